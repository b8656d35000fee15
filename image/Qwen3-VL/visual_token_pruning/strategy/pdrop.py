# Copied from image/LLaVA/llava/vtr/strategy/pdrop.py
# Shared vtr file: edit it in image/LLaVA/llava/vtr, then `make fix-copies` updates every fork.
"""PyramidDrop (Xing et al., 2024): several stages; at each, keep the top share lambda of the visual tokens still
there, ranked by the attention the last instruction token pays them.

Defaults, used for what the user leaves unset: prune layers at 1/4, 1/2 and 3/4 of the depth (8, 16, 24 for
32 layers) and lambda = 0.5 at each (`keep_ratio=[0.5, 0.5, 0.5]`, compounding: 1/2, 1/4, 1/8 of the
visual tokens after each stage). docs/methods.md lists schedules that average 192/128/64 tokens.
"""

from .base import PruningStrategy
from .registry import register_strategy

LAMBDA = 0.5


@register_strategy("pdrop")
class PyramidDrop(PruningStrategy):
    def compute_scores(self, attention, image_token_range, config, **ctx):
        last = attention.shape[-1] - 1  # the last instruction token, whatever query_aggregation says
        return self._aggregate_attention(attention, image_token_range, config, rows=[last])

    @classmethod
    def schedule_defaults(cls, config, num_layers: int) -> dict:
        updates = {}
        layers = config.prune_layers
        per_stage = any(isinstance(v, list) for v in (config.keep_tokens, config.score_threshold, config.keep_ratio))
        if config.prune_layer_defaulted and not per_stage:  # the user's per-stage budgets fix the stages
            layers = sorted({max(1, num_layers * q // 4) for q in (1, 2, 3)})
            updates["prune_layer"] = layers
        if config.budget_defaulted:
            updates.update(keep_tokens=None, keep_ratio=[LAMBDA] * len(layers))
        return updates
