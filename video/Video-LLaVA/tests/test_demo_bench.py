"""The demo and the bench case: realistic token counts, they run end to end with each time's spread, and a
bad argument is one line (exit 2), never a traceback."""

import re

import pytest
import torch
from cli_checks import assert_interrupted, one_error_line

from videollava.vtr import VTRConfig, demo, load_model, load_processor
from videollava.vtr.tiny import bench_case
from videollava.vtr.video_io import write_test_video

SMALL = dict(hidden_size=32, num_layers=3, num_heads=2, num_kv_heads=1, intermediate_size=64)


def test_bench_case_is_an_8_frame_224px_video_of_2056_visual_tokens(tmp_path):
    case = bench_case(SMALL, tmp_path)
    processor = load_processor(case["path"])
    inputs = case["inputs"](processor, 2)
    assert tuple(inputs["pixel_values_videos"].shape) == (2, 8, 3, 224, 224)
    model = load_model(case["path"], VTRConfig(strategy="fastv", keep_tokens=100, prune_layer=1))
    assert ((inputs["input_ids"] == model.config.video_token_id).sum(1) == 8 * 257).all()
    with torch.no_grad():
        model(**inputs, logits_to_keep=1)
        case["vision"](model, inputs)
    assert model.vtr_last.stages[0].image_tokens_before == [2056, 2056]
    assert model.vtr_last.stages[0].image_tokens_kept == [100, 100]
    assert bench_case(SMALL, tmp_path, model=case["path"])["path"] == case["path"]


def test_demo_runs_a_video_file_and_reports_tokens_kept_per_frame(tiny_path, video_files, capsys):
    argv = ["--model", tiny_path, "--video", str(video_files[1]), "--strategies", "fastv", "--budgets", "20,20"]
    assert demo.main([*argv, "--repeats", "2", "--max-new-tokens", "2", "--num-frames", "4"]) == 0
    out, err = capsys.readouterr()
    assert "prompt: " in out and "68 of them video tokens" in out  # 4 frames x 17
    assert "--budgets lists 20 more than once; it runs once" in err and "warm-up round (not timed)" in err
    rows = [[c.strip() for c in line.split("|")] for line in out.splitlines() if " | " in line]
    assert [row[0] for row in rows] == ["strategy", "none (unpruned)", "keep-all", "fastv"]
    cells = rows[3]
    per_frame = [int(n) for n in cells[6].split()]
    assert cells[2] == "20" and len(per_frame) == 4 and sum(per_frame) == 20
    assert rows[2][6] == "17 17 17 17"  # keep-all keeps every token of every frame
    assert all(re.fullmatch(r"\d+\.\d \[\d+\.\d-\d+\.\d\]", row[4]) for row in rows[1:])
    assert rows[1][5] == "reference"
    assert all(re.fullmatch(r"~?\d+\.\d\dx \[\d+\.\d\d-\d+\.\d\d\]", row[5]) for row in rows[2:])
    assert "median [min-max] over 2 timed rounds" in out


PROG = "python -m videollava.vtr.demo"
BAD = [
    (["--budgets", "abc"], "--budgets 'abc': 'abc' is not a whole number"),
    (["--budgets", "-5"], "--budgets '-5': -5 must be >= 1"),
    (["--strategies", "nosuch"], "--strategies nosuch: unknown strategy 'nosuch'"),
    (["--strategies", " "], "--strategies ' ' is empty"),
    (["--video", "bad.mp4"], "--video bad.mp4: no such file"),
    (["--num-frames", "0"], "--num-frames 0: must be >= 1"),
    (["--model", "./no/such/folder"], "--model: model folder './no/such/folder' does not exist"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_a_bad_argument_is_one_line_and_exit_2(argv, message, capsys):
    assert demo.main(argv) == 2
    assert message in one_error_line(capsys.readouterr().err, PROG)


def test_unreadable_video_prune_layer_past_the_model_and_ctrl_c(tiny_path, tmp_path, capsys, monkeypatch):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    assert demo.main(["--model", tiny_path, "--video", str(broken)]) == 2
    assert f"--video {broken}: cannot read video" in one_error_line(capsys.readouterr().err, PROG)
    clip = ["--video", str(tmp_path / "clip.mp4")]
    write_test_video(tmp_path / "clip.mp4", num_frames=8, size=(32, 32))
    assert demo.main(["--model", tiny_path, *clip, "--prune-layer", "99"]) == 2
    assert "--prune-layer 99: the model has 4 decoder layers; choose 0..3" in one_error_line(
        capsys.readouterr().err, PROG
    )

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo.api, "load_model", interrupt)
    assert demo.main(["--model", tiny_path, *clip]) == 130
    err = capsys.readouterr().err
    assert_interrupted(err)
