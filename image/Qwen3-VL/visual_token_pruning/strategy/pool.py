# Copied from image/LLaVA/llava/vtr/strategy/pool.py
# Shared vtr file: edit it in image/LLaVA/llava/vtr, then `make fix-copies` updates every fork.
"""pool: average pooling of each visual grid down to the budget, the downsampling baseline.

Before the LLM (`prune_layer=0` by default), on the visual tokens spliced into the prompt. Each grid of
`ctx["visual_grid"]()` (an image, a tile, a frame) gets a share of the budget proportional to its token
count (largest remainders first); a grid of H x W cells (its bounding box) with a share of t tokens is cut
into h x w non-overlapping cells, the h, w with the most cells h x w <= t (ties: the aspect closest to H/W,
then fewer rows); cell (i, j) holds the tokens of rows [floor(iH/h), floor((i+1)H/h)) and the matching
columns. Each cell becomes the mean of its tokens, placed where its central token was and taking that
token's position (`positions="original"`: the pooled grid keeps its place in the image; M-RoPE keeps the
cell's row and column). Tokens off every grid (LLaVA-1.6's row newlines) are dropped: the rows they closed
are pooled away. Needs a token count: keep_tokens or keep_ratio.
"""

import math

import torch

from .base import MarkedSelection
from .grouping import split_budget
from .registry import register_strategy


def pooled_shape(rows: int, cols: int, budget: int) -> tuple[int, int]:
    """(h, w): the finest cut of a rows x cols grid into at most `budget` cells (see the module docstring)."""
    best = (0, 0, 0.0, 0)
    for h in range(1, rows + 1):
        w = min(cols, budget // h)
        if w == 0:
            break
        key = (h * w, -round(abs(math.log((h / w) / (rows / cols))), 9), -h)  # rounded: 3:4 and 4:3 tie
        if key > best[:3]:
            best = (*key, h)
    h = best[3]
    return (h, min(cols, budget // h)) if h else (0, 0)


def pool_cells(grid: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For visual tokens with (group, row, col) `grid` [n, 3]: (cell [n] long, the cell of each token, -1 for
    tokens off every grid or pooled away; centre [cells] long, each cell's central token)."""
    n = grid.shape[0]
    cell = torch.full((n,), -1, dtype=torch.long)
    groups = [g for g in torch.unique(grid[:, 0]).tolist() if g >= 0]
    members = [(grid[:, 0] == g).nonzero().reshape(-1) for g in groups]
    shares = split_budget([m.numel() for m in members], budget)
    centres, next_cell = [], 0
    for rows_of, share in zip(members, shares):
        if share == 0:
            continue
        r, c = grid[rows_of, 1], grid[rows_of, 2]
        r0, c0 = int(r.min()), int(c.min())
        height, width = int(r.max()) - r0 + 1, int(c.max()) - c0 + 1
        h, w = pooled_shape(height, width, share)
        # cell i holds rows [floor(i H / h), floor((i + 1) H / h)): row r's cell is floor(((r + 1) h - 1) / H)
        ci, cj = ((r - r0 + 1) * h - 1) // height, ((c - c0 + 1) * w - 1) // width
        local = ci * w + cj
        for k in torch.unique(local).tolist():  # cells in raster order; empty cells (partial grids) are skipped
            inside = (local == k).nonzero().reshape(-1)
            i, j = divmod(k, w)
            mid_r = (i * height // h + (i + 1) * height // h - 1) / 2
            mid_c = (j * width // w + (j + 1) * width // w - 1) / 2
            distance = ((r[inside] - r0) - mid_r) ** 2 + ((c[inside] - c0) - mid_c) ** 2
            centres.append(int(rows_of[inside[int(distance.argmin())]]))
            cell[rows_of[inside]] = next_cell
            next_cell += 1
    return cell, torch.tensor(centres, dtype=torch.long)


@register_strategy("pool")
class Pool(MarkedSelection):
    needs_attention = False
    supports_token_merge = True
    token_merge_default = True
    merge_is_method = True
    positions = "original"
    requires = ("visual_grid",)

    @classmethod
    def schedule_defaults(cls, config, num_layers: int) -> dict:
        if len(config.prune_layers) > 1:
            raise ValueError(f"pool runs at one prune layer; got prune_layer={config.prune_layer}")
        return {"prune_layer": 0} if config.prune_layer_defaulted else {}

    def compute_scores(self, attention, image_token_range, config, **ctx):
        if not config.conventions().token_merge:
            raise ValueError(
                "pool replaces the visual tokens by their pooled cells: it cannot run with token_merge=False"
            )
        rows = ctx["image_token_indices"]
        budget = self._token_count(config, ctx["stage"], rows.numel())
        cell, centres = pool_cells(ctx["visual_grid"]().cpu(), budget)
        ctx["vtr_ctx"]["pool"] = (rows, cell.to(rows.device), centres.to(rows.device))
        start, end = image_token_range
        return torch.full((end - start,), -float("inf"), device=rows.device)  # every token goes into its cell

    def merge_tokens(self, dropped_hidden, dropped_scores, config, **ctx):
        rows, cell, centres = ctx["vtr_ctx"]["pool"]
        dropped = ctx["dropped_index"]
        if not torch.equal(dropped, rows):
            raise ValueError("pool runs at one stage, on all the visual tokens of the prompt")
        on_grid = (cell >= 0).nonzero().reshape(-1)
        counts = torch.bincount(cell[on_grid], minlength=centres.numel()).clamp_min(1)
        mix = torch.zeros(centres.numel(), cell.numel(), device=dropped_hidden.device)  # each cell's mean
        mix[cell[on_grid], on_grid] = 1.0 / counts[cell[on_grid]].float()
        merged = (mix @ dropped_hidden.float()).to(dropped_hidden.dtype)
        return merged, centres, rows[centres], mix
