"""The kept-patch picture: one panel per strategy, exactly the selected patches left undimmed."""

import numpy as np
import torch
from PIL import Image

from llava.vtr import VTRConfig, load_model, load_processor
from llava.vtr.demo import build_prompt
from llava.vtr.tiny import demo_image
from llava.vtr.visualize import CAPTION, GAP, main, model_view, panel_geometry


def test_png_shows_exactly_the_kept_patches_per_strategy(tmp_path, tiny_path):
    image_file, out = tmp_path / "scene.png", tmp_path / "kept.png"
    demo_image(200).save(image_file)
    strategies = ["fastv", "random"]
    args = ["--model", tiny_path, "--image", str(image_file), "--prompt", "What is shown?"]
    args += ["--strategies", ",".join(strategies), "--keep-tokens", "10", "--prune-layer", "2", "--out", str(out)]
    assert main(args) == 0
    assert out.exists()

    grid = 8  # 64x64 image, 8x8 patches
    cell, side = panel_geometry(grid)
    picture = np.asarray(Image.open(out).convert("RGB"))
    assert picture.shape == (side + CAPTION, len(strategies) * side + GAP, 3)
    reference = np.asarray(model_view(Image.open(image_file), side))

    processor = load_processor(tiny_path)
    inputs = processor(
        images=Image.open(image_file), text=build_prompt(processor, "What is shown?"), return_tensors="pt"
    )
    model = load_model(tiny_path, VTRConfig(enabled=False))
    first = int((inputs["input_ids"][0] == model.config.image_token_id).nonzero()[0])
    for i, strategy in enumerate(strategies):
        model.set_vtr_config(VTRConfig(strategy=strategy, keep_tokens=10, prune_layer=2))
        with torch.no_grad():
            model(**inputs)
        selected = set((model.vtr_last.stages[0].kept_positions[0] - first).tolist())
        panel = picture[:side, i * (side + GAP) : i * (side + GAP) + side]
        shown = {
            r * grid + c
            for r in range(grid)
            for c in range(grid)
            if np.array_equal(
                panel[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell],
                reference[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell],
            )
        }
        assert len(shown) == 10
        assert shown == selected


def test_llava_16_kept_tokens_are_reported_per_tile(tmp_path, capsys):
    from llava.vtr.tiny import build_tiny_llava_next

    path = str(build_tiny_llava_next(tmp_path / "next"))
    out = tmp_path / "kept.png"
    args = ["--model", path, "--strategies", "fastv", "--keep-tokens", "30", "--prune-layer", "2", "--out", str(out)]
    assert main(args) == 0 and out.exists()
    line = capsys.readouterr().out.splitlines()[0]
    # the demo image is square: base view 16 + four 4x4 tiles + 8 newlines = 88 positions
    assert line.startswith("fastv: kept 30 of 88 patches (base ")
    counts = [part.rsplit(" ", 1)[1] for part in line[line.index("(") + 1 : -1].split(", ")]
    assert [c.split("/")[1] for c in counts] == ["16", "16", "16", "16", "16", "8"]
    assert sum(int(c.split("/")[0]) for c in counts) == 30
