"""`make demo`: run one image + prompt through the LLaVA fork with a few strategies and budgets, and show
what was kept and how long prefill took against the unpruned run: median [min-max] over interleaved timed
rounds, a speedup marked `~` when it is inside the noise (see timing.py). A keep-all row (the machinery,
nothing dropped) shows what noise looks like. Progress goes to stderr, results to stdout.

With no --model it builds (once, cached under .cache/) a random LLaVA-1.5-shaped model: 576 image tokens,
so the token counts and the speedups are the real ones, while the generated text is noise.
With --model (a llava-hf hub id or local folder) it runs that checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from . import api
from .config import VTRConfig
from .timing import (
    Parser,
    add_demo_arguments,
    demo_report,
    demo_settings,
    load_demo_model,
    open_image,
    run_cli,
)
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


def main(argv=None) -> int:
    return run_cli("python -m llava.vtr.demo", run, argv)


def run(argv) -> int:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="llava-hf checkpoint (hub id or folder); default: a built-in random model")
    parser.add_argument("--image", help="image file (default: a built-in synthetic scene)")
    parser.add_argument("--prompt", default="What is shown in the image? Answer briefly.")
    add_demo_arguments(parser, budgets="192,64")
    args = parser.parse_args(argv)
    settings = demo_settings(args, VTRConfig)
    image = open_image(args.image) if args.image else demo_image(336)

    model, processor, device, num_layers = load_demo_model(
        args, api, lambda: build_tiny_llava(Path(args.cache_dir) / "demo-llava", **DEMO_SHAPE), "LLaVA-1.5"
    )
    inputs = processor(images=image, text=build_prompt(processor, args.prompt), return_tensors="pt").to(device)
    if "pixel_values" in inputs and device == "cuda":
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    seq_len = inputs["input_ids"].shape[1]
    num_image = int((inputs["input_ids"] == model.config.image_token_id).sum())
    print(
        f"prompt: {seq_len} tokens, {num_image} of them image tokens; {num_layers} decoder layers; "
        f"threads={torch.get_num_threads()}\n",
        flush=True,
    )

    def shown(model) -> str:
        kept = kept_patch_indices(model, inputs["input_ids"])
        return ",".join(str(p) for p in kept[:8].tolist()) + (",..." if kept.numel() > 8 else "")

    print(
        "\n".join(
            demo_report(
                model, processor, inputs, settings, args, num_image, "kept patches (first 8)", shown, "img kept"
            )
        )
    )
    print("kept patches are indices into the image's patch grid (row-major); see docs/adding-a-method.md.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
