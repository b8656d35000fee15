# Copied from image/LLaVA/llava/vtr/strategy/fastv.py
# Shared vtr file: edit it in image/LLaVA/llava/vtr, then `make fix-copies` updates every fork.
"""FastV: keep the image tokens that receive the most attention from the query rows (Chen et al., 2024)."""

from .base import PruningStrategy
from .registry import register_strategy


@register_strategy("fastv")
class FastV(PruningStrategy):
    def compute_scores(self, attention, image_token_range, config, **ctx):
        return self._aggregate_attention(attention, image_token_range, config)
