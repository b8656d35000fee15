# Copied from image/LLaVA/llava/vtr/config.py
# Shared vtr file: edit it in image/LLaVA/llava/vtr, then `make fix-copies` updates every fork.
"""`VTRConfig`: every knob of visual token reduction, validated on construction.

Every field here is settable by name from the command line (lmms-eval `--model_args`), so a new field
needs no other code to be usable: give it a type annotation, a default and, if it has a range, a check
in `__post_init__`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, fields
from typing import NamedTuple

logger = logging.getLogger(__name__)

# Framework defaults. When no budget is given, a backbone's adapter replaces DEFAULT_KEEP_TOKENS with its
# own (`BackboneAdapter.default_keep_tokens`: LLaVA-1.5 192, LLaVA-1.6 320) when the config is set.
DEFAULT_PRUNE_LAYER = 3
DEFAULT_KEEP_TOKENS = 192

QUERY_AGGREGATIONS = ("last", "question")
FASTVID_TREES = ("auto", "onevision", "llava_video", "qwen2_5_vl")
HEAD_AGGREGATIONS = ("mean", "max")

# The engine conventions a method inherits from its paper (see `PruningStrategy`): each a strategy attribute
# (the official choice), overridable per config. `convention="common"` runs every method under COMMON.
CONVENTIONS = {
    # whose attention scores a stage at prune layer K: layer K-1's (computed inside it, FastV) or layer K's own
    # q/k applied to the hidden states entering it (PyramidDrop)
    "scoring_layer": ("previous", "own"),
    # RoPE positions of the kept tokens: the prompt's original ones (gaps where tokens were dropped), or
    # renumbered without gaps after each drop, decode continuing each layer's own numbering
    "positions": ("original", "compact"),
    # KV cache of the layers before a prune layer: kept whole (decode steps there still see every token), or
    # trimmed to the kept tokens (CLSE)
    "earlier_cache": ("keep", "trim"),
}
COMMON_CONVENTIONS = {"scoring_layer": "previous", "positions": "original", "earlier_cache": "keep"}
CONVENTION_MODES = ("official", "common")


#: the video methods' own numeric fields: (lowest, highest) allowed; integer bounds mean an integer field
_VIDEO_RANGES = {
    "fastvid_segments": (1, 10**6),
    "fastvid_tau": (-1.0, 1.0),
    "fastvid_anchor_share": (0.0, 1.0),
    "fastvid_anchor_stride": (1, 10**6),
    "fastvid_beta": (0.0, 1.0),
    "holitom_tau": (-1.0, 1.0),
    "holitom_beta": (0.0, 1.0),
    "holitom_neighbours": (1, 10**6),
    "holitom_layer": (1, 10**6),
    "holitom_inner_ratio": (0.0, 1.0),
    "dycoke_layer": (1, 10**6),
    "dycoke_decode_prune": (0.0, 1.0),
    "dycoke_gate": (-1.0, 1.0),
    "framefusion_threshold": (-1.0, 1.0),
    "framefusion_cost": (0.0, 1.0),
    "framefusion_min_similar": (0.0, 1.0),
}


class StageBudget(NamedTuple):
    """The budget of one prune stage, already resolved from scalar-or-list fields."""

    keep_tokens: int | None
    score_threshold: float | None
    keep_ratio: float | None

    def describe(self) -> str:
        if self.keep_tokens is not None:
            return f"keep_tokens={self.keep_tokens}"
        if self.score_threshold is not None:
            return f"score_threshold={self.score_threshold}"
        return f"keep_ratio={self.keep_ratio}"


class Conventions(NamedTuple):
    """The engine conventions one run uses, resolved from the config and the method (`VTRConfig.conventions`)."""

    scoring_layer: str
    positions: str
    earlier_cache: str
    token_merge: bool


class VTRConfigError(ValueError):
    """A `VTRConfig` value is out of range; the message names the field, the value and what is allowed."""


def _bad(name: str, value, allowed: str) -> VTRConfigError:
    return VTRConfigError(f"VTRConfig.{name}={value!r} is invalid: {allowed}.")


def _as_list(value) -> list | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


@dataclass
class VTRConfig:
    """Configuration of visual token reduction.

    enabled: False runs the stock model untouched (the unpruned baseline, at no cost).
    strategy: name of a registered strategy (`fastv`, `priortr`, `random`, ... or yours); `none` means
        enabled=False.
    prune_layer: K or a strictly increasing list [K1, K2, ...]. The first K decoder layers see every token,
        scores come from layer index K-1, layers from index K on run on the kept tokens only. K=0 (pre-LLM:
        every decoder layer runs on the kept tokens) is for strategies that read no attention; they
        score from `ctx["hidden_states"]`, the merged input embeddings, and the adapter's facts.
    keep_tokens / score_threshold / keep_ratio: the budget, a scalar or one value per prune layer.
        Priority keep_tokens > score_threshold > keep_ratio. If none is given, keep_tokens=192
        (`budget_defaulted` is then True, and the model replaces it with its backbone's default).
        With several images in one prompt the budget is global: it counts the image tokens kept
        across all images of that prompt (see docs/adding-a-method.md, "Budgets").
    query_aggregation: which query rows score the image tokens: `last` (the last token) or `question`
        (every token after the last image token).
    head_aggregation: how heads are combined: `mean` or `max`.
    seed: seed of the `random` baseline (and of FastVID's density tie-breaking noise).
    priortr_eps: epsilon added to P and Q inside PriorTR's log ratio.
    important_ratio: VisPruner's share of the budget kept as important tokens (by the vision encoder's
        own attention); the rest is filled with diverse tokens.
    clse_cutoff: CLSE's Gaussian high-pass cutoff sigma, as a fraction of min(h//2, w//2) of the token grid.
    clse_temperature: CLSE's sigmoid temperature on the z-scored evolution factor.
    clse_reference_layer: CLSE's reference: the hidden states entering that decoder layer (0 = the input
        embeddings, the default; it must come before the first prune layer).
    pivot_image_tokens / pivot_text_tokens: DART's pivots, the image tokens and the tokens after the image
        with the largest key norms (4 + 4, the official setting).
    contextual_tokens: VisionZip's merged (contextual) tokens per view out of its share of the budget; None =
        round(share x 10/64), the official 54 + 10 split of 64 tokens.
    hiprune_alpha / hiprune_layer: HiPrune's share of a view's budget for anchors and their buffers (anchors =
        round(share x alpha / 5)), and the vision layer (0-based; negative from the end) whose received attention
        picks the anchors (the official 0.1; None = the official layer: the 9th of CLIP's 24, the 16th of
        Qwen2.5-VL's 32 blocks, at the same relative depth in other towers).
    Video methods (docs/methods.md; the budget is the share of the video tokens kept, see strategy/video.py):
    fastvid_segments / fastvid_tau: FastVID's segmentation: at least that many segments (as frames allow), cut at the lowest
        adjacent-frame similarities and at every one below tau; fastvid_anchor_share (d): the share of a frame's
        budget given to density anchors; fastvid_anchor_stride (p): an anchor frame every p frames from each
        segment's end; fastvid_beta: the least weight an anchor keeps in its merged token; fastvid_tree: which
        official code tree's rules to follow: "auto" the backbone's ("llava_video" when a video's frames close every
        row with a newline, LLaVA-Video's grid layout; "qwen2_5_vl" on M-RoPE backbones; "onevision" elsewhere), or
        "onevision", "llava_video", "qwen2_5_vl" on any backbone (fastvid_tau stays as set: the Qwen2.5-VL script
        uses 0.84).
    holitom_tau: HoliTom's similarity above which a token is static between frames; holitom_beta: a static
        cluster's weight on its centre; holitom_neighbours: the k of its DPC-kNN; holitom_layer /
        holitom_inner_ratio: the decoder layer of its inner merge (None = the official 18 of 28 layers, at the same
        depth elsewhere) and the share of the visual tokens merged away there (0 = no inner merge).
    dycoke_layer (L): DyCoke's decode-time pruning reads layer L-1's attention and prunes layers >= L;
        dycoke_decode_prune: the share of the visual cache a decode step drops (0 = none); dycoke_gate: a step
        prunes only when its attention's cosine to the previous step's is below this.
    framefusion_threshold: FrameFusion's cosine from which a token merges into the same place in the frame before;
        framefusion_cost: the mean share of video tokens over the layers (its budget); framefusion_min_similar:
        merging stops once fewer than this share of the tokens are similar.
    token_merge: recycle dropped tokens into merged ones inserted after the kept visual tokens (methods
        with `supports_token_merge`, e.g. sparsevlm); None = the method's own default (SparseVLM: on).
        merge_ratio: int(merge_ratio x dropped) + 1 of the best-scored dropped tokens are recycled;
        merge_clusters: how many merged tokens (0 = int(recycled / 10) + 1, SparseVLM's count).
    convention: `official` (each method runs with the conventions of its official code) or `common` (every
        method runs with scoring_layer=previous, positions=original, earlier_cache=keep: an apples-to-apples
        comparison). scoring_layer / positions / earlier_cache: override one convention (None = as
        `convention` says); see CONVENTIONS and docs/methods.md.

    A field left unset may be filled by the model when the config is set on it: the budget by the
    backbone's default (`budget_defaulted`), and a method's own schedule (e.g. PDrop's three stages) when
    `prune_layer` and the budget were not given (`prune_layer_defaulted`). An explicit value always wins.
    """

    enabled: bool = True
    strategy: str = "fastv"
    prune_layer: int | list[int] | None = None  # None = DEFAULT_PRUNE_LAYER, or the method's schedule
    keep_tokens: int | list[int] | None = None
    score_threshold: float | list[float] | None = None
    keep_ratio: float | list[float] | None = None
    query_aggregation: str = "last"
    head_aggregation: str = "mean"
    seed: int = 0
    priortr_eps: float = 1e-6
    important_ratio: float = 0.5
    clse_cutoff: float = 0.1
    clse_temperature: float = 0.1
    clse_reference_layer: int = 0
    pivot_image_tokens: int = 4
    pivot_text_tokens: int = 4
    contextual_tokens: int | None = None
    hiprune_alpha: float = 0.1
    hiprune_layer: int | None = None
    fastvid_segments: int = 8
    fastvid_tau: float = 0.9
    fastvid_anchor_share: float = 0.4
    fastvid_anchor_stride: int = 4
    fastvid_beta: float = 0.6
    fastvid_tree: str = "auto"
    holitom_tau: float = 0.8
    holitom_beta: float = 0.6
    holitom_neighbours: int = 7
    holitom_layer: int | None = None
    holitom_inner_ratio: float = 0.5
    dycoke_layer: int = 3
    dycoke_decode_prune: float = 0.8
    dycoke_gate: float = 0.9
    framefusion_threshold: float = 0.6
    framefusion_cost: float = 0.3
    framefusion_min_similar: float = 0.1
    token_merge: bool | None = None
    merge_ratio: float = 0.3
    merge_clusters: int = 0
    convention: str = "official"
    scoring_layer: str | None = None
    positions: str | None = None
    earlier_cache: str | None = None
    # Filled in __post_init__: the prune layers as a sorted list; which fields were left to defaults.
    prune_layers: list[int] = field(init=False, repr=False, compare=False, default_factory=list)
    budget_defaulted: bool = field(init=False, repr=False, compare=False, default=False)
    prune_layer_defaulted: bool = field(init=False, repr=False, compare=False, default=False)

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise _bad("enabled", self.enabled, "must be True or False")
        if not isinstance(self.strategy, str) or not self.strategy:
            raise _bad("strategy", self.strategy, "must be a strategy name")
        self.strategy = self.strategy.strip().lower()
        if self.strategy == "none":
            self.enabled = False

        if self.prune_layer is None:
            self.prune_layer = DEFAULT_PRUNE_LAYER
            self.prune_layer_defaulted = True
        layers = _as_list(self.prune_layer)
        if not layers:
            raise _bad("prune_layer", self.prune_layer, "give at least one decoder layer index")
        for k in layers:
            if isinstance(k, bool) or not isinstance(k, int) or k < 0:
                raise _bad(
                    "prune_layer",
                    self.prune_layer,
                    "each prune layer must be a decoder layer index: an integer >= 0 (0 = before the first "
                    "decoder layer, for methods that allow it)",
                )
        if any(b <= a for a, b in zip(layers, layers[1:])):
            raise _bad("prune_layer", self.prune_layer, "a list of prune layers must be strictly increasing")
        self.prune_layers = layers

        if self.keep_tokens is None and self.score_threshold is None and self.keep_ratio is None:
            self.keep_tokens = DEFAULT_KEEP_TOKENS
            self.budget_defaulted = True
        self._check_budget("keep_tokens", self._valid_keep_tokens, "an integer >= 0")
        self._check_budget("score_threshold", self._valid_threshold, "a finite number")
        self._check_budget("keep_ratio", self._valid_ratio, "a number in [0, 1]")
        counts = self.keep_tokens if isinstance(self.keep_tokens, (list, tuple)) else []
        if any(b > a for a, b in zip(counts, counts[1:])):
            logger.warning(
                "VTRConfig: keep_tokens=%s rises from one stage to the next; a stage keeps at most what the stage "
                "before it left, so a larger count there keeps every remaining visual token",
                list(counts),
            )
        given = [n for n in ("keep_tokens", "score_threshold", "keep_ratio") if getattr(self, n) is not None]
        if len(given) > 1:
            logger.warning("VTRConfig: %s are all set; %s takes priority.", " and ".join(given), given[0])

        if self.query_aggregation not in QUERY_AGGREGATIONS:
            raise _bad("query_aggregation", self.query_aggregation, f"choose one of {list(QUERY_AGGREGATIONS)}")
        if self.fastvid_tree not in FASTVID_TREES:
            raise _bad("fastvid_tree", self.fastvid_tree, f"choose one of {list(FASTVID_TREES)}")
        if self.head_aggregation not in HEAD_AGGREGATIONS:
            raise _bad("head_aggregation", self.head_aggregation, f"choose one of {list(HEAD_AGGREGATIONS)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise _bad("seed", self.seed, "must be an integer")
        if not isinstance(self.priortr_eps, (int, float)) or not (0 < self.priortr_eps < 1):
            raise _bad("priortr_eps", self.priortr_eps, "must be a number in (0, 1)")
        if not self._valid_ratio(self.important_ratio):
            raise _bad("important_ratio", self.important_ratio, "must be a number in [0, 1]")
        if (
            not isinstance(self.clse_cutoff, (int, float))
            or isinstance(self.clse_cutoff, bool)
            or not 0 < self.clse_cutoff <= 1
        ):
            raise _bad("clse_cutoff", self.clse_cutoff, "must be a number in (0, 1]")
        if (
            not isinstance(self.clse_temperature, (int, float))
            or isinstance(self.clse_temperature, bool)
            or not self.clse_temperature > 0
        ):
            raise _bad("clse_temperature", self.clse_temperature, "must be a number > 0")
        ref = self.clse_reference_layer
        if isinstance(ref, bool) or not isinstance(ref, int) or ref < 0:
            raise _bad("clse_reference_layer", ref, "must be a decoder layer index >= 0 (0 = the input embeddings)")
        for name in ("pivot_image_tokens", "pivot_text_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise _bad(name, value, "must be an integer >= 0")
        ctx_tokens = self.contextual_tokens
        if ctx_tokens is not None and (
            isinstance(ctx_tokens, bool) or not isinstance(ctx_tokens, int) or ctx_tokens < 0
        ):
            raise _bad("contextual_tokens", ctx_tokens, "must be an integer >= 0, or None (VisionZip's 10/64 split)")
        if not self._valid_ratio(self.hiprune_alpha):
            raise _bad("hiprune_alpha", self.hiprune_alpha, "must be a number in [0, 1]")
        layer = self.hiprune_layer
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)):
            raise _bad("hiprune_layer", layer, "must be a vision layer index (negative: from the end), or None")
        if self.pivot_image_tokens + self.pivot_text_tokens == 0:
            raise _bad("pivot_image_tokens", 0, "DART needs at least one pivot (image or text)")
        for name, (low, high) in _VIDEO_RANGES.items():
            value = getattr(self, name)
            if name == "holitom_layer" and value is None:
                continue
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or (isinstance(low, int) and not isinstance(value, int)) or not low <= value <= high:
                raise _bad(
                    name, value, f"must be {'an integer' if isinstance(low, int) else 'a number'} in [{low}, {high}]"
                )
        if self.token_merge is not None and not isinstance(self.token_merge, bool):
            raise _bad("token_merge", self.token_merge, "must be True, False or None (the method's default)")
        if self.convention not in CONVENTION_MODES:
            raise _bad("convention", self.convention, f"choose one of {list(CONVENTION_MODES)}")
        for name, allowed in CONVENTIONS.items():
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise _bad(name, value, f"choose one of {list(allowed)} (or leave it unset: the method's own)")
        if not self._valid_ratio(self.merge_ratio):
            raise _bad("merge_ratio", self.merge_ratio, "must be a number in [0, 1]")
        if isinstance(self.merge_clusters, bool) or not isinstance(self.merge_clusters, int) or self.merge_clusters < 0:
            raise _bad("merge_clusters", self.merge_clusters, "must be an integer >= 0 (0 = automatic)")
        if self.keep_ratio is not None and not isinstance(self.keep_ratio, (list, tuple)) and len(layers) > 1:
            logger.warning(
                "VTRConfig: keep_ratio=%s applies at each of the %d prune layers to the visual tokens still "
                "there, so about %.3g of them reach the last stage; give one ratio per prune layer to set each",
                self.keep_ratio,
                len(layers),
                self.keep_ratio ** len(layers),
            )

        if self.enabled:
            from .strategy import get_strategy  # validates the name, listing the registered ones

            strategy = get_strategy(self.strategy)
            if self.token_merge and not strategy.supports_token_merge:
                raise _bad("token_merge", True, f"{self.strategy!r} does not recycle dropped tokens (sparsevlm does)")
            needs = strategy.stage_needs_attention(0, self)
            if layers[0] == 0 and needs and self.conventions().scoring_layer == "previous":
                raise _bad(
                    "prune_layer",
                    self.prune_layer,
                    f"each prune layer must be an integer >= 1 for {self.strategy!r}, which scores from the "
                    "attention of layer K-1; 0 (before the first decoder layer) is only for strategies that "
                    "read no attention (needs_attention = False) or score with layer K's own q/k "
                    "(scoring_layer='own')",
                )

    @staticmethod
    def _valid_keep_tokens(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    @staticmethod
    def _valid_threshold(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    @staticmethod
    def _valid_ratio(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0

    def _check_budget(self, name: str, valid, allowed: str) -> None:
        value = getattr(self, name)
        values = _as_list(value)
        if values is None:
            return
        if isinstance(value, (list, tuple)) and len(values) != len(self.prune_layers):
            raise _bad(
                name,
                value,
                f"a list needs one value per prune layer ({len(self.prune_layers)} for prune_layer={self.prune_layer})",
            )
        for v in values:
            if not valid(v):
                raise _bad(name, value, f"each value must be {allowed}")

    def conventions(self, mrope: bool = False) -> Conventions:
        """The conventions this config runs with: an explicit field, else `COMMON_CONVENTIONS` under
        `convention="common"`, else the method's own (its class attributes; on an M-RoPE backbone, `mrope`,
        its `mrope_positions` where it sets one)."""
        from .strategy import get_strategy

        method = get_strategy(self.strategy) if self.enabled else None
        chosen = {}
        for name in CONVENTIONS:
            value = getattr(self, name)
            if value is None:
                value = (
                    COMMON_CONVENTIONS[name] if self.convention == "common" or method is None else getattr(method, name)
                )
                if name == "positions" and mrope and method is not None and self.convention != "common":
                    value = method.mrope_positions or value
            chosen[name] = value
        merge = self.token_merge
        if merge is None:
            merge = bool(method is not None and method.supports_token_merge and method.token_merge_default)
            if self.convention == "common" and not (method is not None and method.merge_is_method):
                merge = False
        return Conventions(token_merge=merge, **chosen)

    def stage_budget(self, stage: int) -> StageBudget:
        """The budget of prune stage `stage` (0-based position in `prune_layers`)."""

        def pick(value):
            values = _as_list(value)
            return None if values is None else values[stage if len(values) > 1 else 0]

        return StageBudget(pick(self.keep_tokens), pick(self.score_threshold), pick(self.keep_ratio))

    def validate_for_model(self, num_layers: int) -> None:
        """Checks that depend on the model: every prune layer must leave at least one layer to run pruned."""
        last = self.prune_layers[-1]
        if self.enabled and last >= num_layers:
            raise _bad(
                "prune_layer",
                self.prune_layer,
                f"the language model has {num_layers} decoder layers, so a prune layer must be at most "
                f"{num_layers - 1} (layers from K on run pruned)",
            )

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.init]
