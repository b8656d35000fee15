# Copied from image/LLaVA/llava/vtr/strategy/vispruner.py
# Shared vtr file: edit it in image/LLaVA/llava/vtr, then `make fix-copies` updates every fork.
"""VisPruner (Zhang et al., 2025): important tokens by the vision encoder's own attention, then diverse ones.

As the official code (Theia-4869/VisPruner, `llava_arch.py`), before the LLM (`prune_layer=0` by default;
the kept tokens then get contiguous positions, as features spliced into the prompt do):
- important: of a budget T, int(T x important_ratio) tokens that the vision encoder's CLS query attends to
  most (`ctx["vision_importance"]()`: the attention of the vision layer whose output the projector reads);
- diverse: the remaining tokens form a queue in descending CLS-attention order; each round splits the
  queue alternately (even places A, odd places B), removes the r = min(8, len - T_div) tokens of A most
  similar (cosine, on the vision encoder's features before the projector: `ctx["vision_features"]()`) to
  some token of B, and re-queues A's survivors most-similar first ahead of B, until T - T_imp are left.
Backbones whose adapter gives no pre-projector features per token (their projector merges patches) use the
tokens' states at the scoring point instead. Needs a token count: keep_tokens or keep_ratio.
"""

import torch

from .base import PruningStrategy
from .registry import register_strategy

MAX_REMOVED_PER_ROUND = 8


def remove_duplicates(features: torch.Tensor, queue: torch.Tensor, keep: int) -> torch.Tensor:
    """The `keep` entries of `queue` (indices into `features` [n, d], in queue order) left by VisPruner's
    rounds of bipartite near-duplicate removal; returned in their final queue order."""
    x = torch.nn.functional.normalize(features.float(), dim=-1)
    while queue.numel() > keep:
        first, second = queue[0::2], queue[1::2]
        removed = min(MAX_REMOVED_PER_ROUND, queue.numel() - keep, first.numel())
        if second.numel() == 0 or removed <= 0:
            break
        similarity = (x[first] @ x[second].T).amax(dim=1)  # each A token's closest B token
        order = torch.sort(similarity, descending=True, stable=True).indices
        queue = torch.cat([first[order[removed:]], second])
    return queue[:keep]


@register_strategy("vispruner")
class VisPruner(PruningStrategy):
    needs_attention = False
    needs_vision_attention = True
    positions = "compact"

    def compute_scores(self, attention, image_token_range, config, **ctx):
        start, end = image_token_range
        rows = ctx["image_token_indices"]
        k = self._token_count(config, ctx["stage"], rows.numel())
        state = ctx["vtr_ctx"]
        if "vispruner" not in state:  # once per sample: every visual token's importance and features
            features = ctx["vision_features"]() if "vision_features" in ctx else None
            importance = ctx["vision_importance"]().to(rows.device).float()
            state["vispruner"] = (ctx["original_index"][rows], importance, features)
        positions, importance, features = state["vispruner"]
        where = torch.searchsorted(positions, ctx["original_index"][rows])
        importance = importance[where]
        features = features[where].to(rows.device) if features is not None else ctx["hidden_states"][0, rows]
        order = torch.sort(importance, descending=True, stable=True).indices
        important = order[: int(k * config.important_ratio)]
        diverse = remove_duplicates(features, order[important.numel() :], k - important.numel())
        scores = torch.zeros(end - start, device=rows.device)
        scores[rows[important] - start] = 2.0
        scores[rows[diverse] - start] = 1.0
        return scores

    @classmethod
    def schedule_defaults(cls, config, num_layers: int) -> dict:
        return {"prune_layer": 0} if config.prune_layer_defaulted else {}
