# Copied from image/LLaVA/llava/vtr/strategy/pdrop.py
# Shared vtr file: edit it in image/LLaVA/llava/vtr, then `make fix-copies` updates every fork.
"""PyramidDrop (Xing et al., 2024): several stages; at each, keep a share of the visual tokens ranked by the
attention the last instruction token pays them.

As the official code (Cooperx521/PyramidDrop, `pdrop_rank_drop`):
- scoring: layer K's own q/k, from its input layernorm applied to the hidden states entering layer K (the
  attention it is about to compute), last row, softmax over every key, heads averaged (`scoring_layer="own"`);
- budget: stage s keeps int(n0 x r_s) of the prompt's ORIGINAL visual count n0, floored; a scalar keep_ratio
  lambda means r_s = lambda^(s+1) (the paper's lambda), a list gives r_s itself (the official ratio list);
- positions: renumbered without gaps after each drop, decode continuing each layer's own count
  (`positions="compact"`); layers before a prune layer keep every token in their cache.

Defaults for what the user leaves unset: prune layers at 1/4, 1/2 and 3/4 of the depth (8, 16, 24 for 32
layers) and r = [0.5, 0.25, 0.125] (lambda = 0.5), the setting of every script in the official repository.
"""

import torch

from .base import PruningStrategy
from .registry import register_strategy

LAMBDA = 0.5


@register_strategy("pdrop")
class PyramidDrop(PruningStrategy):
    scoring_layer = "own"
    positions = "compact"
    earlier_cache = "keep"

    def compute_scores(self, attention, image_token_range, config, **ctx):
        last = attention.shape[-1] - 1  # the last instruction token, whatever query_aggregation says
        return self._aggregate_attention(attention, image_token_range, config, rows=[last])

    def ratio_keep_count(self, config, stage, current, original):
        ratio = config.keep_ratio
        share = ratio[stage] if isinstance(ratio, list) else ratio ** (stage + 1)
        # int(n0 * r) in Python floats, as the official code counts
        return torch.floor(original.double() * share).long().clamp_max(current)

    @classmethod
    def schedule_defaults(cls, config, num_layers: int) -> dict:
        updates = {}
        layers = config.prune_layers
        per_stage = any(isinstance(v, list) for v in (config.keep_tokens, config.score_threshold, config.keep_ratio))
        if config.prune_layer_defaulted and not per_stage:  # the user's per-stage budgets fix the stages
            layers = sorted({max(1, num_layers * q // 4) for q in (1, 2, 3)})
            updates["prune_layer"] = layers
        if config.budget_defaulted:
            updates.update(keep_tokens=None, keep_ratio=[LAMBDA ** (s + 1) for s in range(len(layers))])
        return updates
