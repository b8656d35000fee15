"""`python -m llava.vtr.demo`: bad arguments and Ctrl-C are one line, never a traceback; timings come with
their spread, progress goes to stderr; LLaVA-OneVision runs an image and a video prompt, each with its kept tokens
per part (base view / tiles, frames / newline)."""

import re

import pytest
from cli_checks import assert_interrupted, one_error_line

from llava.vtr import demo
from llava.vtr.tiny import build_tiny_llava_onevision, build_tiny_original_llava_video
from llava.vtr.video_io import write_test_video

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
    (["--family", "llava-2"], "argument --family: invalid choice: 'llava-2'"),
    (["--frames", "0"], "--frames 0: must be >= 1"),
    (["--video", "clip.mp4"], "--video clip.mp4: LLaVA-1.5 and LLaVA-1.6 take images only; use --family onevision"),
    (["--family", "onevision", "--video", "clip.mp4"], "--video clip.mp4: no such file"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_a_bad_argument_is_one_line_and_exit_2(argv, message, capsys):
    assert demo.main(argv) == 2
    assert message in one_error_line(capsys.readouterr().err, PROG)


def test_prune_layer_past_the_model_and_ctrl_c(tiny_path, capsys, monkeypatch):
    assert demo.main(["--model", tiny_path, "--prune-layer", "99"]) == 2
    line = one_error_line(capsys.readouterr().err, PROG)
    assert "--prune-layer 99: the model has 4 decoder layers; choose 0..3" in line
    assert demo.main(["--model", tiny_path, "--strategies", "visionzip"]) == 2  # a method's own refusal, K=2
    line = one_error_line(capsys.readouterr().err, PROG)
    assert "--strategies visionzip: visionzip works in the vision tower, before the LLM" in line

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


def tables(out: str) -> list[dict]:
    """The rows of each table printed, by strategy name (one table per prompt)."""
    found = []
    for line in out.splitlines():
        cells = [c.strip() for c in (line + " ").split(" | ")]  # (an empty last cell leaves " |")
        if cells[0] == "strategy":
            found.append({})
        if len(cells) > 1 and found:
            found[-1][cells[0]] = cells
    return found


def parts(cell: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", cell)]


def test_onevision_runs_an_image_and_a_video_prompt_with_kept_tokens_per_part(tmp_path, capsys, monkeypatch):
    # the built-in model of --family onevision, in the tiny shape: 32 px views of 8 px patches (16 tokens a view, a
    # pooled frame 2 x 2), anyres_max_2; the 384 px demo image is a 64 x 64 tiling (8 x 8), shrunk to 5 x 5
    monkeypatch.setitem(demo.FAMILIES, "onevision", ("LLaVA-OneVision", build_tiny_llava_onevision, {}))
    argv = ["--family", "onevision", "--cache-dir", str(tmp_path), "--strategies", "fastv", "--budgets", "8"]
    assert demo.main([*argv, "--frames", "3", "--repeats", "1", "--max-new-tokens", "1"]) == 0
    out, err = capsys.readouterr()
    assert (tmp_path / "demo-onevision" / "vtr_tiny.json").is_file()
    assert "built-in random LLaVA-OneVision-shaped model" in out
    assert "image prompt:" in out and "46 of them image tokens" in out
    assert "video prompt:" in out and "13 of them video tokens" in out
    image, video = tables(out)
    assert image["strategy"][2] == "image kept" and image["strategy"][6] == "kept in base view, tiles"
    assert video["strategy"][2] == "video kept" and video["strategy"][6] == "kept per frame (+ video newline)"
    # keep-all: base view 16 + tiles 5 x (5 + newline); frames 3 x 4 + the video's newline
    assert image["keep-all"][2] == "46" and image["keep-all"][6] == "base 16, tiles 30"
    assert video["keep-all"][2] == "13" and video["keep-all"][6] == "4 4 4 + newline 1"
    for table in (image, video):
        assert table["fastv"][2] == "8" and sum(parts(table["fastv"][6])) == 8
    assert len(parts(video["fastv"][6])) == 4 and max(parts(video["fastv"][6])[:3]) <= 4
    assert err.count("[3/3] generating with fastv, K=2 keep=8") == 2


def test_onevision_checkpoint_with_a_video_file_and_clear_errors(ov_path, tmp_path, capsys):
    clip = write_test_video(tmp_path / "clip.mp4", num_frames=16, size=(64, 48), fps=8)
    argv = ["--model", ov_path, "--video", str(clip), "--frames", "5", "--strategies", "random", "--budgets", "6"]
    assert demo.main([*argv, "--repeats", "1", "--max-new-tokens", "1"]) == 0
    out = capsys.readouterr().out
    image, video = tables(out)
    assert "21 of them video tokens" in out  # 5 of the 16 frames, 2 x 2 each, + 1
    assert video["keep-all"][6] == "4 4 4 4 4 + newline 1" and video["random"][2] == "6"
    assert sum(parts(video["random"][6])) == 6 and image["random"][2] == "6"

    original, _ = build_tiny_original_llava_video(tmp_path / "original")
    assert demo.main(["--model", str(original)]) == 2
    line = one_error_line(capsys.readouterr().err, PROG)
    assert f"--model {original}: an original-format LLaVA release; give a llava-hf checkpoint" in line

    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video")
    assert demo.main(["--model", ov_path, "--video", str(bad), "--strategies", "random", "--repeats", "1"]) == 2
    assert f"--video {bad}: cannot read it" in one_error_line(capsys.readouterr().err, PROG)


def test_llava_video_layout_counts_each_frame_with_its_row_newlines(tmp_path, capsys):
    # LLaVA-Video's layout on 40 px views (5 x 5 patches): frames average-pooled to 2 x 2, a newline after each
    # pooled row (2 x 3 tokens a frame), none closing the video
    path = build_tiny_llava_onevision(
        tmp_path / "llava-video",
        image_size=40,
        grid_pinpoints=((40, 80), (80, 40), (80, 80)),
        newline_position="grid",
        pool_mode="average",
    )
    argv = ["--model", str(path), "--frames", "3", "--strategies", "fastv", "--budgets", "5", "--repeats", "1"]
    assert demo.main([*argv, "--max-new-tokens", "1"]) == 0
    out = capsys.readouterr().out
    _, video = tables(out)
    assert "18 of them video tokens" in out
    assert video["keep-all"][6] == "6 6 6" and video["fastv"][2] == "5"
    assert len(parts(video["fastv"][6])) == 3 and sum(parts(video["fastv"][6])) == 5
