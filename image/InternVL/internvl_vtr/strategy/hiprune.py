# Copied from image/LLaVA/llava/vtr/strategy/hiprune.py
# Shared vtr file: edit it in image/LLaVA/llava/vtr, then `make fix-copies` updates every fork.
"""HiPrune (2025): training-free pruning by the vision encoder's hierarchical attention.

As the official code (Danielement321/HiPrune, `llava_arch.py`), before the LLM (`prune_layer=0` by default; the
kept tokens then get contiguous positions), per view (image crop, frame: a `visual_grid` group) with a share V of
the budget (split over the views in proportion to their sizes; the official code gives each crop the same V).
A layer's score of a token is the attention it receives, mean over heads and over every query row (CLS
included) (`ctx["vision_layer"](i)["received"]`):
- anchors: the round(V x alpha / 5) tokens (Python's round; `hiprune_alpha`, 0.1) scoring highest in a middle
  layer (`hiprune_layer`; default the official one: the 9th of CLIP's 24 layers, the 16th of Qwen2.5-VL's 32
  blocks, at the same relative depth in other towers with and without CLS);
- buffers: each anchor's neighbours p - 1, p + 1, p - W, p + W in the view's raster index p (W its width),
  clamped to [0, H x W - 1], as the official code (no row check: p +- 1 wraps to the next or previous row);
- registers: the rest of V, the tokens scoring highest in the layer whose output the projector reads, anchors
  and buffers excluded.
Kept in original order (ties: the earlier token). Needs a token count: keep_tokens or keep_ratio.
"""

import torch

from .grouping import ViewSelection, first_stage_facts, view_shares
from .registry import register_strategy


def hiprune_view(shallow, deep, row, col, budget: int, alpha: float) -> torch.Tensor:
    """[n] bool: HiPrune's kept tokens of one view of n tokens at grid (`row`, `col`), given each token's received
    attention in the anchor layer (`shallow`) and the projector's layer (`deep`)."""
    n = shallow.numel()
    keep = torch.zeros(n, dtype=torch.bool, device=shallow.device)
    budget = min(budget, n)
    anchors = min(round(budget * alpha / 5), budget)
    r0, c0 = int(row.min()), int(col.min())
    width, height = int(col.max()) - c0 + 1, int(row.max()) - r0 + 1
    flat = (row - r0) * width + (col - c0)  # the view's raster index
    picked = torch.sort(shallow.float(), descending=True, stable=True).indices[:anchors]
    p = flat[picked]
    around = torch.cat([p, p - 1, p + 1, p - width, p + width]).clamp(0, height * width - 1)
    keep |= torch.isin(flat, around)
    if int(keep.sum()) > budget:  # a view too small for its anchors' neighbourhoods: the anchors first
        keep[:] = False
        keep[picked[:budget]] = True
    registers = budget - int(keep.sum())
    rest = (~keep).nonzero().reshape(-1)
    order = torch.sort(deep[rest].float(), descending=True, stable=True).indices[:registers]
    keep[rest[order]] = True
    return keep


@register_strategy("hiprune")
class HiPrune(ViewSelection):
    requires = ("vision_layer", "vision_tower", "visual_grid")
    mrope_positions = "original"  # the Qwen2.5-VL port gathers the kept tokens' M-RoPE ids

    def vision_layers(self, config, tower: dict) -> tuple[int, ...]:
        if config.hiprune_layer is not None:
            return (config.hiprune_layer,)
        # the official layers: the 9th of CLIP's 24, the 16th of Qwen2.5-VL's 32 blocks (towers without CLS)
        share = 9 / 24 if tower["cls"] else 16 / 32
        return (round(share * tower["depth"]) - 1,)

    def compute_scores(self, attention, image_token_range, config, **ctx):
        rows = ctx["image_token_indices"]

        def facts():
            layer, (anchor_layer,) = ctx["vision_layer"], self.vision_layers(config, ctx["vision_tower"])
            return (layer(anchor_layer)["received"], layer()["received"], ctx["visual_grid"]())

        shallow, deep, grid = first_stage_facts(ctx, "hiprune", facts)
        grid = grid.to(shallow.device)
        keep = torch.zeros(rows.numel(), dtype=torch.bool, device=shallow.device)
        for group, share in view_shares(grid[:, 0], self._token_count(config, ctx["stage"], rows.numel())).items():
            members = (grid[:, 0] == group).nonzero().reshape(-1)
            view = grid[members]
            keep[members] = hiprune_view(
                shallow[members], deep[members], view[:, 1], view[:, 2], share, config.hiprune_alpha
            )
        return self.marked(keep, deep, image_token_range, rows)
