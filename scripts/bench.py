#!/usr/bin/env python3
"""Prefill benchmark of the LLaVA fork: unpruned vs each strategy x budget, measured interleaved in one run.

Builds a random LLaVA-shaped model (576 image tokens by default), then repeats rounds in which every
setting runs one prefill (use_cache=True, logits_to_keep=1) in turn, so drift of the machine hits all
settings alike. Reports medians, the measured speedup over unpruned, the analytic ideal speedup
(llava/vtr/cost.py) and their ratio; `keep_ratio=1.0` rows measure the cost of the machinery itself.
Writes a Markdown table to stdout and JSON to --out. CUDA events are used on a GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from llava.vtr import VTRConfig, load_model, load_processor
from llava.vtr.cost import equivalent_tokens, ideal_speedup, text_config_dims, tokens_per_layer
from llava.vtr.demo import build_prompt
from llava.vtr.tiny import build_tiny_llava, demo_image


def timed_prefill(model, inputs) -> float:
    if inputs["input_ids"].is_cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.inference_mode():
            model(**inputs, use_cache=True, logits_to_keep=1)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    with torch.inference_mode():
        model(**inputs, use_cache=True, logits_to_keep=1)
    return (time.perf_counter() - t0) * 1000


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="real llava-hf checkpoint instead of the random one")
    p.add_argument("--hidden-size", type=int, default=1024)
    p.add_argument("--intermediate-size", type=int, default=2816)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--strategies", default="fastv,priortr,random")
    p.add_argument("--budgets", default="192,128,64")
    p.add_argument("--prune-layer", type=int, default=2)
    p.add_argument("--attn", default="sdpa", help="attn_implementation")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (after one warm-up round)")
    p.add_argument("--out", default="bench-results/bench.json")
    p.add_argument("--cache-dir", default=".cache")
    args = p.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    if args.model:
        path = args.model
    else:
        shape = dict(
            image_size=336,
            patch_size=14,
            hidden_size=args.hidden_size,
            num_layers=args.layers,
            num_heads=args.heads,
            num_kv_heads=args.heads,
            intermediate_size=args.intermediate_size,
            vision_hidden_size=64,
        )
        name = "bench-llava-{hidden_size}x{num_layers}".format(**shape)
        path = str(build_tiny_llava(Path(args.cache_dir) / name, **shape))
    processor = load_processor(path)
    model = load_model(path, VTRConfig(enabled=False), dtype=dtype, attn_implementation=args.attn).to(device)
    inputs = processor(
        images=demo_image(336), text=build_prompt(processor, "What is shown in the image?"), return_tensors="pt"
    ).to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    seq_len = inputs["input_ids"].shape[1]
    num_image = int((inputs["input_ids"] == model.config.image_token_id).sum())
    text_cfg = model.config.text_config
    num_layers = text_cfg.num_hidden_layers
    d, m, d_kv = text_config_dims(text_cfg)

    settings = [("none", None, VTRConfig(enabled=False))]
    settings.append(
        ("keep-all", "ratio=1.0", VTRConfig(strategy="fastv", keep_ratio=1.0, prune_layer=args.prune_layer))
    )
    for s in args.strategies.split(","):
        for b in args.budgets.split(","):
            settings.append((s, int(b), VTRConfig(strategy=s, keep_tokens=int(b), prune_layer=args.prune_layer)))

    times = {i: [] for i in range(len(settings))}
    for round_ in range(args.rounds + 1):
        for i, (_, _, cfg) in enumerate(settings):
            model.set_vtr_config(cfg)
            ms = timed_prefill(model, inputs)
            if round_ > 0:
                times[i].append(ms)
        print(f"round {round_}/{args.rounds} done", flush=True)

    base = statistics.median(times[0])
    rows = []
    for i, (strategy, budget, cfg) in enumerate(settings):
        kept = num_image if not cfg.enabled or budget == "ratio=1.0" else min(int(budget), num_image)
        removed = num_image - kept
        lengths = tokens_per_layer(seq_len, num_layers, [(args.prune_layer, removed)] if removed else [])
        ideal = ideal_speedup(seq_len, lengths, d, m, d_kv)
        med = statistics.median(times[i])
        rows.append(
            dict(
                strategy=strategy,
                keep_tokens=budget,
                prune_layer=args.prune_layer if cfg.enabled else None,
                prefill_ms=med,
                measured_speedup=base / med,
                ideal_speedup=ideal,
                ratio_to_ideal=(base / med - 1) / (ideal - 1) if ideal > 1 else None,
                equivalent_tokens=equivalent_tokens(lengths),
                samples_ms=times[i],
            )
        )

    env = dict(
        device=torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        dtype=str(dtype),
        attn_implementation=args.attn,
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        seq_len=seq_len,
        image_tokens=num_image,
        layers=num_layers,
        hidden=d,
        intermediate=m,
        rounds=args.rounds,
    )
    print(f"\n{env}\n")
    print(
        "| strategy | keep | prefill ms (median) | measured speedup | ideal speedup | gain vs ideal gain | equiv. tokens |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = "-" if r["ratio_to_ideal"] is None else f"{r['ratio_to_ideal']:.2f}"
        print(
            f"| {r['strategy']} | {r['keep_tokens'] or '-'} | {r['prefill_ms']:.1f} | {r['measured_speedup']:.2f}x "
            f"| {r['ideal_speedup']:.2f}x | {ratio} | {r['equivalent_tokens']:.0f} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(env=env, rows=rows), indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
