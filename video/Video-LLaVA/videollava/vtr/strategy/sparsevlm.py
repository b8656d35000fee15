# Copied from image/LLaVA/llava/vtr/strategy/sparsevlm.py
# Shared vtr file: edit it in image/LLaVA/llava/vtr, then `make fix-copies` updates every fork.
"""SparseVLM (Zhang et al., 2024): visual tokens rated by the text tokens that are relevant to the image.

Raters are chosen once per sample, from the input embeddings: for each visual token a softmax over the text
tokens of the question (those after the visual span) of the visual-text similarity, averaged over the
visual tokens; the raters are the text tokens above the mean. A visual token's score is the attention the
raters pay it at the scoring layer (rows averaged per head, heads by `head_aggregation`). Later stages reuse
the same raters.

Recycling (`token_merge=True`): the best-scored `merge_ratio` share of the dropped tokens is clustered by
density peaks (kNN density; the centres are the tokens with the largest density x distance to a denser
token; every token joins its nearest centre), and each cluster's mean is inserted after the kept visual
tokens, at its centre's RoPE position. The engine makes it exist from the prune layer on only: no query
ever attends to it in the layers before, where it has no keys/values of its own.
"""

import math

import torch

from .base import PruningStrategy
from .registry import register_strategy


def choose_raters(visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Indices into `text` [t, d] of the raters for `visual` [v, d]: relevance above the mean."""
    relevance = torch.softmax(visual.float() @ text.float().T, dim=-1).mean(dim=0)  # [t]
    raters = (relevance > relevance.mean()).nonzero().reshape(-1)
    return raters if raters.numel() else relevance.argmax().reshape(1)


def density_peak_clusters(x: torch.Tensor, clusters: int, neighbours: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(centres [c] indices into x, assignment [n] cluster number of each row) for x [n, d]."""
    n = x.shape[0]
    clusters = max(1, min(clusters, n))
    distance = torch.cdist(x.float(), x.float())
    k = max(1, min(neighbours, n - 1))
    nearest = distance.topk(k + 1, largest=False).values[:, 1:] if n > 1 else distance
    density = torch.exp(-(nearest**2).mean(dim=1))
    denser = density[None, :] > density[:, None]  # [i, j]: j is denser than i
    to_denser = distance.masked_fill(~denser, float("inf")).amin(dim=1)
    to_denser = torch.where(torch.isinf(to_denser), distance.amax(dim=1), to_denser)  # the densest point
    centres = torch.topk(density * to_denser, clusters).indices
    assignment = distance[:, centres].argmin(dim=1)
    assignment[centres] = torch.arange(clusters, device=x.device)
    return centres, assignment


@register_strategy("sparsevlm")
class SparseVLM(PruningStrategy):
    supports_token_merge = True

    def merge_tokens(self, dropped_hidden, dropped_scores, config, **ctx):
        recycled = math.floor(config.merge_ratio * dropped_scores.numel() + 0.5)
        if recycled == 0:
            return None
        best = torch.topk(dropped_scores.float(), recycled).indices
        count = config.merge_clusters or max(1, round(math.sqrt(recycled)))
        centres, assignment = density_peak_clusters(dropped_hidden[best], count)
        merged = torch.stack([dropped_hidden[best][assignment == c].float().mean(0) for c in range(centres.numel())])
        return merged.to(dropped_hidden.dtype), best[centres]

    def compute_scores(self, attention, image_token_range, config, **ctx):
        start, end = image_token_range
        state, current = ctx["vtr_ctx"], ctx["original_index"]
        if "sparsevlm_raters" not in state:
            embeddings, embedding_index = ctx["snapshots"][-1]  # the input embeddings, full prompt
            seq = attention.shape[-1]
            text = torch.arange(end, seq, device=current.device)  # the question after the visuals
            if text.numel() == 0:
                text = (current >= 0).nonzero().reshape(-1)[:start]
            picked = choose_raters(embeddings[0, current[ctx["image_token_indices"]]], embeddings[0, current[text]])
            state["sparsevlm_raters"] = current[text[picked]]  # prompt positions: stable across stages
        rows = torch.isin(current, state["sparsevlm_raters"]).nonzero().reshape(-1).tolist()
        return self._aggregate_attention(attention, image_token_range, config, rows=rows)
