# Copied from image/LLaVA/llava/vtr/strategy/dart.py
# Shared vtr file: edit it in image/LLaVA/llava/vtr, then `make fix-copies` updates every fork.
"""DART (Wen et al., 2025): keep the visual tokens that duplicate a few pivot tokens the least.

As the official code (ZichenWen1/DART: LLaVA's `modeling_llama_self.py`, `DART.get_retained_image_token`; its
Qwen2-VL and Qwen2.5-VL ports do the same), once, inside the LLM (`prune_layer=2` by default), from layer K-1's
outputs; kept tokens keep their original positions and the layers before K keep their whole cache:
- pivots: the `pivot_image_tokens` (4) visual tokens and the `pivot_text_tokens` (4) tokens after the visual span
  whose keys in layer K-1 (RoPE applied, every kv head concatenated) have the largest L1 norm;
- duplication: the signed cosine similarity of layer K-1's outputs through the model's final norm
  (`ctx["final_norm"]`);
- each pivot in turn picks the k candidates least similar to it and removes them from the pool (every visual
  token but the image pivots), so no token is picked twice. The pivots go in the order CPython iterates
  `set(image_pivots + text_pivots)` of their indices in the sample's unpadded prompt, as the official code
  iterates its set (the order decides which pivot gets a contested token);
- kept: the image pivots and every pick (the text pivots are text, kept anyway).
The image pivots come on top of the budget: with n visual tokens, p image pivots and P pivots in all,
k = min(b, n - p) // P for keep_tokens=b (LLaVA-1.5's b // 8, capped as LLaVA-1.6's code caps it) and
k = int(n x keep_ratio / P) for a keep_ratio (the Qwen-VL ports' int(L (1 - r) / 8), keep_ratio = 1 - r); so 64
keeps 68, 128 keeps 132, LLaVA-1.6's 320 keeps 324. A pivot that finds fewer than k candidates left takes what
is left (the official code fails there). With several images or frames the pool is every visual token of the
sample and the text pivots come from after the last one; a prompt ending with its visual tokens has no text
pivots (then P = p). Ties go to the earlier token. Needs a token count: keep_tokens or keep_ratio.
"""

import torch

from .base import MarkedSelection
from .registry import register_strategy


def top_rows(values: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` largest `values`, largest first (ties: the earlier index)."""
    return torch.sort(values.float(), descending=True, stable=True).indices[:count]


def pivot_order(ids: list[int]) -> list[int]:
    """Positions in `ids` (the pivots' prompt indices, image pivots then text pivots, each largest norm first)
    in the order the official code visits them: CPython's iteration order of `set(ids)`."""
    where = {value: i for i, value in enumerate(ids)}
    return [where[value] for value in set(ids)]


def least_duplicated(features: torch.Tensor, pivots: list[int], pool: torch.Tensor, per_pivot: int) -> list[int]:
    """Rows of `features` [m, d] each pivot (rows, in visiting order) picks in turn: the `per_pivot` rows of the
    remaining `pool` (ascending rows) least cosine-similar to it (signed; ties: the earlier row), removed from
    the pool once picked. Returns the picks in pick order."""
    x = features.float()
    available = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    available[pool] = True
    picks = []
    for pivot in pivots:
        left = available.nonzero().reshape(-1)
        if per_pivot <= 0 or left.numel() == 0:
            break
        similarity = torch.nn.functional.cosine_similarity(x[pivot][None], x[left], dim=-1, eps=1e-8)
        chosen = left[torch.sort(-similarity, descending=True, stable=True).indices[:per_pivot]]
        available[chosen] = False
        picks += chosen.tolist()
    return picks


@register_strategy("dart")
class DART(MarkedSelection):
    @classmethod
    def schedule_defaults(cls, config, num_layers: int) -> dict:
        return {"prune_layer": max(1, min(2, num_layers - 1))} if config.prune_layer_defaulted else {}

    def per_pivot(self, config, stage: int, num_visual: int, image_pivots: int, pivots: int) -> int:
        """k, the candidates each pivot keeps, for a sample with `num_visual` visual tokens."""
        budget = config.stage_budget(stage)
        if budget.keep_tokens is not None:
            return min(budget.keep_tokens, num_visual - image_pivots) // pivots
        if budget.score_threshold is not None:
            raise self.count_error()
        return int(num_visual * budget.keep_ratio / pivots)

    def compute_scores(self, attention, image_token_range, config, **ctx):
        start, end = image_token_range
        rows = ctx["image_token_indices"]
        hidden = ctx["hidden_states"][0]
        text = torch.arange(end, hidden.shape[0], device=rows.device)  # every token after the visual span
        keys = attention.keys[0]  # [kv_heads, seq, head_dim]
        norms = keys.transpose(0, 1).reshape(keys.shape[1], -1).float().abs().sum(-1)
        image_pivots = top_rows(norms[rows], min(config.pivot_image_tokens, rows.numel()))
        text_pivots = top_rows(norms[text], min(config.pivot_text_tokens, text.numel()))
        pivots = image_pivots.numel() + text_pivots.numel()
        if pivots == 0:
            raise ValueError("dart found no pivot: pivot_image_tokens=0 and no token after the visual span")
        k = self.per_pivot(config, ctx["stage"], rows.numel(), image_pivots.numel(), pivots)

        # one table: the visual tokens, then the text after them; prompt indices for the official set order
        table = torch.cat([rows, text])
        pivot_rows = torch.cat([image_pivots, text_pivots + rows.numel()])
        valid = ctx["valid"]  # the sample's padding rows
        first = int(valid.long().argmax())  # its first real row: prompt index 0
        ids = (ctx["original_index"][table[pivot_rows]] - ctx["original_index"][first]).tolist()
        visiting = pivot_rows[pivot_order(ids)].tolist()
        pool = torch.ones(rows.numel(), dtype=torch.bool, device=rows.device)
        pool[image_pivots] = False
        features = ctx["final_norm"](hidden[table])
        picks = least_duplicated(features, visiting, pool.nonzero().reshape(-1), k)

        kept = torch.cat([image_pivots, torch.tensor(picks, dtype=torch.long, device=rows.device)])
        scores = torch.full((end - start,), -float("inf"), device=rows.device)
        scores[rows[kept] - start] = -torch.arange(kept.numel(), device=rows.device, dtype=torch.float32)
        return scores
