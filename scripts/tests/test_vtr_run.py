"""scripts/vtr_run: --list/--describe/--dry-run, a real sweep on tiny models and a tiny task, failures,
resume, two processes giving the metrics of one; with a fake lmms-eval: run names and summary columns for
every setting, nothing finished deleted or mixed, the output lock, and stopping a sweep."""

import csv
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "vtr_run"
TASK = ROOT / "scripts" / "lmms_tasks" / "vtr_tiny"


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
    assert listing.returncode == 0
    families = list(script().forks.load().families)  # every model family of forks.toml, in its order
    assert families[:2] == ["llava", "llava-next"] and {"internvl", "qwen3vl", "videollava"} <= set(families)
    assert "| method \\ --backbone | " + " | ".join(families) + " |" in listing.stdout
    assert "| `pdrop` |" + " yes |" * len(families) in listing.stdout
    lines = {line.split()[0]: line for line in listing.stdout.splitlines() if line.strip()}
    assert "LLaVA-1.5" in lines["llava"] and "LLaVA-1.6" not in lines["llava"]  # each family's own models
    assert "llava-hf/llava-1.5-7b-hf" in lines["llava"]
    assert "llava-hf/llava-v1.6-vicuna-7b-hf" in lines["llava-next"] and "lmms-eval" in lines["llava-next"]
    assert "Qwen3-VL, Qwen3-VL-MoE" in lines["qwen3vl"] and "Qwen2.5-VL" not in lines["qwen3vl"]
    assert "Qwen2.5-VL" in lines["qwen2.5vl"] and "Qwen/Qwen2.5-VL-7B-Instruct" in lines["qwen2.5vl"]
    assert "qwen2vl" in lines and "video QA" in lines["videollava"]
    assert not hasattr(script(), "available")  # every fork has its adapters: no "no adapter yet" path left
    described = vtr_run("--describe", "llava", "clse")
    assert described.returncode == 0
    assert "CLSE" in described.stdout and "clse_cutoff" in described.stdout and "keep_tokens" in described.stdout
    assert (
        "-m lmms_eval --model llava_vtr --model_args pretrained=llava-hf/llava-1.5-7b-hf,strategy=clse"
        in described.stdout
    )
    assert "--list" in vtr_run("--help").stdout


def test_a_family_added_to_forks_toml_is_a_backbone_and_a_broken_registry_is_one_line(tmp_path, capsys, monkeypatch):
    """One [family.*] block in forks.toml: a --backbone with its lmms-eval model and default checkpoint."""
    forks = script().forks
    registry = forks.load()
    repo = tmp_path / "repo"
    for folder in ("image", "video"):
        (repo / folder).parent.mkdir(exist_ok=True)
        (repo / folder).symlink_to(registry.path.parent / folder)
    block = '\n[family.llava-13b]\nfork = "llava"\nrunner = "lmms-eval"\nlmms_model = "llava_vtr"\n'
    block += 'checkpoint = "llava-hf/llava-1.5-13b-hf"\nmodels = ["LLaVA-1.5"]\n'
    (repo / "forks.toml").write_text(registry.path.read_text() + block)
    monkeypatch.setattr(forks, "ROOT", repo)
    argv = ["--backbone", "llava-13b", "--method", "fastv", "--no-baseline", "--output", str(tmp_path / "out")]
    assert script().main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "-m lmms_eval --model llava_vtr --model_args pretrained=llava-hf/llava-1.5-13b-hf,strategy=fastv" in out
    (repo / "forks.toml").write_text(registry.path.read_text() + block.replace('"llava"', '"llava2"'))
    assert script().main([*argv, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vtr_run: error: forks.toml: [family.llava-13b] fork = 'llava2' is no fork; forks.toml has ")
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


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
        (["--keep-ratio", "3"], "VTRConfig.keep_ratio=3.0 is invalid"),
        (["--prune-layer", "2,x"], "prune_layer='x' does not parse"),
        (["--param", "seed=1", "--param", "seed=2"], "--param seed is given twice"),
        (["--workdir", "/nonexistent/dir"], "--workdir /nonexistent/dir is not a folder"),
        (["--param", "nonsense=1"], "unknown model_args key 'nonsense'"),
        (["--backbone", "videollava", "--method", "fastv"], "needs --video-dir, --questions, --answers"),
        (["--backbone", "llava,qwen3vl", "--pretrained", "some/ckpt"], "as BACKBONE=PATH"),
        # the LLaVA fork serves two lmms-eval models: each family's runs are checked by its own
        (["--backbone", "llava-onevision", "--param", "conv_template=vicuna_v1"], "conv_template='vicuna_v1'"),
        (["--backbone", "llava", "--param", "max_frames_num=8"], "unknown model_args key 'max_frames_num'"),
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
    records = {
        r["run"]: json.loads(next((out / "runs" / r["run"]).rglob("vtr_stats_*.json")).read_text()) for r in rows
    }
    baseline = {r["pretrained"]: records[r["run"]]["prefill_ms_samples"] for r in rows if r["method"] == "none"}
    for row in rows:  # each row holds its own run's lmms-eval results, and its speedup is against its baseline
        assert row["error"] == ""
        (results,) = (out / "runs" / row["run"]).rglob("*_results.json")
        metrics = json.loads(results.read_text())["results"]
        assert float(row["vtr_tiny_mc:acc"]) == metrics["vtr_tiny_mc"]["acc,none"]
        assert float(row["vtr_tiny_qa:exact_match"]) == metrics["vtr_tiny_qa"]["exact_match,none"]
        (stats,) = (out / "runs" / row["run"]).rglob("vtr_stats_*.json")
        record = json.loads(stats.read_text())
        assert float(row["prefill_ms_mean"]) == record["mean_prefill_ms"]
        assert [float(row[f"prefill_ms_{k}"]) for k in ("median", "min", "max")] == [
            record["prefill_ms"][k] for k in ("median", "min", "max")
        ]
        # against its own baseline's record, request by request (the same requests, in the same order)
        ratios = sorted(b / t for b, t in zip(baseline[row["pretrained"]], record["prefill_ms_samples"], strict=True))
        assert float(row["measured_speedup"]) == pytest.approx(statistics.median(ratios), rel=1e-6)
        assert float(row["measured_speedup_min"]) == pytest.approx(ratios[0], rel=1e-6)
        assert float(row["measured_speedup_max"]) == pytest.approx(ratios[-1], rel=1e-6)
        if row["method"] == "none":
            assert row["kept_per_stage"] == "all" and float(row["measured_speedup"]) == 1.0
        else:
            kept = int(row["budget"].split("=")[1])
            assert row["kept_per_stage"] == f"{kept}@L2" and float(row["final_kept"]) == kept
            assert 0 < float(row["flops_ratio"]) < 1 and row["prune_layer"] == "2"
    assert {(row["backbone"], row["pretrained"]) for row in rows} == {
        ("llava", tiny["llava15"]),
        ("qwen3vl", tiny["qwen"]),
    }
    table = (out / "summary.md").read_text()
    assert table.startswith("| backbone | pretrained | method | budget |") and table.count("\n") == 4 + len(rows)
    assert "indicative only" in table and table.count(" | reference | ") == 2
    from PIL import Image

    plotted = json.loads(Image.open(out / "summary.png").text["vtr_run"])
    assert [p["title"] for p in plotted["panels"]] == [
        f"{m} vs {x}"
        for m in ("vtr_tiny_mc:acc", "vtr_tiny_qa:exact_match")
        for x in ("kept tokens", "measured speedup")
    ]

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
    args += ["--prune-layer", "1", *video_qa["data"], "--output", str(out), "--", "--max_new_tokens", "4"]
    proc = vtr_run(*args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {row["method"]: row for row in csv.DictReader(open(out / "summary.csv"))}
    assert set(rows) == {"none", "fastv"}
    from videollava.vtr.score import exact_match

    for row in rows.values():  # the run's own answers, scored against the ground truth
        answered = [json.loads(line) for line in (out / "runs" / row["run"] / "answers.jsonl").read_text().splitlines()]
        truth = {f"q{i}": a for i, a in enumerate(["square", "yes", "red"])}
        expected = sum(exact_match(r["pred"], truth[r["id"]]) for r in answered) / 3
        assert row["error"] == "" and float(row["video_qa:exact_match"]) == pytest.approx(expected)
        prefill_ms = [r["prefill_ms"] for r in answered]
        assert float(row["prefill_ms_mean"]) == pytest.approx(sum(prefill_ms) / len(prefill_ms), rel=1e-6)
        assert float(row["prefill_ms_median"]) == statistics.median(prefill_ms)
        assert float(row["prefill_ms_max"]) == max(prefill_ms)
    # the speedup pairs each question's prefill in the two runs
    ms = {
        row["method"]: {
            r["id"]: r["prefill_ms"] for r in map(json.loads, open(out / "runs" / row["run"] / "answers.jsonl"))
        }
        for row in rows.values()
    }
    ratios = sorted(ms["none"][q] / ms["fastv"][q] for q in ms["none"])
    assert float(rows["fastv"]["measured_speedup"]) == pytest.approx(ratios[1])
    assert [float(rows["fastv"][f"measured_speedup_{k}"]) for k in ("min", "max")] == pytest.approx(
        [ratios[0], ratios[2]]
    )
    assert rows["fastv"]["kept_per_stage"] == "8@L1" and float(rows["fastv"]["final_kept"]) == 8
    assert rows["none"]["kept_per_stage"] == "all" and 0 < float(rows["fastv"]["flops_ratio"]) < 1
    answers = (out / "runs").rglob("answers.jsonl")
    assert all(len(path.read_text().splitlines()) == 3 for path in answers)
    again = vtr_run(*args)
    assert again.returncode == 0 and again.stdout.count("done before, skipped") == 2


# ----------------------------------------------------------------------- the video methods

VIDEO_METHODS = ["evs", "vidcom2", "fastvid", "holitom", "dycoke", "framefusion"]
#: the Qwen3-VL fork's tiny lmms-eval tasks, with a video one (vtr_tiny_video: two clips, written by the test)
QWEN_TASK = ROOT / "image" / "Qwen3-VL" / "tests" / "data" / "lmms_tiny"


def docs_video_sweep() -> list[str]:
    """The sweep of docs/video-qa.md's "Video methods" section, as its arguments after scripts/vtr_run."""
    section = (ROOT / "docs" / "video-qa.md").read_text().split("\n## Video methods\n", 1)[1].split("\n## ", 1)[0]
    (command,) = re.findall(r"```bash\n(.*?)```", section, re.S)
    argv = shlex.split(command.replace("\\\n", " "))
    assert argv[0] == "scripts/vtr_run"
    return argv[1:]


def with_values(argv: list[str], values: dict) -> list[str]:
    """`argv` with the values of the flags in `values` replaced."""
    argv = list(argv)
    for flag, value in values.items():
        argv[argv.index(flag) + 1] = value
    return argv


def test_the_docs_video_sweep_runs_each_method_on_its_own_schedule_with_its_own_fields(tmp_path, monkeypatch, capsys):
    """docs/video-qa.md's command, literally (--dry-run): the baseline and six methods x two budgets, no prune layer
    given to any (each runs its own schedule), dycoke_decode_prune to the dycoke runs only, each in a folder of its own."""
    monkeypatch.chdir(tmp_path)
    argv = docs_video_sweep()
    assert script().main([*argv, "--dry-run"]) == 0
    commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    assert len(commands) == 1 + len(VIDEO_METHODS) * 2 and list(tmp_path.iterdir()) == []  # nothing written

    def vtr_flags(cmd):
        return {flag: cmd[i + 1] for i, flag in enumerate(cmd) if flag.startswith("--vtr_")}

    assert vtr_flags(commands[0]) == {"--vtr_enabled": "false"}
    planned = set()
    for cmd in commands[1:]:
        flags = vtr_flags(cmd)
        method, ratio = flags["--vtr_strategy"], flags["--vtr_keep_ratio"]
        own = {"--vtr_dycoke_decode_prune": "0.7"} if method == "dycoke" else {}
        assert flags == {"--vtr_strategy": method, "--vtr_keep_ratio": ratio, **own}
        planned.add((method, ratio))
    assert planned == {(m, r) for m in VIDEO_METHODS for r in ("0.25", "0.15")}
    folders = [cmd[cmd.index("--output_dir") + 1] for cmd in commands]
    assert len(set(folders)) == len(folders) and all(
        f.startswith("results/msvd-video/runs/videollava__") for f in folders
    )
    assert "results/msvd-video/runs/videollava__LanguageBind_Video-LLaVA-7B-hf__evs__ratio0.25" in folders
    assert [f for f in folders if "dycoke_decode_prune=0.7" in f] == [
        f"results/msvd-video/runs/videollava__LanguageBind_Video-LLaVA-7B-hf__dycoke__ratio{r}__dycoke_decode_prune=0.7"
        for r in ("0.25", "0.15")
    ]
    for flag, value in [("--video_dir", "data/msvd/videos"), ("--gt_file_question", "data/msvd/test_q.json")]:
        assert all(cmd[cmd.index(flag) + 1] == value for cmd in commands)


#: the docs sweep's methods run for real: before the LLM (EVS), at every layer merging what it drops (FrameFusion),
#: and with its own --param (DyCoke); the dry run above checks the whole command
REAL_VIDEO_METHODS = "evs,framefusion,dycoke"


def test_the_docs_video_sweep_runs_on_the_tiny_video_llava(video_qa, tmp_path):
    """The same command on the tiny Video-LLaVA and the 3-question set (its data, checkpoint and output swapped in;
    three of its methods at one budget; 4 new tokens an answer): a result file per setting, each run with its
    method's own prune layers (the summary shows those that ran) and fields, and the summary counting what the LLM
    sees (merged tokens included, and said apart)."""
    from videollava.vtr.strategy.evs import retained_count

    out = tmp_path / "video-methods"
    data = dict(zip(video_qa["data"][::2], video_qa["data"][1::2]))
    subset = {"--method": REAL_VIDEO_METHODS, "--keep-ratio": "0.25", "--output": str(out)}
    argv = with_values(docs_video_sweep(), {**data, **subset})
    proc = vtr_run(*argv, "--pretrained", video_qa["model"], "--", "--max_new_tokens", "4")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["method"]: r for r in csv.DictReader(open(out / "summary.csv"))}
    assert {m: r["budget"] for m, r in rows.items()} == {
        "none": "-",
        **{m: "keep_ratio=0.25" for m in REAL_VIDEO_METHODS.split(",")},
    }
    layers = json.loads((Path(video_qa["model"]) / "config.json").read_text())["text_config"]["num_hidden_layers"]
    schedule = {"framefusion": (list(range(layers)), f"0-{layers - 1} (default)")}  # the others: [0]
    tags = {}
    for method, row in rows.items():
        answered = [json.loads(line) for line in (out / "runs" / row["run"] / "answers.jsonl").read_text().splitlines()]
        (tag,) = {r["vtr"] for r in answered}  # the runner's settings tag: every VTRConfig field it got
        tags[tag] = row["run"]
        assert row["error"] == "" and len(answered) == 3 and all(r["error"] is None for r in answered)
        if method == "none":
            assert tag == "unpruned" and row["params"] == "" and row["kept_per_stage"] == "all"
            assert row["prune_layer"] == "-" and row["final_merged"] == ""
            continue
        ran, shown = schedule.get(method, ([0], "0 (default)"))
        assert row["prune_layer"] == shown and all(r["prune_layers"] == ran for r in answered)
        assert row["params"] == ("dycoke_decode_prune=0.7" if method == "dycoke" else "")
        assert tag.startswith(f"{method}_K") and ("dycoke_decode_prune0.7" in tag) == (method == "dycoke")
        # what the LLM sees from each stage on: the kept tokens and the merged ones, these also said apart
        merged = [r.get("merged_tokens") or [0] * len(ran) for r in answered]
        seen = [statistics.mean(r["kept_tokens"][i] + m[i] for r, m in zip(answered, merged)) for i in range(len(ran))]
        said = [statistics.mean(m[i] for m in merged) for i in range(len(ran))]
        assert row["kept_per_stage"] == " > ".join(
            f"{n:.0f}@L{layer}" + (f" ({m:.0f} merged)" if m else "") for n, m, layer in zip(seen, said, ran)
        )
        assert float(row["final_kept"]) == pytest.approx(seen[-1])
        assert float(row["final_merged"]) == pytest.approx(said[-1])
        if method == "framefusion":  # it merges what its first stage drops
            assert said[0] > 0 and f"@L0 ({said[0]:.0f} merged)" in row["kept_per_stage"]
        if method == "evs":  # vLLM's count of the video's 8 frames, nothing merged
            frames = answered[0]["num_frames"]
            assert all(
                r["kept_tokens"] == [retained_count(frames, r["visual_tokens"] // frames, 0.25)] for r in answered
            )
            assert said == [0]
    assert len(tags) == len(rows) == len(set(tags.values()))  # one file per setting, named apart
    assert "`dycoke_K0_ratio0.25_dycoke_decode_prune0.7`" in (ROOT / "docs" / "video-qa.md").read_text()
    assert "dycoke_K0_ratio0.25_dycoke_decode_prune0.7" in tags


@pytest.mark.parametrize("method", VIDEO_METHODS)
def test_describe_teaches_a_video_method_its_schedule_and_its_fields(method, capsys):
    from dataclasses import fields

    from videollava.vtr.config import VTRConfig
    from videollava.vtr.modeling import VideoLlavaAdapter
    from videollava.vtr.strategy.holitom import inner_layer

    assert script().main(["--describe", "videollava", method]) == 0
    out = capsys.readouterr().out
    assert "\nVideo only: reduces video tokens, images kept. Only the tokens of video frames are reduced;" in out
    depth = script().SCHEDULE_DEPTH
    where = {
        "holitom": f"0+{inner_layer(VTRConfig(), depth)} (0: before the LLM)",
        "framefusion": f"every layer, 0 to {depth - 1} (a stage each)",
    }
    amount = {"dycoke": "keep_ratio 0.3 (the method's)", "framefusion": "the method's own (see above, and its fields)"}
    schedule = out.split("\nSchedule with --prune-layer and the budget left out", 1)[1].split("\n\n", 1)[0]
    assert f"\n  prune layers  {where.get(method, '0 (before the LLM)')}\n" in schedule
    default = f"keep_tokens {VideoLlavaAdapter.default_keep_tokens} (the videollava default)"
    assert f"\n  budget        {amount.get(method, default)}" in schedule
    assert ("\n  decode steps  layers from 3 on see only" in schedule) == (method == "dycoke")
    own = [f for f in fields(VTRConfig) if f.name.startswith(f"{method}_")]
    if own:
        block = out.split("\nIts own fields", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
        assert [line.split() for line in block] == [[f.name, "default", repr(f.default)] for f in own]
    else:  # EVS and VidCom2: the budget is their one setting
        assert "Its own fields" not in out


def test_a_methods_own_field_goes_to_its_runs_only(tmp_path, capsys):
    """A --param named after a method goes to its runs (and its variants': priortr_eps to priortr_2f), one every
    method reads to every run, a loading key to the baseline too; one no run of the sweep reads is refused."""
    args = ["--backbone", "qwen3vl", "--method", "fastv,priortr,priortr_2f,dycoke", "--keep-tokens", "8"]
    params = ["--param", "priortr_eps=0.01", "--param", "dycoke_gate=0.5", "--param", "seed=3"]
    params += ["--param", "max_num_frames=4"]
    assert script().main([*args, *params, "--output", str(tmp_path), "--dry-run"]) == 0
    model_args = [re.search(r"--model_args (\S+)", line).group(1) for line in capsys.readouterr().out.splitlines()]
    checkpoint = "pretrained=Qwen/Qwen3-VL-4B-Instruct"
    assert model_args == [
        f"{checkpoint},strategy=none,max_num_frames=4",
        f"{checkpoint},strategy=fastv,keep_tokens=8,seed=3,max_num_frames=4",
        f"{checkpoint},strategy=priortr,keep_tokens=8,priortr_eps=0.01,seed=3,max_num_frames=4",
        f"{checkpoint},strategy=priortr_2f,keep_tokens=8,priortr_eps=0.01,seed=3,max_num_frames=4",
        f"{checkpoint},strategy=dycoke,keep_tokens=8,dycoke_gate=0.5,seed=3,max_num_frames=4",
    ]
    assert script().main([*args[:3], "evs,fastv", "--param", "dycoke_gate=0.5", "--output", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        "vtr_run: error: --param dycoke_gate=0.5 is a field of dycoke, and --method evs,fastv runs no dycoke\n"
    )
    assert not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def qwen_video_task(tiny):
    """The Qwen3-VL fork's tiny lmms-eval tasks, the video task's two clips written as its own test writes them."""
    from visual_token_pruning.video_io import write_test_video

    task = tiny["root"] / "qwen_task"
    shutil.copytree(QWEN_TASK, task)
    for i, line in enumerate((task / "videos.jsonl").read_text().splitlines()):
        write_test_video(task / json.loads(line)["video"], num_frames=12 + 4 * i, size=(32, 32), fps=8)
    return task


def test_video_methods_on_an_lmms_eval_family_with_a_video_task(tiny, qwen_video_task, tmp_path):
    """EVS and DyCoke on the tiny Qwen3-VL through lmms-eval's video task (no baseline: the dry run above gives it
    its loading keys): each reduces the video tokens before the LLM (its own schedule, the summary's prune layer),
    EVS by vLLM's count; dycoke_gate reaches the DyCoke run alone; the summary counts the merged tokens of the
    record (`mean_merged_tokens`) in what the LLM sees, and says them apart."""
    from visual_token_pruning.strategy.evs import retained_count

    out, task = tmp_path / "qwen-video", str(qwen_video_task)
    args = ["--backbone", "qwen3vl", "--pretrained", tiny["qwen"], "--method", "evs,dycoke", "--keep-ratio", "0.5"]
    args += ["--param", "dycoke_gate=0.5", "--param", "max_num_frames=4", "--tasks", "vtr_tiny_video"]
    proc = vtr_run(*args, "--no-baseline", "--include-path", task, "--workdir", task, "--output", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["method"]: r for r in csv.DictReader(open(out / "summary.csv"))}
    assert {m: r["params"] for m, r in rows.items()} == {
        "evs": "max_num_frames=4",
        "dycoke": "dycoke_gate=0.5 max_num_frames=4",
    }
    records = {
        m: json.loads(next((out / "runs" / r["run"]).rglob("vtr_stats_*.json")).read_text()) for m, r in rows.items()
    }
    video = records["evs"]["mean_image_tokens"]  # per doc: 4 frames, 2 temporal groups (Qwen's "frames")
    for method in ("evs", "dycoke"):
        (stage,) = records[method]["per_prune_layer"]
        assert rows[method]["error"] == "" and stage["layer"] == 0 and stage["mean_image_tokens_in"] == video
        assert records[method]["mean_image_tokens"] == video and rows[method]["prune_layer"] == "0 (default)"
        seen, merged = stage["mean_image_tokens_kept"] + stage["mean_merged_tokens"], stage["mean_merged_tokens"]
        assert float(rows[method]["final_kept"]) == seen and float(rows[method]["final_merged"]) == merged
        assert rows[method]["kept_per_stage"] == f"{seen:.0f}@L0" + (f" ({merged:.0f} merged)" if merged else "")
        (results,) = (out / "runs" / rows[method]["run"]).rglob("*_results.json")
        metric = json.loads(results.read_text())["results"]["vtr_tiny_video"]["exact_match,none"]
        assert float(rows[method]["vtr_tiny_video:exact_match"]) == metric
    assert records["evs"]["per_prune_layer"][0]["mean_image_tokens_kept"] == retained_count(2, int(video) // 2, 0.5)


# ----------------------------------------------------------------------- with a fake lmms-eval (fast)

#: `python -m lmms_eval` run in --workdir finds this one first: it logs its model_args, reports its settings as
#: metrics (the last prune layer, the seed, the limit) and, with FAKE_SLEEP set, writes its pid and sleeps.
#: Its record's prefill times (with their spread, by the shared timing.spread): BASE_MS per request unpruned, half
#: of that pruned; seed=1: BASE_MS times NOISY_FACTOR, around the baseline's; seed=3: the same without the
#: per-request times (an older record); seed=2: the mean only. seed=13 fails, coloured as lmms-eval colours.
BASE_MS = [10.0, 20.0, 12.0, 40.0]
NOISY_FACTOR = [0.9, 1.1, 1.0, 1.05]
TIMING = ROOT / "image" / "LLaVA" / "llava" / "vtr" / "timing.py"
FAKE_LMMS_EVAL = (
    f"""
BASE_MS, NOISY_FACTOR = {BASE_MS}, {NOISY_FACTOR}
import importlib.util, sys
spec = importlib.util.spec_from_file_location("timing", "{TIMING}")
timing = sys.modules["timing"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(timing)
"""
    + """
import json, os, re, sys, time
from pathlib import Path

argv = sys.argv[1:]
opt = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}
model_args = dict(re.findall(r"(\\w+)=(\\[[^\\]]*\\]|[^,]*)", opt["--model_args"]))
with open("calls.log", "a") as log:
    log.write(opt["--model_args"] + "\\n")
if os.environ.get("FAKE_SLEEP"):
    Path("child.tmp").write_text(str(os.getpid()))
    os.replace("child.tmp", "child.pid")
    time.sleep(float(os.environ["FAKE_SLEEP"]))
if model_args.get("seed") == "13":
    print("\x1b[32m2026-01-01 | INFO\x1b[0m loading")
    print("\x1b[1;31mERROR\x1b[0m the \x1b[4mfake\x1b[0m model failed")
    sys.exit(1)
out = Path(opt["--output_path"]) / "model"
out.mkdir(parents=True, exist_ok=True)
layer = int(model_args.get("prune_layer", "0").strip("[]").split(",")[-1])
metrics = {"layer,none": layer, "seed,none": int(model_args.get("seed", -1)), "limit": float(opt.get("--limit", -1))}
(out / "x_results.json").write_text(json.dumps({"results": {"fake": metrics}}))
kept = [] if model_args["strategy"] == "none" else [{"layer": layer, "mean_image_tokens_kept": 8.0}]
seed = model_args.get("seed")
factor = [1.0] * 4 if model_args["strategy"] == "none" else NOISY_FACTOR if seed in ("1", "3") else [0.5] * 4
ms = [b * f for b, f in zip(BASE_MS, factor)]
stats = {"per_prune_layer": kept, "mean_image_tokens": 16.0, "prefill_flops_ratio": 0.5, "ideal_prefill_speedup": 2.0}
stats["mean_prefill_ms"] = sum(ms) / len(ms)
if seed != "2":
    stats["prefill_ms"] = timing.spread(ms)
if seed not in ("2", "3"):
    stats["prefill_ms_samples"] = ms
(out / "vtr_stats_x.json").write_text(json.dumps(stats))
"""
)


@pytest.fixture
def fake(tmp_path):
    work = tmp_path / "work"
    (work / "lmms_eval").mkdir(parents=True)
    (work / "lmms_eval" / "__init__.py").write_text("")
    (work / "lmms_eval" / "__main__.py").write_text(FAKE_LMMS_EVAL)
    return dict(work=work, out=tmp_path / "out", args=["--workdir", str(work), "--output", str(tmp_path / "out")])


def calls(fake) -> list[str]:
    log = fake["work"] / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def test_every_setting_names_its_run_and_has_a_column_and_nothing_finished_is_deleted(fake, capsys):
    main = script().main
    sweep = ["--method", "fastv", "--keep-tokens", "8", *fake["args"]]
    assert main([*sweep, "--prune-layer", "2,3"]) == 0  # a sweep over K: two runs and the baseline
    assert main([*sweep, "--prune-layer", "4", "--param", "seed=7"]) == 0  # another command, same output
    assert main([*sweep, "--prune-layer", "8+16"]) == 0  # one multi-stage schedule
    assert len(calls(fake)) == 3 + 1 + 1 and "prune_layer=[8,16]" in calls(fake)[-1]
    names = sorted(p.name for p in (fake["out"] / "runs").iterdir() if p.is_dir())
    model = "llava__llava-hf_llava-1.5-7b-hf__"
    assert names == [model + n for n in ["fastv__tokens8__L2", "fastv__tokens8__L3", "fastv__tokens8__L4__seed=7",
                                          "fastv__tokens8__L8+16", "none"]]  # fmt: skip
    rows = list(csv.DictReader(open(fake["out"] / "summary.csv")))  # every finished run in the output
    got = {(r["method"], r["budget"], r["prune_layer"], r["params"]): (r["fake:layer"], r["fake:seed"]) for r in rows}
    assert got == {
        ("none", "-", "-", ""): ("0", "-1"),
        ("fastv", "keep_tokens=8", "2", ""): ("2", "-1"),
        ("fastv", "keep_tokens=8", "3", ""): ("3", "-1"),
        ("fastv", "keep_tokens=8", "4", "seed=7"): ("4", "7"),
        ("fastv", "keep_tokens=8", "8+16", ""): ("16", "-1"),
    }
    assert "| prune_layer | params |" in (fake["out"] / "summary.md").read_text()
    capsys.readouterr()
    assert main([*sweep, "--prune-layer", "3,2"]) == 0 and len(calls(fake)) == 5  # finished: skipped
    assert capsys.readouterr().out.count("done before, skipped") == 3
    # runs made another way (here --limit) are never replaced nor mixed into this output: a refusal naming it
    assert main([*sweep, "--prune-layer", "2", "--limit", "1"]) == 2
    error = capsys.readouterr().err
    assert "--limit" in error and "another --output" in error and len(calls(fake)) == 5
    assert len(list(csv.DictReader(open(fake["out"] / "summary.csv")))) == 5
    # a run whose results were removed since is no longer shown as finished (and breaks nothing)
    (fake["out"] / "runs" / f"{model}fastv__tokens8__L4__seed=7" / "model" / "x_results.json").unlink()
    assert main([*sweep, "--prune-layer", "2"]) == 0 and len(calls(fake)) == 5
    assert {r["prune_layer"] for r in csv.DictReader(open(fake["out"] / "summary.csv"))} == {"-", "2", "3", "8+16"}


def test_checkpoints_named_alike_are_refused_and_a_finished_run_folder_is_never_deleted(fake, capsys):
    main = script().main
    assert main(["--pretrained", "org/a_b,org_a/b", "--no-baseline", "--dry-run", *fake["args"]]) == 2
    error = capsys.readouterr().err
    assert "pretrained=org/a_b,strategy=fastv and pretrained=org_a/b,strategy=fastv would both be run" in error
    assert "llava__org_a_b__fastv" in error and "different --output" in error
    assert main(["--pretrained", "org/a_b", "--no-baseline", *fake["args"]]) == 0  # the same, in two commands
    assert main(["--pretrained", "org_a/b", "--no-baseline", *fake["args"]]) == 2 and len(calls(fake)) == 1
    assert "holds another run under that name" in capsys.readouterr().err
    # a finished run whose results were removed since: a row with its error, its folder left as it was
    (finished,) = (fake["out"] / "runs").glob("*/vtr_run_finished.json")
    (finished.parent / "model" / "x_results.json").unlink()
    assert main(["--pretrained", "org/a_b", "--no-baseline", *fake["args"]]) == 1 and len(calls(fake)) == 1
    assert finished.is_file() and (finished.parent / "model" / "vtr_stats_x.json").is_file()
    (row,) = summary(fake).values()
    assert (
        row["error"]
        == f"{finished.parent} holds a finished run but not its results; never deleted: move it away to rerun it"
    )


@pytest.mark.parametrize(
    "param,flag",
    [
        ("keep_tokens=8", "--keep-tokens"),
        ("keep_ratio=0.5", "--keep-ratio"),
        ("strategy=pdrop", "--method"),
        ("prune_layer=2", "--prune-layer"),
        ("pretrained=x/y", "--pretrained"),
    ],
)
def test_a_param_that_vtr_run_sets_itself_is_refused_naming_the_flag(param, flag, tmp_path, capsys):
    code = script().main(["--keep-tokens", "16", "--param", param, "--output", str(tmp_path), "--dry-run"])
    error = capsys.readouterr().err
    assert code == 2 and f"--param {param}" in error and f"use {flag}" in error


def _start_sleeping_sweep(fake):
    env = dict(os.environ, FAKE_SLEEP="300", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--method", "fastv", *fake["args"]], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 180
    while not (fake["work"] / "child.pid").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    return proc, int((fake["work"] / "child.pid").read_text())


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_busy_output_is_refused_and_a_stopped_sweep_stops_its_runner(signum, fake, capsys):
    proc, child = _start_sleeping_sweep(fake)
    try:
        assert script().main(["--method", "fastv", *fake["args"]]) == 2  # a second command on that output
        error = capsys.readouterr().err
        assert f"pid {proc.pid} on {socket.gethostname()}" in error and "--method fastv" in error
        assert f"{fake['out']} is in use by another vtr_run (" in error and "give another --output" in error
        assert calls(fake) == [calls(fake)[0]]  # nothing ran twice
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 128 + signum and "Traceback" not in err
        assert f"stopped by {signal.Signals(signum).name}" in err and "0 of 2 runs finished" in err
        with pytest.raises(ProcessLookupError):  # its runner was stopped and waited for, not orphaned
            os.kill(child, 0)
    finally:
        for pid in (child, proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()


@pytest.mark.parametrize("when", ["the child exited", "its record is written"])
def test_a_signal_as_a_run_finishes_waits_until_its_record_is_written(when, fake, capsys, monkeypatch):
    import llava.vtr.outputs as outputs

    write, wait = outputs.write_atomic, subprocess.Popen.wait

    def write_when_interrupted(path, data):  # Ctrl-C just as the finished run's record is about to be written
        if Path(path).name == "vtr_run_finished.json":
            os.kill(os.getpid(), signal.SIGINT)
        return write(path, data)

    def wait_when_interrupted(self, timeout=None):  # Ctrl-C just after the child exited (0)
        code = wait(self, timeout)
        os.kill(os.getpid(), signal.SIGINT)
        return code

    if when == "the child exited":
        monkeypatch.setattr(subprocess.Popen, "wait", wait_when_interrupted)
    else:
        monkeypatch.setattr(outputs, "write_atomic", write_when_interrupted)
    args = ["--method", "fastv", "--no-baseline", *fake["args"]]
    assert script().main(args) == 128 + signal.SIGINT
    (run,) = (p.name for p in (fake["out"] / "runs").iterdir() if p.is_dir())
    assert capsys.readouterr().err == f"vtr_run: stopped by SIGINT; 1 of 1 runs finished:\n  {run}\n"
    monkeypatch.undo()
    assert script().main(args) == 0 and len(calls(fake)) == 1  # the rerun keeps it
    assert f"{run}: done before, skipped" in capsys.readouterr().out


def test_a_lock_left_by_a_dead_run_is_taken_over_and_one_from_another_host_is_not(fake, capsys):
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    lock = fake["out"] / "vtr_run.lock"
    fake["out"].mkdir()
    held = dict(pid=dead.pid, host=socket.gethostname(), command="vtr_run --old", started="2020-01-02 03:04:05")
    lock.write_text(json.dumps(held))
    args = ["--method", "fastv", "--no-baseline", *fake["args"]]
    assert script().main(args) == 0
    assert f"took over {lock}" in capsys.readouterr().err and not lock.exists()
    lock.write_text(json.dumps(dict(held, host="elsewhere")))
    assert script().main(args) == 2
    error = capsys.readouterr().err
    assert f"pid {dead.pid} on elsewhere" in error and f"delete {lock}" in error


def summary(fake) -> dict:
    """summary.csv's rows by (method, params)."""
    return {(r["method"], r["params"]): r for r in csv.DictReader(open(fake["out"] / "summary.csv"))}


def test_a_failed_runs_error_is_plain_text(fake, capsys):
    assert script().main(["--method", "fastv", "--param", "seed=13", "--no-baseline", *fake["args"]]) == 1
    (row,) = summary(fake).values()
    assert row["error"] == "exit 1: 2026-01-01 | INFO loading | ERROR the fake model failed"
    assert "\x1b" not in (fake["out"] / "summary.md").read_text()


def test_describe_shows_a_user_methods_class_docstring(capsys):
    from llava.vtr.strategy import PruningStrategy, register_strategy
    from llava.vtr.strategy.registry import _REGISTRY

    @register_strategy("user_norm")
    class UserNorm(PruningStrategy):
        """Keeps the image tokens of largest hidden-state norm (a user's method)."""

        needs_attention = False

    try:
        assert script().main(["--describe", "llava", "user_norm"]) == 0
        out = capsys.readouterr().out
        assert "Keeps the image tokens of largest hidden-state norm (a user's method)." in out
        assert "strategy=user_norm" in out
    finally:
        _REGISTRY.pop("user_norm")
    assert script().main(["--describe", "llava", "user_norm"]) == 2  # unknown now: one line, no traceback
    assert "--describe llava user_norm: unknown strategy 'user_norm'" in capsys.readouterr().err


def test_a_method_a_family_cannot_run_is_refused_before_the_sweep_and_described_so(tmp_path, capsys):
    """A method that `requires` a fact an adapter does not give: --dry-run refuses it naming the model and the
    fact, --describe says so, and a family that gives it runs it (CLIP-towered LLaVA gives vision_cls)."""
    from llava.vtr.strategy import PruningStrategy, register_strategy
    from llava.vtr.strategy.registry import _REGISTRY

    @register_strategy("user_needs")
    class UserNeeds(PruningStrategy):
        """Needs a fact no family gives."""

        needs_attention = False
        requires = ("visual_grid", "no_such_fact")

    try:
        out = str(tmp_path / "out")
        assert script().main(["--backbone", "llava", "--method", "user_needs", "--output", out, "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert "user_needs is not supported on llava: LLaVA-1.5 needs no_such_fact" in err and err.count("\n") == 1
        assert script().main(["--describe", "llava-next", "user_needs"]) == 0
        assert "not supported here: LLaVA-1.6 needs no_such_fact" in capsys.readouterr().out
        UserNeeds.requires = ("vision_cls",)
        assert script().main(["--backbone", "llava", "--method", "user_needs", "--output", out, "--dry-run"]) == 0
    finally:
        _REGISTRY.pop("user_needs")


@pytest.mark.parametrize(
    "args,message",
    [
        (["--method", ""], "--method '' is empty"),
        (["--backbone", " "], "--backbone ' ' is empty"),
        (["--pretrained", ","], "--pretrained ',' is empty"),
        (["--keep-tokens", ""], "--keep-tokens '' is empty"),
        (["--keep-tokens", "8,,4"], "--keep-tokens '8,,4' has an empty item"),
        (["--keep-ratio", "[]"], "--keep-ratio '[]' has an empty item"),
        (["--prune-layer", "8++16"], "--prune-layer '8++16' has an empty item"),
    ],
)
def test_an_empty_sweep_list_is_an_error(args, message, tmp_path, capsys):
    assert script().main([*args, "--output", str(tmp_path), "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


def test_a_value_given_twice_runs_once_with_a_note(tmp_path, capsys):
    args = ["--method", "fastv,random,fastv", "--keep-tokens", "8,8", "--prune-layer", "2+3,[2,3]"]
    assert script().main([*args, "--output", str(tmp_path), "--dry-run"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 3 and "strategy=none" in lines[0]
    assert "strategy=fastv,keep_tokens=8,prune_layer=[2,3]" in lines[1] and "strategy=random" in lines[2]
    for flag, value in [("--method", "fastv"), ("--keep-tokens", "8"), ("--prune-layer", "2+3")]:
        assert f"note: {flag} lists {value} more than once; it runs once" in captured.err


def test_model_args_are_checked_by_the_plugin_before_any_run(fake, capsys):
    main = script().main
    assert main(["--method", "fastv", "--param", "dtype=float17", *fake["args"]]) == 2
    assert "none__dtype=float17: dtype='float17' is not a torch dtype" in capsys.readouterr().err
    assert calls(fake) == [] and not (fake["out"] / "runs").exists()
    # a loading key the plugin takes runs, and the baseline loads its model the same way
    assert main(["--method", "fastv", "--param", "dtype=bfloat16", "--dry-run", *fake["args"]]) == 0
    baseline, fastv = capsys.readouterr().out.splitlines()
    assert "strategy=none,dtype=bfloat16 " in baseline and "strategy=fastv,dtype=bfloat16 " in fastv


def test_speedups_and_prefill_times_carry_their_spread(fake, capsys):
    import statistics

    from llava.vtr.timing import spread

    main = script().main
    assert main(["--method", "fastv", "--keep-tokens", "8", *fake["args"]]) == 0
    for seed in ("1", "2", "3"):  # the same output, records of other kinds (see FAKE_LMMS_EVAL)
        assert main(["--method", "fastv", "--keep-tokens", "8", "--param", f"seed={seed}", *fake["args"]]) == 0
    rows = summary(fake)
    base, clear = rows["none", ""], rows["fastv", ""]
    noisy, means, points = rows["fastv", "seed=1"], rows["fastv", "seed=2"], rows["fastv", "seed=3"]
    assert [float(base[f"prefill_ms_{k}"]) for k in ("median", "min", "max", "mean")] == [16.0, 10.0, 40.0, 20.5]
    assert float(clear["measured_speedup"]) == 2.0 and clear["speedup_in_noise"] == "False"
    assert float(clear["measured_speedup_min"]) == float(clear["measured_speedup_max"]) == 2.0
    ratios = sorted(1 / f for f in NOISY_FACTOR)  # per request: baseline / run
    assert float(noisy["measured_speedup"]) == pytest.approx(statistics.median(ratios))
    assert float(noisy["measured_speedup_min"]) == pytest.approx(ratios[0]) and noisy["speedup_in_noise"] == "True"
    assert float(noisy["measured_speedup_max"]) == pytest.approx(ratios[-1])
    # the same times without per-request ones: the ratios of the two spreads' points (min/min, p25/p25, ...)
    a, b = spread(BASE_MS), spread([t * f for t, f in zip(BASE_MS, NOISY_FACTOR)])
    by_point = sorted(a[k] / b[k] for k in ("min", "p25", "median", "p75", "max"))
    assert [float(points[f"measured_speedup{k}"]) for k in ("", "_min", "_max")] == pytest.approx(
        [by_point[2], by_point[0], by_point[-1]]
    )
    assert by_point != ratios and float(points["prefill_ms_median"]) == b["median"]
    mean_ms = 20.5 / 2
    assert float(means["measured_speedup"]) == pytest.approx(2.0) and means["speedup_in_noise"] == "True"
    assert means["measured_speedup_min"] == means["prefill_ms_median"] == ""
    table = {line.split(" | ")[-1].strip(" |"): line for line in (fake["out"] / "summary.md").read_text().splitlines()}
    model = "llava__llava-hf_llava-1.5-7b-hf__"
    assert "| reference | 16.0 [10.0-40.0] |" in table[model + "none"]
    assert "| 2.00x [2.00-2.00] | 8.0 [5.0-20.0] |" in table[model + "fastv__tokens8"]
    low, high = min(t * f for t, f in zip(BASE_MS, NOISY_FACTOR)), max(t * f for t, f in zip(BASE_MS, NOISY_FACTOR))
    cells = f"| ~{statistics.median(ratios):.2f}x [{ratios[0]:.2f}-{ratios[-1]:.2f}] | {b['median']:.1f} [{low:.1f}-{high:.1f}] |"
    assert cells in table[model + "fastv__tokens8__seed=1"]
    assert f"| ~{2.0:.2f}x (means) | {mean_ms:.1f} (mean) |" in table[model + "fastv__tokens8__seed=2"]
    text = (fake["out"] / "summary.md").read_text()
    assert "separate process, so these speedups are indicative only" in text
    assert points["speedup_in_noise"] == "True"  # its range, 0.93x-1.11x, holds 1.00x
    assert "3 of 4 measured speedups are inside the noise" in text


def test_progress_shows_each_runs_time_metric_and_what_is_left(fake, capsys):
    args = ["--method", "fastv,random", "--keep-tokens", "8", "--prune-layer", "3", *fake["args"]]
    assert script().main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "3 runs, 3 to run"
    done = [line for line in out if line.startswith("    done in ")]
    assert len(done) == 3
    assert re.fullmatch(
        r"    done in \d+ s: fake:layer=0, prefill 16\.0 \[10\.0-40\.0\] ms; about \d+ s left for 2 more", done[0]
    )
    assert re.fullmatch(
        r"    done in \d+ s: fake:layer=3, prefill 8\.0 \[5\.0-20\.0\] ms; about \d+ s left for 1 more", done[1]
    )
    assert done[2].endswith("prefill 8.0 [5.0-20.0] ms")
    assert script().main([*args[:-4], "--param", "seed=13", *fake["args"]]) == 1  # fastv fails, random too
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "3 runs, 2 to run (1 finished before)"
    failed = [line for line in out if line.startswith("    failed")]
    assert len(failed) == 2 and "about" in failed[0] and "left for 1 more" in failed[0] and "left" not in failed[1]


def test_the_plot_has_a_panel_per_metric_and_axis_and_shows_every_series(fake):
    assert script().main(["--method", "fastv,random", "--keep-tokens", "8", *fake["args"]]) == 0
    from PIL import Image

    image = Image.open(fake["out"] / "summary.png").convert("RGB")
    info = json.loads(Image.open(fake["out"] / "summary.png").text["vtr_run"])
    metrics = ["fake:layer", "fake:limit", "fake:seed"]
    assert [p["title"] for p in info["panels"]] == [
        f"{m} vs {x}" for m in metrics for x in ("kept tokens", "measured speedup")
    ]
    assert list(image.size) == info["size"] and image.size[1] > 3 * 250  # room for three rows of panels
    legend = {entry["label"]: entry for entry in info["legend"]}
    assert set(legend) == {"none (unpruned)", "fastv", "random"}
    assert len({(e["colour"], e["marker"]) for e in legend.values()}) == 3 and all(label.isascii() for label in legend)
    for panel in info["panels"]:  # fastv and random have equal values: both must still be seen in every panel
        assert set(panel["series"]) == set(legend), panel["title"]
        assert panel["series"]["fastv"] == panel["series"]["random"]
        assert panel["series"]["none (unpruned)"] == [
            [
                16.0 if "kept" in panel["x"] else 1.0,
                {"fake:layer": 0.0, "fake:limit": -1.0, "fake:seed": -1.0}[panel["metric"]],
            ]
        ]
        box = image.crop(panel["box"])
        colours = {c for _, c in box.getcolors(box.size[0] * box.size[1])}
        for entry in legend.values():
            assert tuple(int(entry["colour"][i : i + 2], 16) for i in (1, 3, 5)) in colours, (panel["title"], entry)


def test_plot_lines_of_checkpoints_that_end_alike_stay_apart(tmp_path):
    from PIL import Image

    def plotted(*models):
        rows = [
            {"backbone": "llava", "pretrained": m, "method": "fastv", "prune_layer": "2", "_prune_layer": "2",
             "params": "", "budget": "", "final_kept": 8.0, "t:acc": acc}
            for m, acc in zip(models, (0.5, 0.7))
        ]  # fmt: skip
        script().plot(rows, ["t:acc"], tmp_path / "summary.png")
        info = json.loads(Image.open(tmp_path / "summary.png").text["vtr_run"])
        return [e["label"] for e in info["legend"]], info["panels"][0]["series"]

    tail = "/checkpoints/llava-7b-vtr-final"  # the same last 24 characters and more
    labels, series = plotted(f"/runs/a{tail}", f"/runs/b{tail}")
    assert labels == [f"/runs/a{tail} fastv", f"/runs/b{tail} fastv"]  # two lines, labelled in full
    assert series == {labels[0]: [[8.0, 0.5]], labels[1]: [[8.0, 0.7]]}
    labels, _ = plotted(f"/runs/one{tail}", f"/runs/two{tail}-2")  # long ones that end apart: by their ends
    assert [len(label) < len(f"/runs/one{tail}") for label in labels] == [True, True]
    assert labels[0].endswith("vtr-final fastv") and labels[1].endswith("vtr-final-2 fastv")


def test_the_summary_row_counts_merged_tokens_and_shows_the_layers_that_ran():
    """What the LLM sees from a stage on is what it kept plus what it merged (FastVID, FrameFusion), the merged ones
    said apart; a prune layer left to the model shows the layers its record says ran (`default` without a record),
    one given shows as given; the plot keeps one line per setting as asked."""
    Run, row_of = script().Run, script().row_of

    def stage(layer, kept, merged=None):
        counts = dict(layer=layer, mean_image_tokens_in=136.0, mean_image_tokens_kept=kept)
        return counts if merged is None else dict(counts, mean_merged_tokens=merged)

    framefusion = Run("videollava", "ckpt", "framefusion", ("keep_ratio", "0.25"))
    stages = [stage(0, 11.0, 23.0), stage(1, 34.0, 0.0), stage(2, 34.0, 0.0), stage(3, 30.0, 2.5), stage(16, 30.0, 0)]
    row = row_of(framefusion, None, dict(per_prune_layer=stages, mean_image_tokens=136.0))
    assert row["kept_per_stage"] == "34@L0 (23 merged) > 34@L1 > 34@L2 > 32@L3 (2 merged) > 30@L16"
    assert (row["final_kept"], row["final_merged"], row["prune_layer"]) == (30.0, 0, "0-3+16 (default)")
    fastvid = row_of(Run("llava-onevision", "ckpt", "fastvid"), None, dict(per_prune_layer=[stage(0, 32.0, 8.0)]))
    assert (fastvid["kept_per_stage"], fastvid["final_kept"], fastvid["final_merged"]) == ("40@L0 (8 merged)", 40, 8)
    holitom = row_of(Run("videollava", "ckpt", "holitom"), None, dict(per_prune_layer=[stage(0, 40.0), stage(8, 20.0)]))
    assert holitom["prune_layer"] == "0+8 (default)" and "final_merged" not in holitom  # a record without the count
    assert holitom["kept_per_stage"] == "40@L0 > 20@L8" and holitom["final_kept"] == 20
    given = row_of(Run("llava", "ckpt", "fastv", ("keep_tokens", "8"), "2"), None, dict(per_prune_layer=[stage(2, 8)]))
    assert given["prune_layer"] == "2" and row_of(framefusion, None, None, error="exit 1")["prune_layer"] == "default"
    assert script().series_key(row) == script().series_key(row_of(framefusion, None, None))  # one line per setting


def test_describe_teaches_a_hybrid_decoders_scoring_rule_moved_schedules_and_refusals(tmp_path, capsys, monkeypatch):
    """--describe qwen3.5: the layer kinds (the stock config's, Qwen3.5's checkpoint not being on disk; a checkpoint's
    own where it is), the scoring rule, what is refused, and where the method's default schedule goes as the model
    moves it (engine.snap_schedule), each stage's scoring layer, or its refusal there (engine.check_layer_kinds);
    nothing of it on an all-attention decoder."""
    from visual_token_pruning.tiny import QWEN3_5_TEST_LAYERS, build_tiny_qwen3_vl

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def described(method: str) -> str:
        assert script().main(["--describe", "qwen3.5", method]) == 0
        return " ".join(capsys.readouterr().out.split())  # unwrapped

    fastv = described("fastv")
    layers = "attention in layers 3, 7, 11, 15, 19, 23, 27, 31;"
    assert (
        f"Hybrid decoder (32 layers, from Qwen3_5Config's defaults; Qwen/Qwen3.5-4B is not on disk): {layers}" in fastv
    )
    rule = (
        "scoring rule: a stage at prune layer K scores with the attention of the nearest attention layer at or before"
    )
    assert f"{rule} K-1" in fastv and "refused: a prune layer without such a scoring layer" in fastv
    assert "fastv: its default prune layers 3 moved by the model (with a warning) to 4 (scored from layer 3)." in fastv
    assert "to 11 (scored from layer 11), 19 (scored from layer 19), 27 (scored from layer 27)." in described("pdrop")
    clse = described("clse")
    assert "to 4 (scored from layer 3), 11 (scored from layer 7), 21 (scored from layer 19). Refused there: " in clse
    assert "set earlier_cache='keep'" in clse
    assert "dycoke: its default prune layers 0 kept: 0 (before the LLM). Refused there: 'dycoke' hides" in described(
        "dycoke"
    )
    assert "random: its default prune layers 3 kept: 3 (reads no attention)." in described("random")
    assert script().main(["--describe", "qwen2vl", "fastv"]) == 0 and "Hybrid" not in capsys.readouterr().out
    # a checkpoint on disk: its own layout (L L F L F L L), where no default PDrop schedule fits
    path = str(build_tiny_qwen3_vl(tmp_path / "q35", family="qwen3_5", layer_types=QWEN3_5_TEST_LAYERS))
    family = script().family
    monkeypatch.setattr(script(), "family", lambda name: dataclasses.replace(family(name), checkpoint=path))
    pdrop = described("pdrop")
    assert f"Hybrid decoder (7 layers, from {path}): attention in layers 2, 4;" in pdrop
    assert "pdrop: its default prune layers 1, 3, 5 fit nowhere on this decoder: give --prune-layer." in pdrop
