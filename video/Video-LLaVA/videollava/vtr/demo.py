"""`python -m videollava.vtr.demo`: one video + question through the Video-LLaVA fork with a few strategies
and budgets; shows how many tokens of each frame were kept and the prefill time against the unpruned run: median
[min-max] over interleaved timed rounds, a speedup marked `~` when it is inside the noise (see timing.py),
and a keep-all row (the machinery, nothing dropped) to show what noise looks like. Progress goes to stderr.

With no --model it builds (once, cached under .cache/) a random Video-LLaVA-shaped model: 224 px frames of
14 px patches, 8 frames x 257 tokens (CLS kept per frame) = 2,056 visual tokens, so the token counts and
speedups are the real ones while the answers are noise. With no --video it writes a small generated mp4
and decodes it the way real videos are decoded (video_io: decord, PyAV fallback).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from . import api
from .config import VTRConfig
from .prompts import encode, video_prompt
from .timing import (
    Parser,
    UsageError,
    add_demo_arguments,
    at_least,
    demo_report,
    demo_settings,
    existing_file,
    load_demo_model,
    log,
    run_cli,
)
from .tiny import build_tiny_video_llava
from .video_io import VideoError, load_video, write_test_video

DEMO_SHAPE = dict(
    image_size=224,
    patch_size=14,
    hidden_size=512,
    num_layers=8,
    num_heads=8,
    num_kv_heads=8,
    intermediate_size=1376,
    vision_hidden_size=64,
)


def kept_per_frame(model, input_ids, frames: int) -> list[int]:
    """Video tokens of sample 0 kept after the last stage, per frame (each frame is a run of tokens)."""
    video = (input_ids[0] == model.config.video_token_id).nonzero().reshape(-1)
    per_frame = video.numel() // frames
    kept = torch.isin(video, model.vtr_last.stages[-1].kept_positions[0].to(video.device))
    return kept.reshape(frames, per_frame).sum(1).tolist()


def main(argv=None) -> int:
    return run_cli("python -m videollava.vtr.demo", run, argv)


def run(argv) -> int:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Video-LLaVA checkpoint (hub id or folder); default: a built-in random model")
    parser.add_argument("--video", help="video file (default: a generated clip)")
    parser.add_argument("--num-frames", type=int, default=8, help="frames sampled uniformly (default 8)")
    parser.add_argument("--prompt", default="What happens in the video? Answer briefly.")
    add_demo_arguments(parser, budgets="514,128")
    args = parser.parse_args(argv)
    settings = demo_settings(args, VTRConfig)
    at_least(args, {"num_frames": 1})

    video = existing_file("--video", args.video) if args.video else Path(args.cache_dir) / "demo-clip.mp4"
    if not args.video and not video.is_file():
        log(f"writing the built-in clip {video} ...")
        part = video.with_name(f"demo-clip.{os.getpid()}.mp4")  # renamed when whole: Ctrl-C leaves no torn clip
        write_test_video(part, num_frames=32, size=(224, 224), fps=8)
        part.replace(video)
    try:
        clip = load_video(video, num_frames=args.num_frames)
    except VideoError as err:
        raise UsageError(f"--video {video}: {err}") from None
    model, processor, device, num_layers = load_demo_model(
        args,
        api,
        lambda: build_tiny_video_llava(Path(args.cache_dir) / "demo-video-llava", **DEMO_SHAPE),
        "Video-LLaVA",
    )
    print(f"video: {video} ({clip.total_frames} frames at {clip.fps:g} fps; sampled {clip.indices})")
    inputs = encode(processor, [video_prompt(args.prompt)], videos=[clip.frames]).to(device)
    inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(model.dtype)
    seq_len = inputs["input_ids"].shape[1]
    num_video = int((inputs["input_ids"] == model.config.video_token_id).sum())
    print(f"prompt: {seq_len} tokens, {num_video} of them video tokens; {num_layers} decoder layers\n", flush=True)
    frames = clip.frames.shape[0]
    lines = demo_report(
        model,
        processor,
        inputs,
        settings,
        args,
        num_video,
        "kept per frame",
        lambda m: " ".join(map(str, kept_per_frame(m, inputs["input_ids"], frames))),
    )
    print("\n".join(lines))
    print(f"kept per frame: video tokens kept in frames 1..{frames} (of {num_video // len(clip.indices)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
