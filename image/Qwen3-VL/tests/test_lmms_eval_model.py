"""The qwen3_vl_vtr lmms-eval model in process: images and videos, batching, loglikelihood pruned on the
context, loading keys, bad arguments."""

import importlib
import inspect
import sys

import pytest
import torch
from lmms_eval.api.instance import Instance
from qwen3vl_testlib import oracle_forward, stage_drops, visual_ids

from visual_token_pruning.lmms_eval_plugin import Qwen2_5_VLVTR, Qwen2VLVTR, Qwen3VLVTR
from visual_token_pruning.tiny import demo_image
from visual_token_pruning.video_io import write_test_video

DOCS = {i: {"q": q} for i, q in enumerate(["Is it red?", "What shape is shown in the picture?", "Any text?"])}


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    return str(write_test_video(tmp_path_factory.mktemp("clips") / "long.mp4", num_frames=48, size=(32, 32), fps=8))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return str(write_test_video(tmp_path_factory.mktemp("clips") / "clip.mp4", num_frames=16, size=(32, 32), fps=8))


def make(tiny_path, args, model=Qwen3VLVTR):
    lm = model.create_from_arg_string(f"pretrained={tiny_path},{args}", {"batch_size": None, "device": None})
    lm.task_dict = {"t": {"test": DOCS}}
    return lm


def image_visual(doc):
    return [demo_image(64).rotate(90 * len(doc["q"]))]


def _instance(kind, args, doc_id):
    return Instance(kind, args, idx=0, metadata={"task": "t", "doc_id": doc_id, "repeats": 1})


def gen_request(doc_id, visual_fn=image_visual):
    kwargs = {"max_new_tokens": 4, "temperature": 0, "until": ["\n\n"]}
    return _instance("generate_until", (DOCS[doc_id]["q"], kwargs, visual_fn, doc_id, "t", "test"), doc_id)


def test_images_and_videos_in_batches_give_the_single_request_answers(tiny_path, clip):
    def mixed(doc):  # doc 1: a video; the others an image and a video
        return [clip] if len(doc["q"]) > 20 else [*image_visual(doc), clip]

    requests = [gen_request(i, mixed) for i in DOCS]
    args = "strategy=priortr,keep_tokens=8,prune_layer=2,max_num_frames=4,fps=2"
    batched = make(tiny_path, args + ",batch_size=3")
    answers = batched.generate_until(requests)
    assert answers == make(tiny_path, args + ",batch_size=1").generate_until(requests) and len(answers) == 3
    assert batched.model.vtr_last.stages[0].image_tokens_kept == [8, 8, 8]
    prefill = batched._stats.samples[0]
    assert prefill["stages"][0]["image_kept"] == 8 and prefill["image_tokens"] > 8


def test_loglikelihood_prunes_the_context_and_equals_the_oracle(tiny_path, stock_models):
    lm = make(tiny_path, "strategy=fastv,keep_tokens=6,prune_layer=2")
    request = _instance("loglikelihood", (DOCS[1]["q"], " yes no", image_visual, 1, "t", "test"), 1)
    ((score, _),) = lm.loglikelihood([request])
    record = lm.model.vtr_last
    assert record.stages[0].image_tokens_kept == [6]
    visuals = lm.prepare_visuals(image_visual(DOCS[1]))
    inputs = lm.encode([lm.build_prompt(DOCS[1]["q"], visuals)], [visuals])
    target = lm.tokenizer(" yes no", add_special_tokens=False, return_tensors="pt")["input_ids"]
    ctx_len = inputs["input_ids"].shape[1]
    assert record.original_len == ctx_len, "pruning sees the context only"
    full = dict(inputs, input_ids=torch.cat([inputs["input_ids"], target], 1))
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    visual = torch.isin(inputs["input_ids"], torch.tensor(visual_ids(lm.model.config)))
    logits = oracle_forward(stock_models["eager"], full, stage_drops(record, 1, ctx_len, visual), ctx_len)
    logprobs = torch.log_softmax(logits[0, ctx_len - 1 : -1], -1)
    assert score == pytest.approx(-float(logprobs.gather(1, target[0][:, None]).mean()), abs=1e-4), "the mean NLL"
    # unpruned: the continuation chunk runs on the stock path, given no positions
    ((unpruned, _),) = make(tiny_path, "strategy=none").loglikelihood([request])
    assert unpruned != pytest.approx(score, abs=1e-4)


def test_loading_keys_reach_the_processor(tiny_path):
    lm = make(tiny_path, "strategy=none,min_pixels=1024,max_pixels=2048,max_num_frames=6")
    assert lm.processor.image_processor.size["longest_edge"] == 2048
    assert lm.processor.video_processor.max_frames == 6
    visuals = lm.prepare_visuals([demo_image(128)])
    inputs = lm.encode([lm.build_prompt("Q?", visuals)], [visuals])
    assert int(inputs["image_grid_thw"].prod()) * 16 <= 2048, "max_pixels bounds the image"
    user = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Q?<|im_end|>\n<|im_start|>assistant\n"
    system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"  # lmms-eval's qwen3_vl default
    assert lm.build_prompt("<image>Q?", visuals) == system + user
    assert make(tiny_path, "strategy=none,system_prompt=").build_prompt("<image>Q?", visuals) == user


@pytest.mark.parametrize(
    "args,message",
    [
        ("max_num_frames=0", "max_num_frames=0"),
        ("min_pixels=4096,max_pixels=1024", "min_pixels=4096"),
        ("frames=8", "frames"),
    ],
)
def test_bad_arguments_are_refused_naming_the_key(tiny_path, args, message):
    # (under the lmms-eval CLI the same errors end the process with status 2: lmms_eval_base)
    with pytest.raises(ValueError, match=message):
        make(tiny_path, args)


def test_a_visual_of_another_kind_is_refused(tiny_path):
    lm = make(tiny_path, "strategy=none")
    with pytest.raises(ValueError, match="PIL images and video file paths"):
        lm.prepare_visuals([torch.zeros(3)])
    with pytest.raises(ValueError, match="video file not found"):
        lm.prepare_visuals(["/no/such/video.mp4"])


def test_an_image_file_path_is_an_image_and_task_placeholders_are_dropped(tiny_path, tmp_path):
    lm = make(tiny_path, "strategy=none")
    path = tmp_path / "picture.jpg"
    demo_image(64).save(path)
    ((kind, image),) = lm.prepare_visuals([str(path)])
    assert kind == "image" and image.size == (64, 64)
    prompt = lm.build_prompt("<video>\n<image>\nWhat is it?", [(kind, image)])
    assert "<video>" not in prompt and "<image>" not in prompt and prompt.count("<|vision_start|>") == 1


def test_the_cli_checks_model_args_before_the_task_index(monkeypatch, capsys):
    """`python -m lmms_eval --model qwen3_vl_vtr`: this fork's entry point installs the check, with this fork's own
    keys, before lmms-eval indexes its tasks (in process: lmms-eval's own argument parsing and run function)."""
    from lmms_eval.__main__ import cli_evaluate_single, parse_eval_args
    from lmms_eval.tasks import TaskManager

    from visual_token_pruning.lmms_eval_base import validate_model_args

    validate_model_args("strategy=fastv,max_pixels=1003520,max_num_frames=8,fps=1.5")  # this fork's own keys
    with pytest.raises(ValueError, match="fps=0.0: must be > 0"):
        validate_model_args("fps=0")
    monkeypatch.setattr(TaskManager, "initialize_tasks", lambda *a, **k: pytest.fail("the task index was built"))
    monkeypatch.setattr(
        sys, "argv", ["lmms_eval", "--model", "qwen3_vl_vtr", "--model_args", "max_num_frame=8", "--tasks", "mme"]
    )
    with pytest.raises(SystemExit) as stop:
        cli_evaluate_single(parse_eval_args()[1])
    assert stop.value.code == 2
    assert (
        "qwen3_vl_vtr: invalid --model_args: unknown model_args key 'max_num_frame' (did you mean 'max_num_frames'?)"
        in capsys.readouterr().err
    )


@pytest.mark.parametrize("model,family", [(Qwen2_5_VLVTR, "qwen2_5_vl"), (Qwen2VLVTR, "qwen2_vl")])
def test_qwen2_families_batch_images_and_videos_with_their_counterparts_defaults(
    model, family, family_paths, clip, long_clip
):
    """qwen2_5_vl_vtr / qwen2_vl_vtr: batched answers equal single ones on images + videos, the pixel bounds
    default to lmms-eval's qwen2_5_vl / qwen2_vl values (read from lmms-eval), video frames are sized as
    qwen-vl-utils sizes them, and a video file is sampled at 2 frames per second (or `fps`, at most
    max_num_frames) as qwen-vl-utils does."""
    path = family_paths(family)

    def mixed(doc):
        return [clip] if len(doc["q"]) > 20 else [*image_visual(doc), clip]

    requests = [gen_request(i, mixed) for i in DOCS]
    args = "strategy=fastv,keep_tokens=8,prune_layer=2"
    batched = make(path, args + ",batch_size=3", model)
    answers = batched.generate_until(requests)
    assert answers == make(path, args + ",batch_size=1", model).generate_until(requests) and len(answers) == 3
    assert batched.model.vtr_last.stages[0].image_tokens_kept == [8, 8, 8]
    counterpart = {"qwen2_5_vl": "Qwen2_5_VL", "qwen2_vl": "Qwen2_VL"}[family]
    module = importlib.import_module(f"lmms_eval.models.simple.{family}")
    params = inspect.signature(getattr(module, counterpart).__init__).parameters  # lmms-eval's own defaults
    low, high = params["min_pixels"].default, params["max_pixels"].default
    size = batched.processor.image_processor.size
    assert (size["shortest_edge"], size["longest_edge"]) == (low, high)
    video = batched.processor.video_processor.size  # qwen-vl-utils: within the bounds, at most 768 x 28 x 28
    assert (video["shortest_edge"], video["longest_edge"]) == (low, min(high, 602112))
    visuals = batched.prepare_visuals([long_clip])
    for fps, groups in ((None, 6), (1, 3)):  # 6 s: 12 frames at the default 2 per second, 6 at fps=1
        lm = make(path, "strategy=none" + (f",fps={fps}" if fps else ""), model)
        inputs = lm.encode([lm.build_prompt("Q?", visuals)], [visuals])
        assert inputs["video_grid_thw"][0, 0].tolist() == groups, fps
        if family == "qwen2_5_vl":  # seconds per temporal patch: 2 frames at the sampled fps
            assert inputs["second_per_grid_ts"].tolist() == [2 / (fps or 2)]
    few = make(path, "strategy=none,max_num_frames=4", model)
    assert few.encode([few.build_prompt("Q?", visuals)], [visuals])["video_grid_thw"][0, 0].tolist() == 2


def test_a_checkpoint_of_another_family_names_the_right_model(tiny_path, family_paths):
    with pytest.raises(
        ValueError, match="'qwen3_vl' checkpoint; qwen2_5_vl_vtr takes qwen2_5_vl: use --model qwen3_vl_vtr"
    ):
        make(tiny_path, "strategy=none", Qwen2_5_VLVTR)
    with pytest.raises(ValueError, match="'qwen2_vl' checkpoint; qwen3_vl_vtr .*use --model qwen2_vl_vtr"):
        make(family_paths("qwen2_vl"), "strategy=none")
