#!/usr/bin/env python3
"""Time one stock Llama decoder layer at several sequence lengths and report achieved GFLOP/s.

Explains the gap between measured and ideal prefill speedup (docs/benchmarks.md): the analytic model
assumes every FLOP costs the same, but GEMMs with fewer rows run slower per FLOP.

    .venv/bin/python scripts/profile_layer.py --lengths 598,310,98
"""

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from llava.vtr.cost import layer_cost


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="598,310,98")
    p.add_argument("--hidden-size", type=int, default=1024)
    p.add_argument("--intermediate-size", type=int, default=2816)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    cfg = LlamaConfig(
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
    )
    cfg._attn_implementation = "sdpa"
    layer, rope = LlamaDecoderLayer(cfg, 0).eval(), LlamaRotaryEmbedding(cfg)
    print(f"threads={torch.get_num_threads()} hidden={args.hidden_size} ffn={args.intermediate_size}")
    print("| n | ms / layer | achieved GFLOP/s |\n| --- | --- | --- |")
    for n in [int(x) for x in args.lengths.split(",")]:
        x = torch.randn(1, n, args.hidden_size)
        emb = rope(x, torch.arange(n)[None])
        times = []
        with torch.inference_mode():
            for _ in range(args.repeats + 2):
                t0 = time.perf_counter()
                layer(x, attention_mask=None, position_embeddings=emb)
                times.append(time.perf_counter() - t0)
        t = statistics.median(times[2:])
        flops = 2 * layer_cost(n, args.hidden_size, args.intermediate_size)
        print(f"| {n} | {t * 1000:.1f} | {flops / t / 1e9:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
