"""`PruningStrategy`: the one class a token-reduction method subclasses.

A method implements `compute_scores` (higher = keep); the framework does the rest. The attention it
receives is indexed as `[batch, heads, query, key]` over the current sequence (batch is always 1: the
framework calls once per sample). It is computed lazily: reading a few query rows costs memory for
those rows only, so index the rows you need before reducing (`attention[:, :, -1, :]`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch


class PruningStrategy(ABC):
    #: Registered name (set by `@register_strategy`).
    name: str = ""
    #: False for methods that never read `attention` (the framework then skips computing it).
    needs_attention: bool = True

    @abstractmethod
    def compute_scores(self, attention, image_token_range: tuple[int, int], config, **ctx) -> torch.Tensor:
        """Return one score per position in `range(*image_token_range)` (higher = keep).

        `ctx` holds `layer_idx` (0-based index of the scoring layer), `hidden_states` (that layer's output,
        `[1, seq, hidden]`), `image_token_indices` (positions of the image tokens; with several images the
        range also spans the text between them, whose scores are ignored), `stage` (0-based prune stage),
        `position_ids`, `batch_index`, and `vtr_ctx`: a dict that lives for one forward pass of one
        sample, shared by all its prune stages, for a method's own state.
        """

    def select_tokens(self, scores: torch.Tensor, num_tokens: int, config, stage: int = 0) -> torch.Tensor:
        """Indices (ascending, into `scores`) of the tokens to keep.

        Budget priority: keep_tokens > score_threshold > keep_ratio. Ties keep the earlier token.
        NaN scores rank below every number.
        """
        budget = config.stage_budget(stage)
        scores = scores.detach().float().reshape(-1)
        if scores.numel() != num_tokens:
            raise ValueError(f"select_tokens got {scores.numel()} scores for {num_tokens} tokens")
        scores = torch.nan_to_num(scores, nan=-math.inf)
        if budget.keep_tokens is not None:
            k = min(budget.keep_tokens, num_tokens)
        elif budget.score_threshold is not None:
            return torch.nonzero(scores >= budget.score_threshold).reshape(-1)
        else:
            k = min(num_tokens, math.floor(budget.keep_ratio * num_tokens + 0.5))
        if k >= num_tokens:
            return torch.arange(num_tokens, device=scores.device)
        order = torch.sort(scores, descending=True, stable=True).indices
        return torch.sort(order[:k]).values

    def _query_rows(self, seq_len: int, image_token_range: tuple[int, int], config) -> torch.Tensor:
        """Query rows chosen by `config.query_aggregation`: the last token, or every token after the image."""
        end = image_token_range[1]
        if config.query_aggregation == "question" and end < seq_len:
            return torch.arange(end, seq_len)
        return torch.tensor([seq_len - 1])

    def _aggregate_attention(self, attention, image_token_range: tuple[int, int], config, rows=None) -> torch.Tensor:
        """Attention each image-range token receives, in float32: mean over `rows` (default: the query rows
        of `config.query_aggregation`), heads combined by `config.head_aggregation`."""
        start, end = image_token_range
        if rows is None:
            rows = self._query_rows(attention.shape[-1], image_token_range, config)
        block = attention[:, :, rows, start:end].float()  # [1, heads, rows, num_img]
        heads = block.amax(dim=1) if config.head_aggregation == "max" else block.mean(dim=1)
        return heads.mean(dim=1).reshape(-1)
