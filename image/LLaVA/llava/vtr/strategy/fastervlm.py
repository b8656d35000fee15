# Shared vtr file: edit it in image/LLaVA/llava/vtr, then `make fix-copies` updates every fork.
"""FasterVLM (Zhang et al., 2024): keep the visual tokens the vision encoder's [CLS] attends to most.

As the official code (Theia-4869/FasterVLM, `llava_arch.py`), before the LLM (`prune_layer=0` by default; the
kept tokens then get contiguous positions, as features spliced into the prompt do): the score of a token is
the CLS query's attention to it in the vision layer whose output the projector reads, mean over heads
(`ctx["vision_importance"]()`), and each view (image crop, frame: a `visual_grid` group) keeps its own top
tokens, the budget split over the views in proportion to their sizes (the official code keeps K per crop or
frame). Tokens off every grid (LLaVA-1.6's row newlines) are not kept. InternVL scores a token by the CLS
attention of the 2 x 2 patches merged into it (summed); the Qwen-VL towers have no CLS and score by the attention
each token receives in the last block (`vision_importance` there). Needs a token count: keep_tokens or keep_ratio.
"""

import torch

from .grouping import ViewSelection, first_stage_facts, view_shares
from .registry import register_strategy


def top_per_view(scores: torch.Tensor, groups: torch.Tensor, budget: int) -> torch.Tensor:
    """[n] bool: in each group of `groups` [n], its share of `budget` (`view_shares`) of the highest `scores`
    (ties: the earlier token)."""
    keep = torch.zeros_like(groups, dtype=torch.bool)
    for group, share in view_shares(groups, budget).items():
        members = (groups == group).nonzero().reshape(-1)
        order = torch.sort(scores[members].float(), descending=True, stable=True).indices
        keep[members[order[:share]]] = True
    return keep


@register_strategy("fastervlm")
class FasterVLM(ViewSelection):
    requires = ("vision_importance", "visual_grid")

    def compute_scores(self, attention, image_token_range, config, **ctx):
        rows = ctx["image_token_indices"]
        importance, groups = first_stage_facts(
            ctx, "fastervlm", lambda: (ctx["vision_importance"]().float(), ctx["visual_grid"]()[:, 0])
        )
        keep = top_per_view(
            importance, groups.to(importance.device), self._token_count(config, ctx["stage"], rows.numel())
        )
        return self.marked(keep, importance, image_token_range, rows)
