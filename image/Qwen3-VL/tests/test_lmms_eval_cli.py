"""End to end: the real `python -m lmms_eval` CLI, offline, on a tiny Qwen3-VL and tiny local tasks (images:
generation and multiple choice; videos: generation from file paths)."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from visual_token_pruning.lmms_eval_plugin import Qwen3VLVTR
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


def run_cli(workdir, tiny_path, name, extra_args):
    out = workdir / "results" / name
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(workdir / "hf"))
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "qwen3_vl_vtr"]
    cmd += ["--model_args", f"pretrained={tiny_path},max_num_frames=4,{extra_args}"]
    cmd += ["--tasks", "vtr_tiny_qa,vtr_tiny_mc,vtr_tiny_video", "--include_path", str(workdir / "task")]
    cmd += ["--batch_size", "2", "--output_path", str(out), "--log_samples"]
    proc = subprocess.run(cmd, cwd=workdir / "task", env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (results,) = out.rglob("*_results.json")
    (stats,) = out.rglob("vtr_stats_*.json")
    assert stats.parent == results.parent, "the efficiency record sits next to the scores"
    return json.loads(results.read_text()), json.loads(stats.read_text()), proc, results


def check_scores(results, results_file, lm, task_dir, generation_tasks, mc_task):
    """The scores are the model's answers, scored (from --log_samples): exact_match is the task's rule on each
    logged answer; each multiple-choice option's logged loss is its mean negative log-likelihood computed in
    process, and acc is 1 where the MORE likely option is the answer (lmms-eval picks the smaller loss)."""
    spec = importlib.util.spec_from_file_location(f"{mc_task}_utils", task_dir / "utils.py")
    task = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(task)

    def samples(name):
        path = results_file.with_name(results_file.name.replace("_results.json", f"_samples_{name}.jsonl"))
        return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])

    def docs(data):
        return [json.loads(line) for line in (task_dir / data).read_text().splitlines()]

    for name, data in generation_tasks:
        logged = samples(name)
        exact = [task.process_results(doc, [s["filtered_resps"]])["exact_match"] for doc, s in zip(docs(data), logged)]
        assert [s["exact_match"] for s in logged] == exact and len(exact) == len(docs(data))
        assert results["results"][name]["exact_match,none"] == pytest.approx(sum(exact) / len(exact))
    lm.task_dict = {"t": {"test": docs("data.jsonl")}}
    logged, acc = samples(mc_task), []
    for i, (doc, sample) in enumerate(zip(docs("data.jsonl"), logged)):
        visuals = lm.doc_visuals(task.doc_to_visual, i, "t", "test")
        inputs = lm.encode([lm.build_prompt(sample["input"], visuals)], [visuals])
        likelihood = []
        for choice in ("yes", "no"):
            target = lm.tokenizer(f" {choice}", add_special_tokens=False, return_tensors="pt")["input_ids"]
            logprobs = lm.continuation_logprobs(inputs, target.to(lm.device))
            likelihood.append(float(logprobs.gather(1, target[0][:, None].to(lm.device)).mean()))
        losses = [float(loss) for loss, _ in sample["filtered_resps"]]
        assert losses == pytest.approx([-x for x in likelihood], abs=1e-4), "each option's loss: its mean NLL"
        acc.append(float(("yes", "no")[likelihood.index(max(likelihood))] == doc["answer"]))
    assert [s["acc"] for s in logged] == acc and len(acc) == len(docs("data.jsonl"))
    assert results["results"][mc_task]["acc,none"] == pytest.approx(sum(acc) / len(acc))


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
