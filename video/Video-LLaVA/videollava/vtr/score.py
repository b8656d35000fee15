"""Score video QA outputs locally: exact match and contains, next to the kept visual tokens and timing.

    python -m videollava.vtr.score results/anet/fastv256.jsonl results/anet/unpruned.jsonl

For each file: a summary JSON beside it (`<name>.score.json`, or all of them in one `--output` file) and
one row of the printed table. Both metrics compare normalised text (lower case, punctuation and the
articles a/an/the removed, spaces collapsed):

    exact_match   the prediction equals the answer
    contains      the answer appears in the prediction as whole words ("Yes, he is." contains "yes")

Rows with an `error` (missing or unreadable video) count in `errors`, not in the accuracies, which are
over the `scored` rows (an answer and a prediction). `coverage` = scored / rows. Kept tokens are what the LLM
sees after the last prune stage: the visual tokens kept and, for methods that recycle dropped tokens, the
merged ones they inserted (`mean_merged_tokens`, "(N merged)" in the table). A repeated id counts once:
its last row (`read_answers`, the reader run_video_qa's resume and merge use too). A file with no rows (empty,
or not an answers file) and a summary that cannot be written are errors (exit 2, nothing written). The
GPT-judge metric of the original Video-LLaVA workflow reads the same JSONL (docs/video-qa.md).
"""

from __future__ import annotations

import argparse
import json
import re
import string
import sys
from pathlib import Path

from .outputs import OutputError, write_atomic
from .timing import spread


class ScoreError(ValueError):
    """A file with no rows to score, or a summary that cannot be written; the message names the file."""


_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = {"a", "an", "the"}


def normalize(text) -> str:
    words = _PUNCT.sub(" ", str(text).lower()).split()
    return " ".join(w for w in words if w not in _ARTICLES)


def exact_match(pred, answer) -> bool:
    return normalize(pred) == normalize(answer)


def contains(pred, answer) -> bool:
    target = normalize(answer)
    return bool(target) and f" {target} " in f" {normalize(pred)} "


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def stages_of(row: dict) -> list[tuple[int, int, int]]:
    """(layer, kept, merged) per prune stage of a row: the visual tokens the stage kept (`kept_tokens`) and the
    merged tokens it inserted (`merged_tokens`, written only by methods that recycle dropped tokens); the layers
    from `layer` on see both. [] when nothing was pruned."""
    kept = row.get("kept_tokens") or []
    merged = row.get("merged_tokens") or [0] * len(kept)
    return list(zip(row.get("prune_layers") or [], kept, merged))


def seen_tokens(row: dict) -> tuple[int | None, int]:
    """(the visual tokens the LLM sees after the last prune stage, the merged ones among them); all of them, none
    merged, when nothing was pruned."""
    stages = stages_of(row)
    if not stages:
        return row.get("visual_tokens"), 0
    _, kept, merged = stages[-1]
    return kept + merged, merged


def score_rows(rows: list[dict]) -> dict:
    """The summary of one run's rows (see the module docstring)."""
    scored = [r for r in rows if not r.get("error") and r.get("answer") is not None and r.get("pred") is not None]
    answered = [r for r in rows if not r.get("error")]

    def accuracy(items, metric):
        return sum(metric(r["pred"], r["answer"]) for r in items) / len(items) if items else None

    summary = dict(
        rows=len(rows),
        scored=len(scored),
        errors=sum(1 for r in rows if r.get("error")),
        coverage=len(scored) / len(rows) if rows else None,
        exact_match=accuracy(scored, exact_match),
        contains=accuracy(scored, contains),
        mean_visual_tokens=_mean(r.get("visual_tokens") for r in answered),
        mean_kept_tokens=_mean(seen_tokens(r)[0] for r in answered),
        mean_merged_tokens=_mean(seen_tokens(r)[1] for r in answered),
        mean_prefill_ms=_mean(r.get("prefill_ms") for r in answered),
        prefill_ms=spread(r.get("prefill_ms") for r in answered),
        mean_generate_ms=_mean(r.get("generate_ms") for r in answered),
        vtr=sorted({str(r["vtr"]) for r in rows if r.get("vtr") is not None}),
    )
    # the same efficiency figures under the names of the lmms-eval plugins' record (vtr_stats_*.json)
    flops = _mean(r.get("flops_ratio") for r in answered)
    by_layer: dict[int, list[tuple[int, int, int]]] = {}
    for r in answered:
        before = r.get("visual_tokens")
        for layer, kept, merged in stages_of(r):
            by_layer.setdefault(layer, []).append((before, kept, merged))
            before = kept + merged  # merged tokens are visual tokens for the next stage
    summary.update(
        mean_image_tokens=summary["mean_visual_tokens"],
        per_prune_layer=[
            dict(
                layer=layer,
                mean_image_tokens_in=_mean(b for b, _, _ in items),
                mean_image_tokens_kept=_mean(k for _, k, _ in items),
                mean_merged_tokens=_mean(m for _, _, m in items),
            )
            for layer, items in sorted(by_layer.items())
        ],
        prefill_flops_ratio=flops,
        ideal_prefill_speedup=1 / flops if flops else None,  # analytic, not measured
        # the accuracies as lmms-eval lays out its results ({task: {metric: value}}), for sweep tables
        results={"video_qa": dict(exact_match=summary["exact_match"], contains=summary["contains"])},
    )
    types = sorted({str(r["answer_type"]) for r in scored if r.get("answer_type") is not None})
    if types:
        summary["by_answer_type"] = {
            t: dict(
                scored=len(items),
                exact_match=accuracy(items, exact_match),
                contains=accuracy(items, contains),
            )
            for t in types
            for items in [[r for r in scored if str(r.get("answer_type")) == t]]
        }
    return summary


def read_answers(path: str | Path) -> tuple[list[dict], int]:
    """(rows, unreadable lines) of a run_video_qa answers file; no file: ([], 0). One row per id: a repeated
    id keeps its last row (a later line replaces an earlier one, as a retried failure does), in the place of
    its first. A line that is not a JSON object with an `id` (e.g. cut short by a killed run) is unreadable.
    The one reader of the scorer and of run_video_qa's resume and merge, so they agree on every file."""
    by_id, bad = {}, 0
    path = Path(path)
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return [], 0
    except OSError as error:
        raise ScoreError(f"cannot read {path}: {error}") from None
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            bad += 1
            continue
        if not isinstance(row, dict) or "id" not in row:
            bad += 1
            continue
        by_id[str(row["id"])] = row
    return list(by_id.values()), bad


def score_file(path: str | Path) -> dict:
    rows, bad = read_answers(path)
    if not rows:
        what = f"{bad} unreadable line(s)" if bad else "nothing"
        raise ScoreError(f"{path} holds no answer rows ({what}): not a run_video_qa answers file, or an empty one")
    summary = dict(file=str(path), **score_rows(rows))
    summary["unreadable_lines"] = bad
    return summary


def summary_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name.removesuffix(".jsonl") + ".score.json")


def write_json(target: str | Path, obj) -> Path:
    """Write `obj` to `target` whole or not at all (a temporary file renamed over it); ScoreError if it
    cannot be written."""
    try:
        return write_atomic(target, json.dumps(obj, indent=2) + "\n")
    except OutputError as error:
        raise ScoreError(f"cannot write the summary {target}: {error.reason}") from None


def write_summary(summary: dict, path: str | Path | None = None) -> Path:
    return write_json(Path(path) if path else summary_path(summary["file"]), summary)


def _fmt(value, digits=1, percent=False) -> str:
    if value is None:
        return "-"
    if percent:
        return f"{100 * value:.{digits}f}"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _fmt_spread(value: dict | None) -> str:
    return "-" if not value else f"{value['median']:.1f} [{value['min']:.1f}-{value['max']:.1f}]"


def table(summaries: list[dict]) -> str:
    """A markdown table, one row per scored file."""
    head = "| file | vtr | rows | errors | exact % | contains % | visual tokens | kept tokens | prefill ms median [min-max] |"
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for s in summaries:
        cells = [
            Path(s["file"]).name,
            ",".join(s["vtr"]) or "-",
            str(s["rows"]),
            str(s["errors"]),
            _fmt(s["exact_match"], percent=True),
            _fmt(s["contains"], percent=True),
            _fmt(s["mean_visual_tokens"]),
            _fmt(s["mean_kept_tokens"])
            + (f" ({_fmt(s['mean_merged_tokens'])} merged)" if s.get("mean_merged_tokens") else ""),
            _fmt_spread(s.get("prefill_ms")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_table(summaries: list[dict], file=None) -> None:
    print(table(summaries), file=file or sys.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m videollava.vtr.score",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("files", nargs="+", help="JSONL outputs of run_video_qa (merged, or single-chunk runs)")
    parser.add_argument("--output", help="write every summary into this one JSON file (a list) instead")
    parser.add_argument("--by_type", action="store_true", help="also print the accuracy per answer type")
    args = parser.parse_args(argv)
    for path in args.files:
        if not Path(path).is_file():
            parser.error(f"file not found: {path}")
    summaries, errors = [], []
    for path in args.files:
        try:
            summaries.append(score_file(path))
        except ScoreError as error:
            errors.append(error)
    if errors:  # nothing written: every file must be an answers file
        for error in errors:
            print(f"score: error: {error}", file=sys.stderr)
        return 2
    print_table(summaries)
    if args.by_type:
        for s in summaries:
            for answer_type, block in (s.get("by_answer_type") or {}).items():
                print(
                    f"{Path(s['file']).name}  type {answer_type}: {block['scored']} scored, exact "
                    f"{_fmt(block['exact_match'], percent=True)} %, contains {_fmt(block['contains'], percent=True)} %"
                )
    try:
        if args.output:
            written = [str(write_json(args.output, summaries))]
        else:
            written = [str(write_summary(s)) for s in summaries]
    except ScoreError as error:
        print(f"score: error: {error}", file=sys.stderr)
        return 2
    for s in summaries:
        if s["unreadable_lines"]:
            print(f"warning: {s['file']}: {s['unreadable_lines']} unreadable lines skipped", file=sys.stderr)
    print(f"summary: {', '.join(written)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
