"""Open-ended video QA (ActivityNet-QA, MSVD-QA, MSRVTT-QA, TGIF-QA) with visual token reduction.

The original Video-LLaVA evaluation workflow, with every `VTRConfig` field as a `--vtr_<field>` flag:

    questions.json + answers.json + video folder
        |  (--num_chunks/--chunk_idx: this process takes one contiguous share of the questions)
        v
    find_video -> load_video (num_frames, uniform) -> prompt -> model.generate (pruned prefill)
        |
        v
    OUTPUT_DIR/OUTPUT_NAME.jsonl                one JSON line per question, flushed as it is written
    OUTPUT_DIR/OUTPUT_NAME_<N>_<i>.jsonl        ... or one part per chunk; `--merge` joins the parts
        |
        v
    python -m videollava.vtr.score FILE         exact match / contains, kept tokens, prefill time

A row: {"id", "video", "question", "answer", "pred", "error", "visual_tokens" (before pruning),
"kept_tokens" (one count per prune stage; [] when nothing was pruned), "prune_layers", "seq_len",
"flops_ratio" (analytic decoder prefill FLOPs, pruned / unpruned), "prefill_ms" (the LLM prefill forward),
"generate_ms", and the settings that change an answer: "vtr" (the settings tag), "model", "num_frames",
"conv_mode", "max_new_tokens", "dtype", "attn_implementation", "batch_size", "video_dir" (resolved)}, plus
"answer_type" when the answers file has types and "merged_tokens" for methods that recycle dropped tokens. A
missing or unreadable video gives a row with `error` set and `pred` null, and the run goes on. Rerunning the
same command resumes: ids already answered are skipped, rows that failed before are tried again (and
replaced). A file holding rows of other settings is refused, never mixed; a file being written by another run
(`<file>.lock`) is refused too, both before the model's weights load.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import os
import re
import sys
import time
import typing
from dataclasses import dataclass, fields
from pathlib import Path

from .config import VTRConfig, VTRConfigError
from .cost import ideal_speedup, text_config_dims, tokens_per_layer
from .model_args import ModelArgsError, convert, describe, vtr_field_types
from .outputs import OutputError, OutputLocked, write_atomic
from .outputs import output_lock as _output_lock
from .prompts import CONV_SYSTEM, chat_prompt
from .score import ScoreError, read_answers

VTR_PREFIX = "vtr_"
DTYPES = ("auto", "float16", "bfloat16", "float32")
#: The row keys of the settings that change an answer: a rerun on a file must match every one of them.
SETTINGS = (
    "model",
    "vtr",
    "num_frames",
    "conv_mode",
    "max_new_tokens",
    "dtype",
    "attn_implementation",
    "batch_size",  # left-padded batches can change half-precision answers
    "video_dir",  # the resolved folder: another folder may hold other videos under the same names
)
PART_RE = re.compile(r"^(?P<name>.+)_(?P<num>\d+)_(?P<idx>\d+)\.jsonl$")

EPILOG = """\
examples:
  # FastV keeping 256 of the 2056 video tokens from layer 2 on, on ActivityNet-QA
  python -m videollava.vtr.run_video_qa --model_path LanguageBind/Video-LLaVA-7B-hf \\
      --video_dir data/activitynet/videos --gt_file_question data/activitynet/test_q.json \\
      --gt_file_answers data/activitynet/test_a.json --output_dir results/anet \\
      --vtr_strategy fastv --vtr_prune_layer 2 --vtr_keep_tokens 256

  # three prune stages, one budget each; the unpruned baseline
  ... --vtr_strategy priortr --vtr_prune_layer 2 8 16 --vtr_keep_tokens 512 256 128
  ... --vtr_strategy none

  # split over 4 GPUs, then merge the parts and score
  for i in 0 1 2 3; do CUDA_VISIBLE_DEVICES=$i python -m videollava.vtr.run_video_qa ... \\
      --output_name fastv256 --num_chunks 4 --chunk_idx $i & done; wait
  python -m videollava.vtr.run_video_qa --merge --output_dir results/anet --output_name fastv256 --num_chunks 4
  python -m videollava.vtr.score results/anet/fastv256.jsonl

Values: lists as several values (--vtr_prune_layer 1 13 24) or [1,13,24]; booleans true/false; none
for an optional field. A flag left out keeps VTRConfig's default (the budget then is the backbone's).
Rerunning a command resumes it: answered ids are skipped, failed rows are retried. A rerun with another
model or setting on the same file is refused (the default name holds the model and the settings tag).
"""


class DataError(ValueError):
    """A question/answer file or an output file that cannot be used; the message names the file."""


# ------------------------------------------------------------------------------------------ the flags


def _accepts_list(annotation) -> bool:
    return any(typing.get_origin(option) is list for option in typing.get_args(annotation))


def _accepts_none(annotation) -> bool:
    return type(None) in typing.get_args(annotation)


def _type_text(annotation) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("NoneType", "None")


def _field_docs() -> dict[str, str]:
    """Each field's description, from the `name: text` paragraphs of VTRConfig's docstring."""
    import inspect

    docs: dict[str, str] = {}
    doc = inspect.cleandoc(VTRConfig.__doc__ or "")
    for paragraph in re.split(r"\n(?=\S)", doc):
        # `a: text; b: text` paragraphs describe several fields; `a / b / c: text` one text for several
        for piece in re.split(r";\s+(?=[a-z_]+: )", " ".join(paragraph.split())):
            match = re.match(r"^([a-z_]+(?: / [a-z_]+)*): (.+)$", piece)
            if match:
                sentences = re.split(r"(?<=[.)])\s+(?=[A-Z`])", match.group(2))
                text = sentences[0]
                for sentence in sentences[1:]:  # a short summary: enough sentences for ~80 characters
                    if len(text) >= 80:
                        break
                    text += " " + sentence
                for name in match.group(1).split(" / "):
                    docs[name] = text
    return docs


def add_vtr_flags(parser: argparse.ArgumentParser) -> None:
    """One `--vtr_<field>` flag per `VTRConfig` field, typed from the dataclass annotation (no per-field
    code: a field added to VTRConfig gets its flag here). Values stay strings until `vtr_config_from_args`."""
    from .strategy import available_strategies

    docs = _field_docs()
    defaults = {f.name: f.default for f in fields(VTRConfig) if f.init}
    group = parser.add_argument_group(
        "visual token reduction (every VTRConfig field; a flag left out keeps VTRConfig's default)"
    )
    for name, annotation in vtr_field_types().items():
        kind = _type_text(annotation)
        text = docs.get(name, "")
        if name == "strategy":
            text += f" Registered: {', '.join(available_strategies())}, or none (the unpruned baseline)."
        default = defaults[name]
        shown = "unset" if default is None else str(default).lower() if isinstance(default, bool) else default
        help_text = f"{text} [{kind}; default: {shown}]".strip().replace("%", "%%")
        kwargs: dict = dict(dest=VTR_PREFIX + name, default=None, help=help_text)
        if _accepts_list(annotation):
            kwargs.update(nargs="+", metavar="V")
        elif bool in typing.get_args(annotation) or annotation is bool:
            kwargs.update(nargs="?", const="true", metavar="true|false")
        else:
            kwargs.update(metavar="none|V" if _accepts_none(annotation) else "V")
        group.add_argument(f"--{VTR_PREFIX}{name}", **kwargs)


def vtr_config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> VTRConfig:
    """The `VTRConfig` of the parsed `--vtr_*` flags; a bad value exits (status 2) naming its flag."""
    from .strategy.registry import UnknownStrategyError

    values = {}
    for name, annotation in vtr_field_types().items():
        raw = getattr(args, VTR_PREFIX + name)
        if raw is None:
            continue
        tokens = raw if isinstance(raw, list) else [raw]
        text = tokens[0] if len(tokens) == 1 else "[" + ",".join(tokens) + "]"
        try:
            values[name] = convert(text, annotation, name)
        except ModelArgsError:
            parser.error(
                f"argument --{VTR_PREFIX}{name}: {' '.join(tokens)!r} does not parse as {_type_text(annotation)}"
            )
    try:
        return VTRConfig(**values)
    except UnknownStrategyError as error:
        parser.error(f"argument --{VTR_PREFIX}strategy: {error}")
    except (VTRConfigError, ValueError, TypeError) as error:
        parser.error(_name_the_flag(str(error)))


def _name_the_flag(message: str) -> str:
    match = re.search(r"VTRConfig\.(\w+)=", message)
    return f"argument --{VTR_PREFIX}{match.group(1)}: {message}" if match else f"--{VTR_PREFIX}* settings: {message}"


class _Parser(argparse.ArgumentParser):
    def parse_args(self, args=None, namespace=None):
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            known = [s for action in self._actions for s in action.option_strings]
            hints = []
            for item in extra:
                if item.startswith("--"):
                    close = difflib.get_close_matches(item.split("=")[0], known, n=1, cutoff=0.6)
                    if close:
                        hints.append(f"{item}: did you mean {close[0]}?")
            hint = f" ({'; '.join(hints)})" if hints else ""
            self.error(f"unrecognized arguments: {' '.join(extra)}{hint}; see --help for every flag")
        return parsed


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m videollava.vtr.run_video_qa",
        description="Answer video questions with Video-LLaVA under visual token reduction; one JSON line per "
        "question, resumable, splittable over GPUs (--num_chunks/--chunk_idx, then --merge).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--model_path", help="Video-LLaVA checkpoint, hub id or folder (LanguageBind/Video-LLaVA-7B-hf)")
    data.add_argument("--video_dir", help="folder of the videos (.mp4/.avi/.mov/.mkv, with or without a v_ prefix)")
    data.add_argument(
        "--gt_file_question",
        help="questions: a JSON list (or JSONL) of {question_id, video_name (or video), question}",
    )
    data.add_argument(
        "--gt_file_answers",
        help="answers: a JSON list (or JSONL) of {question_id, answer[, type]}; optional (no answers: pred only)",
    )
    data.add_argument("--num_samples", type=int, help="only the first N questions (before chunking)")
    out = parser.add_argument_group("output")
    out.add_argument("--output_dir", help="where the JSONL goes (created)")
    out.add_argument(
        "--output_name",
        help="file name without .jsonl; default: <model>__<settings tag> (e.g. Video-LLaVA-7B-hf__fastv_K2_keep256; "
        "_f<N> and _plain added for a non-default --num_frames / --conv_mode). "
        "With --num_chunks N > 1 each part is <output_name>_<N>_<chunk_idx>.jsonl",
    )
    out.add_argument("--num_chunks", type=int, default=1, help="split the questions into N contiguous parts")
    out.add_argument("--chunk_idx", type=int, default=0, help="which part this process answers (0-based)")
    out.add_argument(
        "--merge",
        action="store_true",
        help="join the parts <output_name>_<N>_<i>.jsonl into <output_name>.jsonl (no model; fails naming "
        "missing parts; with --gt_file_question it also names unanswered questions), then score it",
    )
    out.add_argument("--no_score", action="store_true", help="do not print/write the score summary at the end")
    gen = parser.add_argument_group("model and generation")
    gen.add_argument("--num_frames", type=int, default=8, help="frames sampled uniformly per video (default 8)")
    gen.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda if available, else cpu)")
    gen.add_argument(
        "--dtype", choices=DTYPES, help="model dtype (default: float16 on cuda, float32 on cpu; auto = checkpoint's)"
    )
    gen.add_argument("--attn_implementation", choices=("eager", "sdpa"), help="default: transformers' choice")
    gen.add_argument(
        "--conv_mode",
        choices=tuple(CONV_SYSTEM),
        default="llava_v1",
        help="prompt format: llava_v1 (default; the original evaluation's, with its system line) or plain "
        "(`USER: <video>\\n{question} ASSISTANT:`, the HF model card's)",
    )
    gen.add_argument("--max_new_tokens", type=int, default=1024, help="default 1024 (the original workflow's)")
    gen.add_argument(
        "--batch_size", type=int, default=1, help="questions per generate() call (default 1; a setting of the file)"
    )
    add_vtr_flags(parser)
    return parser


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    required = ["output_dir"] if args.merge else ["model_path", "video_dir", "gt_file_question", "output_dir"]
    missing = [f"--{name}" for name in required if getattr(args, name) in (None, "")]
    if missing:
        parser.error(
            f"the following arguments are required{' with --merge' if args.merge else ''}: {', '.join(missing)}"
        )
    for name, low in (("num_chunks", 1), ("num_frames", 1), ("max_new_tokens", 1), ("batch_size", 1)):
        if getattr(args, name) < low:
            parser.error(f"argument --{name}: must be >= {low}, got {getattr(args, name)}")
    if args.num_samples is not None and args.num_samples < 1:
        parser.error(f"argument --num_samples: must be >= 1, got {args.num_samples}")
    if not args.merge and not 0 <= args.chunk_idx < args.num_chunks:
        parser.error(f"argument --chunk_idx: must be in [0, {args.num_chunks - 1}] for --num_chunks {args.num_chunks}")
    for name in ("gt_file_question", "gt_file_answers"):
        path = getattr(args, name)
        if path and not Path(path).is_file():
            parser.error(f"argument --{name}: file not found: {path}")
    if not args.merge and not Path(args.video_dir).is_dir():
        parser.error(f"argument --video_dir: not a folder: {args.video_dir}")


# ------------------------------------------------------------------------------------------ the data


@dataclass
class Question:
    id: str
    video: str
    question: str
    answer: str | None = None
    answer_type: str | None = None


def _read_records(path: str | Path) -> list[dict]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"cannot read {path}: {error}") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise DataError(f"{path} must hold a JSON list of objects (or one object per line as .jsonl)")
    if not records:
        raise DataError(f"{path} holds no records")
    return records


def _get(record: dict, keys: tuple[str, ...], path, index: int):
    for key in keys:
        if key in record and record[key] is not None:
            return record[key]
    raise DataError(f"{path}: record {index} has no {' or '.join(map(repr, keys))} key: {json.dumps(record)[:200]}")


def load_questions(question_file: str | Path, answer_file: str | Path | None = None) -> list[Question]:
    """The questions in file order, each with its answer (matched by question id, compared as strings).

    Accepts ActivityNet-QA / MSVD-QA style files: questions carry `question_id`, `video_name` (or `video`)
    and `question`; answers carry `question_id` and `answer` (and, in ActivityNet-QA, `type`)."""
    questions, seen = [], set()
    for i, record in enumerate(_read_records(question_file)):
        qid = str(_get(record, ("question_id", "id"), question_file, i))
        if qid in seen:
            raise DataError(f"{question_file}: question id {qid!r} appears twice; ids must be unique")
        seen.add(qid)
        video = str(_get(record, ("video_name", "video"), question_file, i))
        questions.append(Question(qid, video, str(_get(record, ("question",), question_file, i))))
    if answer_file:
        answers = {}
        for i, record in enumerate(_read_records(answer_file)):
            qid = str(_get(record, ("question_id", "id"), answer_file, i))
            answers[qid] = (str(_get(record, ("answer",), answer_file, i)), record.get("type"))
        missing = [q.id for q in questions if q.id not in answers]
        if missing:
            raise DataError(
                f"{answer_file} has no answer for {len(missing)} of {len(questions)} question ids "
                f"(first: {', '.join(missing[:5])})"
            )
        for q in questions:
            q.answer, answer_type = answers[q.id]
            q.answer_type = None if answer_type is None else str(answer_type)
    return questions


def chunk(items: list, num_chunks: int, chunk_idx: int) -> list:
    """Contiguous part `chunk_idx` of `num_chunks` near-equal parts (sizes differ by at most one; the parts
    in order are `items`)."""
    start = chunk_idx * len(items) // num_chunks
    end = (chunk_idx + 1) * len(items) // num_chunks
    return items[start:end]


def output_path(output_dir: str | Path, output_name: str, num_chunks: int = 1, chunk_idx: int = 0) -> Path:
    name = output_name.removesuffix(".jsonl")
    if num_chunks > 1:
        name = f"{name}_{num_chunks}_{chunk_idx}"
    return Path(output_dir) / f"{name}.jsonl"


def read_rows(path: str | Path) -> tuple[list[dict], int]:
    """(rows, unreadable lines) of a JSONL output file, one row per id (the last one): `score.read_answers`,
    the scorer's own reader, so that resume, merge and the scorer agree on every file."""
    try:
        return read_answers(path)
    except ScoreError as error:
        raise DataError(str(error)) from None


def _write_rows(path: Path, rows: list[dict]) -> None:
    """Replace `path` with `rows` whole or not at all (an interrupted write leaves the old file)."""
    try:
        write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))
    except OutputError as error:
        raise DataError(str(error)) from None


def settings_differ(rows: list[dict], settings: dict) -> dict[str, tuple]:
    """{key: (a row's value, this run's)} for each setting some row was made with otherwise (a row without
    the key, written before it was recorded, differs too)."""
    differ: dict[str, tuple] = {}
    for row in rows:
        for key, value in settings.items():
            if key not in differ and row.get(key) != value:
                differ[key] = (row.get(key), value)
    return differ


def _describe_differences(differ: dict[str, tuple], there: str = "there", here: str = "here") -> str:
    return "; ".join(f"{key}={theirs!r} {there}, {ours!r} {here}" for key, (theirs, ours) in differ.items())


def check_settings(path: Path, run_settings: dict, questions: list[Question] | None = None) -> tuple[list[dict], int]:
    """(rows, unreadable lines) of `path`; DataError, the file untouched, when its rows were made with other
    settings or were asked another question or video than `questions` for the same id."""
    rows, bad = read_rows(path)
    differ = settings_differ(rows, run_settings)
    by_id = {q.id: q for q in questions or []}
    for row in rows:
        q = by_id.get(str(row["id"]))
        for key in ("video", "question"):
            if q is not None and key not in differ and row.get(key) != getattr(q, key):
                differ[key] = (row.get(key), getattr(q, key))
    if differ:
        raise DataError(
            f"{path} holds rows made with other settings ({_describe_differences(differ)}); give another "
            "--output_name or --output_dir (or delete the file) to start a new run: runs are never mixed"
        )
    return rows, bad


def prepare_resume(path: Path, run_settings: dict, questions: list[Question] | None = None) -> dict[str, dict]:
    """The rows already answered in `path`, by id. Rows that failed (and unreadable lines, and the earlier
    rows of a repeated id) are removed from the file so that this run retries them. A file written with
    other settings, or whose rows were asked another question or video than `questions`, is refused."""
    rows, bad = check_settings(path, run_settings, questions)
    done = {str(row["id"]): row for row in rows if not row.get("error")}
    failed = len(rows) - len(done)
    lines = sum(1 for line in path.read_bytes().splitlines() if line.strip()) if path.is_file() else 0
    repeated = lines - bad - len(rows)
    if failed or bad or repeated:
        _write_rows(path, list(done.values()))
        print(
            f"resume: {path}: retrying {failed} failed row(s); dropped {bad} unreadable line(s) and {repeated} "
            "earlier row(s) of a repeated id (the last row of an id is the one kept)",
            file=sys.stderr,
        )
    return done


@contextlib.contextmanager
def output_lock(path: Path, command: str | None = None):
    """Hold `<path>.lock` while this process writes `path` (the shared `outputs.output_lock`): a second run on
    the same file is refused (DataError naming the holder: pid, host, command, start time); a lock file left by
    a dead run of this host is taken over with a note, one naming a run of another host is refused."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(_output_lock(path.with_name(path.name + ".lock"), "run", command))
        except OutputLocked as error:
            if not error.held:
                raise DataError(str(error)) from None
            raise DataError(
                f"{path} is being written by another run ({error.holder}); wait for it to finish, or give another "
                "--output_name / --output_dir"
            ) from None
        except OutputError as error:
            raise DataError(str(error)) from None
        yield


# ------------------------------------------------------------------------------------------ running


def _device_and_dtype(args):
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise DataError(f"--device {device!r} is not a device (cuda, cuda:1, cpu, mps, ...)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise DataError(f"--device {device}: CUDA is not available here; use --device cpu")
    dtype = args.dtype or ("float16" if device.startswith("cuda") else "float32")
    return device, dtype if dtype == "auto" else getattr(torch, dtype)


class _PrefillTimer:
    """Times the first forward call after `arm()` (the prefill of generate()) and keeps `vtr_last`."""

    def __init__(self, model):
        self.armed, self.start, self.ms, self.record = False, None, None, None
        self.handles = [
            model.register_forward_pre_hook(self._before, with_kwargs=True),
            model.register_forward_hook(self._after, with_kwargs=True),
        ]

    def arm(self):
        self.armed, self.ms, self.record = True, None, None

    @staticmethod
    def _sync(module):
        import torch

        if next(module.parameters()).is_cuda:
            torch.cuda.synchronize()

    def _before(self, module, args, kwargs):
        if self.armed:
            self._sync(module)
            self.start = time.perf_counter()

    def _after(self, module, args, kwargs, output):
        if self.armed and self.start is not None:
            self._sync(module)
            self.ms = (time.perf_counter() - self.start) * 1000
            self.record = getattr(module, "vtr_last", None)
            self.armed, self.start = False, None

    def close(self):
        for handle in self.handles:
            handle.remove()


def _visual_token_ids(model) -> set[int]:
    config = model.config
    ids = set()
    for key in ("video_token_id", "image_token_id", "video_token_index", "image_token_index"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            ids.add(value)
    return ids


def group_by_video(questions: list[Question]) -> list[Question]:
    """The questions reordered so that each video's questions follow each other (videos in the order
    they first appear; questions of one video in file order): each video is then decoded once."""
    first: dict[str, int] = {}
    for i, q in enumerate(questions):
        first.setdefault(q.video, i)
    return sorted(questions, key=lambda q: first[q.video])


class VideoLoader:
    """Decoded frames by video name, the next video decoded in a background thread while the model
    answers questions on the current one. `order`: the video names in the order they will be asked for."""

    def __init__(self, video_dir, num_frames: int, order: list[str]):
        from concurrent.futures import ThreadPoolExecutor

        self.video_dir, self.num_frames = video_dir, num_frames
        names = list(dict.fromkeys(order))
        self.next_of = dict(zip(names, names[1:]))
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="video-decode")
        self.futures: dict[str, object] = {}

    def _load(self, name: str):
        from .video_io import find_video, load_video

        path = find_video(self.video_dir, name)
        return path, load_video(path, num_frames=self.num_frames).frames

    def get(self, name: str):
        """(path, frames) of video `name`; raises what decoding raised (VideoError for a missing or bad file)."""
        wanted = [name] + ([self.next_of[name]] if name in self.next_of else [])
        for key in wanted:
            if key not in self.futures:
                self.futures[key] = self.pool.submit(self._load, key)
        for key in [k for k in self.futures if k not in wanted]:
            del self.futures[key]
        return self.futures[name].result()

    def close(self):
        self.pool.shutdown(wait=False, cancel_futures=True)


def build_prompt(question: str, conv_mode: str = "llava_v1") -> str:
    """`llava_v1` (the original evaluation's): `{system} USER: <video>\n{question} ASSISTANT:`;
    `plain`: the same without the system line (the HF model card's). The lmms-eval model's prompt too."""
    return chat_prompt(question, conv_mode)


def answer_batch(
    model, processor, batch: list[tuple[Question, object]], max_new_tokens: int, timer, conv_mode: str = "llava_v1"
) -> list[dict]:
    """Generate the answers of `batch` ([(question, frames)]) in one call; one row of results each."""
    import torch

    from .prompts import encode

    prompts = [build_prompt(q.question, conv_mode) for q, _ in batch]
    inputs = encode(processor, prompts, videos=[frames for _, frames in batch])
    dtype = model.dtype
    inputs = {
        k: (v.to(model.device, dtype) if v.is_floating_point() else v.to(model.device)) if torch.is_tensor(v) else v
        for k, v in inputs.items()
    }
    tokenizer = getattr(processor, "tokenizer", processor)
    timer.arm()
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=tokenizer.pad_token_id
        )
    if output.is_cuda:
        torch.cuda.synchronize()
    generate_ms = (time.perf_counter() - start) * 1000
    texts = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    visual_ids = torch.tensor(sorted(_visual_token_ids(model)), device=inputs["input_ids"].device)
    text_config = model.config.text_config
    dims, num_layers = text_config_dims(text_config), text_config.num_hidden_layers
    record, n = timer.record, len(batch)
    mask = inputs.get("attention_mask")
    results = []
    for b, text in enumerate(texts):
        visual = int(torch.isin(inputs["input_ids"][b], visual_ids).sum())
        seq_len = int(mask[b].sum()) if mask is not None else inputs["input_ids"].shape[1]
        stages = record.stages if record is not None else []
        merged = [stage.merged[b] if stage.merged else 0 for stage in stages]  # recycled tokens stay in
        schedule = [
            (stage.layer, stage.image_tokens_before[b] - stage.image_tokens_kept[b] - m)
            for stage, m in zip(stages, merged)
        ]
        lengths = tokens_per_layer(seq_len, num_layers, schedule)
        row = dict(
            pred=text.strip(),
            visual_tokens=stages[0].image_tokens_before[b] if stages else visual,
            kept_tokens=[stage.image_tokens_kept[b] for stage in stages],
            prune_layers=[stage.layer for stage in stages],
            seq_len=seq_len,
            # analytic decoder prefill FLOPs, pruned / unpruned (cost.py); 1.0 when nothing was pruned
            flops_ratio=round(1 / ideal_speedup(seq_len, lengths, *dims), 6),
            prefill_ms=round(timer.ms / n, 3) if timer.ms is not None else None,
            generate_ms=round(generate_ms / n, 3),
        )
        if any(merged):
            row["merged_tokens"] = merged
        results.append(row)
    return results


def _row(q: Question, settings: dict, **fields_) -> dict:
    row = dict(id=q.id, video=q.video, question=q.question, answer=q.answer)
    if q.answer_type is not None:
        row["answer_type"] = q.answer_type
    row.update(pred=None, error=None, visual_tokens=None, kept_tokens=None, prune_layers=None, seq_len=None)
    row.update(flops_ratio=None, prefill_ms=None, generate_ms=None)
    row.update(settings)
    row.update(fields_)
    return row


def load(args, vtr_config: VTRConfig):
    """(model, processor) from `--model_path`, on `--device` in `--dtype`."""
    from . import load_model, load_processor

    device, dtype = _device_and_dtype(args)
    kwargs = dict(dtype=dtype, device_map=device)
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    try:
        model = load_model(args.model_path, vtr_config, **kwargs)
        return model, load_processor(args.model_path)
    except VTRConfigError:
        raise
    except (OSError, ValueError) as error:  # no such folder / hub id, not a Video-LLaVA checkpoint
        raise DataError(f"cannot load --model_path {args.model_path}: {error}") from None


def model_id(model_path) -> str:
    """The checkpoint as rows record it: a local folder's absolute path, else the hub id as given."""
    path = Path(str(model_path)).expanduser()
    return str(path.resolve()) if path.exists() else str(model_path)


def default_output_name(model: str, tag: str, args) -> str:
    """`<model>__<settings tag>` (the checkpoint's folder or hub name), plus the frame count and prompt format
    when they are not the defaults."""
    slug = re.sub(r"[^\w.-]+", "-", Path(model).name).strip("-") or "model"
    name = f"{slug}__{tag}" if args.num_frames == 8 else f"{slug}__{tag}_f{args.num_frames}"
    return name if args.conv_mode == "llava_v1" else f"{name}_{args.conv_mode}"


def run_settings(args, model) -> dict:
    """The settings that change an answer (SETTINGS), as this run's rows record them."""
    return dict(
        model=model_id(args.model_path),
        vtr=describe(model.vtr_config),  # after the backbone filled in what was left to defaults
        num_frames=args.num_frames,
        conv_mode=args.conv_mode,
        max_new_tokens=args.max_new_tokens,
        dtype=str(model.dtype).removeprefix("torch."),
        attn_implementation=getattr(model.config, "_attn_implementation", None),
        batch_size=args.batch_size,
        video_dir=str(Path(args.video_dir).expanduser().resolve()),
    )


def planned_model(args, vtr_config: VTRConfig):
    """The model `load` will return, built from the checkpoint's config on the meta device (no weights, no
    memory, a fraction of a second): its resolved VTR settings, dtype and attention, known before loading."""
    import torch
    from transformers import AutoConfig

    from .model_args import check_checkpoint
    from .modeling import VTRVideoLlavaForConditionalGeneration

    _, dtype = _device_and_dtype(args)
    try:
        check_checkpoint(args.model_path)
        config = AutoConfig.from_pretrained(args.model_path)
    except (OSError, ValueError) as error:  # no such folder / hub id
        raise DataError(f"cannot load --model_path {args.model_path}: {error}") from None
    if config.model_type != "video_llava":
        raise DataError(
            f"cannot load --model_path {args.model_path}: a {config.model_type!r} checkpoint; this runner takes "
            "Video-LLaVA ('video_llava') checkpoints"
        )
    kwargs = {} if dtype == "auto" else dict(dtype=dtype)
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    with torch.device("meta"):
        model = VTRVideoLlavaForConditionalGeneration._from_config(config, **kwargs)
    model.set_vtr_config(vtr_config)
    return model


def run(args, vtr_config: VTRConfig, model=None, processor=None) -> dict:
    """Answer this chunk's questions not yet in the output file. `model`/`processor` may be given already
    loaded (tests, notebooks); the config is then set on the model. Returns counts and the output path. The
    output is locked, and its rows checked against this run's settings, before the weights load."""
    questions = load_questions(args.gt_file_question, args.gt_file_answers)
    if args.num_samples is not None:
        questions = questions[: args.num_samples]
    mine = chunk(questions, args.num_chunks, args.chunk_idx)
    out_dir = Path(args.output_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"cannot create --output_dir {out_dir}: {error}") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise DataError(f"--output_dir {out_dir}: not writable")

    if model is not None:
        model.set_vtr_config(vtr_config)
    settings = run_settings(args, model if model is not None else planned_model(args, vtr_config))
    name = args.output_name or default_output_name(settings["model"], settings["vtr"], args)
    path = output_path(out_dir, name, args.num_chunks, args.chunk_idx)
    with output_lock(path):
        check_settings(path, settings, mine)  # a file of other settings is refused before the weights load
        if model is None:
            model, processor = load(args, vtr_config)
            settings = run_settings(args, model)  # the same as planned; checked again by the resume
        return _answer(args, model, processor, settings, mine, path)


def _answer(args, model, processor, settings: dict, mine: list[Question], path: Path) -> dict:
    """`run` once `path` is locked: resume, then append one row per pending question."""
    from tqdm import tqdm

    from .video_io import VideoError

    tag = settings["vtr"]
    done = prepare_resume(path, settings, mine)
    pending = group_by_video([q for q in mine if q.id not in done])
    part = f" (chunk {args.chunk_idx} of {args.num_chunks})" if args.num_chunks > 1 else ""
    print(
        f"{len(mine)} questions{part}: {len(mine) - len(pending)} already in {path}, {len(pending)} to answer; "
        f"vtr={tag}",
        file=sys.stderr,
    )

    videos = VideoLoader(args.video_dir, args.num_frames, [q.video for q in pending])
    timer = _PrefillTimer(model)
    counts = dict(total=len(mine), skipped=len(mine) - len(pending), answered=0, errors=0, path=str(path))
    launched = launcher_rank()
    bar = tqdm(
        total=len(mine),
        initial=counts["skipped"],
        desc=f"video QA {tag}",
        unit="q",
        dynamic_ncols=True,
        disable=bool(launched) and launched[0] != 0,  # under torchrun: rank 0's bar only
    )
    try:
        try:
            out = path.open("a", encoding="utf-8")
        except OSError as error:
            raise DataError(f"cannot write {path}: {error}") from None
        with out:

            def write(row):  # one whole line per row, flushed: an interrupted run leaves complete lines
                out.write(json.dumps(row) + "\n")
                out.flush()
                counts["errors" if row["error"] else "answered"] += 1
                bar.update(1)

            for start in range(0, len(pending), args.batch_size):
                batch = []
                for q in pending[start : start + args.batch_size]:
                    try:
                        _, frames = videos.get(q.video)
                    except (VideoError, OSError) as error:
                        write(_row(q, settings, error=f"{type(error).__name__}: {error}"))
                        continue
                    batch.append((q, frames))
                if not batch:
                    continue
                for (q, _), result in zip(
                    batch, answer_batch(model, processor, batch, args.max_new_tokens, timer, args.conv_mode)
                ):
                    write(_row(q, settings, **result))
    finally:
        bar.close()
        timer.close()
        videos.close()
    print(
        f"wrote {counts['answered']} answers and {counts['errors']} error rows to {path} "
        f"({counts['skipped']} were already there)",
        file=sys.stderr,
    )
    return counts


# ------------------------------------------------------------------------------------------ merging


class MergeError(ValueError):
    """Parts are missing or of different settings, the target holds another run, or which parts to merge is
    ambiguous."""


def find_parts(output_dir: str | Path, output_name: str | None = None, num_chunks: int | None = None):
    """(name, num_chunks, {idx: path}) of the part files `<name>_<N>_<i>.jsonl` in `output_dir`."""
    groups: dict[tuple[str, int], dict[int, Path]] = {}
    for path in sorted(Path(output_dir).glob("*.jsonl")):
        match = PART_RE.match(path.name)
        if not match:
            continue
        name, num, idx = match.group("name"), int(match.group("num")), int(match.group("idx"))
        if (output_name and name != output_name.removesuffix(".jsonl")) or (num_chunks and num != num_chunks):
            continue
        if idx < num:
            groups.setdefault((name, num), {})[idx] = path
    if not groups:
        if output_name and num_chunks:  # nothing at all: every part is missing
            return output_name.removesuffix(".jsonl"), num_chunks, {}
        wanted = f"{output_name or '<name>'}_{num_chunks or '<N>'}_<i>.jsonl"
        raise MergeError(f"no part files {wanted} in {output_dir}")
    if len(groups) > 1:
        found = ", ".join(f"--output_name {n} --num_chunks {k}" for n, k in groups)
        raise MergeError(f"several runs have parts in {output_dir}; pick one: {found}")
    (name, num), parts = next(iter(groups.items()))
    return name, num, parts


def merge(output_dir, output_name=None, num_chunks=None, questions: list[Question] | None = None) -> dict:
    """Concatenate the parts, in chunk order, into `<output_name>.jsonl` (one row per id, its last). Refuses
    (MergeError, nothing written) when a part is missing, parts hold rows of different settings, or the target
    already holds rows of other settings (or rows while the parts hold none), and (DataError) while a part or
    the target is being written by a run; with `questions` it also reports questions no part answered."""
    name, num, parts = find_parts(output_dir, output_name, num_chunks if num_chunks and num_chunks > 1 else None)
    missing = [i for i in range(num) if i not in parts]
    if missing:
        files = ", ".join(output_path(output_dir, name, num, i).name for i in missing)
        raise MergeError(
            f"{len(missing)} of {num} parts missing in {output_dir}: {files}; run those chunks "
            f"(--num_chunks {num} --chunk_idx {' / '.join(map(str, missing))}) and merge again"
        )
    target = output_path(output_dir, name)
    with contextlib.ExitStack() as locks:
        for path in [*(parts[i] for i in range(num)), target]:
            locks.enter_context(output_lock(path))
        by_id, bad, first = {}, 0, None
        for i in range(num):
            part_rows, part_bad = read_rows(parts[i])
            if first is None and part_rows:  # the settings every part must share: the first row's
                first = (parts[i], {k: part_rows[0].get(k) for k in SETTINGS})
            differ = settings_differ(part_rows, first[1]) if first else {}
            if differ:
                raise MergeError(
                    f"{parts[i].name} holds rows made with other settings than {first[0].name} "
                    f"({_describe_differences(differ, parts[i].name, first[0].name)}); merge parts of one run only"
                )
            bad += part_bad
            by_id.update((str(row["id"]), row) for row in part_rows)
        finished = read_rows(target)[0]  # a merged file already there: replaced only by rows of its settings
        differ = settings_differ(finished, first[1]) if first else {}
        if differ:
            raise MergeError(
                f"{target} already holds rows made with other settings than the parts "
                f"({_describe_differences(differ, target.name, first[0].name)}); move it away, or merge parts of "
                "its own run"
            )
        if finished and not by_id:
            raise MergeError(f"the parts hold no rows and {target} holds {len(finished)}: nothing to merge")
        rows, seen = list(by_id.values()), set(by_id)
        _write_rows(target, rows)
    report = dict(
        path=str(target),
        parts=num,
        rows=len(rows),
        errors=sum(1 for r in rows if r.get("error")),
        unreadable_lines=bad,
    )
    if questions is not None:
        unanswered = [q.id for q in questions if q.id not in seen]
        report["unanswered"] = len(unanswered)
        report["unanswered_ids"] = unanswered[:20]
    return report


# ------------------------------------------------------------------------------------------ main


def launcher_rank() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when started by torchrun / `python -m torch.distributed.run`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def merge_main(args, name: str | None = None, num_chunks: int | None = None) -> int:
    """`--merge`: join the parts, report what is missing, score the result. 0 = complete, 1 = not."""
    questions = None
    try:
        if args.gt_file_question:
            questions = load_questions(args.gt_file_question)
            questions = questions[: args.num_samples] if args.num_samples else questions
        report = merge(args.output_dir, name or args.output_name, num_chunks or args.num_chunks, questions)
    except (MergeError, DataError) as error:
        print(f"run_video_qa --merge: error: {error}", file=sys.stderr)
        return 1
    print(
        f"merged {report['parts']} parts into {report['path']}: {report['rows']} rows, {report['errors']} with an "
        f"error, {report['unreadable_lines']} unreadable lines skipped",
        file=sys.stderr,
    )
    status = 0
    if report.get("unanswered"):
        print(
            f"run_video_qa --merge: {report['unanswered']} questions have no row "
            f"(first: {', '.join(report['unanswered_ids'][:5])}); rerun their chunks to fill them in",
            file=sys.stderr,
        )
        status = 1
    if not args.no_score:
        status = _score(report["path"]) or status
    return status


def main(argv: list[str] | None = None, model=None, processor=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(args, parser)
    if args.merge:
        return merge_main(args)
    launched = launcher_rank()
    if launched:  # one chunk per process; rank 0 merges once every rank is done
        rank, world, local_rank = launched
        if args.num_chunks != 1 or args.chunk_idx != 0:
            parser.error(f"--num_chunks/--chunk_idx: set by the launcher (WORLD_SIZE={world}, RANK={rank}); leave out")
        args.num_chunks, args.chunk_idx = world, rank
        import torch

        if args.device is None and torch.cuda.is_available():
            args.device = f"cuda:{local_rank}"
    vtr_config = vtr_config_from_args(args, parser)
    if launched:
        return _launched_main(args, vtr_config, model, processor)
    try:
        counts = run(args, vtr_config, model=model, processor=processor)
    except DataError as error:
        print(f"run_video_qa: error: {error}", file=sys.stderr)
        return 2
    except VTRConfigError as error:  # a setting this model cannot run (e.g. a prune layer past its last layer)
        print(f"run_video_qa: error: {_name_the_flag(str(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the rows written so far are whole lines; the lock went with the `with`
        print(
            "run_video_qa: interrupted; the rows written so far are kept: rerun the command to resume", file=sys.stderr
        )
        return 130
    if args.num_chunks > 1:
        print(
            "merge the parts when every chunk has finished: python -m videollava.vtr.run_video_qa --merge "
            f"--output_dir {args.output_dir} --output_name {PART_RE.match(Path(counts['path']).name).group('name')} "
            f"--num_chunks {args.num_chunks}",
            file=sys.stderr,
        )
    elif not args.no_score:
        return _score(counts["path"])
    return 0


def _launched_main(args, vtr_config: VTRConfig, model=None, processor=None) -> int:
    """Under torchrun: answer this rank's chunk, wait for every rank (a gloo barrier, no GPU collective),
    then rank 0 merges the parts into `<output_name>.jsonl` and scores it."""
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=timedelta(days=7))  # a barrier only; chunks may take hours
    try:
        import torch

        try:
            counts, status = run(args, vtr_config, model=model, processor=processor), 0
        except (DataError, VTRConfigError) as error:
            print(f"run_video_qa: error: {_name_the_flag(str(error))}", file=sys.stderr)
            counts, status = None, 2
        except Exception:  # any other failure of this rank: report it, and let every rank know (no hang)
            import traceback

            traceback.print_exc()
            counts, status = None, 1
        # the barrier: every rank reports its status; the worst one decides whether rank 0 merges
        worst = torch.tensor([status])
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        if worst.item() and not status:
            print(
                f"run_video_qa: another rank failed (status {worst.item()}); the parts were not merged", file=sys.stderr
            )
        if worst.item() or dist.get_rank() != 0:
            return status or int(worst.item())
        name = PART_RE.match(Path(counts["path"]).name).group("name")
        return merge_main(args, name, args.num_chunks)
    finally:
        dist.destroy_process_group()


def _score(path) -> int:
    """Print and write the score summary of `path`; 0, or 1 (with the message) when it cannot be scored."""
    from .score import print_table, score_file, write_summary

    try:
        summary = score_file(path)
        print_table([summary])
        write_summary(summary)
    except ScoreError as error:
        print(f"run_video_qa: error: cannot score: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
