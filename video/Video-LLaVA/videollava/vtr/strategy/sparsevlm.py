# Copied from image/LLaVA/llava/vtr/strategy/sparsevlm.py
# Shared vtr file: edit it in image/LLaVA/llava/vtr, then `make fix-copies` updates every fork.
"""SparseVLM (Zhang et al., 2024): visual tokens rated by the text tokens that are relevant to the image.

Raters are chosen once per sample, from the input embeddings: for each visual token a softmax over the text
tokens of the question (those after the visual span) of the visual-text similarity, averaged over the
visual tokens; the raters are the text tokens above the mean. A visual token's score is the attention the
raters pay it at the scoring layer (rows averaged per head, heads by `head_aggregation`). Later stages reuse
the same raters. (The paper's optional recycling of dropped tokens into merged ones is not available: it
needs an engine hook for inserted tokens, see docs/engine.md.)
"""

import torch

from .base import PruningStrategy
from .registry import register_strategy


def choose_raters(visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Indices into `text` [t, d] of the raters for `visual` [v, d]: relevance above the mean."""
    relevance = torch.softmax(visual.float() @ text.float().T, dim=-1).mean(dim=0)  # [t]
    raters = (relevance > relevance.mean()).nonzero().reshape(-1)
    return raters if raters.numel() else relevance.argmax().reshape(1)


@register_strategy("sparsevlm")
class SparseVLM(PruningStrategy):
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
