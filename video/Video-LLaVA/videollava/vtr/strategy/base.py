# Copied from image/LLaVA/llava/vtr/strategy/base.py
# Shared vtr file: edit it in image/LLaVA/llava/vtr, then `make fix-copies` updates every fork.
"""`PruningStrategy`: the one class a token-reduction method subclasses.

A method implements `compute_scores` (higher = keep); the framework does the rest. The attention it
receives is indexed as `[batch, heads, query, key]` over the current sequence (batch is always 1: the
framework calls once per sample). It is computed lazily: reading a few query rows costs memory for
those rows only, so index the rows you need before reducing (`attention[:, :, -1, :]`).

Selection rules (`select_tokens`, and the batched `select_batch` the engine uses; both give the same
result):

- budget priority keep_tokens > score_threshold > keep_ratio;
- `keep_ratio` keeps round-half-up(ratio x n) tokens (the reference implementation floors: 0.2222 x 576
  keeps 128 here, 127 there);
- `score_threshold` keeps the tokens scoring strictly above it, and at least one (the best) when the
  sample has any visual token, as the reference implementation does;
- kept tokens stay in their original order, ties keep the earlier token, NaN ranks below every number.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from ..config import StageBudget


class PruningStrategy(ABC):
    #: Registered name (set by `@register_strategy`).
    name: str = ""
    #: False for methods that never read `attention` (the framework then skips computing it).
    needs_attention: bool = True
    #: True for methods that call `ctx["vision_importance"]()` (the vision encoder's own attention); the
    #: framework then keeps the vision states it needs, also through generate().
    needs_vision_attention: bool = False
    #: True for methods that can recycle dropped tokens (`VTRConfig.token_merge=True` then calls
    #: `merge_tokens` and inserts its tokens among the kept ones).
    supports_token_merge: bool = False
    #: Whether recycling is on when `VTRConfig.token_merge` is left unset (None).
    token_merge_default: bool = False
    #: The backbone facts (ctx names an adapter declares in `BackboneAdapter.facts`) the method cannot run without,
    #: e.g. ("vision_layer", "project"): on a backbone lacking one, the method is refused when the config is set
    #: ("not supported on ...") and `--list` shows it unsupported there.
    requires: tuple[str, ...] = ()
    #: True for methods whose merged tokens are the method itself (VisionZip's contextual tokens, the pool
    #: baseline), not an add-on: `convention="common"` then keeps merging (it turns add-ons such as SparseVLM's off).
    merge_is_method: bool = False

    # The conventions of the method's official code (config.CONVENTIONS; a VTRConfig field of the same name,
    # or `convention="common"`, overrides them). Declared here so `--describe` shows them.
    #: "previous": score with the attention inside layer K-1 (FastV); "own": layer K's own q/k on its input.
    scoring_layer: str = "previous"
    #: "original": kept tokens keep their prompt positions; "compact": renumbered without gaps after each drop.
    positions: str = "original"
    #: "keep": layers before K keep every token in their KV cache; "trim": their cache keeps the kept tokens only.
    earlier_cache: str = "keep"
    #: The positions convention of the method's official port to M-RoPE backbones (Qwen-VL) where it differs from
    #: `positions` (None: the same): those ports compute the M-RoPE ids of the whole prompt first and gather the
    #: kept tokens' ids ("original"), where the LLaVA code splices a shortened image in ("compact").
    mrope_positions: str | None = None

    def merge_tokens(self, dropped_hidden: torch.Tensor, dropped_scores: torch.Tensor, config, **ctx):
        """For `supports_token_merge` methods with `token_merge=True`: the tokens to insert among a sample's kept
        tokens, made from the dropped ones. dropped_hidden: [n, hidden] their states at the prune point;
        dropped_scores: [n]. ctx: `stage`, `layer_idx`, `dropped_index` / `kept_index` (rows of the dropped /
        kept visual tokens in the current sequence), `image_token_range`, and `vtr_ctx` (the sample's context,
        with everything `compute_scores` got: facts, `visual_grid`, `vision_features`, ...).
        Returns (merged [m, hidden], representative [m] indices into the dropped tokens: each merged token
        takes that token's RoPE position and identity[, after [m] current-sequence rows: each merged token goes
        right after that row, a kept or dropped one, in the given order among equals; default: after the last
        kept visual token[, mix [m, n] (dense or sparse COO): when merged = mix @ the dropped tokens' states, those weights, so the
        adapter mixes its per-token extras alike (Qwen3-VL's DeepStack features); default: the representative's]]),
        or None to insert nothing."""
        return None

    @abstractmethod
    def compute_scores(self, attention, image_token_range: tuple[int, int], config, **ctx) -> torch.Tensor:
        """Return one score per position in `range(*image_token_range)` (higher = keep).

        attention: lazy `[1, heads, seq, seq]` float32 causal attention probabilities of the scoring layer
            over the current (possibly already pruned) sequence of this sample (trailing padding excluded),
            or None when `needs_attention` is False; `attention.keys` are that layer's keys (RoPE applied).
        image_token_range: `(start, end)` of the visual tokens in the current sequence; with several
            images or non-contiguous frames it spans all of them and the scores of text inside are ignored.
        ctx: `layer_idx` (0-based scoring layer; -1 for a pre-LLM stage, prune_layer=0), `stage` (0-based
            prune stage), `hidden_states` (`[1, seq, hidden]`, the input of prune layer K: the output of layer
            K-1, which is the scoring layer under scoring_layer="previous" except on a hybrid decoder whose
            scoring layer lies further back, the nearest attention layer; at a pre-LLM stage the merged input
            embeddings), `image_token_indices` (LongTensor of the visual positions), `position_ids` (RoPE positions of the current tokens), `batch_index`,
            `anchor_index` (the backbone's question-free row after the visual span), `prior_attention`
            (a callable: `prior_attention(end)` runs the prompt cut before row `end` through the layers
            up to the scoring layer, earlier stages' drops applied, and returns that layer's lazy
            attention over the cut prompt; PriorTR-2F's explicit prior forward), `original_index` (the
            prompt position of each current row: a token's identity across stages), `valid` ([seq] bool: False
            for the sample's padding rows), `snapshots`
            ({layer: (hidden [1, seq_then, hidden], original index [seq_then])} for the layers named by
            `snapshot_layers`, and -1: the input embeddings), `final_norm` (the language model's final norm
            module, as its lm_head input gets it), backbone facts from the adapter (e.g.
            `patch_grid`; and callables computed on request: `visual_grid()` -> [num_visual, 3] (group,
            row, col) with -1 for tokens off any grid, `vision_importance()` -> [num_visual] the vision
            encoder's own attention to each visual token), and `vtr_ctx`: a dict that lives for one forward
            pass of one sample, shared by all its prune stages.
        """

    @classmethod
    def stage_needs_attention(cls, stage: int, config) -> bool:
        """Whether prune stage `stage` reads `attention` (default: `needs_attention`, at every stage). A method whose
        first stage runs before the LLM and a later one inside it (HoliTom) says which; a stage at prune layer 0
        never gets attention under `scoring_layer="previous"`."""
        return cls.needs_attention

    def stage_positions(self, stage: int, positions: str, config) -> str:
        """The positions convention of prune stage `stage`, given the run's (`positions`: the method's official
        one, or the one the config chose). Default: the same at every stage. A method whose official code
        renumbers at one stage and keeps the gaps at another (HoliTom: its pre-LLM splice renumbers, its inner
        merge keeps positions) overrides it where `config.positions` is unset."""
        return positions

    def vision_layers(self, config, tower: dict) -> tuple[int, ...]:
        """Vision-tower layers (0-based, negative from the end) whose attention this method reads through
        `ctx["vision_layer"](i)`, for the tower `tower` (`ctx["vision_tower"]`: its `depth` and whether it has a
        `cls` token): the adapter keeps their inputs when it encodes, and recomputes those layers only."""
        return ()

    def snapshot_layers(self, config) -> tuple[int, ...]:
        """Decoder layers whose output hidden states this method reads later (`ctx["snapshots"]`; -1, the
        input embeddings, is always there)."""
        return ()

    @classmethod
    def schedule_defaults(cls, config, num_layers: int) -> dict:
        """Field values this method uses for what the user left unset (`config.prune_layer_defaulted`,
        `config.budget_defaulted`), for a decoder of `num_layers` layers. Default: nothing."""
        return {}

    def select_tokens(self, scores: torch.Tensor, num_tokens: int, config, stage: int = 0) -> torch.Tensor:
        """Indices (ascending, into `scores`) of the tokens to keep; override for methods that select
        rather than score (the engine then calls it once per sample)."""
        scores = scores.detach().float().reshape(1, -1)
        if scores.shape[1] != num_tokens:
            raise ValueError(f"select_tokens got {scores.shape[1]} scores for {num_tokens} tokens")
        visual = torch.ones_like(scores, dtype=torch.bool)
        keep = select_batch(scores, visual, config.stage_budget(stage))
        return keep[0].nonzero().reshape(-1)

    def ratio_keep_count(self, config, stage: int, current: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        """[batch] how many visual tokens a `keep_ratio` budget keeps at `stage`, given the visual tokens still
        there (`current`, [batch] long) and the prompt's (`original`). Default: round half up of ratio x
        current. Override for a method whose official code counts otherwise (PyramidDrop: of the original)."""
        return ratio_count(current, config.stage_budget(stage).keep_ratio)

    @classmethod
    def missing_facts(cls, adapter) -> list[str]:
        """The facts this method `requires` that `adapter` (a `BackboneAdapter` or its class) does not give."""
        return [fact for fact in cls.requires if fact not in getattr(adapter, "facts", ())]

    @classmethod
    def count_error(cls) -> ValueError:
        """The error of a method that keeps a count of tokens, given a score_threshold budget."""
        return ValueError(
            f"{cls.name} keeps a fixed number of tokens: give keep_tokens or keep_ratio, not score_threshold"
        )

    def _token_count(self, config, stage: int, num_tokens: int) -> int:
        """`_budget_count` for methods that need a count: a score_threshold budget is refused (`count_error`)."""
        count = self._budget_count(config, stage, num_tokens)
        if count is None:
            raise self.count_error()
        return count

    def _budget_count(self, config, stage: int, num_tokens: int) -> int | None:
        """How many of `num_tokens` visual tokens this stage keeps (None for a score threshold): for methods
        that select a set rather than rank tokens."""
        budget = config.stage_budget(stage)
        if budget.keep_tokens is not None:
            return min(budget.keep_tokens, num_tokens)
        if budget.score_threshold is not None:
            return None
        return min(num_tokens, math.floor(budget.keep_ratio * num_tokens + 0.5))

    def _query_rows(self, seq_len: int, image_token_range: tuple[int, int], config) -> list[int]:
        """Query rows chosen by `config.query_aggregation`: the last token, or every token after the image.
        Python ints: per-sample attention views can then share rows computed once for the batch."""
        end = image_token_range[1]
        if config.query_aggregation == "question" and end < seq_len:
            return list(range(end, seq_len))
        return [seq_len - 1]

    def _aggregate_attention(self, attention, image_token_range: tuple[int, int], config, rows=None) -> torch.Tensor:
        """Attention each image-range token receives, in float32: the query rows (default: those of
        `config.query_aggregation`) averaged per head first, then heads combined by
        `config.head_aggregation` (the reference implementation's order, which its published numbers use)."""
        start, end = image_token_range
        if rows is None:
            rows = self._query_rows(attention.shape[-1], image_token_range, config)
        per_head = attention[:, :, rows, start:end].float().mean(dim=2)  # [1, heads, num_img]
        heads = per_head.amax(dim=1) if config.head_aggregation == "max" else per_head.mean(dim=1)
        return heads.reshape(-1)


class MarkedSelection(PruningStrategy):
    """A method that picks its kept set itself: `compute_scores` gives its picks finite scores and every other
    token -inf, and `select_tokens` keeps exactly the picks (DART, VisionZip, the per-view selections, pool)."""

    @staticmethod
    def marked(keep: torch.Tensor, values: torch.Tensor, image_token_range, rows) -> torch.Tensor:
        """The scores of picks `keep` ([n] bool over the visual `rows`): `values` there, -inf elsewhere."""
        start, end = image_token_range
        scores = torch.full((end - start,), -float("inf"), device=rows.device)
        scores[rows[keep] - start] = values[keep].float().to(rows.device)
        return scores

    def select_tokens(self, scores, num_tokens, config, stage=0):
        return (scores.reshape(-1) > -float("inf")).nonzero().reshape(-1)


def select_batch(scores: torch.Tensor, visual: torch.Tensor, budget: StageBudget, limit=None) -> torch.Tensor:
    """Top-K over a batch without host syncs: `[batch, seq]` bool of the visual tokens to keep.

    scores: [batch, seq] float (only visual positions are read); visual: [batch, seq] bool; limit: [batch]
    counts for a keep_ratio budget (default: round half up of ratio x the visual count).
    """
    values = scores.float()
    nan = torch.isnan(values)
    order = torch.sort(values.masked_fill(nan, -math.inf), dim=1, descending=True, stable=True).indices
    # then, stably, numbers (-inf included) before NaN before non-visual positions
    tier = (nan.to(torch.int8) + 2 * (~visual).to(torch.int8)).gather(1, order)
    order = order.gather(1, torch.sort(tier, dim=1, stable=True).indices)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
    )
    if budget.keep_tokens is None and budget.score_threshold is not None:
        above = visual & (scores > budget.score_threshold)  # NaN compares False
        best = visual & (rank == 0)
        return above | (best & ~above.any(dim=1, keepdim=True))
    counts = visual.sum(dim=1, keepdim=True)
    if budget.keep_tokens is not None:
        limit = counts.clamp_max(budget.keep_tokens)
    elif limit is not None:
        limit = limit.reshape(-1, 1).to(counts.device).clamp_max(counts)
    else:
        limit = ratio_count(counts, budget.keep_ratio)
    return visual & (rank < limit)


def ratio_count(counts: torch.Tensor, ratio: float) -> torch.Tensor:
    """How many of `counts` tokens a keep_ratio keeps: round half up, in float64 like Python's
    math.floor(ratio * n + 0.5), never more than there are."""
    return torch.floor(counts.double() * ratio + 0.5).long().clamp_max(counts)
