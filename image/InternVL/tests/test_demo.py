"""`python -m internvl_vtr.demo` on bad input: one line naming the flag, exit 2, never a traceback; Ctrl-C is
one line too. (The end-to-end run, with its timings, is in test_internvl.py.)"""

import pytest
from cli_checks import assert_interrupted, one_error_line

from internvl_vtr import demo

PROG = "python -m internvl_vtr.demo"
BAD = [
    (["--budgets", "abc"], "--budgets 'abc': 'abc' is not a whole number"),
    (["--budgets", "-5"], "--budgets '-5': -5 must be >= 1"),
    (["--strategies", "nosuch"], "--strategies nosuch: unknown strategy 'nosuch'"),
    (["--strategies", ""], "--strategies '' is empty"),
    (["--image", "bad.png"], "--image bad.png: no such file"),
    (["--video", "bad.mp4"], "--video bad.mp4: no such file"),
    (["--video", "a.mp4", "--image", "b.png"], "--image and --video: give one of them"),
    (["--max-patches", "0"], "--max-patches 0: must be >= 1"),
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
