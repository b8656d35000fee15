"""`python -m internvl_vtr.demo`: one image (or video) + prompt through the InternVL fork with a few strategies
and budgets: what was kept per tile and how long prefill took against the unpruned run.

With no --model it builds (once, cached under .cache/) a random InternVL3-shaped model with real 448 px
tiles: the default 896 x 672 picture becomes 3 x 2 tiles + a thumbnail = 1,792 visual tokens, so the token
counts and speedups are the real ones, while the generated text is noise. With --model (an InternVL `-hf`
hub id or local folder) it runs that checkpoint.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from .api import load_model, load_processor
from .config import VTRConfig
from .tiny import TILE_SHAPE, build_tiny_internvl, demo_image

DEMO_SHAPE = dict(TILE_SHAPE, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=1376)


def build_prompt(processor, question: str, video: bool = False) -> str:
    content = [{"type": "video" if video else "image"}, {"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def kept_per_tile(model, input_ids) -> str:
    """Kept visual tokens of sample 0 per tile (or frame), e.g. `t0:12 t1:3 ... t6:20` (the last tile of an
    image with several is its thumbnail)."""
    visual = (input_ids[0] == model.config.image_token_id).nonzero().reshape(-1)
    per_tile = model.config.image_seq_length
    rank = torch.searchsorted(visual, model.vtr_last.stages[-1].kept_positions[0].to(visual.device))
    counts = torch.bincount(rank // per_tile, minlength=visual.numel() // per_tile).tolist()
    return " ".join(f"t{i}:{n}" for i, n in enumerate(counts))


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
    parser.add_argument("--model", help="InternVL -hf checkpoint (hub id or folder); default: a built-in random model")
    parser.add_argument("--image", help="image file (default: a built-in synthetic scene, 896 x 672)")
    parser.add_argument("--video", help="video file instead of an image (decoded with decord / PyAV)")
    parser.add_argument("--num-frames", type=int, default=8, help="frames sampled from --video (one tile each)")
    parser.add_argument("--max-patches", type=int, default=6, help="tiles per image (a thumbnail is added)")
    parser.add_argument("--prompt", default="What is shown? Answer briefly.")
    parser.add_argument("--strategies", default="fastv,priortr,random", help="comma-separated strategy names")
    parser.add_argument("--budgets", default="256,64", help="comma-separated keep_tokens values")
    parser.add_argument("--prune-layer", type=int, default=2, help="K: layers from index K on run pruned")
    parser.add_argument("--repeats", type=int, default=3, help="timed prefills per setting (median reported; >= 1)")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--cache-dir", default=".cache", help="where the built-in model is kept")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: must be >= 1")

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs = dict(dtype=torch.float16 if device == "cuda" else torch.float32)
    if args.model:
        path = args.model
        print(f"model: {path} on {device}")
    else:
        path = str(build_tiny_internvl(Path(args.cache_dir) / "demo-internvl", max_patches=6, **DEMO_SHAPE))
        print(f"model: built-in random InternVL3-shaped model ({path}); its answers are noise, the numbers are real")
    processor = load_processor(path, max_patches=args.max_patches, num_frames=args.num_frames)
    model = load_model(path, VTRConfig(enabled=False), **kwargs).to(device)
    if args.video:
        text = build_prompt(processor, args.prompt, video=True)
        inputs = processor(
            videos=[args.video], text=text, num_frames=args.num_frames, do_sample_frames=True, return_tensors="pt"
        )
    else:
        from PIL import Image

        image = Image.open(args.image).convert("RGB") if args.image else demo_image(896, 672)
        inputs = processor(images=image, text=build_prompt(processor, args.prompt), return_tensors="pt")
    inputs = inputs.to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    seq_len = inputs["input_ids"].shape[1]
    num_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    tiles = inputs["pixel_values"].shape[0]
    print(
        f"prompt: {seq_len} tokens, {num_visual} of them visual ({tiles} {'frames' if args.video else 'tiles'} x "
        f"{model.config.image_seq_length}); {model.config.text_config.num_hidden_layers} decoder layers; "
        f"threads={torch.get_num_threads()}\n"
    )

    def answer():
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        return processor.decode(out[0, seq_len:], skip_special_tokens=True).strip().replace("\n", " ")

    baseline = prefill_ms(model, inputs, args.repeats)
    rows = [("none (unpruned)", "-", num_visual, seq_len, baseline, 1.0, "", answer())]
    for strategy in [s.strip() for s in args.strategies.split(",") if s.strip()]:
        for budget in [int(b) for b in args.budgets.split(",") if b.strip()]:
            model.set_vtr_config(VTRConfig(strategy=strategy, keep_tokens=budget, prune_layer=args.prune_layer))
            ms = prefill_ms(model, inputs, args.repeats)
            text = answer()
            stage = model.vtr_last.stages[0]
            rows.append(
                (
                    strategy,
                    f"K={args.prune_layer} keep={budget}",
                    stage.image_tokens_kept[0],
                    model.vtr_last.kept_index.shape[1],
                    ms,
                    baseline / ms,
                    kept_per_tile(model, inputs["input_ids"]),
                    text,
                )
            )

    header = ("strategy", "budget", "kept", "seq after", "prefill ms", "speedup", "kept per tile", "answer")
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
    print(
        "\nkept per tile: t0.. are the tiles in reading order, the last one the thumbnail (or the frames of a video)."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
