"""End to end: the real `python -m lmms_eval` CLI, offline, on a tiny LLaVA and a tiny local task."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TASK_DIR = Path(__file__).parent / "data" / "lmms_tiny"
DOCS = 4  # questions in data.jsonl


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms")
    shutil.copytree(TASK_DIR, root / "task")
    return root


def lmms_eval(workdir, model_args, tasks, *options):
    """Run the real `python -m lmms_eval` CLI offline with `--model llava_vtr`; returns the process."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(workdir / "hf"))
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "llava_vtr", "--model_args", model_args]
    cmd += ["--tasks", tasks, "--include_path", str(workdir / "task"), *options]
    return subprocess.run(cmd, cwd=workdir / "task", env=env, capture_output=True, text=True, timeout=600)


def run_cli(workdir, tiny_path, name, extra_args):
    """One evaluation of both tiny tasks through the shared response cache; returns (results, stats, stats file name)."""
    out = workdir / "results" / name
    proc = lmms_eval(
        workdir,
        f"pretrained={tiny_path},{extra_args}",
        "vtr_tiny_qa,vtr_tiny_mc",
        "--batch_size", "2", "--output_path", str(out), "--use_cache", str(workdir / "response-cache"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (results,) = out.rglob("*_results.json")
    (stats,) = out.rglob("vtr_stats_*.json")
    assert stats.parent == results.parent, "the efficiency record sits next to the scores"
    tag = stats.name.removeprefix("vtr_stats_").rsplit("_", 2)[0]
    assert results.parent.name.endswith(f"__vtr-{tag}"), "the results folder names the VTR settings"
    return json.loads(results.read_text()), json.loads(stats.read_text()), stats.name


def check_scores(results):
    qa = results["results"]["vtr_tiny_qa"]["exact_match,none"]
    mc = results["results"]["vtr_tiny_mc"]["acc,none"]
    assert 0.0 <= qa <= 1.0 and 0.0 <= mc <= 1.0
    assert results["n-samples"]["vtr_tiny_qa"]["effective"] == DOCS


# generate_until: one prefill per doc; multiple_choice: one per (doc, choice) = 2 per doc
PREFILLS = DOCS + 2 * DOCS


def test_unpruned_baseline(workdir, tiny_path):
    results, stats, name = run_cli(workdir, tiny_path, "none", "strategy=none")
    check_scores(results)
    assert name.startswith("vtr_stats_unpruned_")
    assert stats["prefills"] == PREFILLS
    assert stats["per_prune_layer"] == [] and stats["prefill_flops_ratio"] == 1.0
    assert stats["mean_image_tokens"] == 64


@pytest.mark.parametrize(
    "strategy,args,tag",
    [
        ("fastv", "keep_tokens=8,prune_layer=2", "fastv_K2_keep8"),
        (
            "priortr",
            "keep_tokens=[16,4],prune_layer=[1,3],query_aggregation=question",
            "priortr_K1-3_keep16-4_qquestion",
        ),
        ("random", "keep_ratio=0.25,prune_layer=3;", "random_K3_ratio0.25_seed0"),
    ],
)
def test_each_strategy_records_what_it_kept(workdir, tiny_path, strategy, args, tag):
    results, stats, name = run_cli(workdir, tiny_path, strategy, f"strategy={strategy},{args}")
    check_scores(results)
    assert name.startswith(f"vtr_stats_{tag}_")
    assert f"strategy={strategy}" in results["config"]["model_args"]
    # every request ran through the model: nothing was served from the unpruned run's response cache
    assert stats["prefills"] == PREFILLS
    layers = stats["per_prune_layer"]
    if strategy == "priortr":
        assert [(x["layer"], x["mean_image_tokens_in"], x["mean_image_tokens_kept"]) for x in layers] == [
            (1, 64, 16),
            (3, 16, 4),
        ]
    else:
        kept = 8 if strategy == "fastv" else 16
        assert [(x["mean_image_tokens_in"], x["mean_image_tokens_kept"]) for x in layers] == [(64, kept)]
    assert 0 < stats["prefill_flops_ratio"] < 1
    assert stats["mean_equivalent_tokens"] < stats["mean_seq_len"]
    assert stats["mean_prefill_ms"] > 0


def test_same_settings_are_served_from_the_response_cache(workdir, tiny_path):
    """The cache is live (so the no-reuse checks above mean something): a repeat run computes nothing."""
    _, stats, _ = run_cli(workdir, tiny_path, "fastv-again", "strategy=fastv,keep_tokens=8,prune_layer=2")
    assert stats["prefills"] == 0


def test_unknown_model_arg_fails_the_cli_with_the_valid_keys(workdir, tiny_path):
    proc = lmms_eval(workdir, f"pretrained={tiny_path},keep_token=64", "vtr_tiny_qa")
    output = proc.stdout + proc.stderr
    # lmms-eval 0.7.3 logs a failed run and still exits 0; the run must stop before evaluating anything
    assert "| Tasks" not in output and "Running generate_until requests" not in output
    assert "unknown model_args key 'keep_token' (did you mean 'keep_tokens'?)" in output
    assert "valid keys:" in output
