"""Show which image patches each strategy kept: one panel per strategy, pruned patches dimmed.

    python -m llava.vtr.visualize --image photo.jpg --prompt "What is on the table?" \
        --strategies fastv,priortr,random --keep-tokens 64 --prune-layer 2 --out kept.png

Without --model it uses the built-in random demo model (see `make demo`); with --model a llava-hf
checkpoint. The panel shows the image as the model saw it (resized and centre-cropped by the processor),
divided into its patch grid; with several prune layers, the tokens kept after the last one are shown.
For LLaVA-1.6 (anyres) the panel shows the base view, and the caption counts what was kept of the base
view, of each tile and of the row-closing newline tokens (`patch_coordinates` maps every visual
position to its tile, row and column).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .api import load_model, load_processor
from .config import VTRConfig
from .demo import DEMO_SHAPE, build_prompt, kept_patch_indices
from .tiny import build_tiny_llava, demo_image

PANEL = 336  # panel side in pixels
GAP = 8  # pixels between panels
CAPTION = 44  # caption strip height
DIM = 0.25  # brightness factor of pruned patches


def model_view(image: Image.Image, size: int) -> Image.Image:
    """Resize the shortest side to `size` and centre-crop a square, as LLaVA's CLIP processor does."""
    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def panel_geometry(grid: int) -> tuple[int, int]:
    """(cell, side): each patch is `cell` pixels square; the panel side is grid * cell (<= PANEL)."""
    cell = max(1, PANEL // grid)
    return cell, cell * grid


def render(image: Image.Image, grid: int, panels: list[tuple[str, list[int]]]) -> Image.Image:
    """Side-by-side panels; `panels` = (caption, kept patch indices in row-major grid order)."""
    cell, side = panel_geometry(grid)
    base = model_view(image, side)
    dimmed = base.point(lambda v: int(v * DIM))
    canvas = Image.new("RGB", (len(panels) * side + (len(panels) - 1) * GAP, side + CAPTION), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (caption, kept) in enumerate(panels):
        panel = dimmed.copy()
        for idx in kept:
            r, c = divmod(int(idx), grid)
            box = (c * cell, r * cell, (c + 1) * cell, (r + 1) * cell)
            panel.paste(base.crop(box), box[:2])
        x = i * (side + GAP)
        canvas.paste(panel, (x, 0))
        for j, line in enumerate(caption.split("\n")[:3]):
            draw.text((x + 4, side + 3 + 13 * j), line, fill="black")
    return canvas


def patch_coordinates(model, image_size) -> torch.Tensor:
    """[num_visual_tokens, 3]: (tile, row, col) of every visual position of one image, in the order the model
    places them. Tile 0 is the whole image (LLaVA-1.5's only view; LLaVA-1.6's base view), tiles 1.. are
    LLaVA-1.6's anyres tiles in row-major order; rows and cols index a tile's patch grid; (-1, -1, -1)
    marks an `image_newline` token. `image_size` is (height, width) as in the processor's `image_sizes`.
    For LLaVA-1.6 the positions are produced by the stock `pack_image_features` itself (fed tile/row/col
    numbers instead of features), so unpadding and newlines always match the model."""
    cfg = model.config
    grid = cfg.vision_config.image_size // cfg.vision_config.patch_size
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    if not hasattr(model.model, "pack_image_features"):
        return torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3)
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    height, width = (int(v) for v in image_size)
    tiles = image_size_to_num_patches((height, width), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
    numbers = torch.stack(
        [torch.stack([torch.full_like(rows, t), rows, cols], -1).reshape(-1, 3) for t in range(tiles)]
    ).float()
    packed, _ = model.model.pack_image_features(
        [numbers],
        torch.tensor([[height, width]]),
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        image_newline=torch.full((3,), -1.0),
    )
    return packed[0].round().long()


def describe_kept(coords: torch.Tensor, kept: torch.Tensor) -> str:
    """'base 12/16, tile 1 3/16, ..., newline 1/8' for anyres images; '' when there is one view only."""
    if int(coords[:, 0].max()) == 0:
        return ""
    parts = []
    for tile in sorted(set(coords[:, 0].tolist()), key=lambda t: (t < 0, t)):
        name = "base" if tile == 0 else ("newline" if tile < 0 else f"tile {tile}")
        parts.append(f"{name} {int((kept[:, 0] == tile).sum())}/{int((coords[:, 0] == tile).sum())}")
    return ", ".join(parts)


def kept_patches(model, inputs) -> list[int]:
    """Indices (row-major, into the image's patch grid) of the patches kept after the last prune stage."""
    with torch.inference_mode():
        model(**inputs)
    return kept_patch_indices(model, inputs["input_ids"]).tolist()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="llava-hf checkpoint; default: the built-in random demo model")
    parser.add_argument("--image", help="image file (default: the built-in synthetic scene)")
    parser.add_argument("--prompt", default="What is shown in the image?")
    parser.add_argument("--strategies", default="fastv,priortr,random")
    parser.add_argument("--keep-tokens", type=int, default=64)
    parser.add_argument("--prune-layer", type=int, default=2)
    parser.add_argument("--out", default="kept.png")
    parser.add_argument("--cache-dir", default=".cache")
    args = parser.parse_args(argv)

    path = args.model or str(build_tiny_llava(Path(args.cache_dir) / "demo-llava", **DEMO_SHAPE))
    processor = load_processor(path)
    model = load_model(path, VTRConfig(enabled=False))
    image = Image.open(args.image) if args.image else demo_image(336)
    inputs = processor(images=image, text=build_prompt(processor, args.prompt), return_tensors="pt")
    num_image = int((inputs["input_ids"] == model.config.image_token_id).sum())
    coords = patch_coordinates(model, inputs["image_sizes"][0] if "image_sizes" in inputs else image.size[::-1])
    if coords.shape[0] != num_image:
        raise SystemExit(
            f"visualize: {num_image} image tokens for {coords.shape[0]} patches: one image per prompt only"
        )
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    panels = []
    for strategy in [s.strip() for s in args.strategies.split(",") if s.strip()]:
        model.set_vtr_config(VTRConfig(strategy=strategy, keep_tokens=args.keep_tokens, prune_layer=args.prune_layer))
        kept = coords[torch.tensor(kept_patches(model, inputs), dtype=torch.long)]
        base = [int(r) * grid + int(c) for t, r, c in kept.tolist() if t == 0]
        caption = f"{strategy}\nkept {len(kept)}/{num_image} (keep_tokens={args.keep_tokens})\nprune layer K={args.prune_layer}"
        summary = describe_kept(coords, kept)
        if summary:
            caption = f"{strategy}: kept {len(kept)}/{num_image}\n{summary}\nprune layer K={args.prune_layer}"
        panels.append((caption, base))
        print(f"{strategy}: kept {len(kept)} of {num_image} patches" + (f" ({summary})" if summary else ""))
    render(image, grid, panels).save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
