# Copied from image/LLaVA/llava/vtr/strategy/grouping.py
# Shared vtr file: edit it in image/LLaVA/llava/vtr, then `make fix-copies` updates every fork.
"""Per-view budgets for methods whose official code selects per image crop or frame (FasterVLM, HiPrune, the
pool baseline): a sample's budget split over its views (`ctx["visual_grid"]()` groups) in proportion to their
sizes, the state such methods keep across prune stages, and their base class."""

import math

import torch

from .base import MarkedSelection


def split_budget(sizes: list[int], budget: int) -> list[int]:
    """Shares of `budget` proportional to `sizes` (floors, then one more each for the largest remainders,
    earlier groups first among equal remainders), never more than a group holds."""
    total = sum(sizes)
    if total == 0:
        return [0] * len(sizes)
    exact = [budget * s / total for s in sizes]
    shares = [min(s, math.floor(e)) for s, e in zip(sizes, exact)]
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - math.floor(exact[i])), i))
    left = min(budget, total) - sum(shares)
    for i in order:
        if left <= 0:
            break
        if shares[i] < sizes[i]:
            shares[i] += 1
            left -= 1
    return shares


def view_shares(groups: torch.Tensor, budget: int) -> dict[int, int]:
    """group id -> its share of `budget` (`split_budget` over the groups' token counts; tokens of group -1,
    off every grid, get none)."""
    ids = [g for g in torch.unique(groups).tolist() if g >= 0]
    counts = [int((groups == g).sum()) for g in ids]
    return dict(zip(ids, split_budget(counts, budget)))


def first_stage_facts(ctx, name: str, compute):
    """`compute()` (per visual token of the prompt, prompt order) once per sample, kept in `vtr_ctx[name]`,
    returned for the current visual tokens (`image_token_indices`), which a later stage may have thinned."""
    rows = ctx["image_token_indices"]
    state = ctx["vtr_ctx"]
    if name not in state:
        state[name] = (ctx["original_index"][rows], compute())
    positions, facts = state[name]
    where = torch.searchsorted(positions, ctx["original_index"][rows])
    return tuple(f[where.to(f.device)] for f in facts)


class ViewSelection(MarkedSelection):
    """A vision-side method that picks its kept set per view before the LLM (FasterVLM, HiPrune): the picks are
    marked (`MarkedSelection`), the kept tokens renumbered without gaps as their official code splices them in."""

    needs_attention = False
    needs_vision_attention = True
    positions = "compact"

    @classmethod
    def schedule_defaults(cls, config, num_layers: int) -> dict:
        return {"prune_layer": 0} if config.prune_layer_defaulted else {}
