"""End to end: the real `python -m lmms_eval` CLI, offline, on a tiny Qwen3-VL and tiny local tasks (images:
generation and multiple choice; videos: generation from file paths), and on a tiny Qwen3.5 (images)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from lmms_scores import check_scores

from visual_token_pruning.lmms_eval_plugin import Qwen3_5VTR, Qwen3VLVTR
from visual_token_pruning.video_io import write_test_video

TASK_DIR = Path(__file__).parent / "data" / "lmms_tiny"
IMAGE_DOCS, VIDEO_DOCS = 4, 2


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms")
    shutil.copytree(TASK_DIR, root / "task")
    for i in range(VIDEO_DOCS):
        write_test_video(root / "task" / "videos" / f"clip{i}.mp4", num_frames=12 + 4 * i, size=(32, 32), fps=8)
    return root


def run_cli(workdir, tiny_path, name, extra_args, model="qwen3_vl_vtr", tasks="vtr_tiny_qa,vtr_tiny_mc,vtr_tiny_video"):
    out = workdir / "results" / name
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(workdir / "hf"), OMP_NUM_THREADS="1"
    )
    cmd = [sys.executable, "-m", "lmms_eval", "--model", model]
    cmd += ["--model_args", f"pretrained={tiny_path},max_num_frames=4,{extra_args}"]
    cmd += ["--tasks", tasks, "--include_path", str(workdir / "task")]
    cmd += ["--batch_size", "2", "--output_path", str(out), "--log_samples"]
    proc = subprocess.run(cmd, cwd=workdir / "task", env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (results,) = out.rglob("*_results.json")
    (stats,) = out.rglob("vtr_stats_*.json")
    assert stats.parent == results.parent, "the efficiency record sits next to the scores"
    return json.loads(results.read_text()), json.loads(stats.read_text()), proc, results


def test_a_pruned_run_over_image_and_video_tasks(workdir, tiny_path):
    args = "strategy=fastv,keep_tokens=8,prune_layer=2"
    results, stats, proc, results_file = run_cli(workdir, tiny_path, "fastv", args)
    assert results["n-samples"]["vtr_tiny_qa"]["effective"] == IMAGE_DOCS
    assert results["n-samples"]["vtr_tiny_video"]["effective"] == VIDEO_DOCS
    lm = Qwen3VLVTR.create_from_arg_string(f"pretrained={tiny_path},max_num_frames=4,{args}", {"device": None})
    generation = [("vtr_tiny_qa", "data.jsonl"), ("vtr_tiny_video", "videos.jsonl")]
    check_scores(results, results_file, lm, workdir / "task", generation, "vtr_tiny_mc")
    # one prefill per generation (4 images + 2 videos) and per (doc, choice) of the multiple choice task
    assert stats["prefills"] == IMAGE_DOCS + VIDEO_DOCS + IMAGE_DOCS  # multiple choice: one prefill per doc
    (layer,) = stats["per_prune_layer"]
    assert layer["layer"] == 2 and layer["mean_image_tokens_kept"] == 8
    assert 0 < stats["prefill_flops_ratio"] < 1
    assert proc.stdout.count("torchvision is unavailable") + proc.stderr.count("torchvision is unavailable") == 1


def test_qwen3_5_on_image_tasks(workdir, family_paths):
    """qwen3_5_vtr's entry point on a hybrid decoder: answers and multiple-choice losses are the model's own (the
    options scored on one pruned cache whose recurrent states are put back after each), FastV at layer 4 scored
    from the full-attention layer 2, thinking off named in the results folder."""
    path = family_paths("qwen3_5")
    args = "strategy=fastv,keep_tokens=8,prune_layer=4,enable_thinking=false"
    results, stats, _, results_file = run_cli(workdir, path, "qwen3_5", args, "qwen3_5_vtr", "vtr_tiny_qa,vtr_tiny_mc")
    assert "__enable_thinking-False" in results_file.parent.name
    lm = Qwen3_5VTR.create_from_arg_string(f"pretrained={path},max_num_frames=4,{args}", {"device": None})
    check_scores(results, results_file, lm, workdir / "task", [("vtr_tiny_qa", "data.jsonl")], "vtr_tiny_mc")
    assert stats["prefills"] == 2 * IMAGE_DOCS  # one per generation, one per multiple-choice doc
    (layer,) = stats["per_prune_layer"]
    assert layer["layer"] == 4 and layer["mean_image_tokens_kept"] == 8 and 0 < stats["prefill_flops_ratio"] < 1
