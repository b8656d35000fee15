"""scripts/vtr_run: --list/--describe/--dry-run, a real sweep on tiny models and a tiny task, failures,
resume, and two processes giving the metrics of one."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "vtr_run"
TASK = ROOT / "image" / "LLaVA" / "tests" / "data" / "lmms_tiny"


def vtr_run(*args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=900
    )


def script():
    """scripts/vtr_run as a module (it has no .py suffix), for the checks that run nothing."""
    import importlib.machinery
    import importlib.util

    loader = importlib.machinery.SourceFileLoader("vtr_run_script", str(SCRIPT))
    if "vtr_run_script" not in sys.modules:
        module = importlib.util.module_from_spec(importlib.util.spec_from_loader("vtr_run_script", loader))
        sys.modules["vtr_run_script"] = module  # dataclasses look their module up there
        loader.exec_module(module)
    return sys.modules["vtr_run_script"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from llava.vtr.tiny import build_tiny_llava
    from visual_token_pruning.tiny import build_tiny_qwen3_vl

    root = tmp_path_factory.mktemp("vtr_run")
    shutil.copytree(TASK, root / "task")
    os.environ.setdefault("HF_HOME", str(root / "hf"))
    return dict(
        root=root, llava15=str(build_tiny_llava(root / "llava15")), qwen=str(build_tiny_qwen3_vl(root / "qwen"))
    )


def common(tiny, output):
    task = str(tiny["root"] / "task")
    return ["--tasks", "vtr_tiny_qa,vtr_tiny_mc", "--include-path", task, "--workdir", task, "--limit", "2",
            "--batch-size", "2", "--output", str(output)]  # fmt: skip


def test_list_and_describe_teach_what_is_there():
    listing = vtr_run("--list")
    assert listing.returncode == 0 and "| `pdrop` | yes | yes |" in listing.stdout
    described = vtr_run("--describe", "llava", "clse")
    assert described.returncode == 0
    assert "CLSE" in described.stdout and "clse_cutoff" in described.stdout and "keep_tokens" in described.stdout
    assert (
        "-m lmms_eval --model llava_vtr --model_args pretrained=llava-hf/llava-1.5-7b-hf,strategy=clse"
        in described.stdout
    )
    assert "--list" in vtr_run("--help").stdout


def test_dry_run_prints_the_sweep_with_baseline_and_data_parallel_launch(tmp_path):
    proc = vtr_run("--method", "fastv,pdrop", "--keep-tokens", "64,16", "--tasks", "mme", "--gpus", "4",
                   "--param", "query_aggregation=question", "--output", str(tmp_path), "--dry-run")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 + 2 * 2
    assert all("-m torch.distributed.run --nproc_per_node 4 -m lmms_eval --model llava_vtr" in line for line in lines)
    assert "strategy=none" in lines[0]
    assert "strategy=pdrop,keep_tokens=16,query_aggregation=question" in lines[-1]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--method", "fastvv"], "unknown method 'fastvv'"),
        (["--backbone", "qwen"], "unknown backbone 'qwen'"),
        (["--param", "keep_ratio=3"], "VTRConfig.keep_ratio=3.0 is invalid"),
        (["--param", "nonsense=1"], "unknown model_args key 'nonsense'"),
        (["--backbone", "videollava", "--method", "fastv"], "needs --video-dir, --questions, --answers"),
        (["--backbone", "llava,qwen3vl", "--pretrained", "some/ckpt"], "as BACKBONE=PATH"),
    ],
)
def test_bad_requests_fail_before_running_anything(args, message, tmp_path, capsys):
    assert script().main([*args, "--output", str(tmp_path)]) == 2  # in process: nothing is started anyway
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_sweep_over_two_methods_two_budgets_and_two_backbones(tiny, tmp_path):
    out = tmp_path / "sweep"
    args = ["--backbone", "llava,qwen3vl", "--method", "fastv,random", "--keep-tokens", "8,4", "--prune-layer", "2"]
    args += ["--pretrained", f"llava={tiny['llava15']},qwen3vl={tiny['qwen']}", *common(tiny, out)]
    proc = vtr_run(*args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert len(rows) == 2 * (1 + 2 * 2)
    for row in rows:
        assert row["error"] == "" and float(row["vtr_tiny_mc:acc"]) >= 0 and row["vtr_tiny_qa:exact_match"] != ""
        if row["method"] == "none":
            assert row["kept_per_stage"] == "all" and float(row["measured_speedup"]) == 1.0
        else:
            kept = int(row["budget"].split("=")[1])
            assert row["kept_per_stage"] == f"{kept}@L2" and float(row["final_kept"]) == kept
            assert 0 < float(row["flops_ratio"]) < 1 and float(row["measured_speedup"]) > 0
    assert {(row["backbone"], row["pretrained"]) for row in rows} == {
        ("llava", tiny["llava15"]),
        ("qwen3vl", tiny["qwen"]),
    }
    table = (out / "summary.md").read_text()
    assert table.startswith("| backbone | pretrained | method | budget |") and table.count("\n") == 2 + len(rows)
    from PIL import Image

    assert Image.open(out / "summary.png").size == (720, 440)

    again = vtr_run(*args)  # a rerun finds every run finished
    assert again.returncode == 0 and again.stdout.count("done before, skipped") == len(rows)


def test_a_failing_run_is_a_row_and_the_sweep_goes_on_and_resumes(tiny, tmp_path):
    out = tmp_path / "failing"
    args = [
        "--method",
        "fastv",
        "--keep-tokens",
        "8",
        "--no-baseline",
        "--pretrained",
        f"{tmp_path}/missing,{tiny['llava15']}",
    ]
    proc = vtr_run(*args, *common(tiny, out))
    assert proc.returncode == 1 and "1 of 2 runs failed" in proc.stderr
    rows = {row["pretrained"]: row for row in csv.DictReader(open(out / "summary.csv"))}
    assert rows[f"{tmp_path}/missing"]["error"].startswith("exit ")
    assert rows[tiny["llava15"]]["error"] == "" and rows[tiny["llava15"]]["final_kept"] == "8.0"
    again = vtr_run(*args, *common(tiny, out))
    assert again.stdout.count("done before, skipped") == 1 and "running" in again.stdout  # only the failed one reruns
    # another command (a different --param) never reuses those results
    good = args[:-1] + [tiny["llava15"]]
    changed = vtr_run(*good, "--param", "query_aggregation=question", *common(tiny, out))
    assert "done before, skipped" not in changed.stdout and changed.returncode == 0
    rows = {row["pretrained"]: row for row in csv.DictReader(open(out / "summary.csv"))}
    assert rows[tiny["llava15"]]["error"] == ""


def test_two_processes_give_the_metrics_of_one_and_one_merged_record(tiny, tmp_path):
    results = {}
    for gpus in (1, 2):
        out = tmp_path / f"p{gpus}"
        proc = vtr_run("--method", "fastv", "--keep-tokens", "8", "--no-baseline", "--gpus", str(gpus),
                       "--pretrained", tiny["llava15"], *common(tiny, out))  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        (stats,) = (out / "runs").rglob("vtr_stats_*.json")
        record = json.loads(stats.read_text())
        (row,) = list(csv.DictReader(open(out / "summary.csv")))
        results[gpus] = ({k: v for k, v in row.items() if ":" in k}, record)
    assert results[1][0] == results[2][0], "same metrics"
    assert results[2][1]["processes_merged"] == 2 and results[2][1]["prefills"] == results[1][1]["prefills"]


@pytest.fixture(scope="module")
def video_qa(tmp_path_factory):
    """A tiny Video-LLaVA and a 3-question video QA set over 2 generated videos."""
    from videollava.vtr.tiny import build_tiny_video_llava
    from videollava.vtr.video_io import write_test_video

    root = tmp_path_factory.mktemp("video_qa")
    for name in ("v_one", "two"):
        write_test_video(root / "videos" / f"{name}.mp4", num_frames=12, size=(48, 40))
    items = [("one", "what moves", "square"), ("one", "is it bright", "yes"), ("two", "what color", "red")]
    questions = [dict(question_id=f"q{i}", video_name=v, question=q) for i, (v, q, _) in enumerate(items)]
    answers = [dict(question_id=f"q{i}", answer=a) for i, (_, _, a) in enumerate(items)]
    (root / "q.json").write_text(json.dumps(questions))
    (root / "a.json").write_text(json.dumps(answers))
    model = build_tiny_video_llava(root / "model")
    data = ["--video-dir", str(root / "videos"), "--questions", str(root / "q.json"), "--answers", str(root / "a.json")]
    return dict(model=str(model), data=data)


def test_a_video_qa_sweep_runs_the_native_runner_and_scores_it(video_qa, tmp_path):
    out = tmp_path / "video"
    args = ["--backbone", "videollava", "--pretrained", video_qa["model"], "--method", "fastv", "--keep-tokens", "8"]
    args += ["--prune-layer", "1", *video_qa["data"], "--output", str(out)]
    proc = vtr_run(*args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {row["method"]: row for row in csv.DictReader(open(out / "summary.csv"))}
    assert set(rows) == {"none", "fastv"}
    for row in rows.values():
        assert row["error"] == "" and 0 <= float(row["video_qa:exact_match"]) <= 1
    assert rows["fastv"]["kept_per_stage"] == "8@L1" and float(rows["fastv"]["final_kept"]) == 8
    assert rows["none"]["kept_per_stage"] == "all" and 0 < float(rows["fastv"]["flops_ratio"]) < 1
    answers = (out / "runs").rglob("answers.jsonl")
    assert all(len(path.read_text().splitlines()) == 3 for path in answers)
    again = vtr_run(*args)
    assert again.returncode == 0 and again.stdout.count("done before, skipped") == 2
