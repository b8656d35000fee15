# Copied from image/LLaVA/llava/vtr/strategy/priortr_2f.py
# Shared vtr file: edit it in image/LLaVA/llava/vtr, then `make fix-copies` updates every fork.
"""PriorTR-2F: PriorTR with an explicit prior forward (two forwards instead of one row of the same forward).

The prompt cut right after the visual span's anchor (prefix + visuals, no question) runs on its own through
the decoder layers up to the scoring layer K-1; Q is its last row's attention to the visual tokens at layer
K-1 (the same layer as P), P is the query rows' attention of the full prompt; S = P log(P / Q). Under causal
attention the cut prompt's last row equals single-forward PriorTR's anchor row, so both rank alike; this
variant is for backbones or kernels where the anchor row of the full forward is not question-free.
Multi-stage: a prior per stage, with the earlier stages' drops applied in the prior forward too.
"""

from .base import PruningStrategy
from .priortr import v_information
from .registry import register_strategy


@register_strategy("priortr_2f")
class PriorTR2F(PruningStrategy):
    def compute_scores(self, attention, image_token_range, config, **ctx):
        anchor = min(ctx["anchor_index"], attention.shape[-1] - 1)
        prior = ctx["prior_attention"](anchor + 1)  # [1, heads, anchor + 1, anchor + 1]
        p = self._aggregate_attention(attention, image_token_range, config)
        q = self._aggregate_attention(prior, image_token_range, config, rows=[anchor])
        return v_information(p, q, config.priortr_eps)
