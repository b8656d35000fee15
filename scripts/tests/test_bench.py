"""scripts/bench.py on every model family of forks.toml whose fork provides `tiny.bench_case`: two tiny rounds
each, every time with its spread; bad arguments and Ctrl-C are one line; a result file is never replaced."""

import importlib
import json
import os
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench  # noqa: E402
import forks  # noqa: E402

FAMILIES = forks.load().families
TINY = ["--hidden-size", "64", "--intermediate-size", "128", "--layers", "3", "--heads", "2", "--kv-heads", "1"]
#: families whose bench model has a hybrid decoder, full attention in every 4th layer: none in 3 layers, so they get
#: their own test (test_bench_moves_keep_all_onto_a_hybrid_decoders_attention_layers)
HYBRID = ("qwen3.5",)


def has_bench_case(backbone: str) -> bool:
    package = FAMILIES[backbone].package
    try:
        return hasattr(importlib.import_module(f"{package}.tiny"), "bench_case")
    except ImportError:
        return False


@pytest.mark.parametrize("backbone", sorted(set(FAMILIES) - set(HYBRID)))
def test_bench_reports_every_setting_on_the_backbone(backbone, tmp_path, capsys):
    if not has_bench_case(backbone):
        pytest.skip(f"the {backbone} fork has no bench_case yet")
    out = tmp_path / "bench.json"
    argv = ["--backbone", backbone, *TINY, "--rounds", "2", "--decode-steps", "1", "--strategies", "fastv,random"]
    argv += ["--budgets", "8", "--prune-layer", "1", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())
    env, rows = report["env"], report["rows"]
    assert env["backbone"] == backbone and env["layers"] == 3 and env["image_tokens"] > 8 and "frames" not in env
    assert ("(anyres)" in env["input"]) == bool(FAMILIES[backbone].bench.get("anyres")), env["input"]
    assert [(r["strategy"], r["keep_tokens"], r["prune_layers"]) for r in rows] == [
        ("none", "-", []),
        ("keep-all", "all", [1]),
        ("fastv", 8, [1]),
        ("random", 8, [1]),  # --prune-layer given: every method at that K
    ]
    by_name = {r["strategy"]: r for r in rows}
    # keeping 8 of the visual tokens from layer 1 on: fewer tokens in layers 1-2, a smaller cache
    assert by_name["fastv"]["equivalent_tokens"] < by_name["none"]["equivalent_tokens"]
    assert by_name["fastv"]["ideal_speedup"] > 1 and by_name["keep-all"]["ideal_speedup"] == 1
    assert by_name["random"]["kv_mib"] < by_name["none"]["kv_mib"]
    out, err = capsys.readouterr()
    assert "| strategy | keep tokens | K |" in out and "| fastv | 8 | 1 |" in out and "dycoke" not in out
    assert "warm-up round (not timed), 5 settings" in err and "timed round 2/2" in err
    # (on these tiny models the vision tower is most of TTFT, so a noisy round can make llm_ms negative)
    number = r"-?\d+\.\d+"
    spread, speedup = rf"{number} \[{number}-{number}\]", rf"~?{number}x \[{number}-{number}\]"
    line = next(line for line in out.splitlines() if line.startswith("| random | 8 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert all(re.fullmatch(spread, cells[i]) for i in (3, 5, 9, 10)) and re.fullmatch(speedup, cells[4]), cells
    assert re.fullmatch(speedup, cells[6]) and "| none | - | - |" in out and "| reference |" in out
    assert "median [min-max] over 2 timed rounds" in out and "~ = inside the noise" in out
    for r in rows:
        assert len(r["samples"]["ttft_ms"]) == 2 and len(r["samples"]["llm_ms"]) == 2
        low, high = r["llm_speedup_range"]
        assert low <= r["llm_speedup"] <= high and r["ttft_ms_range"][0] <= r["ttft_ms"] <= r["ttft_ms_range"][1]
    assert by_name["none"]["within_noise"] is None and isinstance(by_name["keep-all"]["within_noise"], bool)


def test_bench_moves_keep_all_onto_a_hybrid_decoders_attention_layers(tmp_path, capsys):
    """Qwen3.5 as forks.toml benches it (the stock layout: full attention in layers 3 and 7 of 8): without
    --prune-layer, keep-all (FastV's machinery) and the methods without a schedule of their own move from K=2 to 4,
    scored from layer 3, as the model moves a default schedule; the cache counts the linear-attention layers'
    convolution and recurrent states, which do not shrink (only layer 7's keys and values do); the ideal speedup
    prices each layer by its kind."""
    out = tmp_path / "bench.json"
    argv = ["--backbone", "qwen3.5", *TINY, "--layers", "8", "--rounds", "1", "--decode-steps", "1"]
    argv += [
        "--strategies",
        "fastv,random",
        "--budgets",
        "8",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(out),
    ]
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())
    env, rows = report["env"], report["rows"]
    assert "hybrid decoder: 3 of 4 layers Gated DeltaNet" in env["input"] and env["layers"] == 8
    assert env["prune_layer"] == "own schedules (K=4 without one)"
    assert [(r["strategy"], r["prune_layers"]) for r in rows] == [
        ("none", []),
        ("keep-all", [4]),
        ("fastv", [4]),
        ("random", [4]),
    ]
    by_name = {r["strategy"]: r for r in rows}
    # float32; two full-attention layers of one 32-wide kv head; six linear-attention layers, each a convolution state
    # of 2 x 32 (q, k) + 2 x 32 (v) channels x kernel 4 and a recurrent state of 2 value heads x 32 x 32
    attention_row, states = 2 * 32 * 4, 6 * ((2 * 32 + 2 * 32) * 4 + 2 * 32 * 32) * 4
    assert by_name["none"]["kv_mib"] * 2**20 == 2 * env["seq_len"] * attention_row + states
    dropped = env["image_tokens"] - 8
    assert (by_name["none"]["kv_mib"] - by_name["random"]["kv_mib"]) * 2**20 == pytest.approx(dropped * attention_row)
    assert by_name["keep-all"]["ideal_speedup"] == 1 < by_name["fastv"]["ideal_speedup"]
    cost = importlib.import_module("visual_token_pruning.cost")
    ((layer, before, after, _),) = by_name["fastv"]["samples"]["stages"][0]
    lengths = [before] * 4 + [after] * 4
    config = importlib.import_module("transformers").AutoConfig.from_pretrained(env["model"]).get_text_config()
    assert by_name["fastv"]["ideal_speedup"] == pytest.approx(
        cost.ideal_speedup_of(cost.layer_costs(config), before, lengths)
    )
    assert "| keep-all | all | 4 |" in capsys.readouterr().out


def test_video_methods_run_their_own_schedules_at_a_keep_ratio(tmp_path, capsys):
    """Without --prune-layer each video method runs its own schedule (EVS and DyCoke before the LLM, HoliTom there
    and at its inner merge), keep-all FastV's K=2; the ideal and the equivalent tokens count the lengths the
    record says each layer ran on (HoliTom's merged tokens and both its stages), and DyCoke's masked decode
    pruning is said to save nothing."""
    out = tmp_path / "bench.json"
    argv = ["--backbone", "llava-onevision", "--frames", "4", *TINY, "--layers", "4", "--rounds", "1"]
    argv += ["--decode-steps", "1", "--strategies", "evs,holitom,dycoke", "--keep-ratios", "0.5"]
    assert bench.main([*argv, "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    env, rows = report["env"], report["rows"]
    assert env["frames"] == 4 and env["image_tokens"] == 4 * 14 * 14 + 1 and env["layers"] == 4
    assert [(r["strategy"], r["keep_ratio"], r["prune_layers"]) for r in rows] == [
        ("none", "-", []),
        ("keep-all", "all", [2]),
        ("evs", 0.5, [0]),
        ("holitom", 0.5, [0, 3]),  # the inner merge at the official 18 of 28 layers: round(4 x 18 / 28) = 3
        ("dycoke", 0.5, [0]),
    ]
    cost = importlib.import_module("llava.vtr.cost")
    seq_len, dims = env["seq_len"], (env["hidden"], env["intermediate"], env["kv_dim"])
    by_name = {r["strategy"]: r for r in rows}
    (first, _, before_merge, merged), (inner, _, after_merge, _) = by_name["holitom"]["samples"]["stages"][0]
    assert (first, inner) == (0, 3) and merged > 0 and after_merge < before_merge < seq_len
    lengths = [before_merge] * 3 + [after_merge]  # its merged tokens run in every layer from 0 on
    assert by_name["holitom"]["equivalent_tokens"] == sum(lengths) / 4
    assert by_name["holitom"]["ideal_speedup"] == pytest.approx(cost.ideal_speedup(seq_len, lengths, *dims))
    for name in ("evs", "dycoke"):
        [(layer, before, after, _)] = by_name[name]["samples"]["stages"][0]
        assert layer == 0 and before == seq_len and by_name[name]["equivalent_tokens"] == after < seq_len
    assert by_name["keep-all"]["equivalent_tokens"] == by_name["none"]["equivalent_tokens"] == seq_len
    printed = capsys.readouterr().out
    assert "| strategy | keep ratio | K |" in printed and "| holitom | 0.5 | 0,3 |" in printed
    assert "prune_layer=own schedules (K=2 without one)" in printed
    assert "dycoke: its decode-time pruning hides visual cache rows" in printed and "saves no decode time" in printed


ONEVISION = ["--backbone", "llava-onevision", "--frames", "2"]
BAD = [
    (["--budgets", "abc"], "--budgets 'abc': 'abc' is not a whole number"),
    (["--budgets", "-5"], "--budgets '-5': -5 must be >= 1"),
    (["--budgets", "8", "--keep-ratios", "0.5"], "--budgets and --keep-ratios: give one of them"),
    (["--keep-ratios", "0.5,1.5"], "--keep-ratios: 1.5 must be in (0, 1] (a share of the visual tokens kept)"),
    (["--keep-ratios", "0"], "--keep-ratios: 0 must be in (0, 1]"),
    (["--keep-ratios", "half"], "--keep-ratios: 'half' is not a number"),
    (["--strategies", "nosuch"], "--strategies nosuch: unknown strategy 'nosuch'"),
    (["--strategies", ""], "--strategies '' is empty"),
    (["--prune-layer", "99"], "--prune-layer 99: --layers is 3; choose 0..2"),
    (["--rounds", "0"], "--rounds 0: must be >= 1"),
    (["--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
    (["--heads", "3"], "the hidden size must be a multiple of the heads"),
    (["--backbone", "internvl", "--anyres"], "--anyres is LLaVA-1.6 (--backbone llava-next), not --backbone internvl"),
    (
        ["--backbone", "nope"],
        "argument --backbone: invalid choice: 'nope' (choose from 'internvl', 'llava', 'llava-next'",
    ),
    (["--frames", "8"], "--frames: the llava bench case is not a video with a frame count to choose"),
    (["--backbone", "llava-onevision", "--frames", "0"], "--frames 0: must be >= 1"),
    (["--model", "./no/such/folder"], "--model: model folder './no/such/folder' does not exist"),
    # a method's own refusal on the loaded model (VisionZip works before the LLM), before anything is timed
    (
        ["--strategies", "visionzip", "--prune-layer", "2"],
        "--strategies visionzip: visionzip works in the vision tower, before the LLM",
    ),
    # an explicit --prune-layer is every method's, as given: HoliTom's schedule is [0, K]
    ([*ONEVISION, "--strategies", "holitom", "--prune-layer", "2"], "--strategies holitom: holitom reduces before"),
    # a refusal that only the forward meets (DyCoke's decode layer 3 on 3 layers), in the warm-up round
    ([*ONEVISION, "--strategies", "dycoke"], "--strategies dycoke: strategy 'dycoke' prunes the KV cache of decoder"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_a_bad_argument_is_one_line_and_exit_2(argv, message, tmp_path, capsys):
    assert bench.main([*TINY, "--out", str(tmp_path / "b.json"), *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1
    assert err.rstrip().splitlines()[-1].startswith("scripts/bench.py: error: ") and message in err
    assert not (tmp_path / "b.json").exists()


def test_an_existing_result_is_never_replaced_and_ctrl_c_writes_nothing(tmp_path, capsys, monkeypatch):
    out = tmp_path / "b.json"
    out.write_text("finished")
    assert bench.main([*TINY, "--out", str(out)]) == 2
    assert f"--out {out}: exists" in capsys.readouterr().err and out.read_text() == "finished"
    # a run that finds the file created meanwhile (another run) writes beside it
    written = bench.write_new(out, "new")
    assert written == tmp_path / f"b-{os.getpid()}.json" and written.read_text() == "new"
    assert out.read_text() == "finished" and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["b.json", written.name]
    )

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "run_setting", interrupt)
    fresh = tmp_path / "fresh.json"
    argv = [*TINY, "--rounds", "1", "--strategies", "random", "--budgets", "8", "--prune-layer", "1"]
    assert bench.main([*argv, "--cache-dir", str(tmp_path / "cache"), "--out", str(fresh)]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.rstrip().endswith("interrupted (Ctrl-C); nothing more was run")
    assert not fresh.exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_an_unwritable_out_is_one_line_before_the_benchmark_and_a_write_failure_names_it(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file.txt"
    blocker.write_text("")
    ran = []
    monkeypatch.setattr(bench, "run_setting", lambda *args: ran.append(1))
    argv = [*TINY, "--rounds", "1", "--strategies", "random", "--budgets", "8", "--prune-layer", "1"]
    assert bench.main([*argv, "--cache-dir", str(tmp_path / "cache"), "--out", str(blocker / "b.json")]) == 2
    err = capsys.readouterr().err
    assert f"scripts/bench.py: error: --out {blocker / 'b.json'}: cannot create its folder" in err and not ran
    # the write itself failing (the disk filled up meanwhile): one line naming the file
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(bench.timing.UsageError, match=f"--out {tmp_path / 'b.json'}: cannot write .*No space left"):
        bench.write_new(tmp_path / "b.json", "x")
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]  # nothing built, no temporary file


def test_the_backbones_are_forks_toml_s_families_and_a_broken_registry_is_one_line(tmp_path, capsys, monkeypatch):
    """A family added to forks.toml (one block) is a --backbone whose `bench` arguments reach its fork's
    tiny.bench_case; --anyres picks the fork's anyres family; a broken forks.toml is one line."""
    registry = forks.load()
    for folder in ("image", "video"):
        (tmp_path / folder).symlink_to(registry.path.parent / folder)
    block = '\n[family.big-llava]\nfork = "llava"\nruntime = "lmms-eval"\n'
    (tmp_path / "forks.toml").write_text(registry.path.read_text() + block)
    monkeypatch.setattr(forks, "ROOT", tmp_path)
    out = tmp_path / "b.json"
    assert bench.main([*TINY, "--backbone", "big-llava", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert (
        err == "scripts/bench.py: error: forks.toml: [family.big-llava] lacks runner, lmms_model, checkpoint, models\n"
    )
    block = block.replace("runtime", "runner") + 'lmms_model = "llava_vtr"\ncheckpoint = "x/y"\nbench = { size = 7 }\n'
    block += 'models = ["LLaVA-1.5"]\n'
    (tmp_path / "forks.toml").write_text(registry.path.read_text() + block)
    real, cases = importlib.import_module, []

    def bench_case(shape, cache_dir, model=None, **kwargs):
        cases.append(kwargs)
        raise KeyboardInterrupt  # stop there: nothing built, nothing written

    fake_tiny = type(sys)("fake_tiny")
    fake_tiny.bench_case = bench_case
    monkeypatch.setattr(importlib, "import_module", lambda name: fake_tiny if name == "llava.vtr.tiny" else real(name))
    for argv in (["--backbone", "big-llava"], ["--backbone", "llava"], ["--anyres"], ["--backbone", "llava-next"]):
        assert bench.main([*TINY, *argv, "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]) == 130
    assert cases == [{"size": 7}, {}, {"anyres": True}, {"anyres": True}] and not out.exists()
