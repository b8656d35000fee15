"""`python -m visual_token_pruning.demo` on bad input: one line naming the flag, exit 2, never a traceback; Ctrl-C is
one line too. A small end-to-end run shows each time with its spread."""

import re

import pytest
from cli_checks import assert_interrupted, one_error_line

from visual_token_pruning import demo

PROG = "python -m visual_token_pruning.demo"
BAD = [
    (["--budgets", "abc"], "--budgets 'abc': 'abc' is not a whole number"),
    (["--budgets", "-5"], "--budgets '-5': -5 must be >= 1"),
    (["--strategies", "nosuch"], "--strategies nosuch: unknown strategy 'nosuch'"),
    (["--strategies", ""], "--strategies '' is empty"),
    (["--image", "bad.png"], "--image bad.png: no such file"),
    (["--video", "bad.mp4"], "--video bad.mp4: no such file"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0: must be >= 1"),
    (["--model", "./no/such/folder"], "--model: model folder './no/such/folder' does not exist"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_a_bad_argument_is_one_line_and_exit_2(argv, message, capsys):
    assert demo.main(argv) == 2
    assert message in one_error_line(capsys.readouterr().err, PROG)


def test_prune_layer_past_the_model_and_ctrl_c(tiny_path, capsys, monkeypatch):
    assert demo.main(["--model", tiny_path, "--prune-layer", "99"]) == 2
    assert "--prune-layer 99: the model has 4 decoder layers; choose 0..3" in one_error_line(
        capsys.readouterr().err, PROG
    )

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo.api, "load_model", interrupt)
    assert demo.main(["--model", tiny_path]) == 130
    err = capsys.readouterr().err
    assert_interrupted(err)


def test_demo_prints_each_time_with_its_spread(tiny_path, capsys):
    argv = ["--model", tiny_path, "--strategies", "random", "--budgets", "20", "--repeats", "2"]
    assert demo.main([*argv, "--max-new-tokens", "1"]) == 0
    out, err = capsys.readouterr()
    assert "warm-up round (not timed), 3 settings" in err and "timed round 2/2" in err
    rows = [[c.strip() for c in line.split(" | ")] for line in out.splitlines() if " | " in line]
    assert [row[0] for row in rows] == ["strategy", "none (unpruned)", "keep-all", "random"]
    assert [row[5] for row in rows[:2]] == ["speedup", "reference"]
    assert all(re.fullmatch(r"\d+\.\d \[\d+\.\d-\d+\.\d\]", row[4]) for row in rows[1:])
    assert all(re.fullmatch(r"~?\d+\.\d\dx \[\d+\.\d\d-\d+\.\d\d\]", row[5]) for row in rows[2:])
    assert rows[3][2] == "20" and rows[3][6].startswith("g0: ")
    assert "median [min-max] over 2 timed rounds" in out and "~ = inside the noise" in out


def test_the_kept_cells_of_a_qwen2_5_vl_video_lie_on_its_grids(family_paths, capsys):
    """Qwen2.5-VL's frame groups sit apart in absolute time; the demo's (row, col) cells still come from each
    group's own grid (never negative), image and frame groups each named."""
    argv = ["--model", family_paths("qwen2_5_vl"), "--video", "builtin", "--strategies", "random"]
    assert demo.main([*argv, "--budgets", "400", "--repeats", "1", "--max-new-tokens", "1"]) == 0
    rows = [[c.strip() for c in line.split(" | ")] for line in capsys.readouterr().out.splitlines() if " | " in line]
    cells = " | ".join(rows[-1][6:-1])  # the groups are ' | '-separated inside the column too
    assert cells.startswith("g0: ") and "| g1: " in cells
    shown = [c for c in cells.split()[:-1] if c not in ("...", "|") and ":" not in c]  # the column may cut the last
    assert len(shown) >= 6 and all(re.fullmatch(r"\d+,\d+", cell) for cell in shown), cells
