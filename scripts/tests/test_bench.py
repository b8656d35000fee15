"""scripts/bench.py on every backbone whose fork provides `tiny.bench_case`: one tiny round each."""

import importlib
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench  # noqa: E402

TINY = ["--hidden-size", "64", "--intermediate-size", "128", "--layers", "3", "--heads", "2", "--kv-heads", "1"]


def has_bench_case(backbone: str) -> bool:
    package = bench.BACKBONES[backbone][0]
    try:
        return hasattr(importlib.import_module(f"{package}.tiny"), "bench_case")
    except ImportError:
        return False


@pytest.mark.parametrize("backbone", sorted(bench.BACKBONES))
def test_bench_reports_every_setting_on_the_backbone(backbone, tmp_path, capsys):
    if not has_bench_case(backbone):
        pytest.skip(f"the {backbone} fork has no bench_case yet")
    out = tmp_path / "bench.json"
    argv = ["--backbone", backbone, *TINY, "--rounds", "1", "--decode-steps", "1", "--strategies", "fastv,random"]
    argv += ["--budgets", "8", "--prune-layer", "1", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())
    env, rows = report["env"], report["rows"]
    assert env["backbone"] == backbone and env["layers"] == 3 and env["image_tokens"] > 8
    assert [(r["strategy"], r["keep_tokens"]) for r in rows] == [
        ("none", "-"),
        ("keep-all", "all"),
        ("fastv", 8),
        ("random", 8),
    ]
    by_name = {r["strategy"]: r for r in rows}
    # keeping 8 of the visual tokens from layer 1 on: fewer tokens in layers 1-2, a smaller cache
    assert by_name["fastv"]["equivalent_tokens"] < by_name["none"]["equivalent_tokens"]
    assert by_name["fastv"]["ideal_speedup"] > 1 and by_name["keep-all"]["ideal_speedup"] == 1
    assert by_name["random"]["kv_mib"] < by_name["none"]["kv_mib"]
    assert "| fastv | 8 |" in capsys.readouterr().out
