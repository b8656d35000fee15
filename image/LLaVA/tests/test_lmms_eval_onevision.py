"""The llava_onevision_vtr lmms-eval model on the tiny LLaVA-OneVision: image and video docs (video files, frames
sampled as lmms-eval's llava_onevision samples them), prompts, loglikelihood, clear errors, and the real CLI."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from lmms_eval.api.instance import Instance
from lmms_scores import check_scores
from vtr_oracle import oracle_forward, stage_drops

from llava.vtr.lmms_eval_plugin import QWEN_SYSTEM, LlavaOnevisionVTR, frame_indices
from llava.vtr.tiny import demo_image
from llava.vtr.video_io import VideoError, write_test_video
from llava_testlib import onevision_embed

ROOT = Path(__file__).parents[3]
TASK_DIR = ROOT / "scripts" / "lmms_tasks" / "vtr_tiny"
# the tiny checkpoint (tests/conftest.py): a square image is 16 + 5 x 6 = 46 tokens, a video frame 2 x 2
IMAGE_TOKENS, FRAME_TOKENS = 46, 4
CLIP_FRAMES = 12


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return str(
        write_test_video(tmp_path_factory.mktemp("ov-video") / "clip.mp4", num_frames=CLIP_FRAMES, size=(48, 32))
    )


def all_frames(path) -> np.ndarray:
    """Every frame of a video file, decoded here with PyAV (independently of the plugin's decoder)."""
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def chatml(user: str) -> str:
    return f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def make(ov_path, args, docs=None):
    lm = LlavaOnevisionVTR.create_from_arg_string(f"pretrained={ov_path},{args}", {"batch_size": None, "device": None})
    lm.task_dict = {"t": {"test": docs or {}}}
    return lm


def request(kind, doc_id, question, continuation=" yes"):
    second = continuation if kind == "loglikelihood" else {"max_new_tokens": 4, "temperature": 0, "until": ["\n\n"]}
    args = (question, second, lambda doc: doc["visuals"], doc_id, "t", "test")
    return Instance(kind, args, idx=0, metadata={"task": "t", "doc_id": doc_id, "repeats": 1})


def mean_nll(model, inputs, continuation: torch.Tensor) -> float:
    """The oracle: one unpruned forward of the stock model over context + continuation."""
    ids = torch.cat([inputs["input_ids"], continuation], 1)
    full = dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        logits = model(**full).logits[0, inputs["input_ids"].shape[1] - 1 : -1].float()
    logprobs = torch.log_softmax(logits, -1)
    return -float(logprobs.gather(1, continuation[0][:, None]).mean())


def test_frame_indices_are_lmms_evals_linspace():
    """np.linspace(0, total - 1, n, dtype=int): first and last frame, evenly spaced, rounded down; a short clip
    repeats frames (lmms-eval's llava_onevision load_video)."""
    assert frame_indices(12, 4) == [0, 3, 7, 11]
    assert frame_indices(100, 5) == [0, 24, 49, 74, 99]
    assert frame_indices(3, 5) == [0, 0, 1, 1, 2]
    assert frame_indices(7, 1) == [0]


def test_video_fps_is_llava_vids_rule_for_llava_video():
    """lmms-eval's llava_vid (LLaVA-Video's official evaluation): one frame every round(fps / video_fps) from the
    first; the linspace rule once that exceeds max_frames_num, or with force_sample."""
    assert frame_indices(600, 64, fps=30.0, video_fps=1) == list(range(0, 600, 30))  # a 20 s clip: 20 frames
    assert frame_indices(3600, 64, fps=30.0, video_fps=1) == frame_indices(3600, 64)  # 120 s: 64, spaced out
    assert frame_indices(600, 64, fps=30.0, video_fps=1, force_sample=True) == frame_indices(600, 64)
    assert frame_indices(10, 64, fps=8.0, video_fps=16) == list(range(10))  # faster than the file: every frame


def test_a_video_doc_at_video_fps_reads_one_frame_a_second(ov_path, clip):
    """The 12-frame, 8 fps clip at video_fps=2: frames 0, 4, 8 (round(8 / 2) = 4), three frames' tokens."""
    lm = make(ov_path, "strategy=none,max_frames_num=64,video_fps=2")
    ((_, frames),) = lm.prepare_visuals([clip])
    assert np.array_equal(frames, all_frames(clip)[[0, 4, 8]])
    for bad, message in (("video_fps=0", "video_fps=0.0: must be > 0"), ("force_sample=true", "only with video_fps")):
        with pytest.raises(ValueError, match=message):
            make(ov_path, bad)


def test_a_video_doc_uses_max_frames_num_frames_and_is_pruned(ov_path, ov_processor, clip):
    docs = {0: {"visuals": [clip]}}
    lm = make(ov_path, "strategy=fastv,keep_tokens=6,prune_layer=1,max_frames_num=4", docs)
    ((kind, frames),) = lm.prepare_visuals([clip])
    assert kind == "video" and np.array_equal(frames, all_frames(clip)[[0, 3, 7, 11]])
    prompt = lm.build_prompt("What happens?", [(kind, frames)])
    assert prompt == chatml("<video>\nWhat happens?")
    inputs = lm.encode([prompt], [[(kind, frames)]])
    assert int((inputs["input_ids"] == lm.model.config.video_token_id).sum()) == 4 * FRAME_TOKENS + 1
    expected = ov_processor(text=[prompt], videos=[all_frames(clip)[[0, 3, 7, 11]]], return_tensors="pt")
    assert torch.equal(inputs["pixel_values_videos"], expected["pixel_values_videos"])
    assert torch.equal(inputs["input_ids"], expected["input_ids"])

    (answer,) = lm.generate_until([request("generate_until", 0, "What happens?")])
    assert isinstance(answer, str)
    stage = lm.model.vtr_last.stages[0]
    assert (stage.layer, stage.image_tokens_before, stage.image_tokens_kept) == (1, [17], [6])
    record = lm.stats_summary()
    assert record["prefills"] == 1 and record["mean_image_tokens"] == 17
    assert record["per_prune_layer"][0]["mean_image_tokens_kept"] == 6


def test_max_frames_num_defaults_to_32_as_in_lmms_eval(ov_path, clip):
    """A 12-frame clip gives 32 frames (repeats), as lmms-eval's llava_onevision reads it: 32 x 4 + 1 tokens."""
    lm = make(ov_path, "strategy=none")
    ((_, frames),) = lm.prepare_visuals([clip])
    assert np.array_equal(frames, all_frames(clip)[frame_indices(CLIP_FRAMES, 32)])
    inputs = lm.encode([lm.build_prompt("Q?", [("video", frames)])], [[("video", frames)]])
    assert int((inputs["input_ids"] == lm.model.config.video_token_id).sum()) == 32 * FRAME_TOKENS + 1


def test_an_image_doc_generates_with_a_method(ov_path, tmp_path):
    image = demo_image(64)
    image.save(tmp_path / "picture.png")
    docs = {0: {"visuals": [image]}, 1: {"visuals": [str(tmp_path / "picture.png")]}}
    lm = make(ov_path, "strategy=priortr,keep_tokens=8,prune_layer=2", docs)
    assert lm.conv_template == "qwen_1_5", "auto: the checkpoint's tokenizer is ChatML"
    assert lm.build_prompt("Is it red?", lm.prepare_visuals([image])) == chatml("<image>\nIs it red?")
    answers = lm.generate_until([request("generate_until", 0, "Is it red?")])
    stage = lm.model.vtr_last.stages[0]
    assert (stage.layer, stage.image_tokens_before, stage.image_tokens_kept) == (2, [IMAGE_TOKENS], [8])
    assert lm.generate_until([request("generate_until", 1, "Is it red?")]) == answers, "an image file path"
    assert lm.stats_summary()["mean_image_tokens"] == IMAGE_TOKENS


def test_images_and_videos_in_one_doc_and_in_one_batch(ov_path, clip):
    """A doc may hold images and videos (placeholders in the doc's order); several images of one doc are base
    views (16 + 1 tokens each, as the stock processor lays out multi-image prompts); a batch of mixed docs
    keeps each sample's own visuals."""
    image = demo_image(64)
    docs = {0: {"visuals": [image, clip]}, 1: {"visuals": [clip]}, 2: {"visuals": [image, image.rotate(90)]}}
    lm = make(ov_path, "strategy=fastv,keep_tokens=5,prune_layer=1,max_frames_num=4,batch_size=3", docs)
    mixed = lm.prepare_visuals(docs[0]["visuals"])
    assert [kind for kind, _ in mixed] == ["image", "video"]
    assert lm.build_prompt("Both?", mixed) == chatml("<image> <video>\nBoth?")
    assert lm.build_prompt("<video> then <image>: both?", mixed) == chatml("<image> then <video>: both?")
    with pytest.raises(ValueError, match="holds 1 <image>/<video> placeholders for 2 visuals"):
        lm.build_prompt("<image> only?", mixed)

    questions = {0: "Both?", 1: "What happens in the video?", 2: "Two pictures?"}
    alone = {}
    for i, q in questions.items():
        one = make(ov_path, "strategy=fastv,keep_tokens=5,prune_layer=1,max_frames_num=4", docs)
        one.generate_until([request("generate_until", i, q)])
        alone[i] = one.model.vtr_last.stages[0].image_tokens_before
    assert alone == {0: [IMAGE_TOKENS + 17], 1: [17], 2: [2 * (16 + 1)]}
    lm.generate_until([request("generate_until", i, q) for i, q in questions.items()])
    stage = lm.model.vtr_last.stages[0]
    assert sorted(stage.image_tokens_before) == sorted(n for (n,) in alone.values()), "each sample's own layout"
    assert stage.image_tokens_kept == [5, 5, 5]


def test_loglikelihood_is_the_oracles_loss_and_keeps_the_generation_tokens(ov_path, ov_processor, ov_stock, clip):
    """A video doc's loss is the mean NLL of the stock model on the expected prompt and frames: unpruned, and
    pruned (the oracle drops the tokens the model reports dropped from layer 1 on, the context alone pruned);
    every option sees the visual tokens that generation keeps."""
    docs = {0: {"visuals": [clip]}}
    prompt = chatml("<video>\nDoes it move?")
    inputs = ov_processor(text=[prompt], videos=[all_frames(clip)[[0, 3, 7, 11]]], return_tensors="pt")
    target = ov_processor.tokenizer(" yes no", add_special_tokens=False, return_tensors="pt")["input_ids"]
    ctx_len = inputs["input_ids"].shape[1]
    full = dict(inputs, input_ids=torch.cat([inputs["input_ids"], target], 1))
    full["attention_mask"] = torch.ones_like(full["input_ids"])

    def oracle(stages, conventions=None) -> float:
        with torch.no_grad():
            logits = oracle_forward(ov_stock["eager"], full, stages, ctx_len, onevision_embed, conventions=conventions)
        logprobs = torch.log_softmax(logits[0, ctx_len - 1 : -1], -1)
        return -float(logprobs.gather(1, target[0][:, None]).mean())

    unpruned = make(ov_path, "strategy=none,max_frames_num=4,attn_implementation=eager", docs)
    ((loss, _),) = unpruned.loglikelihood([request("loglikelihood", 0, "Does it move?", " yes no")])
    assert loss == pytest.approx(oracle([]), abs=1e-6)

    lm = make(ov_path, "strategy=fastv,keep_tokens=2,prune_layer=1,max_frames_num=4,attn_implementation=eager", docs)
    lm.generate_until([request("generate_until", 0, "Does it move?")])
    kept = [lm.model.vtr_last.stages[0].kept_positions[0].tolist()]
    options = (" yes no", " a red sun")
    losses = lm.loglikelihood([request("loglikelihood", 0, "Does it move?", o) for o in options])
    record = lm.model.vtr_last
    kept.append(record.stages[0].kept_positions[0].tolist())
    assert kept[0] == kept[1] and len(kept[0]) == 2
    assert record.original_len == ctx_len, "pruning sees the context only"
    stages = stage_drops(record, 1, ctx_len, inputs["input_ids"] == lm.model.config.video_token_id)
    assert losses[0][0] == pytest.approx(oracle(stages, lm.model.vtr_conventions()), abs=1e-6)
    assert losses[0][0] != pytest.approx(loss, abs=1e-5), "pruning changes what the continuation is scored on"
    assert lm.stats_summary()["prefills"] == 2, "generation + one prefill for both options of the doc"


def test_an_original_llava_video_checkpoint_is_converted_on_load(tmp_path, clip):
    """An original-format release (LLaVA-NeXT's LlavaQwenForCausalLM) loads through the converter: its loss is the
    stock model's with the same weights (given LLaVA-Video's "grid" video layout, a newline after every pooled row);
    it is pruned like a llava-hf checkpoint; llava_vtr names this model."""
    from llava.vtr import wrap
    from llava.vtr.lmms_eval_plugin import LlavaVTR
    from llava.vtr.tiny import build_tiny_original_llava_video

    path, reference = build_tiny_original_llava_video(tmp_path / "original")
    reference.config.mm_newline_position = "grid"
    reference = wrap(reference)
    docs = {0: {"visuals": [clip]}}
    lm = make(str(path), "strategy=none,max_frames_num=4", docs)
    assert lm.conv_template == "qwen_1_5"
    ((loss, _),) = lm.loglikelihood([request("loglikelihood", 0, "Does it move?", " yes no")])
    visuals = lm.prepare_visuals([clip])
    inputs = lm.encode([lm.build_prompt("Does it move?", visuals)], [visuals])
    assert int((inputs["input_ids"] == lm.model.config.video_token_id).sum()) == 4 * (FRAME_TOKENS + 2)
    target = lm.tokenizer(" yes no", add_special_tokens=False, return_tensors="pt")["input_ids"]
    # the rows the conversion adds (`<video>`) are its own: the reference takes them, every other weight is its own
    base_vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    head = reference.get_output_embeddings().weight
    assert head.shape == lm.model.get_output_embeddings().weight.shape
    with torch.no_grad():
        head[base_vocab:] = lm.model.get_output_embeddings().weight[base_vocab:]
    assert loss == pytest.approx(mean_nll(reference.eval(), inputs, target), abs=1e-5)

    pruned = make(str(path), "strategy=fastv,keep_tokens=4,prune_layer=1,max_frames_num=4", docs)
    pruned.generate_until([request("generate_until", 0, "Does it move?")])
    stage = pruned.model.vtr_last.stages[0]
    assert (stage.image_tokens_before, stage.image_tokens_kept) == ([4 * (FRAME_TOKENS + 2)], [4])
    with pytest.raises(ValueError, match="is a LLaVA-OneVision checkpoint: use --model llava_onevision_vtr"):
        LlavaVTR.create_from_arg_string(f"pretrained={path}", {"batch_size": None, "device": None})


def test_hf_conv_template_is_the_processors_chat_template(ov_path, ov_processor):
    lm = make(ov_path, "strategy=none,conv_template=hf")
    image = demo_image(64)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "Q?"}]}]
    expected = ov_processor.apply_chat_template(messages, add_generation_prompt=True)
    assert lm.build_prompt("<image>\nQ?", [("image", image), ("video", None)]) == expected


@pytest.mark.parametrize(
    "args,message",
    [
        ("max_num_frames=4", r"unknown model_args key 'max_num_frames' \(did you mean 'max_frames_num'\?\)"),
        ("max_frames_num=0", "max_frames_num=0: must be >= 1"),
        ("max_frames_num=four", "max_frames_num='four' does not parse as int"),
        (
            "max_frames_num=8,conv_template=vicuna_v1",
            r"conv_template='vicuna_v1': choose one of \['auto', 'qwen_1_5', 'hf'\]",
        ),
    ],
)
def test_bad_model_args_are_clear_errors(ov_path, args, message):
    """Refused when the model is made, and by the fork's check without loading (scripts/vtr_run), which takes
    what either of the fork's models takes: its error is the one of the model that knows every key given."""
    from llava.vtr.lmms_eval_base import validate_model_args

    with pytest.raises(ValueError, match=message):
        make(ov_path, args)
    with pytest.raises(ValueError, match=message):
        validate_model_args(f"strategy=fastv,{args}")


def test_visuals_it_cannot_take_are_named(ov_path, tmp_path):
    lm = make(ov_path, "strategy=none")
    with pytest.raises(VideoError, match=r"video file not found: .*missing\.mp4 \(llava_onevision_vtr takes"):
        lm.prepare_visuals([str(tmp_path / "missing.mp4")])
    with pytest.raises(FileNotFoundError, match=r"image file not found: .*missing\.png"):
        lm.prepare_visuals([str(tmp_path / "missing.png")])
    with pytest.raises(ValueError, match="llava_onevision_vtr takes PIL images, image file paths and video file "
                       "paths; got ndarray"):  # fmt: skip
        lm.prepare_visuals([np.zeros((2, 8, 8, 3), np.uint8)])
    (tmp_path / "notes.txt").write_text("not a video")
    with pytest.raises(VideoError, match=r"cannot read video .*notes\.txt"):
        lm.prepare_visuals([str(tmp_path / "notes.txt")])


def test_each_model_names_the_other_for_its_checkpoints(ov_path, tiny_path):
    from llava.vtr.lmms_eval_plugin import LlavaVTR

    with pytest.raises(
        ValueError, match="is a 'llava' checkpoint; llava_onevision_vtr takes llava_onevision .*llava_vtr"
    ):
        make(tiny_path, "strategy=none")
    with pytest.raises(ValueError, match="is a LLaVA-OneVision checkpoint: use --model llava_onevision_vtr"):
        LlavaVTR.create_from_arg_string(f"pretrained={ov_path}", {"batch_size": None, "device": None})


def test_the_cli_refuses_bad_onevision_args_before_the_task_index(ov_path, monkeypatch, capsys):
    """Through lmms-eval's own parsing and run function: the entry point registers the model and its check."""
    from lmms_eval.__main__ import cli_evaluate_single, parse_eval_args
    from lmms_eval.tasks import TaskManager

    def index(*args, **kwargs):
        raise AssertionError("the task index was built")

    monkeypatch.setattr(TaskManager, "initialize_tasks", index)
    argv = ["--model", "llava_onevision_vtr", "--model_args", f"pretrained={ov_path},max_frames_num=0"]
    monkeypatch.setattr(sys, "argv", ["lmms_eval", *argv, "--tasks", "vtr_tiny_qa"])
    with pytest.raises(SystemExit) as stop:
        cli_evaluate_single(parse_eval_args()[1])
    assert stop.value.code == 2
    assert "llava_onevision_vtr: invalid --model_args: max_frames_num=0: must be >= 1" in capsys.readouterr().err


VIDEO_TASK = """task: vtr_tiny_video
dataset_path: json
dataset_kwargs:
  data_files:
    test: videos.jsonl
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_video
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""


def test_the_cli_runs_image_and_video_tasks(ov_path, tmp_path):
    """`python -m lmms_eval --model llava_onevision_vtr`, offline: the bundled image tasks and a video task of two
    clips, pruned; scores from the model's own answers, the record's visual tokens (images 46, videos 4 x 4 + 1),
    results in a folder named after the settings."""
    task = tmp_path / "task"
    shutil.copytree(TASK_DIR, task)
    videos = [("Does the square move right?", "yes", 12), ("Is the video dark?", "no", 20)]
    lines = []
    for i, (question, answer, frames) in enumerate(videos):
        write_test_video(task / "videos" / f"clip{i}.mp4", num_frames=frames, size=(32, 32))
        lines.append(json.dumps({"video": f"videos/clip{i}.mp4", "question": question, "answer": answer}))
    (task / "videos.jsonl").write_text("\n".join(lines) + "\n")
    (task / "vtr_tiny_video.yaml").write_text(VIDEO_TASK)
    with open(task / "utils.py", "a") as utils:
        utils.write("\n\ndef doc_to_video(doc):\n    return [str(HERE / doc['video'])]\n")

    args = f"pretrained={ov_path},strategy=fastv,keep_tokens=8,prune_layer=2,max_frames_num=4"
    out = tmp_path / "results"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "llava_onevision_vtr", "--model_args", args]
    cmd += ["--tasks", "vtr_tiny_qa,vtr_tiny_mc,vtr_tiny_video", "--include_path", str(task)]
    cmd += ["--batch_size", "2", "--output_path", str(out), "--log_samples"]
    proc = subprocess.run(cmd, cwd=task, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (results_file,) = out.rglob("*_results.json")
    (stats_file,) = out.rglob("vtr_stats_*.json")
    name = results_file.parent.name  # the frames read are a setting of the run: a run with others gets its own folder
    assert results_file.parent == stats_file.parent and name.endswith("__vtr-fastv_K2_keep8__max_frames_num-4")
    assert LlavaOnevisionVTR.folder_name(args.replace("=4", "=8"), "org/ov").endswith("keep8__max_frames_num-8")
    results, stats = json.loads(results_file.read_text()), json.loads(stats_file.read_text())
    assert results["n-samples"]["vtr_tiny_video"]["effective"] == len(videos)

    lm = LlavaOnevisionVTR.create_from_arg_string(f"{args},batch_size=2", {"device": None})
    generation = [("vtr_tiny_qa", "data.jsonl"), ("vtr_tiny_video", "videos.jsonl")]
    check_scores(results, results_file, lm, task, generation, "vtr_tiny_mc")
    # 4 image generations, 2 video generations, one prefill per doc of the multiple choice task
    assert stats["prefills"] == 4 + 2 + 4
    assert stats["mean_image_tokens"] == pytest.approx((8 * 46 + 2 * 17) / 10)
    assert [(x["layer"], x["mean_image_tokens_kept"]) for x in stats["per_prune_layer"]] == [(2, 8)]
    assert stats["model"] == "llava_onevision_vtr"


def test_the_forks_check_takes_either_models_keys():
    """`validate_model_args` does not name the model: llava_vtr's keys and OneVision's both pass."""
    from llava.vtr.lmms_eval_base import validate_model_args

    validate_model_args("strategy=fastv,conv_template=vicuna_v1,vision_tower=openai/clip-vit-large-patch14-336")
    validate_model_args("strategy=fastv,conv_template=qwen_1_5,max_frames_num=8")
    with pytest.raises(ValueError, match="conv_template='qwen_2': choose one of"):
        validate_model_args("conv_template=qwen_2")


def test_the_video_layout_keys_override_the_checkpoints(ov_path, clip):
    """mm_newline_position / mm_spatial_pool_mode, as lmms-eval's llava_vid / llava_onevision take them: the model and
    the processor both follow (here: a newline after each pooled row of each of the 4 frames); bad values are named."""
    docs = {0: {"visuals": [clip]}}
    lm = make(ov_path, "strategy=fastv,keep_tokens=5,prune_layer=1,max_frames_num=4,mm_newline_position=grid", docs)
    lm.generate_until([request("generate_until", 0, "Does it move?")])
    assert lm.model.vtr_last.stages[0].image_tokens_before == [4 * (FRAME_TOKENS + 2)]
    with pytest.raises(ValueError, match="mm_spatial_pool_mode='mean': choose one of"):
        make(ov_path, "mm_spatial_pool_mode=mean")
