"""`python -m visual_token_pruning.demo`: one image (and optionally a video) + a prompt through the Qwen-VL
fork (Qwen3-VL, Qwen2.5-VL, Qwen2-VL, Qwen3.5) with a few strategies and budgets; shows what was kept (grid cells per image / frame group) and the
prefill time against the unpruned run: median [min-max] over interleaved timed rounds, a speedup marked `~`
when it is inside the noise (see timing.py), and a keep-all row (the machinery, nothing dropped) to show
what noise looks like. Progress goes to stderr.

With no --model it builds (once, cached under .cache/) a random model of --family (default qwen3_vl, with
DeepStack; qwen2_5_vl has window attention in its vision tower; qwen3_5 a hybrid decoder, full attention in layers 3
and 7, so attention methods need --prune-layer 4 or more): a 448 x 448 image is 196 visual tokens
(16 px patches merged 2 x 2), so token counts and speedups are real while the generated text is noise.
With --model (a Qwen3-VL, Qwen2.5-VL, Qwen2-VL or Qwen3.5 hub id or local folder) it runs that checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from . import api
from .config import VTRConfig
from .timing import (
    Parser,
    UsageError,
    add_demo_arguments,
    demo_report,
    demo_settings,
    existing_file,
    load_demo_model,
    open_image,
    run_cli,
)
from .tiny import FAMILIES, VISION_SHAPE, build_tiny_qwen3_vl, demo_image, demo_video

DEMO_SHAPE = dict(VISION_SHAPE, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=1376)


def kept_cells(model, inputs) -> str:
    """Kept tokens of sample 0 per image / frame group, as (row, col) cells of its merged grid (the adapter's
    own `visual_grid` grouping)."""
    positions = model.vtr_last.stages[-1].kept_positions[0]
    prompt = {k: v[:1] if k in ("input_ids", "mm_token_type_ids") else v for k, v in inputs.items()}
    rope = model.vtr_adapter._positions(prompt, prompt["input_ids"], None, 1, prompt["input_ids"].shape[1])
    ids = torch.tensor([model.config.image_token_id, model.config.video_token_id], device=rope.device)
    visual = torch.isin(inputs["input_ids"][:1].to(rope.device), ids)
    group, row, col = (x[0, positions.to(rope.device)] for x in model.vtr_adapter._grid(visual, rope))
    groups = {}
    for g, r, c in zip(group.tolist(), row.tolist(), col.tolist()):
        groups.setdefault(g, []).append(f"{r},{c}")
    return " | ".join(
        f"g{i}: " + " ".join(cells[:4]) + (" ..." if len(cells) > 4 else "") for i, cells in enumerate(groups.values())
    )


def main(argv=None) -> int:
    return run_cli("python -m visual_token_pruning.demo", run, argv)


def run(argv) -> int:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        help="Qwen3-VL, Qwen2.5-VL, Qwen2-VL or Qwen3.5 checkpoint (hub id or folder); default: a built-in random model",
    )
    parser.add_argument(
        "--family",
        choices=sorted(FAMILIES),
        default="qwen3_vl",
        help="the built-in random model's family (default qwen3_vl); --model brings its own",
    )
    parser.add_argument("--image", help="image file (default: a built-in 448 x 448 synthetic scene)")
    parser.add_argument(
        "--video", help="a video file, or 'builtin' for a generated 8-frame clip; adds it to the prompt"
    )
    parser.add_argument("--prompt", default="What is shown? Answer briefly.")
    add_demo_arguments(parser, budgets="98,32")
    args = parser.parse_args(argv)
    settings = demo_settings(args, VTRConfig)
    if args.video and args.video != "builtin":
        existing_file("--video", args.video)
    image = open_image(args.image) if args.image else demo_image(448)

    model, processor, device, num_layers = load_demo_model(
        args,
        api,
        lambda: build_tiny_qwen3_vl(
            Path(args.cache_dir) / f"demo-{args.family.replace('_', '-')}", family=args.family, **DEMO_SHAPE
        ),
        {"qwen3_vl": "Qwen3-VL", "qwen2_5_vl": "Qwen2.5-VL", "qwen2_vl": "Qwen2-VL", "qwen3_5": "Qwen3.5"}[args.family],
        gpu_dtype="bfloat16",
    )
    content, visuals = [{"type": "image"}], dict(images=[image])
    if args.video:
        content.append({"type": "video"})
        if args.video == "builtin":
            visuals.update(videos=[demo_video(8, 224)], video_metadata=[dict(total_num_frames=8, fps=4.0)])
        else:
            visuals.update(videos=[args.video])
    content.append({"type": "text", "text": args.prompt})
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    try:
        inputs = processor(text=text, return_tensors="pt", **visuals).to(device)
    except (ValueError, OSError, RuntimeError) as err:
        if not args.video or args.video == "builtin":
            raise
        raise UsageError(f"--video {args.video}: cannot read it ({err})") from None
    for key in ("pixel_values", "pixel_values_videos"):
        if key in inputs:
            inputs[key] = inputs[key].to(model.dtype)
    seq_len = inputs["input_ids"].shape[1]
    ids = torch.tensor([model.config.image_token_id, model.config.video_token_id], device=device)
    num_visual = int(torch.isin(inputs["input_ids"], ids).sum())
    print(f"prompt: {seq_len} tokens, {num_visual} of them visual; {num_layers} layers\n", flush=True)
    lines = demo_report(
        model, processor, inputs, settings, args, num_visual, "kept cells (row,col)", lambda m: kept_cells(m, inputs)
    )
    print("\n".join(lines))
    print(
        "kept cells: (row, col) in each image / frame group's merged grid (g0, g1, ...); see docs/backbones/"
        + {"qwen3_5": "qwen3_5.md", "qwen3_5_moe": "qwen3_5.md"}.get(
            model.config.model_type, "qwen3-vl.md" if model.config.model_type.startswith("qwen3") else "qwen2-vl.md"
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
