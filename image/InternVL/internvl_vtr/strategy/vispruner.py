# Copied from image/LLaVA/llava/vtr/strategy/vispruner.py
# Shared vtr file: edit it in image/LLaVA/llava/vtr, then `make fix-copies` updates every fork.
"""VisPruner (Zhang et al., 2025): important tokens by the vision encoder's own attention, then diverse ones.

Of a stage's budget k, round(important_ratio x k) tokens are those the vision encoder's CLS query attends to
most (`ctx["vision_importance"]()`, from the adapter: the attention of the vision layer that produced the
projected features, recomputed for that one layer); the rest is filled from the remaining tokens by removing
near-duplicates: in rounds, the remaining tokens are split alternately in two halves and the tokens of the
first half most similar (cosine) to some token of the second half are removed, until k - k_important are
left. Meant for `prune_layer=0` (pre-LLM: every decoder layer runs short); features are the visual tokens'
states at the scoring point (the projected features at K=0). Needs a token count: keep_tokens or keep_ratio.
"""

import torch

from .base import PruningStrategy
from .registry import register_strategy


def remove_duplicates(features: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (ascending) of `keep` rows of `features` [n, d] left after removing the most redundant ones."""
    x = torch.nn.functional.normalize(features.float(), dim=-1)
    alive = torch.arange(x.shape[0], device=x.device)
    while alive.numel() > keep:
        first, second = alive[0::2], alive[1::2]
        if second.numel() == 0:
            break
        similarity = (x[first] @ x[second].T).amax(dim=1)  # each first-half token's closest second-half one
        drop = min(alive.numel() - keep, first.numel())
        gone = first[torch.topk(similarity, drop).indices]
        alive = alive[~torch.isin(alive, gone)]
    return alive[:keep]


@register_strategy("vispruner")
class VisPruner(PruningStrategy):
    needs_attention = False
    needs_vision_attention = True

    def compute_scores(self, attention, image_token_range, config, **ctx):
        start, end = image_token_range
        rows = ctx["image_token_indices"]
        k = self._budget_count(config, ctx["stage"], rows.numel())
        if k is None:
            raise ValueError("vispruner keeps a fixed number of tokens: give keep_tokens or keep_ratio")
        state = ctx["vtr_ctx"]
        if "vispruner" not in state:  # once per sample: every visual token's importance, by prompt position
            state["vispruner"] = (ctx["original_index"][rows], ctx["vision_importance"]().to(rows.device).float())
        positions, importance = state["vispruner"]
        importance = importance[torch.searchsorted(positions, ctx["original_index"][rows])]
        important = torch.topk(importance, int(config.important_ratio * k + 0.5)).indices
        rest = torch.ones(rows.numel(), dtype=torch.bool, device=rows.device)
        rest[important] = False
        rest = rest.nonzero().reshape(-1)
        diverse = rest[remove_duplicates(ctx["hidden_states"][0, rows[rest]], k - important.numel())]
        scores = torch.zeros(end - start, device=rows.device)
        scores[rows[important] - start] = 2.0
        scores[rows[diverse] - start] = 1.0
        return scores
