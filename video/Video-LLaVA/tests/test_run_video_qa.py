"""The native video QA runner (`python -m videollava.vtr.run_video_qa`) and its scorer.

Flags, data files, chunking, resume, merge and scoring need no model; the end-to-end tests load one tiny
random Video-LLaVA per module and answer 5 questions on 4 videos (two real, one missing, one corrupt).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from videollava.vtr import run_video_qa as rq
from videollava.vtr import score
from videollava.vtr.config import VTRConfig

FORK = Path(__file__).resolve().parents[1]


def parse(argv):
    parser = rq.build_parser()
    return rq.vtr_config_from_args(parser.parse_args(argv), parser)


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------ flags


def test_every_vtr_field_has_a_flag_that_round_trips_its_default():
    """Generated from the dataclass: a new VTRConfig field must get its flag with no flag code."""
    parser = rq.build_parser()
    flags = {s for action in parser._actions for s in action.option_strings}
    baseline = VTRConfig()
    for f in fields(VTRConfig):
        if not f.init:
            continue
        assert f"--vtr_{f.name}" in flags, f.name
        text = (
            "none" if f.default is None else str(f.default).lower() if isinstance(f.default, bool) else str(f.default)
        )
        config = parse([f"--vtr_{f.name}", text])
        assert getattr(config, f.name) == getattr(baseline, f.name), f.name


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--vtr_prune_layer", "1", "13", "24"], dict(prune_layer=[1, 13, 24], prune_layers=[1, 13, 24])),
        (
            ["--vtr_prune_layer", "2", "8", "--vtr_keep_tokens", "64", "32"],
            dict(prune_layers=[2, 8], keep_tokens=[64, 32]),
        ),
        (["--vtr_prune_layer", "[2,8]"], dict(prune_layers=[2, 8])),
        (["--vtr_prune_layer", "3", "--vtr_keep_tokens", "8"], dict(prune_layer=3, keep_tokens=8)),
        (["--vtr_keep_ratio", "0.25"], dict(keep_ratio=0.25, keep_tokens=None)),
        (["--vtr_enabled", "false"], dict(enabled=False)),
        (["--vtr_strategy", "none"], dict(enabled=False)),
        (["--vtr_strategy", "sparsevlm", "--vtr_token_merge"], dict(token_merge=True)),  # a bare bool flag
        (["--vtr_clse_reference_layer", "2"], dict(clse_reference_layer=2)),
        (["--vtr_positions", "compact", "--vtr_scoring_layer", "none"], dict(positions="compact", scoring_layer=None)),
        (["--vtr_query_aggregation", "question", "--vtr_seed", "7"], dict(query_aggregation="question", seed=7)),
    ],
)
def test_vtr_flag_values(argv, expected):
    config = parse(argv)
    for name, value in expected.items():
        assert getattr(config, name) == value, name


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--vtr_keep_tokenz", "5"], "--vtr_keep_tokens?"),  # unknown flag: the closest one is suggested
        (["--vtr_keep_tok", "5"], "unrecognized arguments: --vtr_keep_tok"),  # no abbreviations
        (["--vtr_keep_ratio", "2"], "argument --vtr_keep_ratio"),
        (["--vtr_keep_tokens", "abc"], "argument --vtr_keep_tokens: 'abc' does not parse"),
        (["--vtr_prune_layer", "3", "2"], "argument --vtr_prune_layer"),
        (["--vtr_prune_layer", "1", "2", "--vtr_keep_tokens", "8", "4", "2"], "argument --vtr_keep_tokens"),
        (["--vtr_enabled", "maybe"], "argument --vtr_enabled"),
        (["--vtr_strategy", "nope"], "argument --vtr_strategy: unknown strategy 'nope'"),
        (["--vtr_query_aggregation", "first"], "argument --vtr_query_aggregation"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(argv, needle, capsys):
    with pytest.raises(SystemExit) as info:
        parse(argv)
    assert info.value.code == 2
    assert needle in capsys.readouterr().err


def test_run_arguments_are_checked_before_any_model(tmp_path, capsys):
    q = write_json(tmp_path / "q.json", [])
    base = ["--model_path", "x", "--video_dir", str(tmp_path), "--gt_file_question", str(q), "--output_dir", "o"]
    for extra, needle in [
        (["--num_chunks", "2", "--chunk_idx", "2"], "argument --chunk_idx"),
        (["--num_frames", "0"], "argument --num_frames"),
        (["--gt_file_answers", str(tmp_path / "nope.json")], "argument --gt_file_answers: file not found"),
    ]:
        with pytest.raises(SystemExit) as info:
            rq.main(base + extra)
        assert info.value.code == 2 and needle in capsys.readouterr().err
    with pytest.raises(SystemExit):
        rq.main(base[2:])  # no --model_path
    assert "required: --model_path" in capsys.readouterr().err


def test_unusable_model_path_or_device_exit_2_with_a_message(tmp_path, capsys):
    q = write_json(tmp_path / "q.json", [{"question_id": "1", "video_name": "a", "question": "?"}])
    base = ["--video_dir", str(tmp_path), "--gt_file_question", str(q), "--output_dir", str(tmp_path / "out")]
    for extra, needle in [
        (["--model_path", str(tmp_path)], f"cannot load --model_path {tmp_path}"),  # a folder, not a checkpoint
        (["--model_path", str(tmp_path), "--device", "gpu"], "--device 'gpu' is not a device"),
    ]:
        assert rq.main(base + extra) == 2
        assert needle in capsys.readouterr().err


def test_cli_rejects_unknown_flag_and_bad_value_without_a_traceback(tmp_path):
    q = write_json(tmp_path / "q.json", [{"question_id": "1", "video_name": "a", "question": "?"}])
    cmd = [sys.executable, "-m", "videollava.vtr.run_video_qa", "--model_path", "unused", "--video_dir", str(tmp_path)]
    cmd += ["--gt_file_question", str(q), "--output_dir", str(tmp_path / "out")]
    cases = {
        "--vtr_keep_tokenz": (["--vtr_keep_tokenz", "8"], "did you mean --vtr_keep_tokens?"),
        "--vtr_keep_ratio": (
            ["--vtr_keep_ratio", "1.5"],
            "argument --vtr_keep_ratio: VTRConfig.keep_ratio=1.5 is invalid",
        ),
    }
    # both processes at once: each spends its time importing torch and transformers
    procs = {
        name: subprocess.Popen(cmd + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=FORK)
        for name, (argv, _) in cases.items()
    }
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 2, (name, err[-2000:])
        assert cases[name][1] in err and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ data


def test_questions_activitynet_and_msvd_styles(tmp_path):
    anet_q = write_json(
        tmp_path / "anet_q.json",
        [
            {"video_name": "v_abc", "question_id": "v_abc_0", "question": "is it day"},
            {"video_name": "v_abc", "question_id": "v_abc_1", "question": "what color"},
        ],
    )
    anet_a = write_json(  # answers in another order: matched by id, not by position
        tmp_path / "anet_a.json",
        [
            {"question_id": "v_abc_1", "answer": "red", "type": 4},
            {"question_id": "v_abc_0", "answer": "yes", "type": 3},
        ],
    )
    qs = rq.load_questions(anet_q, anet_a)
    assert [(q.id, q.video, q.answer, q.answer_type) for q in qs] == [
        ("v_abc_0", "v_abc", "yes", "3"),
        ("v_abc_1", "v_abc", "red", "4"),
    ]
    msvd_q = write_jsonl(tmp_path / "msvd_q.jsonl", [{"video": "vid7", "id": 0, "question": "who"}])
    msvd_a = write_json(tmp_path / "msvd_a.json", [{"question_id": 0, "answer": "man"}])
    (q,) = rq.load_questions(msvd_q, msvd_a)
    assert (q.id, q.video, q.question, q.answer, q.answer_type) == ("0", "vid7", "who", "man", None)
    (q,) = rq.load_questions(msvd_q)  # no answers file: predictions only
    assert q.answer is None


@pytest.mark.parametrize(
    "questions, answers, needle",
    [
        (
            [{"question_id": 1, "video_name": "a", "question": "?"}],
            [{"question_id": 2, "answer": "x"}],
            "no answer for 1",
        ),
        ([{"question_id": 1, "video_name": "a", "question": "?"}] * 2, None, "appears twice"),
        ([{"question_id": 1, "question": "?"}], None, "no 'video_name' or 'video' key"),
        ({"question_id": 1}, None, "must hold a JSON list"),
        ("not json", None, "cannot read"),
    ],
)
def test_bad_question_files_name_the_file(tmp_path, questions, answers, needle):
    q = tmp_path / "q.json"
    q.write_text(questions if isinstance(questions, str) else json.dumps(questions))
    a = write_json(tmp_path / "a.json", answers) if answers is not None else None
    with pytest.raises(rq.DataError, match=needle) as info:
        rq.load_questions(q, a)
    assert "json" in str(info.value)


def test_chunks_partition_the_questions_in_order():
    for n in range(12):
        items = list(range(n))
        for num_chunks in range(1, 6):
            parts = [rq.chunk(items, num_chunks, i) for i in range(num_chunks)]
            assert sum(parts, []) == items
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert rq.chunk(list(range(10)), 3, 1) == [3, 4, 5]


def test_questions_are_grouped_by_video_in_first_appearance_order():
    qs = [rq.Question(str(i), v, "?") for i, v in enumerate("abacb")]
    assert [(q.video, q.id) for q in rq.group_by_video(qs)] == [
        ("a", "0"),
        ("a", "2"),
        ("b", "1"),
        ("b", "4"),
        ("c", "3"),
    ]


def test_output_paths():
    assert rq.output_path("out", "fastv") == Path("out/fastv.jsonl")
    assert rq.output_path("out", "fastv.jsonl", 4, 2) == Path("out/fastv_4_2.jsonl")


def test_prepare_resume_keeps_answers_and_retries_failures(tmp_path):
    path = write_jsonl(
        tmp_path / "run.jsonl",
        [
            {"id": "1", "pred": "yes", "error": None, "vtr": "fastv_K1_keep8", "num_frames": 8},
            {"id": "2", "pred": None, "error": "VideoError: missing", "vtr": "fastv_K1_keep8", "num_frames": 8},
            '{"id": "3", "pred": "tru',  # the run was killed mid-line
        ],
    )
    done = rq.prepare_resume(path, dict(vtr="fastv_K1_keep8", num_frames=8))
    assert list(done) == ["1"]
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["1"]  # failures left the file
    with pytest.raises(rq.DataError, match="vtr='fastv_K1_keep8' there, 'unpruned' here"):
        rq.prepare_resume(path, dict(vtr="unpruned", num_frames=8))
    assert rq.prepare_resume(tmp_path / "new.jsonl", dict(vtr="x")) == {}


def test_merge_refuses_missing_parts_then_concatenates_in_chunk_order(tmp_path, capsys):
    def part(i, ids):
        write_jsonl(tmp_path / f"run_3_{i}.jsonl", [{"id": k, "pred": k, "error": None} for k in ids])

    part(0, ["a", "b"])
    part(2, ["e"])
    assert rq.main(["--merge", "--output_dir", str(tmp_path), "--output_name", "run", "--num_chunks", "3"]) == 1
    err = capsys.readouterr().err
    assert "1 of 3 parts missing" in err and "run_3_1.jsonl" in err and not (tmp_path / "run.jsonl").exists()

    part(1, ["c", "d"])
    q = write_json(
        tmp_path / "q.json", [{"question_id": k, "video_name": "v", "question": "?"} for k in ["a", "b", "c", "d", "e"]]
    )
    # name and chunk count found from the part files; every question answered
    assert rq.main(["--merge", "--output_dir", str(tmp_path), "--gt_file_question", str(q), "--no_score"]) == 0
    assert [r["id"] for r in rq.read_rows(tmp_path / "run.jsonl")[0]] == ["a", "b", "c", "d", "e"]

    part(2, [])  # a chunk that wrote nothing: its questions are reported
    assert rq.main(["--merge", "--output_dir", str(tmp_path), "--gt_file_question", str(q), "--no_score"]) == 1
    assert "1 questions have no row (first: e)" in capsys.readouterr().err

    part(1, ["x"])
    write_jsonl(tmp_path / "other_2_0.jsonl", [])
    with pytest.raises(rq.MergeError, match="several runs"):
        rq.merge(tmp_path)


# ------------------------------------------------------------------------------------------ scorer


def test_scorer_numbers_on_a_hand_written_run(tmp_path, capsys):
    def row(i, answer, pred, kept, prefill, answer_type, error=None):
        return dict(
            id=str(i),
            answer=answer,
            pred=pred,
            error=error,
            visual_tokens=128,
            kept_tokens=kept,
            prune_layers=[2] * len(kept or []),
            flops_ratio={64: 0.5, 32: 0.25}[kept[0]] if kept else 1.0,
            prefill_ms=prefill,
            vtr="fastv_K2_keep64",
            answer_type=answer_type,
        )

    path = write_jsonl(
        tmp_path / "run.jsonl",
        [
            row(1, "yes", "Yes.", [64], 10.0, "yn"),  # exact, contains
            row(2, "dog", "a dog running", [64], 20.0, "obj"),  # contains only
            row(3, "2", "two", [32], 30.0, "num"),  # neither
            row(4, "the red car", "Red car!", [32], 40.0, "obj"),  # exact (articles, punctuation, case)
            row(5, "cat", "category", [], 50.0, "obj"),  # neither (whole words); unpruned: kept = visual = 128
            row(6, "no", None, None, None, "yn", error="VideoError: missing"),
        ],
    )
    assert score.main([str(path)]) == 0
    summary = json.loads((tmp_path / "run.score.json").read_text())
    assert (summary["rows"], summary["scored"], summary["errors"]) == (6, 5, 1)
    assert summary["exact_match"] == pytest.approx(2 / 5)
    assert summary["contains"] == pytest.approx(3 / 5)
    assert summary["coverage"] == pytest.approx(5 / 6)
    assert summary["mean_kept_tokens"] == pytest.approx((64 + 64 + 32 + 32 + 128) / 5)
    assert summary["mean_visual_tokens"] == 128
    assert summary["mean_prefill_ms"] == pytest.approx(30.0)
    assert summary["prefill_ms"] == dict(min=10.0, p25=20.0, median=30.0, p75=40.0, max=50.0), "with its spread"
    assert summary["prefill_flops_ratio"] == pytest.approx((0.5 + 0.5 + 0.25 + 0.25 + 1.0) / 5)
    assert summary["ideal_prefill_speedup"] == pytest.approx(2.0)
    assert summary["per_prune_layer"] == [
        dict(layer=2, mean_image_tokens_in=128, mean_image_tokens_kept=48, mean_merged_tokens=0)
    ]
    assert summary["mean_merged_tokens"] == 0
    assert summary["results"] == {"video_qa": dict(exact_match=pytest.approx(0.4), contains=pytest.approx(0.6))}
    assert summary["by_answer_type"]["obj"] == dict(scored=3, exact_match=pytest.approx(1 / 3), contains=2 / 3)
    assert summary["by_answer_type"]["yn"]["scored"] == 1
    out = capsys.readouterr().out
    assert "| run.jsonl | fastv_K2_keep64 | 6 | 1 | 40.0 | 60.0 | 128.0 | 64.0 | 30.0 [10.0-50.0] |" in out


def test_scorer_counts_merged_tokens_in_what_the_llm_sees(tmp_path, capsys):
    """A method that recycles dropped tokens (FrameFusion, FastVID; the row's `merged_tokens`, one per stage): the
    LLM sees the kept tokens and the merged ones, which the summary also says apart, per stage as the lmms-eval
    record does; the next stage's input holds them too. A row of the same run that merged nothing has no
    `merged_tokens`."""

    def row(i, kept, **merged):
        counts = dict(visual_tokens=136, kept_tokens=kept, prune_layers=[0, 1], **merged)
        return dict(id=str(i), answer="yes", pred="yes", error=None, **counts)

    path = write_jsonl(tmp_path / "ff.jsonl", [row(1, [11, 30], merged_tokens=[23, 4]), row(2, [24, 12])])
    assert score.main([str(path)]) == 0
    summary = json.loads((tmp_path / "ff.score.json").read_text())
    assert summary["mean_kept_tokens"] == (30 + 4 + 12) / 2 and summary["mean_merged_tokens"] == 4 / 2
    assert summary["per_prune_layer"] == [
        dict(layer=0, mean_image_tokens_in=136, mean_image_tokens_kept=(11 + 24) / 2, mean_merged_tokens=23 / 2),
        dict(
            layer=1, mean_image_tokens_in=(11 + 23 + 24) / 2, mean_image_tokens_kept=(30 + 12) / 2, mean_merged_tokens=2
        ),
    ]
    assert "| 136.0 | 23.0 (2.0 merged) |" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ end to end

TIMING = ("prefill_ms", "generate_ms")


@pytest.fixture(scope="module")
def tiny(tiny_path):
    """(path, model, processor): the fork's tiny random Video-LLaVA (conftest), loaded once for this module."""
    import torch

    from videollava.vtr import load_model, load_processor

    return tiny_path, load_model(tiny_path, VTRConfig(), dtype=torch.float32), load_processor(tiny_path)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Videos a (two questions) and v_b (found as `b`), c missing, d not a video; ActivityNet-style files."""
    from videollava.vtr.video_io import write_test_video

    root = tmp_path_factory.mktemp("video-qa")
    write_test_video(root / "videos" / "a.mp4", num_frames=16)
    write_test_video(root / "videos" / "v_b.mp4", num_frames=12, size=(48, 64))
    (root / "videos" / "d.mp4").write_bytes(b"this is not a video" * 8)
    items = [("a", "what happens", "walk"), ("a", "is it day", "yes"), ("b", "what color", "red")]
    items += [("c", "who is there", "man"), ("d", "where is it", "park")]
    write_json(
        root / "q.json", [dict(question_id=f"q{i}", video_name=v, question=q) for i, (v, q, _) in enumerate(items)]
    )
    write_json(root / "a.json", [dict(question_id=f"q{i}", answer=a) for i, (_, _, a) in enumerate(items)])
    return root


def run_qa(tiny, dataset, out, *flags) -> int:
    path, model, processor = tiny
    argv = ["--model_path", path, "--video_dir", str(dataset / "videos"), "--output_dir", str(out)]
    argv += ["--gt_file_question", str(dataset / "q.json"), "--gt_file_answers", str(dataset / "a.json")]
    return rq.main([*argv, "--max_new_tokens", "3", *flags], model=model, processor=processor)


def named(tiny, tag: str) -> str:
    """The default output name: the checkpoint folder's name, then the settings tag."""
    return f"{Path(tiny[0]).name}__{tag}"


def rows_of(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def visual_tokens_per_video(model) -> int:
    vision = model.config.vision_config
    return ((vision.image_size // vision.patch_size) ** 2 + 1) * 8  # CLS + patches, per frame, 8 frames


FASTV = ("--vtr_strategy", "fastv", "--vtr_prune_layer", "1", "--vtr_keep_tokens", "8")


@pytest.fixture(scope="module")
def fastv_run(tiny, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("fastv-run")
    assert run_qa(tiny, dataset, out, *FASTV) == 0
    return out


def test_end_to_end_kept_tokens_and_error_rows(tiny, fastv_run):
    rows = rows_of(fastv_run / f"{named(tiny, 'fastv_K1_keep8')}.jsonl")  # default name: model and settings tag
    assert [r["id"] for r in rows] == ["q0", "q1", "q2", "q3", "q4"]
    answered, (missing, corrupt) = rows[:3], rows[3:]
    for row in answered:
        assert row["error"] is None and isinstance(row["pred"], str)
        assert row["kept_tokens"] == [8] and row["prune_layers"] == [1]
        assert row["visual_tokens"] == visual_tokens_per_video(tiny[1])
        assert row["vtr"] == "fastv_K1_keep8" and row["num_frames"] == 8 and row["prefill_ms"] > 0
        assert row["seq_len"] > row["visual_tokens"] and 0 < row["flops_ratio"] < 1
    assert [r["answer"] for r in answered] == ["walk", "yes", "red"]
    assert missing["pred"] is None and "video 'c' not found" in missing["error"]
    assert corrupt["pred"] is None and "cannot read video" in corrupt["error"] and "d.mp4" in corrupt["error"]
    summary = json.loads((fastv_run / f"{named(tiny, 'fastv_K1_keep8')}.score.json").read_text())  # scored
    assert (summary["rows"], summary["scored"], summary["errors"], summary["mean_kept_tokens"]) == (5, 3, 2, 8)


def test_rerun_resumes(tiny, dataset, fastv_run, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    path = out / f"{named(tiny, 'fastv_K1_keep8')}.jsonl"
    path.write_text((fastv_run / path.name).read_text())
    first = {r["id"]: r for r in rows_of(path)}
    asked = []
    real = rq.answer_batch

    def spy(model, processor, batch, *args):
        asked.extend(q.id for q, _ in batch)
        return real(model, processor, batch, *args)

    monkeypatch.setattr(rq, "answer_batch", spy)
    assert run_qa(tiny, dataset, out, *FASTV) == 0
    assert asked == []  # nothing recomputed; the two failed rows were retried and failed again
    rows = rows_of(path)
    assert sorted(r["id"] for r in rows) == ["q0", "q1", "q2", "q3", "q4"]
    assert [r for r in rows if not r["error"]] == [first[k] for k in ("q0", "q1", "q2")]

    path.write_text("".join(line + "\n" for line in path.read_text().splitlines() if '"q1"' not in line))
    assert run_qa(tiny, dataset, out, *FASTV) == 0
    assert asked == ["q1"]
    again = {r["id"]: r for r in rows_of(path)}
    assert len(again) == 5 and again["q1"]["pred"] == first["q1"]["pred"]

    # the same file with other settings is refused, not mixed
    assert run_qa(tiny, dataset, out, *FASTV, "--vtr_keep_tokens", "16", "--output_name", path.stem) == 2
    assert asked == ["q1"]


def test_two_chunks_merged_equal_one_run(tiny, dataset, fastv_run, tmp_path):
    for idx in ("0", "1"):
        assert (
            run_qa(tiny, dataset, tmp_path, *FASTV, "--output_name", "f", "--num_chunks", "2", "--chunk_idx", idx) == 0
        )
    assert [r["id"] for r in rows_of(tmp_path / "f_2_0.jsonl")] == ["q0", "q1"]
    assert rq.main(["--merge", "--output_dir", str(tmp_path), "--output_name", "f", "--num_chunks", "2"]) == 0

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]

    assert strip(rows_of(tmp_path / "f.jsonl")) == strip(rows_of(fastv_run / f"{named(tiny, 'fastv_K1_keep8')}.jsonl"))
    assert (tmp_path / "f.score.json").is_file()


def test_multi_stage_flags_batched(tiny, dataset, tmp_path):
    flags = ("--vtr_strategy", "fastv", "--vtr_prune_layer", "1", "2", "--vtr_keep_tokens", "16", "8")
    assert run_qa(tiny, dataset, tmp_path, *flags, "--num_samples", "3", "--batch_size", "2") == 0
    rows = rows_of(tmp_path / f"{named(tiny, 'fastv_K1-2_keep16-8')}.jsonl")
    assert [r["id"] for r in rows] == ["q0", "q1", "q2"]
    assert all(r["kept_tokens"] == [16, 8] and r["prune_layers"] == [1, 2] and not r["error"] for r in rows)


def test_prompt_formats():
    system = (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions."
    )
    assert rq.build_prompt(" why? ") == f"{system} USER: <video>\nwhy? ASSISTANT:"
    assert rq.build_prompt("why?", "plain") == "USER: <video>\nwhy? ASSISTANT:"


def test_unpruned_rows_and_a_prune_layer_past_the_model(tiny, dataset, fastv_run, tmp_path, capsys):
    flags = ("--vtr_strategy", "none", "--num_samples", "1", "--no_score", "--conv_mode", "plain")
    assert run_qa(tiny, dataset, tmp_path, *flags) == 0
    (row,) = rows_of(tmp_path / f"{named(tiny, 'unpruned_plain')}.jsonl")
    assert row["kept_tokens"] == [] and row["visual_tokens"] == visual_tokens_per_video(tiny[1])
    assert row["conv_mode"] == "plain"
    assert row["seq_len"] < rows_of(fastv_run / f"{named(tiny, 'fastv_K1_keep8')}.jsonl")[0]["seq_len"]  # no system
    assert row["flops_ratio"] == 1.0
    assert run_qa(tiny, dataset, tmp_path, "--vtr_prune_layer", "4", "--num_samples", "1") == 2  # 4 layers
    assert "argument --vtr_prune_layer" in capsys.readouterr().err


def test_torchrun_ranks_answer_one_chunk_each_and_rank0_merges(tiny, dataset, fastv_run, tmp_path):
    """`scripts/vtr_run --gpus N` starts the runner under torch.distributed.run: each rank takes a chunk."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "videollava.vtr.run_video_qa", "--model_path", tiny[0], "--video_dir", str(dataset / "videos")]
    cmd += ["--gt_file_question", str(dataset / "q.json"), "--gt_file_answers", str(dataset / "a.json")]
    cmd += ["--output_dir", str(tmp_path), "--device", "cpu", "--max_new_tokens", "3", *FASTV]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=FORK, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    name = named(tiny, "fastv_K1_keep8")
    assert [r["id"] for r in rows_of(tmp_path / f"{name}_2_0.jsonl")] == ["q0", "q1"]
    merged = rows_of(tmp_path / f"{name}.jsonl")
    single = rows_of(fastv_run / f"{name}.jsonl")
    keys = ("id", "pred", "error", "kept_tokens", "visual_tokens", "flops_ratio")
    assert [[r[k] for k in keys] for r in merged] == [[r[k] for k in keys] for r in single]
    assert json.loads((tmp_path / f"{name}.score.json").read_text())["rows"] == 5


def test_a_rank_that_fails_reports_it_and_nobody_waits_forever(monkeypatch, tmp_path, capsys):
    """Under torchrun any failure of a rank (not only bad data) reaches the others through the status
    exchange that replaces the barrier, so no rank waits at it and nothing is merged."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    for key, value in env.items():
        monkeypatch.setenv(key, value)

    def boom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(rq, "run", boom)
    assert rq._launched_main(None, VTRConfig()) == 1
    assert "CUDA out of memory (simulated)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ never mixed, never lost


def test_lmms_eval_model_and_runner_share_the_original_evaluations_prompt(tiny_path):
    """One behaviour: the original evaluation's llava_v1 conversation (system line first) in both, plain on demand."""
    from videollava.vtr.lmms_eval_plugin import VideoLlavaVTR
    from videollava.vtr.prompts import CONV_SYSTEM

    def make(args):
        return VideoLlavaVTR.create_from_arg_string(f"pretrained={tiny_path},{args}", {"batch_size": None})

    system = "A chat between a curious human and an artificial intelligence assistant."
    video = [("video", None)]
    lm = make("strategy=none")
    assert lm.build_prompt("What happens?", video) == rq.build_prompt("What happens?")
    assert lm.build_prompt("What happens?", video).startswith(f"{system} The assistant gives helpful")
    assert (
        lm.build_prompt("Q?", video + [("image", None)])
        == f"{CONV_SYSTEM['llava_v1']} USER: <video>\n<image>\nQ? ASSISTANT:"
    )
    plain = make("strategy=none,conv_mode=plain")
    assert plain.build_prompt("What happens?", video) == rq.build_prompt("What happens?", "plain")
    assert plain.build_prompt("<video>\nWhy?", video) == "USER: <video>\nWhy? ASSISTANT:"  # the task's placeholder
    with pytest.raises(ValueError, match="conv_mode='vicuna': choose one of"):
        make("conv_mode=vicuna")


def test_one_reader_the_last_row_of_a_repeated_id_everywhere(tmp_path):
    """Resume, merge and the scorer read a file with a repeated id the same way: its last row counts."""
    rows = [
        {"id": "1", "answer": "yes", "pred": "no", "error": None},
        {"id": "2", "answer": "red", "pred": "red", "error": None},
        {"id": "1", "answer": "yes", "pred": "yes", "error": None},  # a later row of id 1
    ]
    path = write_jsonl(tmp_path / "run_2_0.jsonl", rows)
    write_jsonl(tmp_path / "run_2_1.jsonl", [])
    assert [r["pred"] for r in score.read_answers(path)[0]] == ["yes", "red"]
    assert rq.read_rows(path) == score.read_answers(path)
    assert score.score_file(path)["exact_match"] == 1.0
    rq.merge(tmp_path, "run", 2)
    assert [r["pred"] for r in rows_of(tmp_path / "run.jsonl")] == ["yes", "red"]
    assert {k: r["pred"] for k, r in rq.prepare_resume(path, {}).items()} == {"1": "yes", "2": "red"}


def test_default_name_holds_the_model_and_a_rerun_never_mixes_settings(tiny, dataset, tmp_path, capsys):
    """Two checkpoints into one folder get two files; on one file every setting that changes an answer
    (model, generation length, prompt, ...) must match, or the rerun is refused naming it."""
    other = tmp_path / "other-ckpt"
    shutil.copytree(tiny[0], other)
    out = tmp_path / "out"
    one = ("--vtr_strategy", "none", "--num_samples", "1", "--no_score")
    assert run_qa(tiny, dataset, out, *one) == 0
    assert run_qa((str(other), *tiny[1:]), dataset, out, *one) == 0
    first, second = out / f"{named(tiny, 'unpruned')}.jsonl", out / "other-ckpt__unpruned.jsonl"
    assert rows_of(first)[0]["model"] == str(Path(tiny[0]).resolve()) and len(rows_of(first)) == 1
    assert rows_of(second)[0]["model"] == str(other.resolve()) and len(rows_of(second)) == 1
    capsys.readouterr()
    before = first.read_text()
    two = ("--vtr_strategy", "none", "--num_samples", "2", "--no_score", "--output_name", first.stem)
    for flags, needle in [
        (("--max_new_tokens", "4"), "max_new_tokens=3 there, 4 here"),
        (("--conv_mode", "plain"), "conv_mode='llava_v1' there, 'plain' here"),
        (("--num_frames", "4"), "num_frames=8 there, 4 here"),
    ]:
        assert run_qa(tiny, dataset, out, *two, *flags) == 2, flags
        assert needle in capsys.readouterr().err
    assert run_qa((str(other), *tiny[1:]), dataset, out, *two) == 2
    assert f"model={str(Path(tiny[0]).resolve())!r} there, {str(other.resolve())!r} here" in capsys.readouterr().err
    assert first.read_text() == before  # nothing added, nothing removed


def test_resume_refuses_rows_asked_another_question(tmp_path):
    path = write_jsonl(tmp_path / "run.jsonl", [{"id": "1", "video": "a", "question": "why?", "pred": "x"}])
    assert list(rq.prepare_resume(path, {}, [rq.Question("1", "a", "why?")])) == ["1"]
    with pytest.raises(rq.DataError, match="question='why\\?' there, 'how\\?' here"):
        rq.prepare_resume(path, {}, [rq.Question("1", "a", "how?")])


def test_repeated_rows_are_not_failures_and_the_resume_keeps_them(tiny, dataset, fastv_run, tmp_path, capsys):
    """Two runs that both wrote every id (before the lock): the resume drops the earlier copies, retries the two
    failed videos only, and the file holds each id once."""
    name = named(tiny, "fastv_K1_keep8")
    lines = (fastv_run / f"{name}.jsonl").read_text()
    path = tmp_path / f"{name}.jsonl"
    path.write_text(lines + lines)
    assert run_qa(tiny, dataset, tmp_path, *FASTV, "--no_score") == 0
    err = capsys.readouterr().err
    assert "retrying 2 failed row(s)" in err and "5 earlier row(s) of a repeated id" in err
    assert "5 questions: 3 already in" in err
    assert [r["id"] for r in rows_of(path)] == ["q0", "q1", "q2", "q3", "q4"]


def test_a_second_run_on_a_file_is_refused_and_a_dead_runs_lock_is_taken_over(tiny, dataset, tmp_path, capsys):
    import signal
    import time

    path = tmp_path / "run.jsonl"
    flags = ("--vtr_strategy", "none", "--num_samples", "1", "--no_score", "--output_name", "run")
    ready, tell = os.pipe()
    pid = os.fork()
    if pid == 0:  # the first run, holding the lock
        try:
            os.close(ready)
            with rq.output_lock(path, "python -m videollava.vtr.run_video_qa --first"):
                os.write(tell, b"1")
                time.sleep(120)
        finally:
            os._exit(0)
    os.close(tell)  # the first run's end only: a first run that fails ends the read below
    try:
        assert os.read(ready, 1) == b"1"
        assert run_qa(tiny, dataset, tmp_path, *flags) == 2
        err = capsys.readouterr().err
        assert f"{path} is being written by another run (pid {pid} on " in err
        assert "run_video_qa --first" in err and not path.exists()
        write_jsonl(tmp_path / "run_1_0.jsonl", [])
        assert rq.main(["--merge", "--output_dir", str(tmp_path), "--output_name", "run", "--no_score"]) == 1
        assert "is being written by another run" in capsys.readouterr().err  # the merge target is locked too
    finally:
        os.kill(pid, signal.SIGKILL)  # dies holding the lock: its lock file stays behind
        os.waitpid(pid, 0)
        os.close(ready)
    assert Path(f"{path}.lock").is_file()
    assert run_qa(tiny, dataset, tmp_path, *flags) == 0
    assert f"took over {path}.lock, left by a run that is no longer running (pid {pid}" in capsys.readouterr().err
    assert len(rows_of(path)) == 1 and not Path(f"{path}.lock").exists()


def test_ctrl_c_leaves_whole_rows_and_the_rerun_resumes(tiny, dataset, tmp_path, monkeypatch, capsys):
    real, calls = rq.answer_batch, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(rq, "answer_batch", interrupted)
    flags = ("--vtr_strategy", "none", "--no_score", "--output_name", "run")
    try:
        status = run_qa(tiny, dataset, tmp_path, *flags)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped the runner with a traceback")  # not raised on: it would stop the whole session
    assert status == 130
    assert "interrupted" in capsys.readouterr().err
    text = (tmp_path / "run.jsonl").read_text()
    assert text.endswith("\n") and [r["id"] for r in rows_of(tmp_path / "run.jsonl")] == ["q0"]
    assert not (tmp_path / "run.jsonl.lock").exists()
    monkeypatch.setattr(rq, "answer_batch", real)
    assert run_qa(tiny, dataset, tmp_path, *flags) == 0
    assert [r["id"] for r in rows_of(tmp_path / "run.jsonl")] == ["q0", "q1", "q2", "q3", "q4"]


def test_scorer_refuses_what_is_not_an_answers_file_and_unwritable_outputs(tmp_path, capsys):
    text = tmp_path / "notamodel.txt"
    text.write_text("hello\nworld\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    for path, needle in [(text, "(2 unreadable line(s))"), (empty, "(nothing)"), (binary, "unreadable line(s))")]:
        assert score.main([str(path)]) == 2
        err = capsys.readouterr().err
        assert f"score: error: {path} holds no answer rows (" in err and needle in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl", "model.bin", "notamodel.txt"]
    good = write_jsonl(tmp_path / "run.jsonl", [{"id": "1", "answer": "a", "pred": "a", "error": None}])
    assert score.main([str(good), "--output", str(text / "all.json")]) == 2  # a folder that is a file
    assert f"cannot write the summary {text / 'all.json'}" in capsys.readouterr().err


def test_runner_refuses_empty_questions_and_an_unusable_output_dir(tiny, dataset, tmp_path, capsys):
    empty = write_json(tmp_path / "q.json", [])
    argv = ["--model_path", tiny[0], "--video_dir", str(dataset / "videos"), "--gt_file_question", str(empty)]
    argv += ["--output_dir", str(tmp_path / "out")]
    assert rq.main(argv, model=tiny[1], processor=tiny[2]) == 2
    assert f"{empty} holds no records" in capsys.readouterr().err and not (tmp_path / "out").exists()
    blocked = tmp_path / "file.txt"
    blocked.write_text("")
    assert run_qa(tiny, dataset, blocked / "out", "--num_samples", "1") == 2
    assert f"cannot create --output_dir {blocked / 'out'}" in capsys.readouterr().err


def test_merge_refuses_parts_of_different_settings(tmp_path):
    write_jsonl(tmp_path / "run_2_0.jsonl", [{"id": "a", "pred": "x", "error": None, "model": "m1", "vtr": "t"}])
    write_jsonl(tmp_path / "run_2_1.jsonl", [{"id": "b", "pred": "y", "error": None, "model": "m2", "vtr": "t"}])
    with pytest.raises(rq.MergeError, match="run_2_1.jsonl holds rows made with other settings than run_2_0.jsonl"):
        rq.merge(tmp_path, "run", 2)
    assert not (tmp_path / "run.jsonl").exists()


def test_merge_refuses_a_merged_file_of_other_settings(tmp_path, capsys):
    """A finished `run.jsonl` of model A is never replaced by parts of model B (nor by parts with no rows)."""
    finished = write_jsonl(
        tmp_path / "run.jsonl", [{"id": k, "pred": k, "error": None, "model": "A", "vtr": "t"} for k in "abcd"]
    )
    before = finished.read_text()
    write_jsonl(tmp_path / "run_2_0.jsonl", [{"id": "a", "pred": "x", "error": None, "model": "B", "vtr": "t"}])
    write_jsonl(tmp_path / "run_2_1.jsonl", [{"id": "b", "pred": "y", "error": None, "model": "B", "vtr": "t"}])
    with pytest.raises(rq.MergeError, match="model='A' run.jsonl, 'B' run_2_0.jsonl"):
        rq.merge(tmp_path, "run", 2)
    assert rq.main(["--merge", "--output_dir", str(tmp_path), "--output_name", "run", "--no_score"]) == 1
    assert f"{finished} already holds rows made with other settings than the parts" in capsys.readouterr().err
    for i in (0, 1):
        write_jsonl(tmp_path / f"run_2_{i}.jsonl", [])
    with pytest.raises(rq.MergeError, match="the parts hold no rows and .*run.jsonl holds 4"):
        rq.merge(tmp_path, "run", 2)
    assert finished.read_text() == before
    # parts of the finished file's own settings replace it, as a merge after rerunning a chunk does
    write_jsonl(tmp_path / "run_2_0.jsonl", [{"id": "a", "pred": "new", "error": None, "model": "A", "vtr": "t"}])
    assert rq.merge(tmp_path, "run", 2)["rows"] == 1 and rows_of(finished)[0]["pred"] == "new"


def test_batch_size_and_video_folder_are_settings_of_a_file(tiny, dataset, tmp_path, capsys):
    """Left-padded batches can change half-precision answers, and another folder may hold other videos under
    the same names: a resume with another --batch_size or --video_dir is refused, naming it."""
    flags = ("--vtr_strategy", "none", "--num_samples", "2", "--no_score", "--output_name", "run")
    assert run_qa(tiny, dataset, tmp_path, *flags) == 0
    path = tmp_path / "run.jsonl"
    row = rows_of(path)[0]
    assert row["batch_size"] == 1 and row["video_dir"] == str((dataset / "videos").resolve())
    before = path.read_text()
    assert run_qa(tiny, dataset, tmp_path, *flags, "--batch_size", "2") == 2
    assert "batch_size=1 there, 2 here" in capsys.readouterr().err
    other = tmp_path / "copy"
    shutil.copytree(dataset, other)
    assert run_qa(tiny, other, tmp_path, *flags) == 2
    assert f"video_dir={str((dataset / 'videos').resolve())!r} there, {str(other / 'videos')!r} here" in (
        capsys.readouterr().err
    )
    assert path.read_text() == before


def unloadable(calls):
    def load(*args):
        calls.append(args)
        raise AssertionError("the model was loaded")

    return load


def test_the_lock_and_the_settings_check_come_before_the_weights_load(tiny, dataset, tmp_path, monkeypatch, capsys):
    """A duplicate command, or one on a file of other settings, is refused before the 7B weights load."""
    calls = []
    monkeypatch.setattr(rq, "load", unloadable(calls))
    argv = ["--model_path", tiny[0], "--video_dir", str(dataset / "videos"), "--output_dir", str(tmp_path)]
    argv += ["--gt_file_question", str(dataset / "q.json"), "--num_samples", "1", "--device", "cpu"]
    path = tmp_path / f"{named(tiny, 'unpruned')}.jsonl"  # the default name: the planned settings tag
    with rq.output_lock(path, "python -m videollava.vtr.run_video_qa --first"):
        assert rq.main([*argv, "--vtr_strategy", "none"]) == 2
    assert f"{path} is being written by another run (pid {os.getpid()} on " in capsys.readouterr().err
    write_jsonl(path, [{"id": "q0", "pred": "x", "error": None, "model": "other"}])
    assert rq.main([*argv, "--vtr_strategy", "none"]) == 2
    assert f"{path} holds rows made with other settings (model='other' there" in capsys.readouterr().err
    assert rq.main([*argv, "--vtr_prune_layer", "4"]) == 2  # past the 4 layers: known from the config alone
    assert "argument --vtr_prune_layer" in capsys.readouterr().err
    assert calls == [] and not Path(f"{path}.lock").exists()


def test_the_planned_settings_are_the_loaded_models(tiny, dataset, tmp_path, capsys):
    """A run that loads its model checks the file against the settings planned before loading: the rerun
    resumes (it would be refused if the plan differed from the loaded model), in the default and other dtypes
    and attentions."""
    argv = ["--model_path", tiny[0], "--video_dir", str(dataset / "videos"), "--output_dir", str(tmp_path)]
    argv += ["--gt_file_question", str(dataset / "q.json"), "--num_samples", "1", "--max_new_tokens", "2"]
    argv += ["--device", "cpu", "--no_score", *FASTV]
    for name, extra, expected in [
        ("default", [], ("float32", "sdpa")),
        ("auto", ["--dtype", "auto", "--attn_implementation", "eager"], ("float32", "eager")),
        ("bf16", ["--dtype", "bfloat16"], ("bfloat16", "sdpa")),
    ]:
        for _ in range(2):
            assert rq.main([*argv, *extra, "--output_name", name]) == 0, capsys.readouterr().err
        assert "1 questions: 1 already in" in capsys.readouterr().err, name
        (row,) = rows_of(tmp_path / f"{name}.jsonl")
        assert (row["dtype"], row["attn_implementation"]) == expected


# ------------------------------------------------------------------------------------------ outputs.py


def test_output_lock_names_a_live_holder_takes_over_a_dead_one_and_never_another_hosts(tmp_path, capsys):
    import socket

    from videollava.vtr import outputs

    lock = tmp_path / "run.lock"
    with outputs.output_lock(lock, "vtr_run", "vtr_run --first") as mine:
        assert (
            json.loads(lock.read_text()) == mine and mine["pid"] == os.getpid() and mine["command"] == "vtr_run --first"
        )
        with pytest.raises(
            outputs.OutputLocked, match=f"{lock} is held by another vtr_run \\(pid {os.getpid()} on"
        ) as held:
            with outputs.output_lock(lock, "vtr_run"):
                pytest.fail("a second holder got the lock")
        assert held.value.held and "vtr_run --first" in held.value.holder
    assert not lock.exists()  # released: the file goes

    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    record = dict(pid=dead.pid, host=socket.gethostname(), command="vtr_run --killed", started="2024-01-01 00:00:00")
    lock.write_text(json.dumps(record))
    with outputs.output_lock(lock, "vtr_run"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    err = capsys.readouterr().err
    assert f"note: took over {lock}, left by a vtr_run that is no longer running (pid {dead.pid} on " in err
    for changed, needle in [
        (dict(host="elsewhere"), f"held by a vtr_run on another host (pid {dead.pid} on elsewhere"),
        (dict(pid=os.getppid()), f"names a vtr_run that is still running (pid {os.getppid()} on"),  # no flock here
    ]:
        lock.write_text(json.dumps({**record, **changed}))
        with pytest.raises(outputs.OutputLocked, match="delete") as refused:
            with outputs.output_lock(lock, "vtr_run"):
                pytest.fail("took over a lock it must not")
        assert needle in str(refused.value) and not refused.value.held
        assert json.loads(lock.read_text()) == {**record, **changed}  # left as it was
    with pytest.raises(outputs.OutputError, match=f"cannot create the lock file {tmp_path / 'no' / 'x.lock'}"):
        with outputs.output_lock(tmp_path / "no" / "x.lock"):
            pass


def test_atomic_writes_replace_whole_or_not_at_all_and_new_files_never_replace(tmp_path, monkeypatch):
    from videollava.vtr import outputs

    path = tmp_path / "summary.json"
    assert outputs.write_atomic(path, "one") == path and path.read_text() == "one"
    assert outputs.write_atomic(path, b"two") == path and path.read_bytes() == b"two"

    def broken(*args):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", broken)
        with pytest.raises(outputs.OutputError, match=f"cannot write {path}: .*No space left") as failed:
            outputs.write_atomic(path, "three")
    assert failed.value.reason == "[Errno 28] No space left on device"
    with pytest.raises(outputs.OutputError, match=f"cannot write {tmp_path / 'no' / 'x.json'}"):
        outputs.write_atomic(tmp_path / "no" / "x.json", "x")

    new = tmp_path / "bench.json"
    assert outputs.write_new(new, "first") == new and new.read_text() == "first"
    with pytest.raises(outputs.OutputExists, match=f"{new} exists"):
        outputs.write_new(new, "second")
    with monkeypatch.context() as patch:  # a filesystem without hard links: created exclusively all the same
        patch.setattr(os, "link", broken)
        assert outputs.write_new(tmp_path / "nolink.json", "x").read_text() == "x"
        with pytest.raises(outputs.OutputExists):
            outputs.write_new(new, "third")
    assert new.read_text() == "first" and path.read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "nolink.json", "summary.json"]  # no temp


def test_a_lock_left_by_a_run_of_another_host_is_not_taken_over(tiny, dataset, tmp_path, capsys):
    path = tmp_path / "run.jsonl"
    record = dict(pid=1, host="elsewhere", command="python -m videollava.vtr.run_video_qa", started="2024-01-01")
    Path(f"{path}.lock").write_text(json.dumps(record))
    assert run_qa(tiny, dataset, tmp_path, "--num_samples", "1", "--no_score", "--output_name", "run") == 2
    err = capsys.readouterr().err
    assert f"{path}.lock is held by a run on another host (pid 1 on elsewhere" in err and f"delete {path}.lock" in err
    assert not path.exists()
