# Copied from image/LLaVA/llava/vtr/strategy/divprune.py
# Shared vtr file: edit it in image/LLaVA/llava/vtr, then `make fix-copies` updates every fork.
"""DivPrune (Alvar et al., 2025): keep the most diverse visual tokens, by greedy max-min diversity.

As the official code (vbdi/divprune, `llava_arch.py`): before the LLM (`prune_layer=0` by default), on the
projected visual features spliced into the prompt, whose kept tokens then get contiguous positions.
Distance is the cosine distance. The first pick is the token farthest from its nearest neighbour; each next
pick maximises its distance to the nearest token already picked (ties: the first index). The scores encode
the pick order (earlier = higher; greedy stops at the stage's budget), so Top-K keeps exactly what greedy
max-min picks for that budget.
"""

import torch

from .base import PruningStrategy
from .registry import register_strategy


def max_min_order(features: torch.Tensor, picks: int | None = None) -> torch.Tensor:
    """Indices of `features` [n, d] in greedy max-min (cosine distance) pick order (the first `picks`)."""
    x = torch.nn.functional.normalize(features.float(), dim=-1)
    distance = 1 - x @ x.T
    n = distance.shape[0]
    picks = n if picks is None else min(picks, n)
    if picks == 0:
        return torch.empty(0, dtype=torch.long, device=x.device)
    nearest = distance.masked_fill(torch.eye(n, dtype=torch.bool, device=x.device), float("inf")).amin(1)
    order = torch.empty(picks, dtype=torch.long, device=x.device)
    order[0] = nearest.argmax() if n > 1 else 0
    gap = distance[order[0]].clone()  # distance of every token to its nearest picked token
    for i in range(1, picks):
        gap[order[:i]] = -float("inf")
        order[i] = gap.argmax()
        gap = torch.minimum(gap, distance[order[i]])
    return order


@register_strategy("divprune")
class DivPrune(PruningStrategy):
    needs_attention = False
    positions = "compact"

    @classmethod
    def schedule_defaults(cls, config, num_layers: int) -> dict:
        return {"prune_layer": 0} if config.prune_layer_defaulted else {}

    def compute_scores(self, attention, image_token_range, config, **ctx):
        start, end = image_token_range
        rows = ctx["image_token_indices"]
        picks = self._budget_count(config, ctx["stage"], rows.numel())  # greedy stops at the budget
        order = max_min_order(ctx["hidden_states"][0, rows], picks)
        scores = torch.full((end - start,), -float("inf"), device=rows.device)
        scores[rows[order] - start] = -torch.arange(order.numel(), device=rows.device, dtype=torch.float32)
        return scores
