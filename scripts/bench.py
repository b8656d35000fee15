#!/usr/bin/env python3
"""Efficiency benchmark of any fork: unpruned vs each strategy x budget, measured interleaved in one run.

`--backbone` picks the model family, a [family.*] of forks.toml (llava, llava-next, internvl, qwen3vl,
videollava, ...), and so the fork that serves it. Builds a random model of that backbone with a realistic
visual token count (the fork's `tiny.bench_case` with the family's `bench` arguments: LLaVA-1.5 576 image tokens
+ ~35 text tokens) unless --model is given, then repeats rounds in which every setting (and the vision tower alone) runs in turn, each round starting one
setting later, so drift of the machine hits all settings alike; one warm-up round first, not timed. Every time
is the median over the timed rounds with its range [min-max]; a speedup is the median of the per-round
ratios with their range, marked `~` when it is inside the noise (a single round, a range that holds 1.00x,
or a middle half of the rounds wider than the distance from 1.00x; see the forks' timing.py). Per setting:

  ttft_ms        forward of the whole prompt (vision tower + projector + decoder, logits of the last row
                 only) and the argmax: time to first token
  llm_ms         ttft_ms minus the vision tower + projector time (measured in the same rounds): the part
                 pruning can shrink and the part the analytic cost model covers
  decode_ms      ms per token of --decode-steps greedy decode steps on the resulting (pruned) KV cache
  scoring_ms     wall time of score + select as the engine records it (StageRecord.scoring_ms: attention
                 recomputation, compute_scores, Top-K, gather; on a GPU it includes waiting for the layers
                 before it to finish, since the kept counts are read back)
  peak_mib       peak memory during the prefill above the memory held before it (CUDA: allocator peak;
                 CPU: resident set sampled every 0.5 ms by a thread)
  kv_mib         bytes of the KV cache after the prefill (a hybrid decoder's linear-attention layers: their
                 convolution and recurrent states, which do not shrink with pruning)
  ideal          analytic ideal speedup of the decoder (the fork's cost.py, each layer by its kind) for the
                 schedule that ran: each layer's length as the engine recorded it (every stage's length after
                 it, a method's merged tokens included); `vs ideal` = measured llm speedup / ideal speedup

Schedules and budgets: without --prune-layer each method runs its own schedule (what the model fills in for a
prune layer left unset: the video methods and the pre-LLM methods at K=0, HoliTom at [0, K] with its inner
merge, FrameFusion a stage per layer, PDrop its three stages) and a method without one at K=2 (the last layer
if the decoder is shallower; on a hybrid decoder the first layer from there whose scoring layer has attention, as
the model moves a default schedule), as does `keep-all` (FastV's machinery; random's where no such layer exists);
--prune-layer K runs every method at K. --budgets counts visual tokens kept, --keep-ratios gives their share
instead (how the video methods are compared; a video method's budget is a share of the video tokens either way).
`keep-all` (keep_ratio=1.0) runs the whole machinery and drops nothing: its cost is the overhead.
Writes a Markdown table to stdout, progress to stderr, and everything (all samples, each figure's median and
range) to a new JSON file (--out; an existing file is never replaced). On a GPU, CUDA events.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import platform
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from llava.vtr import outputs, timing

sys.path.insert(0, str(Path(__file__).resolve().parent))
import forks  # noqa: E402  (scripts/forks.py: --backbone is a model family of forks.toml)

DTYPES = ("float32", "float16", "bfloat16")
BENCH_LAYER = 2  # K of keep-all and of methods without a schedule of their own when --prune-layer is not given


def families() -> dict:
    """--backbone -> its forks.Family (the fork's package, the keyword arguments of its `tiny.bench_case`)."""
    try:
        return forks.load().families
    except forks.RegistryError as error:
        raise timing.UsageError(str(error)) from None


class Clock:
    """Wall-clock ms on CPU, CUDA events on a GPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    @contextmanager
    def measure(self, out: list):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            torch.cuda.synchronize()
            out.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            yield
            out.append((time.perf_counter() - t0) * 1000)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_memory(out: list, cuda: bool):
    """Appends the peak bytes above the starting level reached inside the block."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield
        torch.cuda.synchronize()
        out.append(torch.cuda.max_memory_allocated() - base)
        return
    base, peak, stop = _rss_bytes(), [0], threading.Event()

    def poll():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0005)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        out.append(max(peak[0], _rss_bytes()) - base)


def kv_bytes(cache) -> int:
    """Bytes the cache holds: keys and values, and a linear-attention layer's convolution and recurrent states."""
    tensors = []
    for layer in cache.layers:
        if hasattr(layer, "recurrent_states"):
            tensors += [
                t for store in (layer.conv_states, layer.recurrent_states) for t in store.values() if t is not None
            ]
        else:
            tensors += [layer.keys, layer.values]
    return sum(t.numel() * t.element_size() for t in tensors)


def run_setting(model, inputs, clock, decode_steps, cuda, samples):
    with torch.inference_mode():
        with peak_memory(samples["peak_bytes"], cuda):
            with clock.measure(samples["ttft_ms"]):
                out = model(**inputs, use_cache=True, logits_to_keep=1)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
        # the engine records the wall time of scoring + selection per stage (older versions did not)
        stages = model.vtr_last.stages if model.vtr_last is not None else []
        samples["scoring_ms"].append(sum(getattr(stage, "scoring_ms", float("nan")) for stage in stages))
        samples["stages"].append([[s.layer, s.seq_len_before, s.seq_len_after, sum(s.merged)] for s in stages])
        cache = out.past_key_values
        samples["kv_bytes"].append(kv_bytes(cache))
        with clock.measure(samples["decode_total_ms"]):
            for _ in range(decode_steps):
                token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, True)


def write_new(path: Path, text: str) -> Path:
    """Writes `text` to a new file, all or nothing, never replacing a file (the shared `outputs.write_new`): if
    `path` appeared meanwhile (another run), the result goes to `<stem>-<pid><suffix>` beside it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for target in (path, path.with_name(f"{path.stem}-{os.getpid()}{path.suffix}")):
            try:
                return outputs.write_new(target, text)
            except outputs.OutputExists:
                continue
    except OSError as error:
        raise timing.UsageError(f"--out {path}: cannot create its folder: {error}") from None
    except outputs.OutputError as error:
        raise timing.UsageError(f"--out {path}: {error}") from None
    raise timing.UsageError(f"--out {path}: exists, and so does {target}")


def ratio(text: str) -> float:
    """A --keep-ratios item: a share of the visual tokens in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise timing.UsageError(f"--keep-ratios: {text!r} is not a number") from None
    if not 0 < value <= 1:
        raise timing.UsageError(f"--keep-ratios: {text} must be in (0, 1] (a share of the visual tokens kept)")
    return value


def layers_text(layers: list[int]) -> str:
    """Prune layers for the table: `2`, `0,5`, a run of three or more as `0-7`."""
    if len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


def own_schedules(model, settings, k: int, get_strategy) -> list:
    """The settings as they run on `model`: a config that left prune_layer unset gets the method's own schedule
    (what `set_vtr_config` fills in: its `schedule_defaults`) or, for a method without one, K=`k`. A refusal names
    the strategy."""
    resolved = []
    for setting in settings:
        timing.check_settings(model, [setting])
        name, budget, cfg = setting
        layers = model.vtr_adapter.num_layers
        if cfg.enabled and cfg.prune_layer_defaulted and not get_strategy(cfg.strategy).schedule_defaults(cfg, layers):
            setting = (name, budget, dataclasses.replace(cfg, prune_layer=k))
            timing.check_settings(model, [setting])
        resolved.append(setting)
    return resolved


def keep_all_layer(model, given: int | None, package: str) -> tuple[int, str]:
    """(K, method) of `keep-all` and of the methods without a schedule of their own: --prune-layer, else K=2 (the
    last layer of a shallower decoder) moved up as the model moves a default schedule on a hybrid decoder (the first
    K whose scoring layer has attention); FastV's machinery, random's (no attention read) at K=0 or where FastV fits
    nowhere."""
    adapter = model.vtr_adapter
    k = min(BENCH_LAYER, adapter.num_layers - 1) if given is None else given
    if k == 0:  # K=0 admits only methods without attention
        return k, "random"
    if given is not None:
        return k, "fastv"
    config = importlib.import_module(package).VTRConfig(strategy="fastv", keep_ratio=1.0, prune_layer=k)
    moved = importlib.import_module(f"{package}.engine").snap_schedule(config, adapter.layer_types, adapter.mrope)
    return (moved[0], "fastv") if moved else (k, "random")


def main(argv=None) -> int:
    return timing.run_cli("scripts/bench.py", run, argv)


def run(argv) -> int:
    backbones = families()
    anyres = [name for name, family in backbones.items() if family.bench.get("anyres")]
    p = timing.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--backbone", choices=sorted(backbones), default="llava", help="model family of forks.toml (default llava)"
    )
    p.add_argument("--model", help="a real checkpoint of that backbone instead of the random one")
    p.add_argument(
        "--anyres",
        action="store_true",
        help=f"same as --backbone {' or '.join(anyres)}: LLaVA-1.6, a 672x672 image gives the 336 px base view + 2x2 tiles "
        "+ a newline per feature row = 2,928 visual tokens",
    )
    p.add_argument(
        "--frames",
        type=int,
        help="frames of the video case, for a backbone whose bench case is a video (llava-onevision: default 16, "
        "each 14 x 14 tokens after pooling; e.g. 8 or 32 for the video methods' rows)",
    )
    p.add_argument("--hidden-size", type=int, default=1024)
    p.add_argument("--intermediate-size", type=int, default=2816)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=16)
    p.add_argument("--strategies", default="fastv,priortr,random")
    p.add_argument("--budgets", help="visual tokens kept, comma-separated (default 192,128,64)")
    p.add_argument(
        "--keep-ratios", help="instead of --budgets: shares of the visual tokens kept, comma-separated (e.g. 0.25,0.15)"
    )
    p.add_argument(
        "--prune-layer",
        type=int,
        help=f"K for every method (default: each method's own schedule, K={BENCH_LAYER} for a method without one)",
    )
    p.add_argument("--batch-size", type=int, default=1, help="prompts per forward (the same image and prompt)")
    p.add_argument("--attn", default="sdpa", help="attn_implementation (eager, sdpa, flash_attention_2)")
    p.add_argument("--dtype", choices=DTYPES, help="float32 (CPU default) or float16 (GPU default), bfloat16")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds after one warm-up round (default 7)")
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument(
        "--out",
        type=Path,
        help="JSON of every sample (default bench-results/bench-<backbone>-<time>.json; never replaced)",
    )
    p.add_argument("--cache-dir", default=".cache")
    args = p.parse_args(argv)
    sizes = ("hidden_size", "intermediate_size", "layers", "heads", "kv_heads", "batch_size", "rounds")
    timing.at_least(args, {**dict.fromkeys(sizes, 1), "decode_steps": 0})
    optional = {"prune_layer": 0, "frames": 1}
    timing.at_least(args, {k: least for k, least in optional.items() if getattr(args, k) is not None})
    serving = backbones[args.backbone].fork
    backbone = next((n for n in anyres if backbones[n].fork == serving), None) if args.anyres else args.backbone
    if backbone is None:  # --anyres: the family of the same fork whose bench case is anyres
        raise timing.UsageError(
            f"--anyres is LLaVA-1.6 (--backbone {' or '.join(anyres)}), not --backbone {args.backbone}"
        )
    if not args.model and (args.hidden_size % args.heads or args.heads % args.kv_heads):
        raise timing.UsageError(
            f"--hidden-size {args.hidden_size}, --heads {args.heads}, --kv-heads {args.kv_heads}: the hidden size "
            "must be a multiple of the heads, and the heads of the kv heads"
        )
    out = args.out or Path("bench-results") / f"bench-{backbone}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    if out.exists():
        raise timing.UsageError(f"--out {out}: exists; a finished result is never replaced, give another --out")
    package, case_kwargs = backbones[backbone].package, dict(backbones[backbone].bench)
    if args.frames is not None:
        videos = [name for name, family in backbones.items() if family.bench.get("onevision")]
        if backbone not in videos:
            raise timing.UsageError(
                f"--frames: the {backbone} bench case is not a video with a frame count to choose "
                f"(--backbone {' or '.join(videos)})"
            )
        case_kwargs["frames"] = args.frames
    fork = importlib.import_module(package)
    VTRConfig = fork.VTRConfig
    cost = importlib.import_module(f"{package}.cost")
    strategies = timing.parse_list("--strategies", args.strategies, str.lower)
    if args.budgets is not None and args.keep_ratios is not None:
        raise timing.UsageError("--budgets and --keep-ratios: give one of them (visual tokens kept, or their share)")
    if args.keep_ratios is not None:
        field, budgets = "keep_ratio", timing.parse_list("--keep-ratios", args.keep_ratios, ratio)
    else:
        field, budgets = "keep_tokens", timing.parse_list("--budgets", args.budgets or "192,128,64", int, minimum=1)
    layer = {} if args.prune_layer is None else {"prune_layer": args.prune_layer}  # unset: the method's schedule
    settings = [("none", "-", VTRConfig(enabled=False))]
    for s in strategies:
        for b in budgets:
            try:
                settings.append((s, b, VTRConfig(strategy=s, **{field: b}, **layer)))
            except ValueError as err:  # an unknown strategy, or a prune layer the method does not allow
                raise timing.UsageError(f"--strategies {s}: {err}") from None
    if args.model:
        timing.check_model(args.model)
    elif args.prune_layer is not None and args.prune_layer >= args.layers:
        raise timing.UsageError(
            f"--prune-layer {args.prune_layer}: --layers is {args.layers}; choose 0..{args.layers - 1}"
        )
    try:  # its folder before the benchmark, not after it
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise timing.UsageError(f"--out {out}: cannot create its folder: {error}") from None

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if cuda else torch.float32)
    shape = dict(
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        intermediate_size=args.intermediate_size,
    )
    if not args.model:
        timing.log(f"building the random {backbone} model under {args.cache_dir} (once per shape) ...")
    case = importlib.import_module(f"{package}.tiny").bench_case(shape, args.cache_dir, model=args.model, **case_kwargs)
    path = case["path"]
    if args.model and args.prune_layer is not None:
        timing.check_prune_layer(args, path)
    with timing.loading(path):
        processor = fork.load_processor(path)
        model = fork.load_model(path, VTRConfig(enabled=False), dtype=dtype, attn_implementation=args.attn).to(device)
    batch = args.batch_size
    inputs = case["inputs"](processor, batch).to(device)
    for key in ("pixel_values", "pixel_values_images", "pixel_values_videos"):
        if key in inputs:
            inputs[key] = inputs[key].to(dtype)
    seq_len = inputs["input_ids"].shape[1]
    text_cfg = model.config.get_text_config()
    num_layers = text_cfg.num_hidden_layers
    default_k, machinery = keep_all_layer(model, args.prune_layer, package)
    settings.insert(1, ("keep-all", "all", VTRConfig(strategy=machinery, keep_ratio=1.0, prune_layer=default_k)))
    settings = own_schedules(model, settings, default_k, fork.get_strategy)
    model.set_vtr_config(VTRConfig(strategy="random", keep_ratio=1.0, prune_layer=default_k))
    with torch.inference_mode():
        model(**inputs, logits_to_keep=1)
    num_image = model.vtr_last.stages[0].image_tokens_before[0]  # the adapter's own count of visual tokens
    d, m, d_kv = cost.text_config_dims(text_cfg)
    layer_costs = cost.layer_costs(text_cfg)
    clock = Clock(cuda)

    # every setting and the vision tower alone (index len(settings)) once per round, interleaved
    keys = ("ttft_ms", "decode_total_ms", "scoring_ms", "peak_bytes", "kv_bytes", "stages")
    samples = [{k: [] for k in keys} for _ in settings]
    vision_ms: list[float] = []
    for round_, i in timing.rounds(args.rounds, len(settings) + 1):
        if i == len(settings):
            with torch.inference_mode(), clock.measure(vision_ms if round_ else []):
                case["vision"](model, inputs)
            continue
        model.set_vtr_config(settings[i][2])
        try:
            run_setting(model, inputs, clock, args.decode_steps, cuda, samples[i] if round_ else {k: [] for k in keys})
        except ValueError as err:  # a method's refusal that shows only on the inputs (the warm-up round meets it)
            raise timing.UsageError(f"--strategies {settings[i][0]}: {err}") from None

    vision = timing.Timings(tuple(vision_ms))
    for s in samples:
        s["llm_ms"] = [t - v for t, v in zip(s["ttft_ms"], vision_ms)]
    base = samples[0]
    rows = []
    for i, ((strategy, budget, _), s) in enumerate(zip(settings, samples)):
        # what ran, as the first timed round recorded it (every round runs the same): each stage's layer and the
        # length after it, its merged tokens included
        stages = s["stages"][0]
        lengths = cost.tokens_per_layer(seq_len, num_layers, [(k, before - after) for k, before, after, _ in stages])
        spread = {k: timing.Timings(tuple(s[k])) for k in ("ttft_ms", "llm_ms", "scoring_ms")}
        spread["decode_ms_per_token"] = timing.Timings(
            tuple(t / max(args.decode_steps, 1) for t in s["decode_total_ms"])
        )
        spread["ttft_speedup"] = timing.Speedup.of(base["ttft_ms"], s["ttft_ms"])
        spread["llm_speedup"] = timing.Speedup.of(base["llm_ms"], s["llm_ms"])
        ideal = cost.ideal_speedup_of(layer_costs, seq_len, lengths)
        row = dict(strategy=strategy, **{field: budget}, prune_layers=[stage[0] for stage in stages])
        row.update({k: v.median for k, v in spread.items()})
        row.update({f"{k}_range": [v.low, v.high] for k, v in spread.items()})
        row.update(
            within_noise=None if i == 0 else spread["llm_speedup"].within_noise,  # of the LLM speedup
            peak_mib=statistics.median(s["peak_bytes"]) / 2**20,
            kv_mib=statistics.median(s["kv_bytes"]) / 2**20,
            ideal_speedup=ideal,
            vs_ideal=spread["llm_speedup"].median / ideal,
            equivalent_tokens=cost.equivalent_tokens(lengths),
            samples=s,
            cells=spread,
        )
        rows.append(row)

    env = dict(
        device=torch.cuda.get_device_name() if cuda else (platform.processor() or platform.machine()),
        dtype=str(dtype).removeprefix("torch."),
        attn_implementation=args.attn,
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        backbone=backbone,
        input=case["description"],
        model=path,
        seq_len=seq_len,
        image_tokens=num_image,
        layers=num_layers,
        hidden=d,
        intermediate=m,
        kv_dim=d_kv,
        prune_layer=f"own schedules (K={default_k} without one)" if args.prune_layer is None else args.prune_layer,
        **({} if args.frames is None else {"frames": args.frames}),  # the video case's own count otherwise
        rounds=args.rounds,
        decode_steps=args.decode_steps,
        batch_size=batch,
        vision_ms=vision.median,
    )
    print("\n" + ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in env.items()))
    print(f"vision tower + projector ms: {vision.format()} (subtracted per round for the LLM columns)\n")
    print(
        f"| strategy | {field.replace('_', ' ')} | K | TTFT ms | TTFT speedup | LLM prefill ms | LLM speedup | ideal "
        "| vs ideal | decode ms/tok | scoring ms | peak MiB | KV MiB | equiv. tokens |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(rows):
        c = r.pop("cells")
        speedups = ("reference", "reference") if i == 0 else (c["ttft_speedup"].format(), c["llm_speedup"].format())
        print(
            f"| {r['strategy']} | {r[field]} | {layers_text(r['prune_layers']) or '-'} | {c['ttft_ms'].format()} "
            f"| {speedups[0]} "
            f"| {c['llm_ms'].format()} | {speedups[1]} | {r['ideal_speedup']:.2f}x | {r['vs_ideal']:.2f} "
            f"| {c['decode_ms_per_token'].format(2)} | {c['scoring_ms'].format(2)} | {r['peak_mib']:.1f} "
            f"| {r['kv_mib']:.1f} | {r['equivalent_tokens']:.0f} |"
        )
    llm = [timing.Speedup.of(base["llm_ms"], s["llm_ms"]).format() for s in samples[1:]]
    print(
        "\n"
        + timing.noise_note(llm, args.rounds, "--rounds", "LLM speedups")
        + "\nK: the decoder layers where a stage ran (0: before the first). ideal, equiv. tokens: the lengths each"
        " layer ran on, as recorded (a method's merged tokens count as tokens). vs ideal: the median LLM speedup /"
        " ideal."
    )
    if args.decode_steps and any(name == "dycoke" and cfg.dycoke_decode_prune > 0 for name, _, cfg in settings):
        print(
            "dycoke: its decode-time pruning hides visual cache rows from the layers >= dycoke_layer through the "
            "attention mask; every row is still computed, so it saves no decode time (decode ms/tok and KV MiB are "
            "those of its reduced prefill)."
        )
    written = write_new(out, json.dumps(dict(env=env, rows=rows), indent=2))
    print(f"\nwrote {written}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
