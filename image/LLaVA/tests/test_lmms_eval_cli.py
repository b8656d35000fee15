"""End to end: the real `python -m lmms_eval` CLI, offline, on a tiny LLaVA and the bundled local task
(scripts/lmms_tasks/vtr_tiny), including the README's offline command as written."""

import itertools
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from lmms_scores import check_multiple_choice, logged_samples, read_docs, task_module

from llava.vtr.demo import DEMO_SHAPE
from llava.vtr.lmms_eval_plugin import LlavaVTR
from llava.vtr.tiny import build_tiny_llava
from llava_lmms_testlib import _instance

ROOT = Path(__file__).parents[3]
TASK_DIR = ROOT / "scripts" / "lmms_tasks" / "vtr_tiny"
DOCS = 4  # questions in data.jsonl
CHOICES = ["yes", "no"]  # vtr_tiny_mc.yaml


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
        "--log_samples",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (results,) = out.rglob("*_results.json")
    (stats,) = out.rglob("vtr_stats_*.json")
    assert stats.parent == results.parent, "the efficiency record sits next to the scores"
    date_id = results.name.removesuffix("_results.json")
    assert stats.name.endswith(f"_{date_id}.json"), "stamped with the results' own timestamp"
    tag = stats.name.removeprefix("vtr_stats_").rsplit("_", 2)[0]
    assert results.parent.name.endswith(f"__vtr-{tag}"), "the results folder names the VTR settings"
    return json.loads(results.read_text()), json.loads(stats.read_text()), stats.name, results


def check_scores(results, results_file, model_args):
    """The CLI's scores are the model's own answers, scored: each logged answer equals the one generated in
    process with the same settings, each option's logged loss is its mean negative log-likelihood, and
    exact_match / acc score those answers (acc: per question the option the model finds MORE likely; lmms-eval
    picks the smallest loss, so a log-probability in its place would pick the less likely one)."""
    task = task_module(TASK_DIR, "vtr_tiny_task")
    docs = read_docs(TASK_DIR, "data.jsonl")
    lm = LlavaVTR.create_from_arg_string(f"{model_args},batch_size=2", {"device": None})
    lm.task_dict = {"t": {"test": docs}}

    qa = logged_samples(results_file, "vtr_tiny_qa")
    assert [s["doc_id"] for s in qa] == list(range(DOCS))
    gen = {"max_new_tokens": 4, "temperature": 0, "do_sample": False, "num_beams": 1, "until": ["\n\n"]}
    answers = lm.generate_until(
        [
            _instance("generate_until", (s["input"], gen, task.doc_to_visual, i, "t", "test"), i)
            for i, s in enumerate(qa)
        ]
    )
    assert [s["filtered_resps"] for s in qa] == answers
    exact = [task.process_results(doc, [answer])["exact_match"] for doc, answer in zip(docs, answers)]
    assert [s["exact_match"] for s in qa] == exact
    assert results["results"]["vtr_tiny_qa"]["exact_match,none"] == pytest.approx(sum(exact) / DOCS)
    check_multiple_choice(results, results_file, lm, task, docs, "vtr_tiny_mc", CHOICES)
    assert results["n-samples"]["vtr_tiny_qa"]["effective"] == DOCS


# generate_until: one prefill per doc; multiple_choice: one per (doc, choice) = 2 per doc
PREFILLS = DOCS + DOCS  # one per generation, one per doc for all its options


def test_unpruned_baseline(workdir, tiny_path):
    results, stats, name, results_file = run_cli(workdir, tiny_path, "none", "strategy=none")
    check_scores(results, results_file, f"pretrained={tiny_path},strategy=none")
    assert name.startswith("vtr_stats_unpruned_")
    assert stats["prefills"] == PREFILLS
    assert stats["per_prune_layer"] == [] and stats["prefill_flops_ratio"] == 1.0
    assert stats["ideal_prefill_speedup"] == 1.0
    assert stats["mean_image_tokens"] == 64
    by_type = stats["by_request_type"]
    assert by_type["generate_until"]["prefills"] == DOCS and by_type["loglikelihood"]["prefills"] == DOCS
    assert stats["requests"] == {
        "computed": {"generate_until": DOCS, "loglikelihood": 2 * DOCS},
        "from_response_cache": {},
    }
    assert stats["from_cache"] == 0 and "note" not in stats


@pytest.mark.parametrize(
    "strategy,args,tag",
    [  # fastv: test_the_readme_offline_command_runs_as_written
        (
            "priortr",
            "keep_tokens=[16,4],prune_layer=[1,3],query_aggregation=question",
            "priortr_K1-3_keep16-4_qquestion",
        ),
        ("random", "keep_ratio=0.25,prune_layer=3;", "random_K3_ratio0.25_seed0"),
    ],
)
def test_each_strategy_records_what_it_kept(workdir, tiny_path, strategy, args, tag):
    results, stats, name, results_file = run_cli(workdir, tiny_path, strategy, f"strategy={strategy},{args}")
    check_scores(results, results_file, f"pretrained={tiny_path},strategy={strategy},{args}")
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
        assert [(x["mean_image_tokens_in"], x["mean_image_tokens_kept"]) for x in layers] == [(64, 16)]
    assert 0 < stats["prefill_flops_ratio"] < 1
    assert stats["ideal_prefill_speedup"] == pytest.approx(1 / stats["prefill_flops_ratio"])
    assert stats["mean_equivalent_tokens"] < stats["mean_seq_len"]
    assert stats["mean_prefill_ms"] > 0


def test_same_settings_are_served_from_the_response_cache(workdir, tiny_path):
    """The cache is live (so the no-reuse checks above mean something): a repeat run computes nothing, and its
    record says that every answer came from the cache (its figures are empty, not a measurement)."""
    _, stats, _, _ = run_cli(workdir, tiny_path, "random-again", "strategy=random,keep_ratio=0.25,prune_layer=3;")
    assert stats["prefills"] == 0 and stats["mean_prefill_ms"] is None
    assert stats["requests"]["from_response_cache"] == {"generate_until": DOCS, "loglikelihood": 2 * DOCS}
    assert stats["from_cache"] == DOCS + 2 * DOCS and stats["response_cache"]  # requests, not prefills
    assert stats["note"].startswith("every answer came from lmms-eval's response cache")


def test_a_run_from_a_config_file_writes_its_efficiency_record(workdir, tiny_path):
    out = workdir / "results" / "from-config"
    config = workdir / "run.yaml"
    config.write_text(
        f"model: llava_vtr\nmodel_args: pretrained={tiny_path},strategy=fastv,keep_tokens=6,prune_layer=2\n"
        f"tasks: vtr_tiny_qa\nbatch_size: 2\noutput_path: {out}\ninclude_path: {workdir / 'task'}\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(workdir / "hf"))
    proc = subprocess.run(
        [sys.executable, "-m", "lmms_eval", "--config", str(config)],
        cwd=workdir / "task", env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (results,) = out.rglob("*_results.json")
    (stats,) = out.rglob("vtr_stats_*.json")
    assert stats.parent == results.parent
    assert stats.name == f"vtr_stats_fastv_K2_keep6_{results.name.removesuffix('_results.json')}.json"
    record = json.loads(stats.read_text())
    assert record["prefills"] == DOCS and record["per_prune_layer"][0]["mean_image_tokens_kept"] == 6


def test_unknown_model_arg_fails_the_cli_with_the_valid_keys(workdir, tiny_path):
    proc = lmms_eval(workdir, f"pretrained={tiny_path},keep_token=64", "vtr_tiny_qa")
    output = proc.stdout + proc.stderr
    # lmms-eval 0.7.3 logs a failed run and exits 0; our argument errors end the process with status 2
    assert proc.returncode == 2, output[-2000:]
    assert "| Tasks" not in output and "Running generate_until requests" not in output
    # checked before lmms-eval indexes its tasks (~5 s), which it logs its tracker's arguments after
    assert "Evaluation tracker args" not in output, "--model_args are checked before the task index"
    assert "unknown model_args key 'keep_token' (did you mean 'keep_tokens'?)" in output
    assert "valid keys:" in output


@pytest.mark.parametrize(
    "bad,message",
    [
        ("prune_layer=99", "has 4 decoder layers"),  # (keep_ratio=1.5, strategy=fastvv: test_model_args.py)
        ("device=nodevice", "nodevice"),  # a loading error: lmms-eval alone would log it and exit 0
    ],
)
def test_bad_values_stop_the_cli_with_a_non_zero_status(workdir, tiny_path, bad, message):
    proc = lmms_eval(workdir, f"pretrained={tiny_path},{bad}", "vtr_tiny_qa")
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and message in output, output[-2000:]
    assert "Traceback" not in proc.stderr, "a clear message, not a stack trace"


def test_two_processes_share_the_docs_and_write_one_merged_record(workdir, tiny_path):
    """Data parallel (torchrun, two CPU processes): lmms-eval gives each process half the docs; every
    process's figures are merged and the one record, covering the whole run, is written once."""
    import socket

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    out, stats_path = workdir / "results" / "two-processes", workdir / "two-processes.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(workdir / "hf"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    cmd += ["-m", "lmms_eval", "--model", "llava_vtr", "--tasks", "vtr_tiny_qa,vtr_tiny_mc"]
    cmd += [
        "--model_args",
        f"pretrained={tiny_path},strategy=fastv,keep_tokens=8,prune_layer=2,stats_path={stats_path}",
    ]
    cmd += ["--include_path", str(workdir / "task"), "--batch_size", "2", "--output_path", str(out)]
    proc = subprocess.run(cmd, cwd=workdir / "task", env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    assert output.count("wrote efficiency stats to") == 1, "one process writes the merged record"
    assert [p.name for p in workdir.glob("two-processes*.json")] == ["two-processes.json"]
    assert not list(out.rglob("vtr_stats_*.json")), "stats_path= replaces the record beside the results"
    (results,) = out.rglob("*_results.json")
    assert json.loads(results.read_text())["n-samples"]["vtr_tiny_qa"]["effective"] == DOCS
    record = json.loads(stats_path.read_text())
    assert (record["world_size"], record["processes_merged"], record["prefills"]) == (2, 2, PREFILLS)
    assert record["requests"]["computed"] == {"generate_until": DOCS, "loglikelihood": 2 * DOCS}
    assert record["per_prune_layer"][0]["mean_image_tokens_kept"] == 8


def test_automatic_batch_size_is_refused(workdir, tiny_path):
    proc = lmms_eval(workdir, f"pretrained={tiny_path}", "vtr_tiny_qa", "--batch_size", "auto")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "batch_size='auto'" in output
    assert "Evaluation tracker args" not in output, "refused before the task index"


def test_llava_16_checkpoint_runs_with_its_default_budget(workdir, tmp_path_factory):
    from llava.vtr.tiny import build_tiny_llava_next

    next_path = build_tiny_llava_next(tmp_path_factory.mktemp("cli-llava-next"))
    results, stats, name, results_file = run_cli(workdir, next_path, "llava-next", "strategy=fastv,prune_layer=2")
    check_scores(results, results_file, f"pretrained={next_path},strategy=fastv,prune_layer=2")
    assert name.startswith("vtr_stats_fastv_K2_keep320_"), "LLaVA-1.6's default budget, named in the record"
    assert stats["prefills"] == PREFILLS and stats["mean_image_tokens"] == 88  # base view + 4 tiles + newlines


def readme_section() -> str:
    return (ROOT / "README.md").read_text().split("## Evaluating with lmms-eval", 1)[1].split("\n## ", 1)[0]


def readme_command() -> list[str]:
    """The README's offline lmms-eval command (the line of its lmms-eval section with --include_path), split."""
    lines = readme_section().replace("\\\n", " ").splitlines()
    (command,) = [line for line in lines if " -m lmms_eval " in line and "--include_path" in line]
    return shlex.split(command)


def test_the_readme_offline_command_runs_as_written(tmp_path):
    """From a folder laid out like the repository (the bundled task folder, and the model `make demo` builds in
    .cache/demo-llava: 576 image tokens), the README's command as written, but for the interpreter's path:
    offline, it scores both tasks, and the results land where the README says."""
    argv = readme_command()
    env_vars = dict(a.split("=", 1) for a in itertools.takewhile(lambda a: "=" in a and a[0] != "-", argv))
    argv = argv[len(env_vars) :]
    assert env_vars == {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"} and argv[0] == ".venv/bin/python"
    shutil.copytree(TASK_DIR, tmp_path / "scripts" / "lmms_tasks" / "vtr_tiny")
    build_tiny_llava(tmp_path / ".cache" / "demo-llava", **DEMO_SHAPE)  # what `make demo` builds
    env = dict(os.environ, **env_vars, HF_HOME=str(tmp_path / "hf"))  # HF_HOME: no shared datasets cache
    proc = subprocess.run(
        [sys.executable, *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    said = "results/lmms-demo/cache__demo-llava__vtr-fastv_K2_keep64/"
    assert f"`{said}`" in readme_section().replace("\n", " "), "the README says where the results land"
    folder = tmp_path / said
    (results_file,) = folder.glob("*_results.json")
    (stats,) = folder.glob("vtr_stats_fastv_K2_keep64_*.json")
    results, stats = json.loads(results_file.read_text()), json.loads(stats.read_text())
    # (the scores are checked against the model's own answers by the runs above, on the smaller test model)
    for task, metric in (("vtr_tiny_qa", "exact_match,none"), ("vtr_tiny_mc", "acc,none")):
        assert results["n-samples"][task]["effective"] == DOCS and metric in results["results"][task]
        assert [s["doc_id"] for s in logged_samples(results_file, task)] == list(range(DOCS))  # --log_samples
    assert stats["prefills"] == PREFILLS and stats["mean_image_tokens"] == 576
    kept = [(x["layer"], x["mean_image_tokens_in"], x["mean_image_tokens_kept"]) for x in stats["per_prune_layer"]]
    assert kept == [(2, 576, 64)]


def parse_cli(monkeypatch, *argv):
    """lmms-eval's own parsing of a command line (as `python -m lmms_eval ...` would get it)."""
    from lmms_eval.__main__ import parse_eval_args

    monkeypatch.setattr(sys, "argv", ["lmms_eval", *argv])
    return parse_eval_args()[1]


def test_a_repeated_include_path_stops_with_status_2_naming_the_missing_tasks(tiny_path, tmp_path, monkeypatch, capsys):
    """lmms-eval keeps the last --include_path, logs "Tasks not found" and exits 0; with our models the run
    stops with status 2 and says why. (In process: lmms-eval's own argument parsing and run function, our
    check installed through the entry points, the real task index.)"""
    from lmms_eval.__main__ import cli_evaluate_single

    (tmp_path / "other").mkdir()
    args = parse_cli(
        monkeypatch, "--model", "llava_vtr", "--model_args", f"pretrained={tiny_path}", "--tasks", "vtr_tiny_qa,vtr_tiny_mc",
        "--include_path", str(TASK_DIR), "--include_path", str(tmp_path / "other"),
    )  # fmt: skip
    with pytest.raises(SystemExit) as stop:
        cli_evaluate_single(args)
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert (
        f"llava_vtr: --tasks not found: vtr_tiny_qa, vtr_tiny_mc (searched lmms-eval's tasks and --include_path {tmp_path / 'other'})"
        in err
    )
    assert "--include_path was given 2 times and lmms-eval keeps only the last" in err


@pytest.mark.parametrize(
    "options,message",
    [
        (["--include_path", "/no/such/tasks"], "llava_vtr: --include_path /no/such/tasks: no such folder"),
        (["--include_path", str(TASK_DIR)], "llava_vtr: no --tasks given"),  # lmms-eval: exit 0
        (
            ["--tasks", "vtr_tiny_qa", "--batch_size", "0"],
            "llava_vtr: invalid --model_args: batch_size=0: must be >= 1",
        ),
    ],
)
def test_arguments_are_refused_before_the_task_index(tiny_path, monkeypatch, capsys, options, message):
    from lmms_eval.__main__ import cli_evaluate_single
    from lmms_eval.tasks import TaskManager

    def index(*args, **kwargs):
        raise AssertionError("the task index was built")

    monkeypatch.setattr(TaskManager, "initialize_tasks", index)
    args = parse_cli(monkeypatch, "--model", "llava_vtr", "--model_args", f"pretrained={tiny_path}", *options)
    with pytest.raises(SystemExit) as stop:
        cli_evaluate_single(args)
    assert stop.value.code == 2 and message in capsys.readouterr().err
