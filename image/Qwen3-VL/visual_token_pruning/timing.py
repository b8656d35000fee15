# Copied from image/LLaVA/llava/vtr/timing.py
# Shared vtr file: edit it in image/LLaVA/llava/vtr, then `make fix-copies` updates every fork.
"""Timings a user can trust, and the command-line plumbing the demos and scripts/bench.py share.

Settings are timed in interleaved rounds: one warm-up round (not timed), then `repeats` timed rounds, each
running every setting once, starting one setting later than the round before, so that drift of the machine
hits every setting alike. A time is printed as the median over the rounds with their range,
`123.4 [118.0-131.2]`; a speedup is the median of the per-round ratios (unpruned / setting, both from the
same round) with their range, marked `~` when it is inside the noise: the range holds 1.00x, or the middle
half of the ratios (interquartile range, which one disturbed round does not widen) spreads wider than the
distance of the median from 1.00x, or there is one round only (no range at all).

Bad command-line values raise `UsageError`; `run_cli` prints them as one line and exits 2, and Ctrl-C as
one line with exit status 130, never a traceback.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


def log(message: str) -> None:
    """Progress, on stderr (stdout keeps the results)."""
    print(message, file=sys.stderr, flush=True)


def spread(values) -> dict | None:
    """min, quartiles, median and max of a record's samples (None when there are none): a mean alone hides a
    warm-up or a disturbed run. Quartiles interpolate linearly between the nearest ranks."""
    ordered = sorted(v for v in values if v is not None)
    if not ordered:
        return None

    def at(q):
        pos = q * (len(ordered) - 1)
        low = int(pos)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)

    return dict(min=ordered[0], p25=at(0.25), median=at(0.5), p75=at(0.75), max=ordered[-1])


@dataclass(frozen=True)
class Timings:
    """Samples of one figure (ms, one per timed round): median and range."""

    samples: tuple[float, ...]

    def __post_init__(self):
        if not self.samples:
            raise ValueError("Timings needs at least one sample")

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def low(self) -> float:
        return min(self.samples)

    @property
    def high(self) -> float:
        return max(self.samples)

    def format(self, digits: int = 1) -> str:
        return f"{self.median:.{digits}f} [{self.low:.{digits}f}-{self.high:.{digits}f}]"


@dataclass(frozen=True)
class Speedup(Timings):
    """Per-round ratios baseline / setting."""

    @classmethod
    def of(cls, baseline, setting) -> Speedup:
        """Pairs sample r of the baseline with sample r of the setting (both measured in round r)."""
        if len(baseline) != len(setting):
            raise ValueError(f"{len(baseline)} baseline samples against {len(setting)}: pair them by round")
        return cls(tuple(b / s for b, s in zip(baseline, setting)))

    @property
    def spread(self) -> float:
        """Width of the middle half of the rounds (interquartile range): one disturbed round does not widen it."""
        if len(self.samples) < 2:
            return 0.0
        q1, _, q3 = statistics.quantiles(self.samples, n=4, method="inclusive")
        return q3 - q1

    @property
    def within_noise(self) -> bool:
        """No round range, a range that holds 1.00x, or a middle half wider than the distance from 1.00x."""
        if len(self.samples) < 2:
            return True
        return self.low <= 1.0 <= self.high or self.spread > abs(self.median - 1.0)

    def format(self, digits: int = 2) -> str:
        mark = "~" if self.within_noise else ""
        return f"{mark}{self.median:.{digits}f}x [{self.low:.{digits}f}-{self.high:.{digits}f}]"


def rounds(repeats: int, settings: int):
    """Yields (round, setting index): round 0 is the warm-up (not to be timed), rounds 1..repeats are timed;
    each round visits every setting once, starting one later than the round before. Logs each round."""
    start = time.perf_counter()
    for r in range(repeats + 1):
        done = f" ({time.perf_counter() - start:.0f} s so far)" if r else ""
        log(f"warm-up round (not timed), {settings} settings" if r == 0 else f"timed round {r}/{repeats}{done}")
        for j in range(settings):
            yield r, (j + r) % settings


def prefill_ms(model, inputs) -> float:
    """Wall time of one prefill (logits of the last row only), in ms; waits for the GPU."""
    import torch

    cuda = inputs["input_ids"].is_cuda
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        model(**inputs, use_cache=True, logits_to_keep=1)
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000


def measure_prefill(model, inputs, configs, repeats: int) -> list[Timings]:
    """Prefill times of the model under each VTR config, interleaved over rounds (see `rounds`)."""
    samples = [[] for _ in configs]
    for r, i in rounds(repeats, len(configs)):
        model.set_vtr_config(configs[i])
        ms = prefill_ms(model, inputs)
        if r:
            samples[i].append(ms)
    return [Timings(tuple(s)) for s in samples]


def speed_cells(times: list[Timings]) -> list[tuple[str, str]]:
    """(prefill ms, speedup) cells for each setting; the first is the unpruned reference."""
    return [
        (t.format(), "reference" if i == 0 else Speedup.of(times[0].samples, t.samples).format())
        for i, t in enumerate(times)
    ]


def noise_note(speedups: list[str], repeats: int, flag: str = "--repeats", what: str = "speedups") -> str:
    """The footnote of a table whose speedup cells come from `Speedup.format`."""
    note = (
        f"Times: median [min-max] over {repeats} timed round{'s' * (repeats != 1)} (after a warm-up round), every "
        "setting once per round.\n"
        "~ = inside the noise: the speedup's range over the rounds holds 1.00x, or its middle half (interquartile) "
        "is wider than its distance from 1.00x, or there is one round."
    )
    flagged = sum(cell.startswith("~") for cell in speedups)
    if flagged:
        note += (
            f"\n{flagged} of {len(speedups)} {what} are inside the noise: rerun on an idle machine, or with more "
            f"{flag}, to tell them from 1.00x."
        )
    return note


# ------------------------------------------------------------------------------------------ command line


class UsageError(Exception):
    """A bad command-line value; the message names the flag and the value."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors are a `UsageError` (one line through `run_cli`), not a usage dump."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def run_cli(prog: str, body, argv=None) -> int:
    """body(argv) with a bad value as one line `prog: error: ...` (exit 2) and Ctrl-C as one line (exit 130)."""
    try:
        return body(argv)
    except UsageError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted (Ctrl-C); nothing more was run", file=sys.stderr)
        return 130


def parse_list(flag: str, text: str, convert=str, minimum: int | None = None) -> list:
    """Comma-separated values of `flag`: none empty, each converted (ints >= minimum), duplicates dropped with a
    note."""
    items = [part.strip() for part in text.split(",")]
    if not any(items):
        raise UsageError(f"{flag} {text!r} is empty: give at least one value")
    values = []
    for item in items:
        if not item:
            raise UsageError(f"{flag} {text!r} has an empty item")
        try:
            value = convert(item)
        except ValueError:
            raise UsageError(f"{flag} {text!r}: {item!r} is not a whole number") from None
        if minimum is not None and value < minimum:
            raise UsageError(f"{flag} {text!r}: {item} must be >= {minimum}")
        if value in values:
            log(f"note: {flag} lists {item} more than once; it runs once")
        else:
            values.append(value)
    return values


def at_least(args, minimums: dict) -> None:
    """Each `dest: minimum` of the parsed args must be >= its minimum."""
    for dest, minimum in minimums.items():
        value = getattr(args, dest)
        if value < minimum:
            raise UsageError(f"--{dest.replace('_', '-')} {value}: must be >= {minimum}")


def existing_file(flag: str, path) -> Path:
    if not Path(path).is_file():
        raise UsageError(f"{flag} {path}: no such file")
    return Path(path)


def open_image(path):
    """--image as RGB: a missing or unreadable file is a UsageError."""
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(existing_file("--image", path)).convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise UsageError(f"--image {path}: not an image that can be read ({err})") from None


def add_demo_arguments(parser, budgets: str, repeats: int = 5) -> None:
    """The flags every fork's demo shares."""
    parser.add_argument("--strategies", default="fastv,priortr,random", help="comma-separated strategy names")
    parser.add_argument("--budgets", default=budgets, help="comma-separated keep_tokens values")
    parser.add_argument("--prune-layer", type=int, default=2, help="K: layers from index K on run pruned")
    parser.add_argument(
        "--repeats",
        type=int,
        default=repeats,
        help=f"timed rounds after one warm-up round; each runs every setting once (default {repeats})",
    )
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--cache-dir", default=".cache", help="where the built-in model is kept")


def demo_settings(args, config_cls) -> list[tuple[str, str, object]]:
    """(name, budget label, config) of the demo's rows from the shared flags: the unpruned reference, keep-all
    (the machinery, nothing dropped: a speedup there is noise), then each strategy x budget."""
    at_least(args, {"repeats": 1, "max_new_tokens": 1, "prune_layer": 0})
    strategies = parse_list("--strategies", args.strategies, str.lower)
    budgets = parse_list("--budgets", args.budgets, int, minimum=1)
    if "none" in strategies:
        raise UsageError("--strategies: 'none' is the unpruned reference, which is always run; leave it out")
    k = args.prune_layer
    machinery = "fastv" if k > 0 else "random"  # K=0 admits only methods without attention
    settings = [("none (unpruned)", "-", config_cls(enabled=False))]
    settings.append(("keep-all", f"K={k} all", config_cls(strategy=machinery, keep_ratio=1.0, prune_layer=k)))
    for strategy in strategies:
        for budget in budgets:
            try:
                cfg = config_cls(strategy=strategy, keep_tokens=budget, prune_layer=k)
            except ValueError as err:  # an unknown strategy, or a prune layer the method does not allow
                raise UsageError(f"--strategies {strategy}: {err}") from None
            settings.append((strategy, f"K={k} keep={budget}", cfg))
    return settings


def check_model(path: str) -> str:
    """A --model that names a local folder must exist and hold a checkpoint (transformers would answer "Repo id
    must be in the form ..."); a hub id passes."""
    from .model_args import CheckpointNotFoundError, check_checkpoint

    try:
        check_checkpoint(path)
    except CheckpointNotFoundError as err:
        raise UsageError(f"--model: {err}") from None
    return path


@contextmanager
def loading(path, what: str = "model"):
    """Loading the model at `path`: a failure to read or fetch it (OSError) is one line naming it."""
    log(f"loading the {what} of {path} ...")
    try:
        yield
    except OSError as err:
        raise UsageError(f"cannot load the {what} of {path}: {str(err).strip().splitlines()[0]}") from None


def check_prune_layer(args, path: str) -> int:
    """--prune-layer against the decoder depth in the checkpoint's config (read before the weights are)."""
    from transformers import AutoConfig

    with loading(path, "config"):
        num_layers = AutoConfig.from_pretrained(path).get_text_config().num_hidden_layers
    if args.prune_layer >= num_layers:
        raise UsageError(
            f"--prune-layer {args.prune_layer}: the model has {num_layers} decoder layers; choose 0..{num_layers - 1}"
        )
    return num_layers


def load_demo_model(args, api, build, family: str, gpu_dtype: str = "float16", gpu_dtype_builtin=False, **processor_kw):
    """(model, processor, device, decoder layers) of a demo: the --model checkpoint (checked first, `gpu_dtype`
    on a GPU), else the built-in random model `build()` writes (once; `gpu_dtype` too if `gpu_dtype_builtin`),
    its --prune-layer checked against the config before the weights load, unpruned until the demo sets a
    config. `api`: the fork package (load_model, load_processor, VTRConfig)."""
    import torch

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = dict(dtype=getattr(torch, gpu_dtype) if device == "cuda" else torch.float32)
    if args.model:
        path, kwargs = check_model(args.model), dtype
    else:
        log(f"building the built-in model under {args.cache_dir} (once) ...")
        path, kwargs = str(build()), dtype if gpu_dtype_builtin else {}
    num_layers = check_prune_layer(args, path)
    with loading(path):
        processor = api.load_processor(path, **processor_kw)
        model = api.load_model(path, api.VTRConfig(enabled=False), **kwargs).to(device)
    if args.model:
        print(f"model: {path} on {device}")
    else:
        print(f"model: built-in random {family}-shaped model ({path}); its answers are noise, the timings are real")
    return model, processor, device, num_layers


def check_settings(model, settings) -> None:
    """Each (name, budget, config) setting as `model` takes it, before anything runs: a method's refusal on this
    model (a prune layer it does not allow, a fact the family lacks) is a UsageError naming the strategy."""
    for name, _, cfg in settings:
        try:
            model.set_vtr_config(cfg)
        except ValueError as err:
            raise UsageError(f"--strategies {name}: {err}") from None


def demo_report(model, processor, inputs, settings, args, num_visual: int, kept_header: str, kept_cell, kept="kept"):
    """Runs the demo's settings and returns its table and footnote as lines. For each setting in turn it
    generates the answer and reads what was kept (`kept_cell(model)`: the fork's own view), then it times the
    prefill of every setting, interleaved (`measure_prefill`)."""
    import torch

    check_settings(model, settings)
    seq_len = inputs["input_ids"].shape[1]
    rows = []
    for n, (name, budget, cfg) in enumerate(settings, 1):
        log(f"[{n}/{len(settings)}] generating with {name}" + ("" if budget == "-" else f", {budget}"))
        model.set_vtr_config(cfg)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        text = processor.decode(out[0, seq_len:], skip_special_tokens=True).strip().replace("\n", " ")[:40]
        if cfg.enabled:
            record = model.vtr_last
            rows.append([name, budget, record.stages[0].image_tokens_kept[0], record.kept_index.shape[1]])
            rows[-1] += [kept_cell(model), text]
        else:
            rows.append([name, budget, num_visual, seq_len, "", text])
    cells = speed_cells(measure_prefill(model, inputs, [cfg for *_, cfg in settings], args.repeats))
    for row, cell in zip(rows, cells):
        row[4:4] = cell
    header = ("strategy", "budget", kept, "seq after", "prefill ms", "speedup", kept_header, "answer")
    return [*table(header, rows, max_width=64), "", noise_note([s for _, s in cells[1:]], args.repeats)]


def table(header, rows, max_width: int = 48) -> list[str]:
    """Rows of cells as aligned text lines, each column at most max_width wide."""
    cells = [[str(c) for c in row] for row in [header, *rows]]
    widths = [min(max(len(row[i]) for row in cells), max_width) for i in range(len(header))]
    lines = [" | ".join(c[:w].ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return lines
