# Copied from image/LLaVA/llava/vtr/strategy/cdpruner.py
# Shared vtr file: edit it in image/LLaVA/llava/vtr, then `make fix-copies` updates every fork.
"""CDPruner (Zhang et al., 2025): keep the visual tokens of greatest diversity conditioned on the instruction.

As the official code (Theia-4869/CDPruner, `llava_arch.py` `encode_images`): before the LLM (`prune_layer=0` by
default), on the projected visual features spliced into the prompt, whose kept tokens then get contiguous
positions. The kept set is the MAP of a conditional determinantal point process:
- similarity S: cosine of the visual features (normalised in the model's dtype, the product in float32);
- relevance r: cosine of each visual token with the instruction, min-max scaled over the sample's visual tokens
  as (r - min + 1e-6) / (max - min) (all equal: r = 1, a pure diversity kernel);
- kernel L = diag(r) S diag(r); the fast greedy MAP of Chen et al. (incremental Cholesky): d = diag(L), pick
  j = argmax d (ties: the first index), e = (L_j - sum_t c_t[j] c_t) / sqrt(d_j), d -= e^2, d_j = -inf, until the
  stage's budget is picked.
Checkpoints carry no CLIP text tower, so the instruction is the language model's own input embeddings of the
text after the visual span (the question; without one, every non-visual token before it), mean-pooled, as the
OpenVINO port does; the official code negates its CLIP relevance, this does not (see docs/methods.md). When the
greedy gain runs out (d_j <= 0 or NaN: the kernel's rank is used up), the remaining picks go by relevance
(ties: the first index). One budget over all the sample's visual tokens (images, tiles, frames, row newlines);
at a later prune layer the same on that layer's hidden states. The scores encode the pick order (earlier =
higher), so Top-K keeps exactly the greedy set. Needs a token count: keep_tokens or keep_ratio.
"""

import torch

from .base import PruningStrategy
from .registry import register_strategy


def conditional_kernel(visual: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel [n, n], relevance [n]) in float32 for visual features [n, d] and text features [t, d] (t may be 0)."""
    unit = torch.nn.functional.normalize(visual, dim=-1).float()  # in the features' dtype, as the official code
    kernel = unit @ unit.T  # S, then diag(r) S diag(r) in place: one [n, n] buffer
    query = text.float().mean(dim=0) if text.shape[0] else visual.new_zeros(visual.shape[-1], dtype=torch.float32)
    cosine = torch.nn.functional.normalize(visual.float(), dim=-1) @ torch.nn.functional.normalize(query, dim=0)
    low, high = cosine.min(), cosine.max()
    relevance = torch.where(high > low, (cosine - low + 1e-6) / (high - low), torch.ones_like(cosine))
    return kernel.mul_(relevance[:, None]).mul_(relevance[None, :]), relevance


def greedy_map(kernel: torch.Tensor, picks: int, fallback: torch.Tensor) -> torch.Tensor:
    """The first `picks` indices of the fast greedy MAP of a DPP with `kernel` [n, n], in pick order; once the
    gain is used up (d_j <= 0 or NaN) the rest follow `fallback` [n] descending (ties: the first index).
    One [n] update per pick and no host sync."""
    n = kernel.shape[0]
    picks = min(picks, n)
    order = torch.empty(picks, dtype=torch.long, device=kernel.device)
    factors = torch.zeros(picks, n, dtype=kernel.dtype, device=kernel.device)
    gain = kernel.diagonal().clone()
    rest = fallback.float().clone()
    alive = torch.ones(1, dtype=torch.bool, device=kernel.device)
    for i in range(picks):
        best = gain.argmax().reshape(1)
        gain_j = gain.index_select(0, best)
        alive = alive & (gain_j > 0)  # False for NaN too; stays False
        j = torch.where(alive, best, rest.argmax().reshape(1))
        order[i : i + 1] = j
        projected = factors[:i].index_select(1, j).reshape(-1) @ factors[:i]  # sum_t c_t[j] c_t
        e = (kernel.index_select(0, j).reshape(-1) - projected) / gain_j.sqrt()
        factors[i] = torch.where(alive, e, torch.zeros_like(e))
        gain = gain - factors[i] ** 2
        gain.index_fill_(0, j, -float("inf"))
        rest.index_fill_(0, j, -float("inf"))
    return order


@register_strategy("cdpruner")
class CDPruner(PruningStrategy):
    needs_attention = False
    positions = "compact"

    @classmethod
    def schedule_defaults(cls, config, num_layers: int) -> dict:
        for stage in range(len(config.prune_layers)):
            budget = config.stage_budget(stage)
            if budget.keep_tokens is None and budget.score_threshold is not None:
                raise cls.count_error()
        return {"prune_layer": 0} if config.prune_layer_defaulted else {}

    def compute_scores(self, attention, image_token_range, config, **ctx):
        start, end = image_token_range
        rows = ctx["image_token_indices"]
        picks = self._token_count(config, ctx["stage"], rows.numel())
        hidden = ctx["hidden_states"][0]
        text = hidden[end:]  # the question after the visual span (trailing padding is not in hidden)
        if text.shape[0] == 0:  # no text after the visuals: every non-visual token before them
            text = hidden[:start][ctx["valid"][:start]]  # not the left padding
        kernel, relevance = conditional_kernel(hidden[rows], text)
        order = greedy_map(kernel, picks, relevance)
        scores = torch.full((end - start,), -float("inf"), device=rows.device)
        scores[rows[order] - start] = -torch.arange(order.numel(), device=rows.device, dtype=torch.float32)
        return scores
