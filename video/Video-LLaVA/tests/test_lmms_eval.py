"""The video_llava_vtr lmms-eval model: in process (prompts, visuals, batching, loglikelihood against the oracle)
and once through the real `python -m lmms_eval` CLI, offline, on a tiny local video task."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lmms_eval.api.instance import Instance
from lmms_scores import check_scores
from videollava_testlib import oracle_forward, stage_drops, visual_mask

from videollava.vtr.lmms_eval_plugin import VideoLlavaVTR
from videollava.vtr.tiny import demo_frames

TASK_DIR = Path(__file__).parent / "data" / "lmms_video_tiny"
DOCS = 4  # questions in data.jsonl
QUESTIONS = {0: "What happens in the video?", 1: "Is there a ball?", 2: "Describe the video and the picture."}


@pytest.fixture(scope="module")
def video_path(video_files):
    return str(video_files[0])


def make(tiny_path, args):
    lm = VideoLlavaVTR.create_from_arg_string(f"pretrained={tiny_path},{args}", {"batch_size": None, "device": None})
    lm.task_dict = {"t": {"test": {i: {"q": q} for i, q in QUESTIONS.items()}}}
    return lm


def request(kind, doc_id, visual_fn, second):
    args = (QUESTIONS[doc_id], second, visual_fn, doc_id, "t", "test")
    return Instance(kind, args, idx=0, metadata={"task": "t", "doc_id": doc_id, "repeats": 1})


def test_prompt_puts_each_visual_on_its_own_line(tiny_path, video_path):
    from videollava.vtr.prompts import CONV_SYSTEM

    video = make(tiny_path, "strategy=none").prepare_visuals([video_path])
    default = make(tiny_path, "strategy=none").build_prompt("What happens?", video)
    assert default == f"{CONV_SYSTEM['llava_v1']} USER: <video>\nWhat happens? ASSISTANT:", "llava_v1 by default"
    lm = make(tiny_path, "strategy=none,conv_mode=plain")
    assert lm.build_prompt("What happens?", video) == "USER: <video>\nWhat happens? ASSISTANT:"
    both = lm.prepare_visuals([video_path, demo_frames(1, 40)[0]])
    assert [kind for kind, _ in both] == ["video", "image"]
    assert lm.build_prompt("Same?", both) == "USER: <video>\n<image>\nSame? ASSISTANT:"
    assert lm.build_prompt("<video>\nWhat happens?", video) == "USER: <video>\nWhat happens? ASSISTANT:"


def test_visuals_video_paths_images_and_num_frames(tiny_path, video_path, tmp_path):
    from PIL import Image

    lm = make(tiny_path, "strategy=none,num_frames=4,conv_mode=plain")
    png = tmp_path / "x.png"
    Image.fromarray(demo_frames(1, 40)[0]).save(png)
    visuals = lm.prepare_visuals([video_path, Image.open(png), str(png)])
    assert [kind for kind, _ in visuals] == ["video", "image", "image"]
    assert visuals[0][1].shape[0] == 4, "num_frames frames per video"
    assert lm.build_prompt("Q?", visuals) == "USER: <video>\n<image>\n<image>\nQ? ASSISTANT:"
    with pytest.raises(ValueError, match="video paths and images"):
        lm.prepare_visuals([3.5])
    with pytest.raises(ValueError, match="not found"):
        lm.prepare_visuals([str(tmp_path / "missing.mp4")])
    with pytest.raises(ValueError, match="num_frames=0"):
        make(tiny_path, "num_frames=0")
    with pytest.raises(ValueError, match="unknown model_args key 'num_frame'"):
        make(tiny_path, "num_frame=4")


def test_loglikelihood_prunes_the_context_and_equals_the_oracle(tiny_path, stock_models, video_path, image):
    lm = make(tiny_path, "strategy=fastv,keep_tokens=30,prune_layer=2")

    def visual_fn(doc):
        return [video_path, image]

    ((score, greedy),) = lm.loglikelihood([request("loglikelihood", 2, visual_fn, " yes no")])
    record = lm.model.vtr_last
    assert record.stages[0].image_tokens_before == [136 + 16] and record.stages[0].image_tokens_kept == [30]
    visuals = lm.prepare_visuals(visual_fn(None))
    inputs = lm.encode([lm.build_prompt(QUESTIONS[2], visuals)], [visuals])
    target = lm.tokenizer(" yes no", add_special_tokens=False, return_tensors="pt")["input_ids"]
    ctx_len = inputs["input_ids"].shape[1]
    assert record.original_len == ctx_len, "pruning sees the context only"
    full = dict(inputs, input_ids=torch.cat([inputs["input_ids"], target], 1))
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    stages = stage_drops(record, 1, ctx_len, visual_mask(stock_models["eager"], inputs))
    logits = oracle_forward(stock_models["eager"], full, stages, ctx_len)
    logprobs = torch.log_softmax(logits[0, ctx_len - 1 : -1], -1)
    assert score == pytest.approx(-float(logprobs.gather(1, target[0][:, None]).mean()), abs=1e-4), "the mean NLL"
    assert greedy == bool((logprobs.argmax(-1) == target[0]).all())


def test_generate_until_batches_give_the_single_request_answers(tiny_path, video_files):
    def visual_fn(doc):
        return [str(video_files[len(doc["q"]) % 2])]

    gen = {"max_new_tokens": 4, "temperature": 0, "until": ["\n\n"]}
    requests = [request("generate_until", i, visual_fn, gen) for i in QUESTIONS]
    batched = make(tiny_path, "strategy=priortr,keep_tokens=20,prune_layer=2,batch_size=3")
    answers = batched.generate_until(requests)
    assert batched.model.vtr_last.stages[0].image_tokens_kept == [20, 20, 20], "one batch of three"
    single = make(tiny_path, "strategy=priortr,keep_tokens=20,prune_layer=2,batch_size=1").generate_until(requests)
    assert answers == single and len(answers) == 3
    stats = batched.stats_summary()
    assert stats["prefills"] == 3 and stats["mean_image_tokens"] == 136
    assert stats["per_prune_layer"][0]["mean_image_tokens_kept"] == 20 and 0 < stats["prefill_flops_ratio"] < 1


# ------------------------------------------------------------------------------------------ the real CLI


def test_the_lmms_eval_cli_runs_a_video_task_with_pruning(tiny_path, tmp_path):
    """One run (each costs a fresh interpreter): generation and multiple choice, batch 2, videos given as paths,
    one doc with a video and an image; the efficiency record sits beside the scores."""
    shutil.copytree(TASK_DIR, tmp_path / "task")
    out = tmp_path / "results"
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1"
    )
    args = f"pretrained={tiny_path},strategy=fastv,keep_tokens=40,prune_layer=2,num_frames=8"
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "video_llava_vtr", "--model_args", args]
    cmd += ["--tasks", "vtr_video_tiny_qa,vtr_video_tiny_mc", "--include_path", str(tmp_path / "task")]
    cmd += ["--batch_size", "2", "--output_path", str(out), "--log_samples"]
    proc = subprocess.run(cmd, cwd=tmp_path / "task", env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (results_file,) = out.rglob("*_results.json")
    (stats,) = out.rglob("vtr_stats_*.json")
    assert stats.parent == results_file.parent and results_file.parent.name.endswith("__vtr-fastv_K2_keep40")
    results, stats = json.loads(results_file.read_text()), json.loads(stats.read_text())
    assert results["n-samples"]["vtr_video_tiny_qa"]["effective"] == DOCS
    lm = make(tiny_path, args.removeprefix(f"pretrained={tiny_path},"))
    check_scores(
        results, results_file, lm, tmp_path / "task", [("vtr_video_tiny_qa", "data.jsonl")], "vtr_video_tiny_mc"
    )
    assert stats["prefills"] == DOCS + DOCS  # one per generation, one per doc for all its choices
    assert stats["mean_image_tokens"] == 136 + 16 * 2 / DOCS  # every doc a video, two with a picture too
    assert [(x["layer"], x["mean_image_tokens_kept"]) for x in stats["per_prune_layer"]] == [(2, 40)]
    assert stats["by_request_type"]["loglikelihood"]["prefills"] == DOCS


def test_the_cli_checks_model_args_before_the_task_index(monkeypatch, capsys):
    """`python -m lmms_eval --model video_llava_vtr`: this fork's entry point installs the check, with this fork's own
    keys, before lmms-eval indexes its tasks (in process: lmms-eval's own argument parsing and run function)."""
    from lmms_eval.__main__ import cli_evaluate_single, parse_eval_args
    from lmms_eval.tasks import TaskManager

    from videollava.vtr.lmms_eval_base import validate_model_args

    validate_model_args("strategy=fastv,num_frames=4,conv_mode=plain")  # this fork's own keys
    with pytest.raises(ValueError, match="conv_mode='vicuna': choose one of"):
        validate_model_args("conv_mode=vicuna")
    monkeypatch.setattr(TaskManager, "initialize_tasks", lambda *a, **k: pytest.fail("the task index was built"))
    monkeypatch.setattr(
        sys, "argv", ["lmms_eval", "--model", "video_llava_vtr", "--model_args", "num_frame=4", "--tasks", "mme"]
    )
    with pytest.raises(SystemExit) as stop:
        cli_evaluate_single(parse_eval_args()[1])
    assert stop.value.code == 2
    assert (
        "video_llava_vtr: invalid --model_args: unknown model_args key 'num_frame' (did you mean 'num_frames'?)"
        in capsys.readouterr().err
    )
