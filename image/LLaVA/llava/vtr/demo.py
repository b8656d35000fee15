"""`make demo`: run one image + prompt through the LLaVA fork with a few strategies and budgets, and show
what was kept and how long prefill took against the unpruned run.

With no --model it builds (once, cached under .cache/) a random LLaVA-1.5-shaped model: 576 image tokens,
so the token counts and the speedups are the real ones, while the generated text is noise.
With --model (a llava-hf hub id or local folder) it runs that checkpoint.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from .api import load_model, load_processor
from .config import VTRConfig
from .tiny import build_tiny_llava, demo_image

DEMO_SHAPE = dict(
    image_size=336,
    patch_size=14,
    hidden_size=512,
    num_layers=8,
    num_heads=8,
    num_kv_heads=8,
    intermediate_size=1376,
    vision_hidden_size=64,
)


def build_prompt(processor, question: str) -> str:
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"}, {"type": "text", "text": question}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return f"USER: <image>\n{question} ASSISTANT:"


def kept_patch_indices(model, input_ids) -> torch.Tensor:
    """Patch-grid indices (row-major) of the image tokens of sample 0 kept after the last prune stage."""
    first_image_token = int((input_ids[0] == model.config.image_token_id).nonzero()[0])
    return model.vtr_last.stages[-1].kept_positions[0] - first_image_token


def prefill_ms(model, inputs, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        start = time.perf_counter()
        with torch.inference_mode():
            model(**inputs, use_cache=True, logits_to_keep=1)
        if inputs["input_ids"].is_cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times[1:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="llava-hf checkpoint (hub id or folder); default: a built-in random model")
    parser.add_argument("--image", help="image file (default: a built-in synthetic scene)")
    parser.add_argument("--prompt", default="What is shown in the image? Answer briefly.")
    parser.add_argument("--strategies", default="fastv,priortr,random", help="comma-separated strategy names")
    parser.add_argument("--budgets", default="192,64", help="comma-separated keep_tokens values")
    parser.add_argument("--prune-layer", type=int, default=2, help="K: layers from index K on run pruned")
    parser.add_argument("--repeats", type=int, default=3, help="timed prefills per setting (median reported)")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--cache-dir", default=".cache", help="where the built-in model is kept")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.model:
        path = args.model
        kwargs = dict(dtype=torch.float16 if device == "cuda" else torch.float32)
        print(f"model: {path} on {device}")
    else:
        path = str(build_tiny_llava(Path(args.cache_dir) / "demo-llava", **DEMO_SHAPE))
        kwargs = {}
        print(f"model: built-in random LLaVA-1.5-shaped model ({path}); its answers are noise, the numbers are real")
    processor = load_processor(path)
    model = load_model(path, VTRConfig(enabled=False), **kwargs).to(device)
    num_layers = model.config.text_config.num_hidden_layers
    if args.image:
        from PIL import Image

        image = Image.open(args.image).convert("RGB")
    else:
        image = demo_image(336)
    inputs = processor(images=image, text=build_prompt(processor, args.prompt), return_tensors="pt").to(device)
    if "pixel_values" in inputs and device == "cuda":
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    seq_len = inputs["input_ids"].shape[1]
    num_image = int((inputs["input_ids"] == model.config.image_token_id).sum())
    print(
        f"prompt: {seq_len} tokens, {num_image} of them image tokens; {num_layers} decoder layers; "
        f"threads={torch.get_num_threads()}\n"
    )

    def answer():
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        return processor.decode(out[0, seq_len:], skip_special_tokens=True).strip().replace("\n", " ")

    baseline = prefill_ms(model, inputs, args.repeats)
    rows = [("none (unpruned)", "-", num_image, seq_len, baseline, 1.0, "", answer())]
    for strategy in [s.strip() for s in args.strategies.split(",") if s.strip()]:
        for budget in [int(b) for b in args.budgets.split(",") if b.strip()]:
            model.set_vtr_config(VTRConfig(strategy=strategy, keep_tokens=budget, prune_layer=args.prune_layer))
            ms = prefill_ms(model, inputs, args.repeats)
            text = answer()
            stage = model.vtr_last.stages[0]
            kept = kept_patch_indices(model, inputs["input_ids"])
            shown = ",".join(str(p) for p in kept[:8].tolist()) + (",..." if kept.numel() > 8 else "")
            rows.append(
                (
                    strategy,
                    f"K={args.prune_layer} keep={budget}",
                    stage.image_tokens_kept[0],
                    model.vtr_last.kept_index.shape[1],
                    ms,
                    baseline / ms,
                    shown,
                    text,
                )
            )

    header = (
        "strategy",
        "budget",
        "img kept",
        "seq after",
        "prefill ms",
        "speedup",
        "kept patches (first 8)",
        "answer",
    )
    widths = [max(len(str(r[i])) if not isinstance(r[i], float) else 8 for r in rows + [header]) for i in range(8)]
    widths[7] = min(widths[7], 40)

    def fmt(row):
        cells = [
            f"{c:.1f}" if isinstance(c, float) and i == 4 else f"{c:.2f}x" if isinstance(c, float) else str(c)
            for i, c in enumerate(row)
        ]
        return " | ".join(c[: widths[i]].ljust(widths[i]) for i, c in enumerate(cells))

    print(fmt(header))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(fmt(row))
    print("\nkept patches are indices into the image's patch grid (row-major); see docs/adding-a-method.md.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
