"""`python -m videollava.vtr.demo`: one video + question through the Video-LLaVA fork with a few strategies
and budgets; shows how many tokens of each frame were kept and the prefill time against the unpruned run.

With no --model it builds (once, cached under .cache/) a random Video-LLaVA-shaped model: 224 px frames of
14 px patches, 8 frames x 257 tokens (CLS kept per frame) = 2,056 visual tokens, so the token counts and
speedups are the real ones while the answers are noise. With no --video it writes a small generated mp4
and decodes it the way real videos are decoded (video_io: decord, PyAV fallback).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from .api import load_model, load_processor
from .config import VTRConfig
from .prompts import encode, video_prompt
from .tiny import build_tiny_video_llava
from .video_io import load_video, write_test_video

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


def kept_per_frame(model, input_ids, frames: int) -> list[int]:
    """Video tokens of sample 0 kept after the last stage, per frame (each frame is a run of tokens)."""
    video = (input_ids[0] == model.config.video_token_id).nonzero().reshape(-1)
    per_frame = video.numel() // frames
    kept = torch.isin(video, model.vtr_last.stages[-1].kept_positions[0].to(video.device))
    return kept.reshape(frames, per_frame).sum(1).tolist()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Video-LLaVA checkpoint (hub id or folder); default: a built-in random model")
    parser.add_argument("--video", help="video file (default: a generated clip)")
    parser.add_argument("--num-frames", type=int, default=8, help="frames sampled uniformly (default 8)")
    parser.add_argument("--prompt", default="What happens in the video? Answer briefly.")
    parser.add_argument("--strategies", default="fastv,priortr,random", help="comma-separated strategy names")
    parser.add_argument("--budgets", default="514,128", help="comma-separated keep_tokens values")
    parser.add_argument("--prune-layer", type=int, default=2, help="K: layers from index K on run pruned")
    parser.add_argument("--repeats", type=int, default=2, help="timed prefills per setting (median reported)")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--cache-dir", default=".cache", help="where the built-in model and clip are kept")
    args = parser.parse_args(argv)
    for name in ("repeats", "num_frames", "prune_layer"):
        if getattr(args, name) < (0 if name == "prune_layer" else 1):
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} is too small")

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.model:
        path, kwargs = args.model, dict(dtype=torch.float16 if device == "cuda" else torch.float32)
        print(f"model: {path} on {device}")
    else:
        path, kwargs = str(build_tiny_video_llava(Path(args.cache_dir) / "demo-video-llava", **DEMO_SHAPE)), {}
        print(f"model: built-in random Video-LLaVA-shaped model ({path}); its answers are noise, the numbers are real")
    video = Path(args.video) if args.video else Path(args.cache_dir) / "demo-clip.mp4"
    if not args.video and not video.is_file():
        write_test_video(video, num_frames=32, size=(224, 224), fps=8)
    clip = load_video(video, num_frames=args.num_frames)
    print(f"video: {video} ({clip.total_frames} frames at {clip.fps:g} fps; sampled {clip.indices})")
    processor = load_processor(path)
    model = load_model(path, VTRConfig(enabled=False), **kwargs).to(device)
    inputs = encode(processor, [video_prompt(args.prompt)], videos=[clip.frames]).to(device)
    inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(model.dtype)
    seq_len = inputs["input_ids"].shape[1]
    num_video = int((inputs["input_ids"] == model.config.video_token_id).sum())
    layers = model.config.text_config.num_hidden_layers
    print(f"prompt: {seq_len} tokens, {num_video} of them video tokens; {layers} decoder layers\n")

    def answer():
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        return processor.decode(out[0, seq_len:], skip_special_tokens=True).strip().replace("\n", " ")

    baseline = prefill_ms(model, inputs, args.repeats)
    rows = [("none (unpruned)", "-", str(num_video), seq_len, f"{baseline:.1f}", "1.00x", "", answer()[:40])]
    for strategy in [s.strip() for s in args.strategies.split(",") if s.strip()]:
        for budget in [int(b) for b in args.budgets.split(",") if b.strip()]:
            model.set_vtr_config(VTRConfig(strategy=strategy, keep_tokens=budget, prune_layer=args.prune_layer))
            ms = prefill_ms(model, inputs, args.repeats)
            text = answer()[:40]
            frames = kept_per_frame(model, inputs["input_ids"], clip.frames.shape[0])
            rows.append(
                (
                    strategy,
                    f"K={args.prune_layer} keep={budget}",
                    str(model.vtr_last.stages[0].image_tokens_kept[0]),
                    model.vtr_last.kept_index.shape[1],
                    f"{ms:.1f}",
                    f"{baseline / ms:.2f}x",
                    " ".join(map(str, frames)),
                    text,
                )
            )
    header = ("strategy", "budget", "kept", "seq after", "prefill ms", "speedup", "kept per frame", "answer")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print(" | ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    print(
        f"\nkept per frame: video tokens kept in frames 1..{clip.frames.shape[0]} (of {num_video // len(clip.indices)})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
