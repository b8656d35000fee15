# Copied from image/LLaVA/llava/vtr/strategy/sparsevlm.py
# Shared vtr file: edit it in image/LLaVA/llava/vtr, then `make fix-copies` updates every fork.
"""SparseVLM (Zhang et al., 2024): visual tokens rated by the text tokens that are relevant to the image.

As the official code's default (Gumpest/SparseVLMs, v1.5 algorithm: `modelling_sparse_llama.py`, `score.py`,
`utils.py`):
- raters, chosen once per sample from the input embeddings: for each visual token a softmax over the text
  tokens after the visual span (the question and the answer prefix) of the raw visual-text dot products,
  averaged over the visual tokens; the raters are the text tokens strictly above the mean;
- score: the attention the raters pay each visual token in the scoring layer (heads averaged, then rows);
- schedule: scores inside layers 2, 6 and 15 and drops right after them (`prune_layer=[3, 7, 16]`), keeping
  [300, 200, 110] visual tokens for the "192" setting, [303, 110, 36] for "128", [238, 48, 26] for "96" and
  [66, 30, 17] for "64" (576 visual tokens, 32 layers);
- recycling, on by default: of the dropped tokens the int(0.3 x dropped) + 1 best-scored are clustered into
  int(m / 10) + 1 groups by DPC-kNN (distances divided by sqrt(width), k nearest neighbours with k = the
  cluster count and the token itself included, density exp(-mean d^2), centres = top density x distance to
  a denser token); each group's mean is inserted after the kept visual tokens; later stages may drop or
  recycle merged tokens again;
- positions renumbered without gaps after each drop, decode continuing each layer's own count; the layers
  before a prune layer keep every token in their cache.
"""

import math

import torch

from .base import PruningStrategy
from .registry import register_strategy

LAYERS = (3, 7, 16)  # for 32 decoder layers
PRESETS = {192: [300, 200, 110], 128: [303, 110, 36], 96: [238, 48, 26], 64: [66, 30, 17]}


def choose_raters(visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Indices into `text` [t, d] of the raters for `visual` [v, d]: relevance above the mean."""
    relevance = torch.softmax(visual.float() @ text.float().T, dim=-1).mean(dim=0)  # [t]
    raters = (relevance > relevance.mean()).nonzero().reshape(-1)
    return raters if raters.numel() else relevance.argmax().reshape(1)


def density_peak_clusters(x: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN: (centres [c] indices into x, best first; assignment [n] cluster number of each row) for x [n, d].

    Distances are Euclidean divided by sqrt(d) (so the density does not underflow for wide features); the
    density of a row is exp(-mean squared distance to its c nearest rows, itself included)."""
    n, width = x.shape
    clusters = max(1, min(clusters, n))
    distance = torch.cdist(x.float(), x.float()) / math.sqrt(width)
    nearest = distance.topk(clusters, dim=1, largest=False).values
    density = torch.exp(-(nearest**2).mean(dim=1))
    denser = density[None, :] > density[:, None]  # [i, j]: j is denser than i
    to_denser = distance.masked_fill(~denser, float("inf")).amin(dim=1)
    to_denser = torch.where(torch.isinf(to_denser), distance.max(), to_denser)  # the densest rows
    order = torch.sort(density * to_denser, descending=True, stable=True).indices
    centres = order[:clusters]
    assignment = distance[:, centres].argmin(dim=1)
    assignment[centres] = torch.arange(clusters, device=x.device)
    return centres, assignment


@register_strategy("sparsevlm")
class SparseVLM(PruningStrategy):
    supports_token_merge = True
    token_merge_default = True
    positions = "compact"
    earlier_cache = "keep"

    def merge_tokens(self, dropped_hidden, dropped_scores, config, **ctx):
        n = dropped_scores.numel()
        recycled = min(n, int(config.merge_ratio * n) + 1)
        best = torch.sort(dropped_scores.float(), descending=True, stable=True).indices[:recycled]
        count = config.merge_clusters or int(recycled / 10) + 1
        centres, assignment = density_peak_clusters(dropped_hidden[best], count)
        members = dropped_hidden[best].float()
        merged = torch.stack([members[assignment == c].mean(0) for c in range(centres.numel())])
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

    @classmethod
    def schedule_defaults(cls, config, num_layers: int) -> dict:
        per_stage = any(isinstance(v, list) for v in (config.keep_tokens, config.score_threshold, config.keep_ratio))
        if not config.prune_layer_defaulted or per_stage:
            return {}  # the user chose the stages
        layers = sorted({min(num_layers - 1, max(1, round(num_layers * k / 32))) for k in LAYERS})
        updates = {"prune_layer": layers}
        if isinstance(config.keep_tokens, int) and config.score_threshold is None:
            budget = config.keep_tokens
            preset = PRESETS.get(budget) or [max(0, round(budget * k / 192)) for k in PRESETS[192]]
            updates["keep_tokens"] = preset[-len(layers) :] if len(layers) < len(preset) else preset
        return updates
