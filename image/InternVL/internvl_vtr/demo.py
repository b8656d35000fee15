"""`python -m internvl_vtr.demo`: one image (or video) + prompt through the InternVL fork with a few strategies
and budgets: what was kept per tile and how long prefill took against the unpruned run: median [min-max] over
interleaved timed rounds, a speedup marked `~` when it is inside the noise (see timing.py), and a keep-all
row (the machinery, nothing dropped) to show what noise looks like. Progress goes to stderr.

With no --model it builds (once, cached under .cache/) a random InternVL3-shaped model with real 448 px
tiles: the default 896 x 672 picture becomes 3 x 2 tiles + a thumbnail = 1,792 visual tokens, so the token
counts and speedups are the real ones, while the generated text is noise. With --model (an InternVL `-hf`
hub id or local folder) it runs that checkpoint. With --video, the processor's `frame_index` (which `<img>` blocks
are frames) goes to the model with the other inputs, so the video methods run too (`--strategies evs,vidcom2`).
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
    at_least,
    demo_report,
    demo_settings,
    existing_file,
    load_demo_model,
    open_image,
    run_cli,
)
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


def main(argv=None) -> int:
    return run_cli("python -m internvl_vtr.demo", run, argv)


def run(argv) -> int:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="InternVL -hf checkpoint (hub id or folder); default: a built-in random model")
    parser.add_argument("--image", help="image file (default: a built-in synthetic scene, 896 x 672)")
    parser.add_argument("--video", help="video file instead of an image (decoded with decord / PyAV)")
    parser.add_argument("--num-frames", type=int, default=8, help="frames sampled from --video (one tile each)")
    parser.add_argument("--max-patches", type=int, default=6, help="tiles per image (a thumbnail is added)")
    parser.add_argument("--prompt", default="What is shown? Answer briefly.")
    add_demo_arguments(parser, budgets="256,64")
    args = parser.parse_args(argv)
    settings = demo_settings(args, VTRConfig)
    at_least(args, {"num_frames": 1, "max_patches": 1})
    if args.video and args.image:
        raise UsageError("--image and --video: give one of them")
    if args.video:
        existing_file("--video", args.video)
    image = None if args.video else open_image(args.image) if args.image else demo_image(896, 672)

    model, processor, device, num_layers = load_demo_model(
        args,
        api,
        lambda: build_tiny_internvl(Path(args.cache_dir) / "demo-internvl", max_patches=6, **DEMO_SHAPE),
        "InternVL3",
        gpu_dtype_builtin=True,
        max_patches=args.max_patches,
        num_frames=args.num_frames,
    )
    if args.video:
        text = build_prompt(processor, args.prompt, video=True)
        try:
            inputs = processor(
                videos=[args.video], text=text, num_frames=args.num_frames, do_sample_frames=True, return_tensors="pt"
            )
        except (ValueError, OSError, RuntimeError) as err:
            raise UsageError(f"--video {args.video}: cannot read it ({err})") from None
    else:
        inputs = processor(images=image, text=build_prompt(processor, args.prompt), return_tensors="pt")
    inputs = inputs.to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    seq_len = inputs["input_ids"].shape[1]
    num_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    tiles = inputs["pixel_values"].shape[0]
    print(
        f"prompt: {seq_len} tokens, {num_visual} of them visual ({tiles} {'frames' if args.video else 'tiles'} x "
        f"{model.config.image_seq_length}); {num_layers} decoder layers; threads={torch.get_num_threads()}\n",
        flush=True,
    )
    lines = demo_report(
        model,
        processor,
        inputs,
        settings,
        args,
        num_visual,
        "kept per tile",
        lambda m: kept_per_tile(m, inputs["input_ids"]),
    )
    print("\n".join(lines))
    print("kept per tile: t0.. are the tiles in reading order, the last one the thumbnail (or the frames of a video).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
