"""The internvl_vtr lmms-eval model: in process (prompts, visuals, loglikelihood = oracle on a video doc,
batches), and end to end through the real `python -m lmms_eval` CLI, offline, on tiny local tasks."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from internvl_testlib import oracle_forward, stage_drops
from lmms_eval.api.instance import Instance
from lmms_scores import check_scores
from PIL import Image

from internvl_vtr.lmms_eval_plugin import InternVLVTR
from internvl_vtr.tiny import demo_image
from internvl_vtr.video_io import VideoError, write_test_video

TASK_DIR = Path(__file__).parent / "data" / "lmms_tiny"


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return str(write_test_video(tmp_path_factory.mktemp("clip") / "clip.mp4", num_frames=9, size=(40, 32)))


def make(tiny_path, args):
    lm = InternVLVTR.create_from_arg_string(f"pretrained={tiny_path},{args}", {"batch_size": None, "device": None})
    return lm


def request(lm, kind, docs, doc_id, second):
    lm.task_dict = {"t": {"test": docs}}
    args = (docs[doc_id]["q"], second, lambda doc: doc["visuals"], doc_id, "t", "test")
    return Instance(kind, args, idx=0, metadata={"task": "t", "doc_id": doc_id, "repeats": 1})


def test_prompts_and_visuals(tiny_path, clip):
    lm = make(tiny_path, "strategy=none,max_patches=2,num_frames=3")
    image = demo_image(64, 64)
    prompt = lm.build_prompt("<image>\nIs it red?", lm.prepare_visuals([image, clip]))
    assert prompt == "<|im_start|>user\n<IMG_CONTEXT>\n<video>\nIs it red?<|im_end|>\n<|im_start|>assistant\n"
    inputs = lm.encode([prompt], [[image, clip]])
    # max_patches=2: a square image stays one tile (no thumbnail); the video gives one tile per frame
    assert (
        inputs["pixel_values"].shape[0] == 1 + 3 and (inputs["input_ids"] == lm.model.config.image_token_id).sum() == 64
    )
    with pytest.raises(ValueError, match="images .PIL. and videos .a file path.; got a int"):
        lm.prepare_visuals([3])
    with pytest.raises(VideoError, match="nowhere.mp4"):
        lm.prepare_visuals(["/nowhere.mp4"])
    saved = Path(clip).with_suffix(".png")  # an image given as a file path is an image, not a video
    image.save(saved)
    (loaded,) = lm.prepare_visuals([str(saved)])
    assert isinstance(loaded, Image.Image) and loaded.size == image.size
    for bad, message in [
        ("max_patches=0", "max_patches=0"),
        ("min_patches=3,max_patches=2", "min_patches=3 > max_patches=2"),
    ]:
        with pytest.raises(ValueError, match=message):
            make(tiny_path, bad)


def test_loglikelihood_on_a_video_doc_equals_the_oracle(tiny_path, stock_models, clip):
    """The context (3 frames + question) is pruned on its own; the continuation is scored on that cache."""
    lm = make(tiny_path, "strategy=fastv,keep_tokens=10,prune_layer=2,num_frames=3")
    docs = {0: {"q": "What moves?", "visuals": [clip]}}
    ((score, greedy),) = lm.loglikelihood([request(lm, "loglikelihood", docs, 0, " yes no")])
    record = lm.model.vtr_last
    assert record.stages[0].image_tokens_before == [48] and record.stages[0].image_tokens_kept == [10]
    visuals = lm.prepare_visuals([clip])
    inputs = lm.encode([lm.build_prompt("What moves?", visuals)], [visuals])
    target = lm.tokenizer(" yes no", add_special_tokens=False, return_tensors="pt")["input_ids"]
    ctx_len = inputs["input_ids"].shape[1]
    full = dict(inputs, input_ids=torch.cat([inputs["input_ids"], target], 1))
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    stages = stage_drops(record, 1, ctx_len, inputs["input_ids"] == lm.model.config.image_token_id)
    logprobs = torch.log_softmax(oracle_forward(stock_models["eager"], full, stages, ctx_len)[0, ctx_len - 1 : -1], -1)
    assert score == pytest.approx(-float(logprobs.gather(1, target[0][:, None]).mean()), abs=1e-4), "the mean NLL"
    assert greedy == bool((logprobs.argmax(-1) == target[0]).all())


def test_batches_mixing_images_and_videos_give_the_single_request_answers(tiny_path, clip):
    docs = {
        0: {"q": "Is it red?", "visuals": [demo_image(64, 64)]},
        1: {"q": "Describe the picture in detail.", "visuals": [demo_image(64, 32)]},
        2: {"q": "What moves?", "visuals": [clip]},
        3: {"q": "Two pictures: what differs?", "visuals": [demo_image(32, 32), demo_image(64, 32)]},
    }
    kwargs = {"max_new_tokens": 4, "temperature": 0, "until": ["\n\n"]}
    answers = []
    for batch in (3, 1):
        lm = make(tiny_path, f"strategy=priortr,keep_tokens=8,prune_layer=2,batch_size={batch},num_frames=3")
        answers.append(lm.generate_until([request(lm, "generate_until", docs, i, kwargs) for i in docs]))
    assert answers[0] == answers[1] and len(answers[0]) == 4


def test_video_methods_run_on_video_docs(tiny_path, clip):
    """The processor's frame_index goes to the model with the rest: EVS (keep_ratio 0.5) keeps half of a 4-frame
    video doc (64 -> 32) in a batch beside an image doc (kept whole: no video), and in loglikelihood."""
    lm = make(tiny_path, "strategy=evs,keep_ratio=0.5,batch_size=2,num_frames=4")
    docs = {0: {"q": "Is it red?", "visuals": [demo_image(64, 64)]}, 1: {"q": "What moves?", "visuals": [clip]}}
    kwargs = {"max_new_tokens": 2, "temperature": 0, "until": ["\n\n"]}
    assert len(lm.generate_until([request(lm, "generate_until", docs, i, kwargs) for i in docs])) == 2
    stage = lm.model.vtr_last.stages[0]
    assert sorted(stage.image_tokens_before) == [64, 80] and sorted(stage.image_tokens_kept) == [32, 80]
    lm.loglikelihood([request(lm, "loglikelihood", docs, 1, " yes")])
    assert lm.model.vtr_last.stages[0].image_tokens_kept == [32]


# ------------------------------------------------------------------------------------------ CLI


def lmms_eval(workdir, model_args, tasks, *options):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(workdir / "hf"))
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "internvl_vtr", "--model_args", model_args]
    cmd += ["--tasks", tasks, "--include_path", str(workdir / "task"), *options]
    return subprocess.run(cmd, cwd=workdir / "task", env=env, capture_output=True, text=True, timeout=600)


def test_cli_end_to_end_images_videos_generation_and_multiple_choice(tmp_path, tiny_path):
    shutil.copytree(TASK_DIR, tmp_path / "task")
    spec = importlib.util.spec_from_file_location("internvl_lmms_tiny_utils", tmp_path / "task" / "utils.py")
    task_utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(task_utils)
    task_utils.make_media(tmp_path / "task")
    out = tmp_path / "results"
    args = f"pretrained={tiny_path},strategy=priortr,keep_tokens=[20,6],prune_layer=[1,3],num_frames=3"
    tasks = "vtr_tiny_qa,vtr_tiny_mc,vtr_tiny_video"
    proc = lmms_eval(tmp_path, args, tasks, "--batch_size", "2", "--output_path", str(out), "--log_samples")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (results_file,) = out.rglob("*_results.json")
    (stats,) = out.rglob("vtr_stats_*.json")
    assert stats.parent == results_file.parent and stats.name.startswith("vtr_stats_priortr_K1-3_keep20-6_")
    results, stats = json.loads(results_file.read_text()), json.loads(stats.read_text())
    for task, docs in (("vtr_tiny_qa", 4), ("vtr_tiny_mc", 4), ("vtr_tiny_video", 2)):
        assert results["n-samples"][task]["effective"] == docs
    generation = [("vtr_tiny_qa", "data.jsonl"), ("vtr_tiny_video", "videos.jsonl")]
    check_scores(results, results_file, make(tiny_path, args), tmp_path / "task", generation, "vtr_tiny_mc")
    # generation: 4 image + 2 video prefills; multiple choice: one per doc (4), for both its options
    assert stats["by_request_type"]["generate_until"]["prefills"] == 6
    assert stats["by_request_type"]["loglikelihood"]["prefills"] == 4
    # visual tokens: square images 2x2 tiles + thumbnail (80), wide 2x1 + thumbnail (48), videos 3 frames (48)
    assert stats["mean_image_tokens"] == pytest.approx((2 * (80 + 80 + 48 + 48) + 2 * 48) / 10)
    kept = [(x["layer"], x["mean_image_tokens_kept"]) for x in stats["per_prune_layer"]]
    assert kept == [(1, 20), (3, 6)]
    assert 0 < stats["prefill_flops_ratio"] < 1


def test_unknown_key_stops_the_cli_with_status_2_naming_the_closest_key(tiny_path, monkeypatch, capsys):
    """In process, as under `python -m lmms_eval` (the exit path itself runs through the CLI in LLaVA's tests)."""
    from internvl_vtr import lmms_eval_compat as compat

    monkeypatch.setattr(compat, "under_lmms_eval_cli", lambda: True)
    with pytest.raises(SystemExit) as stop:
        make(tiny_path, "max_patch=3")
    assert stop.value.code == 2
    assert "unknown model_args key 'max_patch' (did you mean 'max_patches'?)" in capsys.readouterr().err


def test_the_cli_checks_model_args_before_the_task_index(monkeypatch, capsys):
    """`python -m lmms_eval --model internvl_vtr`: this fork's entry point installs the check, with this fork's own
    keys, before lmms-eval indexes its tasks (in process: lmms-eval's own argument parsing and run function)."""
    from lmms_eval.__main__ import cli_evaluate_single, parse_eval_args
    from lmms_eval.tasks import TaskManager

    from internvl_vtr.lmms_eval_base import validate_model_args

    validate_model_args("strategy=fastv,max_patches=6,num_frames=4")  # this fork's own keys
    with pytest.raises(ValueError, match="min_patches=3 > max_patches=2"):
        validate_model_args("min_patches=3,max_patches=2")
    monkeypatch.setattr(TaskManager, "initialize_tasks", lambda *a, **k: pytest.fail("the task index was built"))
    monkeypatch.setattr(
        sys, "argv", ["lmms_eval", "--model", "internvl_vtr", "--model_args", "max_patch=3", "--tasks", "mme"]
    )
    with pytest.raises(SystemExit) as stop:
        cli_evaluate_single(parse_eval_args()[1])
    assert stop.value.code == 2
    assert (
        "internvl_vtr: invalid --model_args: unknown model_args key 'max_patch' (did you mean 'max_patches'?)"
        in capsys.readouterr().err
    )
