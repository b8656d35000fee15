"""`python -m visual_token_pruning.demo`: one image (and optionally a video) + a prompt through the Qwen3-VL
fork with a few strategies and budgets; shows what was kept (grid cells per image / frame group) and the
prefill time against the unpruned run.

With no --model it builds (once, cached under .cache/) a random Qwen3-VL-shaped model with DeepStack:
a 448 x 448 image is 196 visual tokens (16 px patches merged 2 x 2), so token counts and speedups are real
while the generated text is noise. With --model (a Qwen3-VL hub id or local folder) it runs that checkpoint.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from .api import load_model, load_processor
from .config import VTRConfig
from .tiny import VISION_SHAPE, build_tiny_qwen3_vl, demo_image, demo_video

DEMO_SHAPE = dict(VISION_SHAPE, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=1376)


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


def kept_cells(model, inputs) -> str:
    """Kept tokens of sample 0 per image / frame group, as (row, col) cells of its merged grid."""
    positions = model.vtr_last.stages[-1].kept_positions[0]
    rope, _ = model.model.get_rope_index(
        inputs["input_ids"][:1],
        inputs["mm_token_type_ids"][:1],
        image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"),
    )
    t, h, w = rope[:, 0, positions.cpu()]
    groups = {}
    for start, row, col in zip(t.tolist(), (h - t).tolist(), (w - t).tolist()):
        groups.setdefault(start, []).append(f"{row},{col}")
    return " | ".join(
        f"g{i}: " + " ".join(cells[:4]) + (" ..." if len(cells) > 4 else "") for i, cells in enumerate(groups.values())
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Qwen3-VL checkpoint (hub id or folder); default: a built-in random model")
    parser.add_argument("--image", help="image file (default: a built-in 448 x 448 synthetic scene)")
    parser.add_argument(
        "--video", help="a video file, or 'builtin' for a generated 8-frame clip; adds it to the prompt"
    )
    parser.add_argument("--prompt", default="What is shown? Answer briefly.")
    parser.add_argument("--strategies", default="fastv,priortr,random", help="comma-separated strategy names")
    parser.add_argument("--budgets", default="98,32", help="comma-separated keep_tokens values")
    parser.add_argument("--prune-layer", type=int, default=2, help="K: layers from index K on run pruned")
    parser.add_argument("--repeats", type=int, default=3, help="timed prefills per setting (median reported)")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--cache-dir", default=".cache", help="where the built-in model is kept")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.model:
        path, kwargs = args.model, dict(dtype=torch.bfloat16 if device == "cuda" else torch.float32)
        print(f"model: {path} on {device}")
    else:
        path, kwargs = str(build_tiny_qwen3_vl(Path(args.cache_dir) / "demo-qwen3-vl", **DEMO_SHAPE)), {}
        print(f"model: built-in random Qwen3-VL-shaped model ({path}); its answers are noise, the numbers are real")
    processor = load_processor(path)
    model = load_model(path, VTRConfig(enabled=False), **kwargs).to(device)
    if args.image:
        from PIL import Image

        image = Image.open(args.image).convert("RGB")
    else:
        image = demo_image(448)
    content, visuals = [{"type": "image"}], dict(images=[image])
    if args.video:
        content.append({"type": "video"})
        if args.video == "builtin":
            visuals.update(videos=[demo_video(8, 224)], video_metadata=[dict(total_num_frames=8, fps=4.0)])
        else:
            visuals.update(videos=[args.video])
    content.append({"type": "text", "text": args.prompt})
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(text=text, return_tensors="pt", **visuals).to(device)
    for key in ("pixel_values", "pixel_values_videos"):
        if key in inputs:
            inputs[key] = inputs[key].to(model.dtype)
    seq_len = inputs["input_ids"].shape[1]
    ids = torch.tensor([model.config.image_token_id, model.config.video_token_id], device=device)
    num_visual = int(torch.isin(inputs["input_ids"], ids).sum())
    print(
        f"prompt: {seq_len} tokens, {num_visual} of them visual; {model.config.text_config.num_hidden_layers} layers\n"
    )

    def answer():
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        return processor.decode(out[0, seq_len:], skip_special_tokens=True).strip().replace("\n", " ")

    baseline = prefill_ms(model, inputs, args.repeats)
    rows = [("none (unpruned)", "-", num_visual, seq_len, f"{baseline:.1f}", "1.00x", "", answer())]
    for strategy in [s.strip() for s in args.strategies.split(",") if s.strip()]:
        for budget in [int(b) for b in args.budgets.split(",") if b.strip()]:
            model.set_vtr_config(VTRConfig(strategy=strategy, keep_tokens=budget, prune_layer=args.prune_layer))
            ms = prefill_ms(model, inputs, args.repeats)
            reply = answer()
            kept = model.vtr_last.stages[0].image_tokens_kept[0]
            after = model.vtr_last.kept_index.shape[1]
            cells = kept_cells(model, inputs)
            rows.append(
                (
                    strategy,
                    f"K={args.prune_layer} keep={budget}",
                    kept,
                    after,
                    f"{ms:.1f}",
                    f"{baseline / ms:.2f}x",
                    cells,
                    reply,
                )
            )
    header = ("strategy", "budget", "kept", "seq after", "prefill ms", "speedup", "kept cells (row,col)", "answer")
    widths = [min(max(len(str(r[i])) for r in rows + [header]), 48) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print(" | ".join(str(c)[:w].ljust(w) for c, w in zip(row, widths)))
    print(
        "\nkept cells: (row, col) in each image / frame group's merged grid (g0, g1, ...); see docs/backbones/qwen3-vl.md"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
