# Copied from image/LLaVA/llava/vtr/strategy/random.py
# Shared vtr file: edit it in image/LLaVA/llava/vtr, then `make fix-copies` updates every fork.
"""Random baseline: a seeded uniform draw, independent of the content (never reads attention)."""

import torch

from .base import PruningStrategy
from .registry import register_strategy


@register_strategy("random")
class RandomStrategy(PruningStrategy):
    needs_attention = False

    def compute_scores(self, attention, image_token_range, config, **ctx):
        start, end = image_token_range
        # One stream per (seed, scoring layer): reproducible, and different at each stage.
        generator = torch.Generator().manual_seed(config.seed * 1000 + ctx.get("layer_idx", 0))
        return torch.rand(end - start, generator=generator)
