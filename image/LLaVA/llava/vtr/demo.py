"""`make demo`: run one image (and, on LLaVA-OneVision, one video) + a prompt through the LLaVA fork with a few
strategies and budgets, and show what was kept and how long prefill took against the unpruned run: median
[min-max] over interleaved timed rounds, a speedup marked `~` when it is inside the noise (see timing.py). A
keep-all row (the machinery, nothing dropped) shows what noise looks like. Progress goes to stderr, results to
stdout.

With no --model it builds (once, cached under .cache/) a random model of --family, so the token counts and
the speedups are the real ones, while the generated text is noise:
  llava      LLaVA-1.5-shaped: 576 image tokens (336 px, 14 px patches)
  onevision  LLaVA-OneVision-shaped (384 px SigLIP views, 14 px patches, anyres_max_9): two prompts, one after
             the other, each with its own table: the image (a 384 px image is its base view, 729 tokens, and
             one tile of 27 rows of 27 + a newline, 1,485 tokens) and a video (--frames frames of 14 x 14
             pooled tokens each + one newline: 1,569 tokens for 8)
With --model (a llava-hf hub id or local folder) it runs that checkpoint; a LLaVA-OneVision one (LLaVA-Video
too) gets the image and the video prompt, whatever --family says. --budgets defaults to 192,64 (LLaVA-1.5 and
1.6) or 384,128 (LLaVA-OneVision).
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch

from . import api
from .config import VTRConfig
from .convert import is_original_llava, is_original_onevision
from .model_args import checkpoint_model_type
from .timing import (
    Parser,
    UsageError,
    add_demo_arguments,
    check_model,
    demo_report,
    demo_settings,
    existing_file,
    load_demo_model,
    loading,
    open_image,
    run_cli,
)
from .tiny import build_tiny_llava, build_tiny_llava_onevision, demo_image, demo_video

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
#: The built-in OneVision: the real model's views, patches and tile layouts (1..6 x 1..6 views of 384 px,
#: anyres_max_9), a small SigLIP and a Qwen2 decoder with grouped KV heads.
ONEVISION_DEMO_SHAPE = dict(
    DEMO_SHAPE,
    image_size=384,
    num_kv_heads=4,
    grid_pinpoints=[[384 * rows, 384 * cols] for rows in range(1, 7) for cols in range(1, 7)],
    vision_aspect_ratio="anyres_max_9",
)
#: --family: the built-in model (its name in the output, its builder, its shape).
FAMILIES = {
    "llava": ("LLaVA-1.5", build_tiny_llava, DEMO_SHAPE),
    "onevision": ("LLaVA-OneVision", build_tiny_llava_onevision, ONEVISION_DEMO_SHAPE),
}
#: --budgets when none is given: LLaVA-1.5 / 1.6 (576 tokens an image), LLaVA-OneVision (about 1,500 a prompt).
BUDGETS = {"llava": "192,64", "onevision": "384,128"}


def build_prompt(processor, question: str, visual: str = "image") -> str:
    if getattr(processor, "chat_template", None):
        content = [{"type": visual}, {"type": "text", "text": question}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return f"USER: <image>\n{question} ASSISTANT:"


def kept_patch_indices(model, input_ids) -> torch.Tensor:
    """Patch-grid indices (row-major) of the image tokens of sample 0 kept after the last prune stage."""
    first_image_token = int((input_ids[0] == model.config.image_token_id).nonzero()[0])
    return model.vtr_last.stages[-1].kept_positions[0] - first_image_token


def kept_per_part(model, inputs) -> str:
    """LLaVA-OneVision, sample 0: the visual tokens kept in each part of the prompt's one image (its base view,
    its tiles with their row newlines) or one video (each frame, with the newlines its layout puts in it, then
    the newline closing the video where the layout has one: the stock one; LLaVA-Video's "grid" closes every
    pooled row instead)."""
    config = model.config
    ids = inputs["input_ids"][0]
    visual = torch.isin(ids, torch.tensor([config.image_token_id, config.video_token_id], device=ids.device))
    positions = visual.nonzero()[:, 0]
    kept = model.vtr_last.stages[-1].kept_positions[0].to(positions.device)
    order = torch.searchsorted(positions, kept)  # index of each kept token among the visual ones
    if "pixel_values_videos" in inputs:
        frames = inputs["pixel_values_videos"].shape[1]
        per_frame = positions.numel() // frames  # the tokens after the last frame close the video
        counts = torch.bincount(torch.clamp(order // per_frame, max=frames), minlength=frames + 1).tolist()
        closing = positions.numel() - frames * per_frame
        return " ".join(str(n) for n in counts[:frames]) + (f" + newline {counts[frames]}" if closing else "")
    rows, cols = model.vtr_adapter.patch_grid()
    base = int((order < rows * cols).sum())
    return f"base {base}, tiles {order.numel() - base}"


def report(model, processor, inputs, settings, args, num_visual: int, onevision: str | None) -> list[str]:
    """The table of one prompt: LLaVA-1.5 / 1.6 show the first kept patches, LLaVA-OneVision (`onevision`: the
    prompt's "image" or "video") the kept tokens per part."""
    input_ids = inputs["input_ids"]
    if onevision:
        header = "kept per frame (+ video newline)" if onevision == "video" else "kept in base view, tiles"
        shown = functools.partial(kept_per_part, inputs=inputs)
        return demo_report(model, processor, inputs, settings, args, num_visual, header, shown, f"{onevision} kept")

    def shown(model) -> str:
        kept = kept_patch_indices(model, input_ids)
        return ",".join(str(p) for p in kept[:8].tolist()) + (",..." if kept.numel() > 8 else "")

    return demo_report(
        model, processor, inputs, settings, args, num_visual, "kept patches (first 8)", shown, "img kept"
    )


def main(argv=None) -> int:
    return run_cli("python -m llava.vtr.demo", run, argv)


def run(argv) -> int:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="llava-hf checkpoint (hub id or folder); default: a built-in random model")
    parser.add_argument(
        "--family",
        choices=sorted(FAMILIES),
        default="llava",
        help="the built-in random model's family (default llava: LLaVA-1.5); --model brings its own",
    )
    parser.add_argument("--image", help="image file (default: a built-in synthetic scene)")
    parser.add_argument("--prompt", default="What is shown in the image? Answer briefly.")
    parser.add_argument(
        "--video", help="LLaVA-OneVision: a video file for the video prompt (default: a built-in generated clip)"
    )
    parser.add_argument(
        "--frames", type=int, default=8, help="LLaVA-OneVision: frames of the video, sampled uniformly (default 8)"
    )
    parser.add_argument("--video-prompt", default="What happens in the video? Answer briefly.")
    add_demo_arguments(parser, budgets=None)
    args = parser.parse_args(argv)
    if args.frames < 1:
        raise UsageError(f"--frames {args.frames}: must be >= 1")
    family, build, shape = FAMILIES[args.family]
    if args.model:
        with loading(check_model(args.model), "config"):
            if is_original_llava(args.model) or is_original_onevision(args.model):
                raise UsageError(
                    f"--model {args.model}: an original-format LLaVA release; give a llava-hf checkpoint, or convert "
                    "it first (llava.vtr.convert; lmms-eval's llava_vtr / llava_onevision_vtr convert on load)"
                )
            onevision = checkpoint_model_type(args.model) == "llava_onevision"
    else:
        onevision = args.family == "onevision"
    if args.video and not onevision:
        raise UsageError(
            f"--video {args.video}: LLaVA-1.5 and LLaVA-1.6 take images only; "
            "use --family onevision or a LLaVA-OneVision --model"
        )
    if args.video:
        existing_file("--video", args.video)
    if args.budgets is None:
        args.budgets = BUDGETS["onevision" if onevision else "llava"]
    settings = demo_settings(args, VTRConfig)
    size = 384 if onevision else 336  # a LLaVA-OneVision view, a LLaVA-1.5 image
    image = open_image(args.image) if args.image else demo_image(size)

    model, processor, device, num_layers = load_demo_model(
        args, api, lambda: build(Path(args.cache_dir) / f"demo-{args.family}", **shape), family
    )
    prompts = [("image", dict(images=image), args.prompt)]
    if onevision:
        video = dict(videos=[args.video], do_sample_frames=True, num_frames=args.frames) if args.video else None
        prompts.append(("video", video or dict(videos=[demo_video(args.frames, size)]), args.video_prompt))
    for n, (visual, media, question) in enumerate(prompts):
        try:
            inputs = processor(text=build_prompt(processor, question, visual), return_tensors="pt", **media)
        except (ValueError, OSError, RuntimeError) as err:
            if visual != "video" or not args.video:
                raise
            raise UsageError(f"--video {args.video}: cannot read it ({err})") from None
        inputs = inputs.to(device)
        for key in ("pixel_values", "pixel_values_videos"):
            if key in inputs and device == "cuda":
                inputs[key] = inputs[key].to(model.dtype)
        seq_len = inputs["input_ids"].shape[1]
        ids = torch.tensor([model.config.image_token_id, getattr(model.config, "video_token_id", -1)], device=device)
        num_visual = int(torch.isin(inputs["input_ids"], ids).sum())
        print(
            ("\n" if n else "")
            + (f"{visual} prompt: " if onevision else "prompt: ")
            + f"{seq_len} tokens, {num_visual} of them {visual} tokens; {num_layers} decoder layers; "
            f"threads={torch.get_num_threads()}\n",
            flush=True,
        )
        print("\n".join(report(model, processor, inputs, settings, args, num_visual, visual if onevision else None)))
    if onevision:
        print(
            "kept: visual tokens kept in each part (the tiles' count includes their row newlines); one budget "
            "covers the whole prompt; see docs/backbones/llava-onevision.md."
        )
    else:
        print("kept patches are indices into the image's patch grid (row-major); see docs/adding-a-method.md.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
