# Copied from image/LLaVA/llava/vtr/strategy/priortr.py
# Shared vtr file: edit it in image/LLaVA/llava/vtr, then `make fix-copies` updates every fork.
"""PriorTR: rank image tokens by their V-information S = P * log(P / Q).

P is the attention the task query rows (`query_aggregation`) pay to each image token; Q is the attention
paid by the anchor (`ctx["anchor_index"]`, the backbone's question-free row: LLaVA's first token after the
image, InternVL's `\n` after `</img>`), which under the causal mask sees only the prefix and the image and so
carries a question-independent prior. Both are head-aggregated and normalised to sum 1
over the image tokens. A token scores high when the question attends to it much more than the prior
does, even if its raw P is not the largest. Computed in float32, never cast back before Top-K.
"""

import torch

from .base import PruningStrategy
from .registry import register_strategy


@register_strategy("priortr")
class PriorTR(PruningStrategy):
    def compute_scores(self, attention, image_token_range, config, **ctx):
        anchor = ctx.get("anchor_index", image_token_range[1])
        seq_len = attention.shape[-1]
        if anchor >= seq_len:  # image at the very end: no anchor row exists, fall back to the query rows
            anchor = seq_len - 1
        p = self._aggregate_attention(attention, image_token_range, config)
        q = self._aggregate_attention(attention, image_token_range, config, rows=[anchor])
        return v_information(p, q, config.priortr_eps)


def v_information(p: torch.Tensor, q: torch.Tensor, eps: float) -> torch.Tensor:
    """S = P * log(P / Q) on distributions normalised to sum 1, with eps inside the log; NaN/inf -> 0."""
    p = p.float().clamp_min(0)
    q = q.float().clamp_min(0)
    p = p / p.sum().clamp_min(torch.finfo(torch.float32).tiny)
    q = q / q.sum().clamp_min(torch.finfo(torch.float32).tiny)
    scores = p * (torch.log(p + eps) - torch.log(q + eps))
    return torch.nan_to_num(scores, nan=0.0, posinf=0.0, neginf=0.0)
