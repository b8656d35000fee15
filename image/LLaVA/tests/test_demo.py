"""`python -m llava.vtr.demo`: bad arguments and Ctrl-C are one line, never a traceback; timings come with
their spread, progress goes to stderr."""

import re

import pytest
from cli_checks import assert_interrupted, one_error_line

from llava.vtr import demo

PROG = "python -m llava.vtr.demo"

BAD = [
    (["--budgets", "abc"], "--budgets 'abc': 'abc' is not a whole number"),
    (["--budgets", "-5"], "--budgets '-5': -5 must be >= 1"),
    (["--budgets", ""], "--budgets '' is empty"),
    (["--strategies", "nosuch"], "--strategies nosuch: unknown strategy 'nosuch'"),
    (["--strategies", ""], "--strategies '' is empty"),
    (["--image", "bad.png"], "--image bad.png: no such file"),
    (["--model", "./no/such/folder"], "--model: model folder './no/such/folder' does not exist"),
    (["--repeats", "0"], "--repeats 0: must be >= 1"),
    (["--prune-layer", "x"], "argument --prune-layer: invalid int value: 'x'"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_a_bad_argument_is_one_line_and_exit_2(argv, message, capsys):
    assert demo.main(argv) == 2
    assert message in one_error_line(capsys.readouterr().err, PROG)


def test_prune_layer_past_the_model_and_ctrl_c(tiny_path, capsys, monkeypatch):
    assert demo.main(["--model", tiny_path, "--prune-layer", "99"]) == 2
    line = one_error_line(capsys.readouterr().err, PROG)
    assert "--prune-layer 99: the model has 4 decoder layers; choose 0..3" in line

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo.api, "load_model", interrupt)
    assert demo.main(["--model", tiny_path]) == 130
    err = capsys.readouterr().err
    assert_interrupted(err)


def test_demo_prints_each_time_with_its_spread_and_shows_progress(tiny_path, capsys):
    argv = ["--model", tiny_path, "--strategies", "fastv,fastv", "--budgets", "8", "--repeats", "2"]
    assert demo.main([*argv, "--max-new-tokens", "1"]) == 0
    out, err = capsys.readouterr()
    assert "--strategies lists fastv more than once; it runs once" in err
    assert "[3/3] generating with fastv, K=2 keep=8" in err
    assert "warm-up round (not timed), 3 settings" in err and "timed round 2/2" in err
    rows = {
        line.split(" | ")[0].strip(): [c.strip() for c in line.split(" | ")]
        for line in out.splitlines()
        if " | " in line
    }
    assert list(rows) == ["strategy", "none (unpruned)", "keep-all", "fastv"]
    spread = re.compile(r"^\d+\.\d \[\d+\.\d-\d+\.\d\]$")
    speedup = re.compile(r"^~?\d+\.\d\dx \[\d+\.\d\d-\d+\.\d\d\]$")
    assert rows["strategy"][4:6] == ["prefill ms", "speedup"]
    assert all(spread.match(rows[name][4]) for name in ("none (unpruned)", "keep-all", "fastv"))
    assert rows["none (unpruned)"][5] == "reference"
    assert speedup.match(rows["keep-all"][5]) and speedup.match(rows["fastv"][5])
    assert rows["keep-all"][2:4] == ["64", "98"] and rows["fastv"][2:4] == ["8", "42"]
    assert "median [min-max] over 2 timed rounds" in out and "~ = inside the noise" in out
