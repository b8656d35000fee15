# Shared vtr file: edit it in image/LLaVA/llava/vtr, then `make fix-copies` updates every fork.
"""The prunable prefill: one backbone-independent engine shared (as identical copies) by every fork.

A fork supplies a `BackboneAdapter` (what is the language model, which tokens are visual, positions and
RoPE, the output class) and a model subclass whose `forward` is one call into `VTRModelMixin`; the whole
adapter interface, with what strategies may rely on, is declared in `BackboneAdapter`'s docstring, and the
pieces every adapter needs (embedding lookup, `PrefillTokens` from a merged prompt, the stock output, beam
alignment, the CLIP CLS attention, checkpoint-mapping registration) are here, so an adapter states only what
differs for its family (docs/engine.md, "Adding a model family"). The engine does everything else:

    adapter.prefill_tokens()      merged embeddings, visual mask, positions, cos/sin, extra per-token rows
    layers [0, K)                 all tokens, the stock decoder layers on the configured kernel
    score (layer K-1, or K)       causal attention recomputed from that layer's own Q/K (attention.py): layer
                                  K-1 (scoring_layer="previous") or layer K on its input ("own"),
                                  strategy.compute_scores per sample, one batched Top-K for the batch; on a
                                  hybrid decoder (recurrent layers, `RECURRENT_LAYER_TYPES`) "previous" is
                                  the nearest attention layer at or before K-1 (`scoring_layers`)
    gather                        every per-token tensor (TokenState) keeps the selected rows; samples that
                                  keep fewer rows are left re-padded
    layers [K, ...)               the kept rows only (positions="compact": renumbered); a list of prune
                                  layers repeats score + gather; earlier_cache="trim" also trims [0, K)
    decode                        `DecodeState` on the cache re-maps later masks and positions, per layer
                                  where layers hold different rows or continue different numberings; a
                                  strategy's `DecodeHook` may hide cached visual rows from layers [L, ...)
                                  step by step, chosen from layer L-1's attention of the step's query

A recurrent (linear-attention) layer from K on runs on the kept rows only, so its state is the one the
stock layer would hold had it been fed the shortened sequence; what cannot hold for it is refused
(`check_layer_kinds`: a scoring layer without attention, trimming its cache, hiding rows from it).

Host syncs: one before the first layer (padding; each sample's visual span, count and length) and one per
prune stage (the kept counts, with the next stage's spans), whatever the batch size; only the stage's
one waits for the layers before it. Everything between them stays on the device.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import logging
import time
import weakref
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_utils import slice_logits_to_keep

from .attention import ScoringAttention, scoring_attention
from .config import VTRConfig
from .strategy import get_strategy
from .strategy.base import PruningStrategy, select_batch

logger = logging.getLogger(__name__)

#: `layer_types` of decoder layers without softmax attention (Qwen3.5's Gated DeltaNet): their cache is a recurrent
#: state over every token they saw, not rows, so they give no attention map to score from and no rows to trim or hide
RECURRENT_LAYER_TYPES = ("linear_attention",)

# ----------------------------------------------------------------------------------------------- records


@dataclass
class StageRecord:
    """What one prune stage did, per sample."""

    layer: int  # K: layers from index K on run pruned; scores came from `scoring_layer`
    budget: str
    seq_len_before: int
    seq_len_after: int
    image_tokens_before: list[int]
    image_tokens_kept: list[int]
    # Original (prompt) positions of the visual tokens kept, one LongTensor per sample.
    kept_positions: list[torch.Tensor]
    # Wall time of scoring + selection (ms; on a GPU it includes waiting for the layers before it).
    scoring_ms: float = 0.0
    # Merged tokens inserted per sample (methods that recycle dropped tokens); their rows in `kept_index`
    # carry the position of the dropped token they represent.
    merged: list[int] = field(default_factory=list)
    # The decoder layer whose attention scored the stage (its compute_scores `layer_idx`; -1 before the LLM):
    # K-1, or K under scoring_layer="own"; on a hybrid decoder the nearest attention layer (`scoring_layers`).
    scoring_layer: int = -1


@dataclass
class DecodeRecord:
    """What one decode step after a pruned prefill hid from the layers from `layer` on (a strategy's decode hook,
    `DecodeHook`): nothing is removed from the cache, those layers' masks hide the rows."""

    layer: int  # L: layers from index L on attended without the hidden rows; layer L-1's attention chose them
    # [batch, pruned_len] bool over the prefill's cache rows (`VTRRecord.kept_index` gives each row's prompt
    # position): True = hidden from layers >= L at this step; all False when the step hid nothing
    hidden: torch.Tensor


@dataclass
class VTRRecord:
    """What the last pruned forward kept. `model.vtr_last` after each call (None for unpruned calls)."""

    strategy: str
    original_len: int
    stages: list[StageRecord] = field(default_factory=list)
    # [batch, final_len]: original position of each row of the pruned sequence (-1 for re-padding).
    kept_index: torch.Tensor | None = None
    # One entry per decode step on this prefill's cache, for strategies with a decode hook (DyCoke); else empty.
    decode: list[DecodeRecord] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- adapter


@dataclass
class PrefillTokens:
    """What an adapter hands the engine for one prefill. Every tensor is [batch, seq, ...]."""

    hidden: torch.Tensor  # [b, s, d] input embeddings with the visual features merged in
    visual: torch.Tensor  # [b, s] bool: candidates for pruning (every visual position the model fills)
    valid: torch.Tensor  # [b, s] bool: False = padding
    positions: torch.Tensor  # [b, s] or [b, s, rows] RoPE positions (M-RoPE keeps its rows last)
    cos: torch.Tensor  # [b, s, head_dim] rotary tables for those positions
    sin: torch.Tensor
    # Extra per-token tensors gathered with the sequence (e.g. a modality id, a DeepStack row index).
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    # Anything the output class wants besides logits (e.g. image_hidden_states).
    output_extras: dict = field(default_factory=dict)
    # Facts for strategies, merged into each compute_scores ctx (e.g. the patch grid); a list holds one
    # value per sample.
    strategy_ctx: dict = field(default_factory=dict)
    # Per-sample facts computed only when a strategy asks: name -> fn(b); the ctx gets a no-argument
    # callable (e.g. `visual_grid`, `vision_importance`).
    lazy_ctx: dict = field(default_factory=dict)
    # This prefill's data that only the adapter reads later (e.g. DeepStack features for `after_layer`):
    # adapters keep no per-call state on themselves, so one model may run several prefills at once.
    adapter_state: dict = field(default_factory=dict)


class BackboneAdapter:
    """Everything the engine needs to know about one model family. Subclass once per family.

    `model` is the fork's `...ForConditionalGeneration` subclass. The defaults suit Llama-style decoders
    (Llama, Mistral, Qwen2/3) fed one placeholder run per image; override only what differs. An adapter
    keeps no per-call state on itself: what one prefill needs later goes in `PrefillTokens.adapter_state`
    (the stock models' own per-call fields, such as Qwen-VL's `rope_deltas`, stay where the stock code puts
    them).

    Declared by every adapter (class attributes):
        output_class           the stock output class (`loss`, `logits`, `past_key_values`, `output_extras`)
        pixel_inputs           forward() arguments that carry pixels (default `("pixel_values",)`)
        encoded_modalities     keys of `mm_encoder_outputs` it accepts pre-encoded (default `("image",)`)
        default_keep_tokens    the budget when the user gives none (None: the config's own default)
        mrope                  True for M-RoPE backbones (methods' `mrope_positions` apply)
        facts                  the facts below it provides (strategies' `requires` are checked against them)
        encoder_arguments      forward() arguments only the visual encoding reads (e.g. LLaVA's
                               `vision_feature_layer`), dropped from generate() once it has encoded

    Must implement:
        prefill_tokens(args)   encode, merge, describe every token: usually `input_embeddings(args)`, the
                               stock feature/merge calls, then `self.prefill(args, hidden, visual, ...)`

    May override (defaults in brackets):
        language_model, rope_fn, rotary, num_layers    [Llama-style `model.model.language_model`]
        layer_kind(i)          [`config.layer_types[i]`, else "full_attention"] decoder layer i's kind, as the
                               stock model masks it; kinds in `RECURRENT_LAYER_TYPES` make a hybrid decoder
        has_visual_input(args) [any `pixel_inputs` or `encoded_modalities` present]
        encode_inputs(args)    [`mm_encoder_outputs` as given] modality -> the stock encoder output of this
                               forward's visuals: the given `mm_encoder_outputs` plus the `pixel_inputs`
                               encoded, keeping what the lazy facts read (vision hidden states, grids);
                               `prefill_tokens` reads it, and so does the default `pre_encode`
        pre_encode(kwargs)     [encode_inputs into `mm_encoder_outputs`, pixels and `encoder_arguments`
                               dropped] generate() kwargs with the visuals encoded as the prefill would
                               encode them; generate() then expands the batch for beams (the beam contract)
        stock_inputs(args, cache)  [unchanged] fills in what a stock forward after an UNPRUNED prefill needs
        after_layer(i, tokens, prefill)  [tokens.hidden] hidden states after decoder layer i (DeepStack)
        merged_extras(extras, mix, prefill)  [{}] the extras rows of tokens a method merged as a weighted mix
        anchor_row(span_end)   [span_end] PriorTR's question-free row
        decode_positions(state, decoded, query_len, batch)  [original_len + decoded, ...] a decode step's
                               positions when generate() passes none (M-RoPE: `state.next_position`)
        engine_positions, layer_masks, lm_head, output

    Facts strategies may rely on (the compute_scores ctx; `PrefillTokens.strategy_ctx` / `lazy_ctx`), each
    named in the adapter's `facts` when it provides it:
        patch_grid             (rows, cols) of the sample's first image's (or frame's) token grid
        visual_grid()          [num_visual, 3] long: (group, row, col) of each visual token in prompt order,
                               group = one image / tile / frame (-1: off-grid tokens such as row newlines)
        frames()               [num_visual, 2] long: (video, frame) of each visual token in prompt order, the video
                               numbered 0.. in the sample (images do not count) and the frame 0.. in time order, as
                               the LLM sees frames (Qwen-VL: one temporal patch group); every token of a frame
                               carries it (its CLS row, the newlines closing its rows); (-1, -1) for tokens of no
                               frame (images, a video's one trailing newline). Within a video every frame has the
                               same token count in the same layout, so frames compare token by token; video
                               methods (`requires=("frames",)`) run on families that declare it
        vision_importance()    [num_visual] float: the attention each visual token receives in the vision
                               tower (CLS attention for CLIP-style towers; mean received attention otherwise)
        vision_features()      [num_visual, width]: the vision tower's features before the projector
        vision_layer(i=None)   vision-tower layer i (one the strategy names in `vision_layers`; None: the layer whose
                               output the projector reads), per visual token
                               (prompt order; zeros for tokens of no view, such as row newlines): {`cls` [n] the CLS
                               query's attention, mean over heads (None without CLS); `received` [n] the attention
                               it receives, mean over heads and every query row; `keys` [n, head_dim] mean over heads}
        vision_tower           {"depth": the vision tower's layer count, "cls": whether it has a CLS token}
        vision_cls()           [num_visual, width]: the CLS token's features before the projector, of each visual
                               token's own view (image, tile, frame); zeros for tokens of no view
        project                a callable: pre-projector features [n, width] -> the LLM input embeddings [n, hidden]
    A family that cannot provide one leaves it out of `facts`; a method that `requires` it is refused there.

    Beam contract: generate(num_beams=k / num_return_sequences=k) repeats each sample k times in a row
    AFTER `pre_encode`: the prompt rows and the stock fields of the encoder outputs (`pooler_output`,
    DeepStack features) are expanded, but what the adapter keeps on them itself (vision hidden states,
    grids, image sizes: `vtr_*` attributes) still describes the original samples; a lazy fact maps those
    with `beam_repeats(...)` (each sample's values repeated k times). `pre_encode` hands generate() copies
    of the outputs, so a caller's own `mm_encoder_outputs` are never expanded in place.

    Attributes adapters set on the stock encoder outputs they return (read back by their lazy facts):
    `vtr_grid_thw` (Qwen-VL), `vtr_image_sizes` (LLaVA-1.6), `vtr_frames` / `vtr_select` (Video-LLaVA),
    `vtr_feature_layer` / `vtr_select_strategy` (`encode_images`: LLaVA, InternVL).
    """

    output_class: type | None = None
    #: True for M-RoPE backbones (Qwen-VL): a method's `mrope_positions` then sets its official positions
    mrope: bool = False
    #: the facts above that this family provides (a method's `requires` is checked against it)
    facts: tuple[str, ...] = ()
    pixel_inputs: tuple[str, ...] = ("pixel_values",)
    encoded_modalities: tuple[str, ...] = ("image",)
    default_keep_tokens: int | None = None
    encoder_arguments: tuple[str, ...] = ()

    def __init__(self, model):
        self.model = model

    @property
    def language_model(self):
        """The decoder stack: `.layers`, `.norm`, `.rotary_emb`, `.config`."""
        return self.model.model.language_model

    @property
    def rope_fn(self):
        """`apply_rotary_pos_emb(q, k, cos, sin) -> (q, k)` of the decoder's model family: by default the one
        defined beside the language model's class (Llama, Mistral, Qwen2, Qwen3-VL's M-RoPE text model, ...)."""
        return importlib.import_module(type(self.language_model).__module__).apply_rotary_pos_emb

    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor):
        """(cos, sin) of the decoder's rotary embedding for `positions` in the engine's layout: [b, s], or
        [b, s, rows] for M-RoPE (the model's own layout is [rows, b, s])."""
        if positions.ndim == 3:
            positions = positions.permute(2, 0, 1)
        return self.language_model.rotary_emb(hidden, positions)

    @staticmethod
    def engine_positions(position_ids: torch.Tensor) -> torch.Tensor:
        """A decode step's model-level `position_ids` in the engine's layout (M-RoPE rows last; a leading text
        row that generate() adds for mask creation, as Qwen-VL's 4-row ids carry, is dropped)."""
        if position_ids.ndim == 3:
            rows = position_ids[1:] if position_ids.shape[0] == 4 else position_ids
            return rows.permute(1, 2, 0)
        return position_ids

    def has_visual_input(self, args: dict) -> bool:
        """True when `forward(**args)` carries pixels or pre-encoded visual features (a prefill to prune)."""
        encoded = args.get("mm_encoder_outputs") or {}
        return any(args.get(name) is not None for name in self.pixel_inputs) or any(
            encoded.get(name) is not None for name in self.encoded_modalities
        )

    def input_embeddings(self, args: dict) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(input_ids, embeddings) of a prefill: exactly one of `input_ids` / `inputs_embeds` is given."""
        input_ids, embeds = args.get("input_ids"), args.get("inputs_embeds")
        if (input_ids is None) ^ (embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if embeds is None:
            embeds = self.model.get_input_embeddings()(input_ids)
        return input_ids, embeds

    def prefill(
        self, args: dict, hidden: torch.Tensor, visual: torch.Tensor, positions=None, **fields
    ) -> PrefillTokens:
        """`PrefillTokens` for merged embeddings `hidden` [b, s, d] and their visual mask [b, s]: `valid` from
        the 2-D `attention_mask`, positions as given (else `args["position_ids"]`, else 0..s-1; M-RoPE
        positions are [b, s, rows]), their rotary tables; `fields` sets the other `PrefillTokens` fields."""
        batch, seq_len = visual.shape
        mask = args.get("attention_mask")
        if positions is None:
            positions = args.get("position_ids")
        if positions is None:
            positions = torch.arange(seq_len, device=hidden.device).unsqueeze(0)
        if positions.ndim == 2:
            positions = positions.expand(batch, -1)
        cos, sin = self.rotary(hidden, positions)
        valid = mask.bool() if mask is not None else torch.ones_like(visual)
        return PrefillTokens(hidden=hidden, visual=visual, valid=valid, positions=positions, cos=cos, sin=sin, **fields)

    def vision_tower(self) -> dict:
        """The `vision_tower` fact: {"depth": the tower's layer count, "cls": whether it has a CLS token}. Default:
        a CLIP-style tower, `vision_config.num_hidden_layers` layers with CLS; a family without CLS overrides it."""
        return {"depth": self.model.config.vision_config.num_hidden_layers, "cls": True}

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The `project` fact for families whose stock projector maps each patch on its own (LLaVA, Video-LLaVA):
        `multi_modal_projector` on pre-projector features [n, width]."""
        projector = self.model.model.multi_modal_projector
        return projector(features.to(projector.linear_1.weight.dtype))

    def tower_layer(self, layer: int) -> int:
        """A vision-tower layer index (negative from the end) as a 0-based index; out of range, a clear error."""
        depth = self.vision_tower()["depth"]
        index = layer + depth if layer < 0 else layer
        if not 0 <= index < depth:
            raise ValueError(f"vision layer {layer} does not exist: the vision tower has {depth} layers")
        return index

    def feature_states(self, feature_layer=None) -> list[int]:
        """The tower hidden states (0-based, in the given order) a `vision_feature_layer` names (an index or a
        list; None: the config's): what the projector reads, for families that take one (LLaVA, InternVL,
        Video-LLaVA)."""
        layer = self.model.config.vision_feature_layer if feature_layer is None else feature_layer
        states = self.vision_tower()["depth"] + 1
        return [i if i >= 0 else states + i for i in (layer if isinstance(layer, (list, tuple)) else [layer])]

    def encoder_states(self, feature_layer=None) -> list[int]:
        """The tower hidden states to keep when encoding with `feature_layer`: the projector's input(s), the input
        of the layer producing the last of them (whose attention `vision_importance` and `vision_layer()`
        recompute), and the inputs of the layers the strategy reads (`strategy_vision_layers`)."""
        wanted = self.feature_states(feature_layer)
        return sorted({wanted[-1] - 1, *wanted, *self.strategy_vision_layers()})

    def encode_images(self, pixel_values, **vision_kwargs):
        """The stock `get_image_features` (LLaVA, InternVL), also keeping the hidden states the lazy facts read
        (`encoder_states`), and noting on its output the feature layer and selection it used
        (`vtr_feature_layer`, `vtr_select_strategy`: a forward may give its own)."""
        layer = vision_kwargs.get("vision_feature_layer")
        out = self.model.model.get_image_features(
            pixel_values=pixel_values,
            return_dict=True,
            output_hidden_states=self.encoder_states(layer),
            **vision_kwargs,
        )
        out.vtr_feature_layer = layer
        out.vtr_select_strategy = vision_kwargs.get("vision_feature_select_strategy")
        return out

    def strategy_vision_layers(self) -> list[int]:
        """The vision-tower layers (0-based) the configured strategy reads through `vision_layer(i)` (its
        `vision_layers`): the adapter keeps their inputs when it encodes."""
        config = getattr(self.model, "vtr_config", None)
        if config is None or not config.enabled:
            return []
        method = get_strategy(config.strategy)()
        return [self.tower_layer(i) for i in method.vision_layers(config, self.vision_tower())]

    def stock_inputs(self, args: dict, cache) -> dict:
        """The arguments of a stock forward that follows an UNPRUNED prefill (no decode state on the cache),
        with anything the stock model would get wrong filled in. Default: unchanged."""
        return args

    def encoder_kwargs(self, args: dict) -> dict:
        """The `encoder_arguments` of a forward: as given, else the model config's value (the stock default)."""
        config = self.model.config
        return {key: args[key] if args.get(key) is not None else getattr(config, key) for key in self.encoder_arguments}

    def encode_inputs(self, args: dict) -> dict:
        """modality -> the stock encoder output of this forward's visuals (see the class docstring); a
        modality given both as pixels and pre-encoded is an error. Default: `mm_encoder_outputs` as given."""
        return dict(args.get("mm_encoder_outputs") or {})

    def pre_encode(self, generate_kwargs: dict) -> dict:
        """generate() kwargs with the visuals encoded into `mm_encoder_outputs` the way the adapter's own
        prefill encodes them (`encode_inputs`, keeping what methods read); the pixels and the
        `encoder_arguments` are dropped, as the stock model drops them once it has encoded."""
        pixels = any(generate_kwargs.get(name) is not None for name in self.pixel_inputs)
        if not pixels and not generate_kwargs.get("mm_encoder_outputs"):
            return generate_kwargs
        kwargs = dict(generate_kwargs)
        # copies: generate() expands the outputs' stock fields in place for beams
        kwargs["mm_encoder_outputs"] = {k: copy.copy(v) for k, v in self.encode_inputs(kwargs).items()}
        for name in (*self.pixel_inputs, *self.encoder_arguments):
            kwargs.pop(name, None)
        return kwargs

    def prefill_tokens(self, args: dict) -> PrefillTokens:
        """Encode the visual inputs, merge them into the embeddings, and describe every token."""
        raise NotImplementedError

    def anchor_row(self, span_end: int) -> int:
        """PriorTR's question-free row for a visual span ending (exclusive) at `span_end`: by default the
        first token after it, which under the causal mask sees only the prefix and the visuals."""
        return span_end

    def merged_extras(self, extras: dict, mix: torch.Tensor, prefill: PrefillTokens) -> dict:
        """The `PrefillTokens.extras` rows of merged tokens that a method made as `mix` [m, n] (weights over n
        dropped tokens, dense or sparse COO, whose own extras are `extras`: name -> [n, ...]); name -> [m, ...]. Default: none (a merged
        token keeps its representative's). Qwen3-VL mixes the DeepStack features the same way."""
        return {}

    def after_layer(self, layer_idx: int, tokens: TokenState, prefill: PrefillTokens) -> torch.Tensor:
        """Called after every decoder layer with the current tokens and this prefill's `PrefillTokens`; returns
        the hidden states to go on with (DeepStack adds visual features here, to the rows still present)."""
        return tokens.hidden

    def decode_positions(self, state: DecodeState, decoded: int, query_len: int, batch: int) -> torch.Tensor:
        """Positions of a decode step given without `position_ids`: those the unpruned model would use,
        continuing the ORIGINAL prompt (not the shortened cache)."""
        start = state.original_len + decoded
        positions = torch.arange(start, start + query_len, device=state.prefix_valid.device)
        return positions.unsqueeze(0).expand(batch, -1)

    def layer_masks(self, hidden: torch.Tensor, padding: torch.Tensor | None) -> dict:
        """One mask per layer type, for a fresh prefill: 4-D for attention layers (or None for kernels that need
        none); recurrent layers get the 2-D `padding` itself (None: nothing padded), as the stock model gives them
        (padding rows are zeroed before they enter the state, which the engine's left re-padding keeps exact)."""
        config = self.language_model.config
        masks = {
            "full_attention": create_causal_mask(
                config=config, inputs_embeds=hidden, attention_mask=padding, past_key_values=None
            )
        }
        kinds = set(self.layer_types)
        if "sliding_attention" in kinds:
            masks["sliding_attention"] = create_sliding_window_causal_mask(
                config=config, inputs_embeds=hidden, attention_mask=padding, past_key_values=None
            )
        masks.update({kind: padding for kind in kinds & set(RECURRENT_LAYER_TYPES)})
        return masks

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden)

    def output(self, loss, logits, cache, tokens: PrefillTokens):
        """The stock output class of the backbone (`output_class`), with `tokens.output_extras`."""
        if self.output_class is None:
            raise NotImplementedError(f"{type(self).__name__} declares no output_class")
        return self.output_class(loss=loss, logits=logits, past_key_values=cache, **tokens.output_extras)

    @property
    def num_layers(self) -> int:
        return self.language_model.config.num_hidden_layers

    def layer_kind(self, layer_idx: int) -> str:
        """Decoder layer `layer_idx`'s kind (`config.layer_types`; "full_attention" where the config has none)."""
        types = getattr(self.language_model.config, "layer_types", None)
        return types[layer_idx] if types else "full_attention"

    @property
    def layer_types(self) -> list[str]:
        """Every decoder layer's kind (`layer_kind`)."""
        return [self.layer_kind(i) for i in range(self.num_layers)]

    @property
    def reference_layer(self) -> int:
        """The first decoder layer with attention: the stock model fits its masks and `cache.get_seq_length()` to
        that layer's cache (0 unless the decoder starts with recurrent layers)."""
        return next((i for i, kind in enumerate(self.layer_types) if kind not in RECURRENT_LAYER_TYPES), 0)


def beam_repeats(num_tokens: int, num_encoded: int, what: str) -> int:
    """k such that `num_tokens` visual tokens are `num_encoded` encoded ones repeated k times per sample (1
    outside beam search; see the beam contract in `BackboneAdapter`); a clear error when they do not match."""
    if num_encoded > 0 and num_tokens % num_encoded == 0 and num_tokens >= num_encoded:
        return num_tokens // num_encoded
    raise ValueError(f"{what}: the {num_tokens} visual tokens do not line up with the {num_encoded} encoded ones")


def repeat_per_sample(values: torch.Tensor, counts: list[int], repeats: int) -> torch.Tensor:
    """`values` laid out per original sample (`counts` rows each, batch order), each sample's rows repeated
    `repeats` times in a row, as generate() repeats the prompts for beams."""
    if repeats == 1:
        return values
    return torch.cat([chunk for chunk in values.split(counts) for _ in range(repeats)])


def scatter_visual(tables: dict, mask: torch.Tensor, flat: dict, what: str, fill=0, dtype=None) -> None:
    """Fill `tables` (name -> [batch, seq, ...], made on first use: `fill` everywhere, `dtype` or the values') at
    the positions `mask` [batch, seq] with `flat` (name -> [n, ...]: one row per token of the encoded items, the
    original samples' in batch and prompt order); under beam search each repeated sample gets its sample's rows
    (`beam_repeats`). A clear error when the rows do not line up with the positions."""
    first = next(iter(flat.values()))
    repeats = beam_repeats(int(mask.sum()), first.shape[0], what)
    counts = mask.sum(1)[::repeats].tolist()
    if sum(counts) != first.shape[0]:
        raise ValueError(
            f"{what}: the placeholders ({counts} per sample) do not line up with the {first.shape[0]} encoded tokens"
        )
    for name, value in flat.items():
        value = repeat_per_sample(value.to(mask.device), counts, repeats)
        if name not in tables:
            tables[name] = torch.full(
                (*mask.shape, *value.shape[1:]), fill, dtype=dtype or value.dtype, device=mask.device
            )
        tables[name][mask] = value.to(tables[name].dtype)


def number_groups(grid: torch.Tensor) -> torch.Tensor:
    """A sample's `visual_grid` [n, 3] with its groups renumbered 0, 1, ... in prompt order (each group one run of
    tokens, off-grid rows (-1) aside)."""
    on = grid[:, 0] >= 0
    ids = grid[on, 0]
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[1:] = ids[1:] != ids[:-1]
    grid = grid.clone()
    grid[on, 0] = starts.cumsum(0) - 1
    return grid


def clip_cls_attention(layer, hidden: torch.Tensor) -> torch.Tensor:
    """[views, length]: the CLS query's (row 0) attention, mean over heads, in one CLIP/SigLIP-style encoder
    layer (`layer_norm1`, `self_attn.q_proj/k_proj`, `num_heads`, `head_dim`, `scale`), recomputed in float32
    from that layer's input `hidden` [views, length, width] (no attention map of any other layer is built)."""
    attn = layer.self_attn
    h = layer.layer_norm1(hidden)
    views, length, _ = h.shape
    q = attn.q_proj(h[:, :1]).view(views, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(h).view(views, length, attn.num_heads, attn.head_dim).transpose(1, 2)
    probs = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * attn.scale, dim=-1)  # [v, heads, 1, len]
    return probs.mean(dim=1)[:, 0]


def clip_layer_attention(layer, hidden: torch.Tensor, cls: bool = True) -> dict:
    """{`cls` [views, length] | None, `received` [views, length], `keys` [views, length, head_dim]} of one
    CLIP/SigLIP-style encoder layer, recomputed in float32 from its input `hidden` [views, length, width]: the
    CLS row (row 0) mean over heads, the attention each token receives (mean over heads and query rows), the keys
    (`k_proj` of the normed input, bias included) mean over heads. Only this layer's attention map is built."""
    attn = layer.self_attn
    h = layer.layer_norm1(hidden)
    views, length, _ = h.shape
    q = attn.q_proj(h).view(views, length, attn.num_heads, attn.head_dim).transpose(1, 2).float()
    k = attn.k_proj(h).view(views, length, attn.num_heads, attn.head_dim).transpose(1, 2).float()
    probs = torch.softmax((q @ k.transpose(-1, -2)) * attn.scale, dim=-1)  # [views, heads, length, length]
    per_head = probs.mean(dim=1)
    return {
        "cls": per_head[:, 0] if cls else None,
        "received": per_head.mean(dim=1),
        "keys": k.mean(dim=1),
    }


def register_vtr_classes(vtr_classes: dict) -> None:
    """transformers skips its built-in checkpoint key renaming for classes defined outside the library;
    register each stock mapping (model_type -> VTR class) under the VTR class's name, so hub checkpoints
    load and save exactly as with the stock classes. The stock class's own mapping wins over its
    model_type's, as in transformers' lookup."""
    for model_type, cls in vtr_classes.items():
        stock = getattr(cls, "vtr_stock_class", None)
        mapping = get_checkpoint_conversion_mapping(stock.__name__) if stock is not None else None
        if mapping is None:
            mapping = get_checkpoint_conversion_mapping(model_type)
        if mapping is not None:
            register_checkpoint_conversion_mapping(cls.__name__, mapping, overwrite=True)


# ----------------------------------------------------------------------------------------------- layer kinds


def _ranges(layers: list[int]) -> str:
    """Layer indices as runs: [0, 1, 2, 4, 5] -> "0-2, 4-5"."""
    runs = []
    for i in layers:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _stage_scoring_layer(layer_types, k: int, low: int, scoring: str, needs_attention: bool) -> int | None:
    """The scoring layer of a stage at prune layer `k` after a stage at `low` (0 for the first), or None when the
    layer it must read has no attention (see `scoring_layers`)."""
    if scoring == "own":
        return k if not needs_attention or layer_types[k] not in RECURRENT_LAYER_TYPES else None
    if not needs_attention:
        return k - 1
    attention = [j for j in range(low, k) if layer_types[j] not in RECURRENT_LAYER_TYPES]
    return attention[-1] if attention else None


def _stage_needs_attention(method, config: VTRConfig, stage: int, scoring: str) -> bool:
    """Whether prune stage `stage` reads attention (a stage at prune layer 0 never does under "previous")."""
    k = config.prune_layers[stage]
    return method.stage_needs_attention(stage, config) and not (scoring == "previous" and k == 0)


def scoring_layers(config: VTRConfig, layer_types, mrope: bool = False) -> list[int]:
    """Per prune stage of `config`, the decoder layer whose attention scores it (its compute_scores `layer_idx`) on a
    decoder whose layers are of the kinds `layer_types`: under scoring_layer="own" layer K itself; under "previous"
    the nearest attention layer at or before K-1 that ran on the rows reaching K, i.e. at or after the previous prune
    layer: K-1 itself on a decoder without recurrent layers. A stage that reads no attention runs at any K and gets
    K-1 (K under "own"; -1 before the LLM). A stage whose layer would be recurrent is refused (ValueError naming the
    prune layers that work)."""
    scoring = config.conventions(mrope=mrope).scoring_layer
    method = get_strategy(config.strategy)
    layers, low = [], 0
    for stage, k in enumerate(config.prune_layers):
        j = _stage_scoring_layer(layer_types, k, low, scoring, _stage_needs_attention(method, config, stage, scoring))
        if j is None:
            raise ValueError(_scoring_refusal(config, layer_types, stage, low, scoring))
        layers.append(j)
        low = k
    return layers


def _scoring_refusal(config: VTRConfig, layer_types, stage: int, low: int, scoring: str) -> str:
    k = config.prune_layers[stage]
    attention = [i for i, kind in enumerate(layer_types) if kind not in RECURRENT_LAYER_TYPES]
    first = low + 1 if stage else int(scoring == "previous")
    layer_of = functools.partial(_stage_scoring_layer, layer_types, low=low, scoring=scoring, needs_attention=True)
    valid = [x for x in range(first, len(layer_types)) if layer_of(x) is not None]
    if scoring == "own":
        reads, linear = "that layer's own attention (scoring_layer='own')", f"layer {k} is"
    else:
        after = f" and at or after the previous prune layer {low}" if stage else ""
        reads = f"the attention of the nearest attention layer at or before layer {k - 1}{after}"
        linear = f"layer {low} is" if k - low == 1 else f"layers {_ranges(list(range(low, k)))} are"
    if not valid:
        fix = "no prune layer of this decoder works for that stage"
    elif scoring == "own":
        fix = f"prune that stage at one of the attention layers {_ranges(valid)}"
    else:
        fix = f"prune that stage at layer {valid[0]} or later"
    return (
        f"prune_layer={config.prune_layer}: {config.strategy!r} scores its stage at layer {k} with {reads}, but "
        f"{linear} linear attention (a recurrent state, no attention map; this decoder's attention layers: "
        f"{_ranges(attention) or 'none'}): {fix}, or use a method that reads no attention"
    )


def snap_schedule(config: VTRConfig, layer_types, mrope: bool = False) -> list[int] | None:
    """A DEFAULT schedule (the config's or the method's, `prune_layer` left unset) moved onto a hybrid decoder: each
    stage to the lowest layer at or above its own, and above the stage before, whose scoring layer has attention
    (`scoring_layers`); e.g. FastV's 3 becomes 4 on Qwen3.5 (attention in every 4th layer, from layer 3). None when
    some stage finds no such layer."""
    scoring = config.conventions(mrope=mrope).scoring_layer
    method = get_strategy(config.strategy)
    layers, low = [], 0
    for stage, k in enumerate(config.prune_layers):
        needs = _stage_needs_attention(method, config, stage, scoring)
        start = max(k, layers[-1] + 1) if layers else k
        layer_of = functools.partial(_stage_scoring_layer, layer_types, low=low, scoring=scoring, needs_attention=needs)
        low = next((x for x in range(start, len(layer_types)) if layer_of(x) is not None), None)
        if low is None:
            return None
        layers.append(low)
    return layers


def check_layer_kinds(config: VTRConfig, layer_types, mrope: bool = False) -> list[int]:
    """`config` against a decoder whose layers are of the kinds `layer_types` (a model's `adapter.layer_types`, or a
    checkpoint config's, to check without a model): every stage's scoring layer has attention (`scoring_layers`,
    returned); on a hybrid decoder `earlier_cache="trim"` finds no recurrent layer to trim, and a strategy's decode
    hook (`DecodeHook`) no recurrent layer among those it reads or hides rows from. ValueError otherwise."""
    scoring = scoring_layers(config, layer_types, mrope)
    recurrent = [i for i, kind in enumerate(layer_types) if kind in RECURRENT_LAYER_TYPES]
    if not recurrent:
        return scoring
    trimmed = [i for i in recurrent if i < config.prune_layers[-1]]
    if trimmed and config.conventions(mrope=mrope).earlier_cache == "trim":
        whose = f" (the official convention of {config.strategy!r})" if config.earlier_cache is None else ""
        raise ValueError(
            f"earlier_cache='trim'{whose} trims the cache of the layers before each prune layer to the kept tokens; "
            f"layers {_ranges(trimmed)} of this decoder are linear attention, whose cache is a recurrent state over "
            "every token they saw and cannot be trimmed: set earlier_cache='keep' (those layers then hold what they saw "
            "of the whole prompt, as attention layers keep their cache)"
        )
    decode_layer = getattr(get_strategy(config.strategy)(), "decode_layer", None)
    hook = decode_layer(config) if decode_layer is not None else None
    hidden_from = [i for i in recurrent if i >= hook - 1] if hook is not None else []
    if hidden_from:
        raise ValueError(
            f"{config.strategy!r} hides cached visual rows from decoder layers >= {hook} at decode steps, chosen from "
            f"layer {hook - 1}'s attention; layers {_ranges(hidden_from)} of this decoder are linear attention, whose "
            "recurrent state has no rows to hide (nor attention to read), so its decode-time pruning cannot run here"
        )
    return scoring


# ----------------------------------------------------------------------------------------------- state


class TokenState:
    """Per-token tensors of a pruned prefill, each [batch, seq, ...], shortened together by `gather`.

    `fill` gives the value of re-padding rows (rows a sample does not need when others keep more).
    """

    FILL = {"valid": False, "visual": False, "original_index": -1, "positions": 0, "born": 0, "merged": False}

    def __init__(self, **tensors: torch.Tensor):
        self.__dict__["tensors"] = tensors

    def __getattr__(self, name):
        try:
            return self.__dict__["tensors"][name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self.__dict__["tensors"][name] = value

    def gather(self, index: torch.Tensor, new_valid: torch.Tensor) -> None:
        """Keep rows `index` [batch, new_len]; where `new_valid` is False the row becomes re-padding."""
        for name, t in self.tensors.items():
            t = gather_seq(t, index, 1)
            if name in self.FILL:
                t = t.masked_fill(~new_valid.view(*new_valid.shape, *([1] * (t.ndim - 2))), self.FILL[name])
            self.tensors[name] = t


def _span_info(visual: torch.Tensor, valid: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """[batch, 4] long: first visual position, last visual position + 1, visual count, last valid position
    + 1, reading positions from `position` [batch, seq] (rows where visual/valid is False are ignored)."""
    big = torch.iinfo(torch.long).max
    return torch.stack(
        [
            torch.where(visual, position, big).amin(1),
            torch.where(visual, position, -1).amax(1) + 1,
            visual.sum(1),
            torch.where(valid, position, -1).amax(1) + 1,
        ],
        dim=1,
    ).long()


def _next_position(positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[batch]: one past the largest position of each sample's valid rows (M-RoPE: over every row)."""
    per_token = positions.amax(-1) if positions.ndim == 3 else positions
    return torch.where(valid, per_token, -1).amax(1) + 1


def compact_positions(positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Positions renumbered without the gaps dropped tokens left, as if the kept tokens had been the prompt.

    1-D [b, s]: each sample's valid rows get first position + 0, 1, 2, ... M-RoPE [b, s, rows]: every row of
    a token moves down by the gaps before it, where a token's gap is how far its lowest row lies above the
    highest position before it, plus one (so text continues right after the previous maximum, and a visual
    token keeps its grid offsets within its image). Re-padding rows are left as they are.
    """
    if positions.ndim == 2:
        first = torch.where(valid, positions, torch.iinfo(positions.dtype).max).amin(1, keepdim=True)
        rank = valid.long().cumsum(1) - 1
        return torch.where(valid, first + rank, positions)
    low, high = positions.amin(-1), positions.amax(-1)
    floor = torch.iinfo(positions.dtype).min // 2
    high = torch.where(valid, high, floor)
    before = torch.cummax(high, dim=1).values
    before = torch.cat([torch.full_like(before[:, :1], floor), before[:, :-1]], dim=1)
    gap = torch.where(valid & (before > floor), (low - before - 1).clamp_min(0), 0)
    return torch.where(valid[..., None], positions - gap.cumsum(1)[..., None], positions)


def gather_seq(t: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """Gather `t` along its sequence dimension `dim` with a [batch, new_len] index."""
    if t.shape[0] != index.shape[0]:
        t = t.expand(index.shape[0], *t.shape[1:])
    shape = [1] * t.ndim
    shape[0], shape[dim] = index.shape
    full = list(t.shape)
    full[dim] = index.shape[1]
    return torch.gather(t, dim, index.reshape(shape).expand(full))


@dataclass
class Segment:
    """The layers [first_layer, next segment's first) of a pruned prefill: the rows they ran on."""

    first_layer: int
    valid: torch.Tensor  # [batch, len] bool: the rows those layers' KV cache holds (False = re-padding)
    next_position: torch.Tensor  # [batch] long: the position after the last one those layers used


@dataclass
class DecodeHook:
    """A strategy's hook on the decode steps after its pruned prefill (DyCoke's dynamic KV pruning).

    A strategy takes part by defining two methods, and a third if it wants (`PruningStrategy` declares none; the
    engine looks them up):

        decode_layer(config) -> int | None
            L (1 <= L < the decoder's layer count), or None for no decode hook. Layers [0, L) of every decode step
            attend to their whole cache; layer L-1 must hold the prefill's final rows (a prune layer <= L-1, or
            `earlier_cache="trim"`).
        decode_candidates(visual, original_index, sample_ctx) -> [batch, len] bool   (optional)
            called once, at the end of the prefill: the final rows the hook chooses among (default: `visual`, every
            visual row). visual, original_index: [batch, len], the prefill's final rows and each one's row in the
            prompt; sample_ctx: per sample, the `vtr_ctx` its prune stages shared. Only visual rows count.
        decode_keep(attention, visual, state, config, query_len) -> [batch, kv_len] bool | None
            called at every decode step once layer L-1 has run. attention: that layer's lazy
            `[batch, heads, kv_len, kv_len]` float32 attention over its whole cache (`ScoringAttention`; cache rows,
            the current token included; only the step's own query rows, the last `query_len`, can be read: e.g.
            `attention[:, :, -1, :]`; rows that layer does not see, such as padding, get 0). visual: [batch, kv_len]
            bool, the cached candidate rows (`decode_candidates`). state: this dict's `state`, the strategy's own
            across the steps of one prompt (empty at the first step; a tensor in it whose first dimension is the
            batch follows beam search's reordering). Returns the candidate rows layers >= L see at this step (every
            other row they always see), or None: all of them.

    Nothing leaves the cache: the masks of layers >= L hide the other candidate rows for that step only (eager and
    sdpa; other kernels take no 4-D mask and are refused at the prefill). Each step is recorded in
    `VTRRecord.decode`.
    """

    strategy: PruningStrategy
    config: VTRConfig
    layer: int
    visual: torch.Tensor  # [batch, pruned_len] bool: the final rows it chooses among (`decode_candidates`)
    record: VTRRecord
    state: dict = field(default_factory=dict)

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Beam search picked `beam_idx` [batch] as the rows of the next step: the strategy's per-row state follows."""
        batch = self.visual.shape[0]
        for name, value in self.state.items():
            if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch:
                self.state[name] = value.index_select(0, beam_idx.to(value.device))


class DecodeState:
    """Attached to a KV cache that a pruned prefill shortened; maps later decode inputs onto it.

    Each layer's cache holds the rows of its segment (`earlier_cache="keep"`: the layers before a prune
    layer keep every token) or of the last one (`"trim"`). Decode positions continue the original prompt;
    under `positions="compact"` each layer continues its own numbering, `shift` positions lower. A strategy's
    `DecodeHook` (`hook`) may hide cached visual rows from the layers from its L on, step by step. The model-level
    mask and positions fit the reference layer (`BackboneAdapter.reference_layer`: layer 0 unless the decoder starts
    with recurrent layers, which take neither and need nothing mapped).
    """

    def __init__(self, adapter, segments: list[Segment], original_len: int, has_padding: bool, conventions):
        self.adapter = adapter
        self.hook: DecodeHook | None = None
        self.segments = segments
        self.original_len = original_len
        self.has_padding = has_padding
        self.trim = conventions.earlier_cache == "trim"
        self.compact = conventions.positions == "compact"
        self.prefix_born: torch.Tensor | None = None  # [batch, final_len]: set when tokens were inserted
        self.step: dict = {}  # the current decode step's model-level inputs, and what its layers share
        # per layer: the segment it ran its prefill positions with, and the one whose rows its cache holds
        self.position_index = [
            max(j for j, seg in enumerate(segments) if seg.first_layer <= i) for i in range(adapter.num_layers)
        ]
        self.mask_index = [len(segments) - 1] * adapter.num_layers if self.trim else self.position_index
        self.reference = adapter.reference_layer
        self.prefix_valid = segments[self.mask_index[self.reference]].valid  # [batch, len]: the model-level mask
        self.pruned_len = self.prefix_valid.shape[1]

    @property
    def next_position(self) -> torch.Tensor:
        """[batch]: one past each sample's largest prompt position (M-RoPE: over every row), in the original
        numbering: where a decode step given no positions continues."""
        return self.segments[0].next_position

    def shift(self, layer_idx: int) -> torch.Tensor | None:
        """[batch]: how much lower than the original numbering layer `layer_idx` continues (None: not at all)."""
        if not self.compact:
            return None
        return self.segments[0].next_position - self.segments[self.position_index[layer_idx]].next_position

    def layer_inputs(self, layer_idx: int, kwargs: dict, cache, hidden: torch.Tensor) -> dict | None:
        """The attention mask and rotary tables of decoder layer `layer_idx` for a decode step, where they differ
        from the model-level ones (mapped onto the reference layer): another cache layout, other positions, or rows
        of tokens inserted at a later layer to hide. None: nothing differs (always, for a recurrent layer: the new
        tokens' padding is all it masks). Layers of one segment share what is built for it within a step."""
        if self.adapter.layer_kind(layer_idx) in RECURRENT_LAYER_TYPES:
            return None
        updates, query_len = {}, hidden.shape[1]
        segment = self.mask_index[layer_idx]
        mask = kwargs.get("attention_mask")
        if segment != self.mask_index[self.reference]:
            key = ("mask", segment)
            if key not in self.step:
                self.step[key] = self._layer_mask(self.segments[segment].valid, mask, cache, layer_idx, query_len)
            mask = updates["attention_mask"] = self.step[key]
        narrowed = self.hide_unborn(layer_idx, mask, cache, query_len)
        if narrowed is not None:
            mask = updates["attention_mask"] = narrowed
        if self.hook is not None and layer_idx == self.hook.layer - 1:  # its input, for the hook's attention
            self.step["hook_query"] = (hidden, mask, kwargs["position_embeddings"])
        elif self.hook is not None and layer_idx >= self.hook.layer:
            if "hook_hidden" not in self.step:
                self.step["hook_hidden"] = self._run_hook(cache)
            hide = self.step["hook_hidden"]
            if hide is not None:
                updates["attention_mask"] = self._hide_rows(hide, mask, cache, layer_idx, query_len)
        segment = self.position_index[layer_idx]
        if self.compact and segment != self.position_index[self.reference]:
            key = ("rotary", segment)
            if key not in self.step:
                positions = self.step["positions"]
                delta = self.shift(layer_idx) - self.shift(self.reference)
                positions = positions - delta.view(-1, *[1] * (positions.ndim - 1))
                self.step[key] = self.adapter.rotary(hidden, positions)
            updates["position_embeddings"] = self.step[key]
        return updates or None

    def _layer_mask(self, prefix_valid, model_mask, cache, layer_idx: int, query_len: int):
        """A 4-D mask over this layer's cache: its own prefix rows, then the decoded tokens (causal)."""
        new_valid = self.step["new_valid"]  # [batch, decoded + query_len]
        kernel = getattr(self.adapter.language_model.config, "_attn_implementation", "eager")
        if model_mask is None and not self.has_padding and bool(new_valid.all()) and query_len == 1:
            return None  # one new query row sees every cached row: no mask, whatever the layer's length
        if kernel not in ("eager", "sdpa"):
            hybrid = set(self.adapter.layer_types) & set(RECURRENT_LAYER_TYPES)  # which cannot trim
            trim = "" if hybrid else ", or set VTRConfig(earlier_cache='trim')"
            raise ValueError(
                f"decoding a padded batch after a pruned prefill whose layers keep different cache lengths needs "
                f"per-layer masks, which attn_implementation={kernel!r} cannot take; load the model with "
                f"attn_implementation='sdpa' or 'eager'{trim}"
            )
        batch, past = prefix_valid.shape[0], cache.get_seq_length(layer_idx)
        kv_len = past + query_len
        allowed = torch.cat([prefix_valid, new_valid], dim=1)[:, None, None, :kv_len]
        rows = torch.arange(query_len, device=allowed.device)[:, None] + past
        causal = torch.arange(kv_len, device=allowed.device)[None, :] <= rows
        allowed = (allowed & causal[None, None]).expand(batch, 1, query_len, kv_len)
        if model_mask is not None and model_mask.dtype != torch.bool:
            dtype = model_mask.dtype
            return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(dtype).min
            )
        return allowed

    def hide_unborn(self, layer_idx: int, attention_mask, cache, query_len: int):
        """The attention mask of decoder layer `layer_idx` for a decode step, hiding the cache rows of tokens
        inserted at a later layer (their keys/values there are placeholders). None: nothing to hide."""
        if self.prefix_born is None:
            return None
        hidden = self.prefix_born > layer_idx  # [batch, pruned_len]
        if not bool(hidden.any()):
            return None
        return self._hide_rows(hidden, attention_mask, cache, layer_idx, query_len)

    @staticmethod
    def _hide_rows(hidden: torch.Tensor, attention_mask, cache, layer_idx: int, query_len: int):
        """`attention_mask` of decoder layer `layer_idx` at a decode step with the cache rows `hidden` [batch, n]
        (the first n rows of its cache) hidden as well; a None mask (the kernel's causal default) is built."""
        batch, past = hidden.shape[0], cache.get_seq_length(layer_idx)
        kv_len = past + query_len
        hide = torch.zeros(batch, kv_len, dtype=torch.bool, device=hidden.device)
        hide[:, : hidden.shape[1]] = hidden
        hide = hide[:, None, None, :]
        if attention_mask is None:  # build what the kernel would have used: causal over the new tokens
            rows = torch.arange(query_len, device=hidden.device)[:, None] + past
            allowed = torch.arange(kv_len, device=hidden.device)[None, :] <= rows
            return (allowed[None, None] & ~hide).expand(batch, 1, query_len, kv_len)
        if attention_mask.dtype == torch.bool:
            return attention_mask & ~hide
        return attention_mask.masked_fill(hide, torch.finfo(attention_mask.dtype).min)

    def _run_hook(self, cache) -> torch.Tensor | None:
        """The `DecodeHook` at this step: layer L-1's attention of the step's query rows over its whole cache
        (computed for those rows only), the strategy's choice, recorded; the rows to hide from layers >= L
        ([batch, pruned_len] bool), or None."""
        hook = self.hook
        hidden, mask, (cos, sin) = self.step.pop("hook_query")
        index = hook.layer - 1
        keys = cache.layers[index].keys  # after layer L-1 ran: the current tokens included
        batch, query_len, kv_len = hidden.shape[0], hidden.shape[1], keys.shape[2]
        if mask is None:
            seen = torch.ones(batch, kv_len, dtype=torch.bool, device=keys.device)
        else:  # the rows the step's last query row saw in layer L-1
            row = mask[:, 0, -1, -kv_len:]
            seen = (row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2).expand(batch, kv_len)
        layer = self.adapter.language_model.layers[index]
        own = scoring_attention(layer, hidden, cos, sin, seen, cache, index, self.adapter.rope_fn)
        # scoring_attention numbers query rows by its input (the step's rows); the hook reads them as cache rows
        offset = kv_len - query_len
        attention = ScoringAttention(lambda rows: own._query_fn(rows - offset), keys, seen, own.shape[1], own._scaling)
        visual = torch.zeros(batch, kv_len, dtype=torch.bool, device=keys.device)
        visual[:, : hook.visual.shape[1]] = hook.visual
        keep = hook.strategy.decode_keep(attention, visual, hook.state, hook.config, query_len=query_len)
        hide = None if keep is None else (visual & ~keep.to(visual.device))[:, : hook.visual.shape[1]]
        recorded = hide if hide is not None else torch.zeros_like(hook.visual)
        hook.record.decode.append(DecodeRecord(layer=hook.layer, hidden=recorded))
        return hide if hide is not None and bool(hide.any()) else None

    def conversation_length(self, cache) -> int:
        """How many tokens of the conversation the (shorter) cache stands for: the original prompt and every
        token appended since."""
        return self.original_len + cache.get_seq_length() - self.pruned_len

    def map_inputs(self, attention_mask, position_ids, cache, query_len: int):
        decoded = cache.get_seq_length() - self.pruned_len  # tokens appended since the prefill
        batch = self.prefix_valid.shape[0]
        device = self.prefix_valid.device
        new_valid = torch.ones(batch, decoded + query_len, dtype=torch.bool, device=device)
        if attention_mask is not None:
            expected = self.original_len + decoded + query_len
            if attention_mask.ndim != 2 or attention_mask.shape[1] != expected:
                raise ValueError(
                    f"after a pruned prefill, decode steps need a 2-D attention_mask over the original prompt plus "
                    f"the new tokens ({expected} columns); got shape {tuple(attention_mask.shape)}"
                )
            new_valid = attention_mask[:, self.original_len :].bool()
            prefix = self.prefix_valid.to(attention_mask.dtype)
            attention_mask = torch.cat([prefix, attention_mask[:, self.original_len :]], dim=1)
        elif self.has_padding:
            attention_mask = torch.cat([self.prefix_valid.long(), new_valid.long()], dim=1)
        if position_ids is None:
            position_ids = self.adapter.decode_positions(self, decoded, query_len, batch)
        shift = self.shift(self.reference)
        if shift is not None:  # the reference layer's own numbering; other layers re-shift in their hook
            position_ids = (
                position_ids - shift.view(-1, 1) if position_ids.ndim == 2 else position_ids - shift.view(1, -1, 1)
            )
        self.step = {"new_valid": new_valid, "positions": self.adapter.engine_positions(position_ids)}
        return attention_mask, position_ids


#: cache -> the DecodeState of the pruned prefill that filled it (weak: it goes with the cache)
_DECODE_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decode_state(cache) -> DecodeState | None:
    """The `DecodeState` of the pruned prefill that filled `cache` (None: not a pruned prefill's cache, or one
    emptied since by `reset()`). A copy of a pruned cache (`copy.deepcopy`) has none: decoding
    on it is refused where it can be told (`VTRModelMixin.vtr_forward`), so do not copy a pruned cache."""
    if cache is None:
        return None
    try:
        state = _DECODE_STATES.get(cache)
    except TypeError:  # an unhashable cache object is never one of ours
        return None
    if state is not None and cache.get_seq_length() == 0:  # emptied: whatever comes next is a new prompt
        del _DECODE_STATES[cache]
        return None
    return state


# ----------------------------------------------------------------------------------------------- engine


class PrunedPrefill:
    """One pruned prefill of a batch. `run()` returns the backbone's output."""

    def __init__(self, adapter: BackboneAdapter, config: VTRConfig, args: dict, kwargs: dict):
        self.adapter, self.config, self.args, self.kwargs = adapter, config, args, kwargs
        self.strategy: PruningStrategy = get_strategy(config.strategy)()
        self.renumbered = False  # a stage renumbered positions (`compact`)
        self.conventions = config.conventions(mrope=adapter.mrope)
        self.scoring = check_layer_kinds(config, adapter.layer_types, adapter.mrope)  # per stage: its scoring layer

    def run(self):
        args, kwargs, lm = self.args, self.kwargs, self.adapter.language_model
        use_cache, return_dict = self._pop_options(kwargs)
        kernel = getattr(lm.config, "_attn_implementation", "eager")
        if (
            self.conventions.token_merge
            and self.conventions.earlier_cache == "trim"
            and kernel not in ("eager", "sdpa")
        ):
            raise ValueError(
                f"token_merge needs per-layer decode masks, which attn_implementation={kernel!r} cannot take; "
                "load the model with attn_implementation='sdpa' or 'eager'"
            )
        decode_layer = self._decode_layer(kernel)
        prefill = self.prefill_tokens = self.adapter.prefill_tokens(args)
        batch, seq_len = prefill.visual.shape
        cache = self._empty_cache(args.get("past_key_values"), use_cache, lm.config)
        if args.get("attention_mask") is not None and tuple(args["attention_mask"].shape) != (batch, seq_len):
            raise ValueError(
                f"attention_mask must be [batch, seq] = {(batch, seq_len)}, got {tuple(args['attention_mask'].shape)}"
            )
        device = prefill.hidden.device
        tokens = TokenState(
            hidden=prefill.hidden,
            visual=prefill.visual,
            valid=prefill.valid,
            positions=prefill.positions,
            original_index=torch.arange(seq_len, device=device).unsqueeze(0).expand(batch, -1),
            cos=prefill.cos,
            sin=prefill.sin,
            born=torch.zeros(batch, seq_len, dtype=torch.long, device=device),  # first layer a row exists in
            merged=torch.zeros(batch, seq_len, dtype=torch.bool, device=device),  # rows a strategy inserted
            **prefill.extras,
        )
        # Host sync (once per forward, before any layer runs): padding, and per sample the visual span,
        # visual count and real length that the first prune stage needs.
        host = torch.cat(
            [prefill.valid.all(1, keepdim=True), _span_info(prefill.visual, prefill.valid, tokens.original_index)], 1
        )
        host = host.tolist()
        self.has_padding = not all(row[0] for row in host)
        self.info = [row[1:] for row in host]
        self.record = VTRRecord(strategy=self.config.strategy, original_len=seq_len)
        self.sample_ctx = [{} for _ in range(batch)]  # one vtr_ctx per sample, shared by its stages
        self.snapshots: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.layer0 = TokenState(**tokens.tensors)  # the unpruned layer-0 inputs, for prior forwards
        self.segments = [Segment(0, tokens.valid, _next_position(tokens.positions, tokens.valid))]
        self.original_counts = prefill.visual.sum(1)  # [batch]: for budgets counted from the prompt
        snapshot_layers = set(self.strategy.snapshot_layers(self.config))
        stages = {k: stage for stage, k in enumerate(self.config.prune_layers)}
        masks = self.adapter.layer_masks(tokens.hidden, tokens.valid if self.has_padding else None)
        # inputs of the scoring layers (scoring_layer="previous"), for recomputing their Q/K
        captured = set(self.scoring) if self.conventions.scoring_layer == "previous" else set()
        pruned, scoring_inputs = False, {}
        for i, layer in enumerate(lm.layers[: self.adapter.num_layers]):
            if i in stages and self._prune_stage(stages[i], i, tokens, scoring_inputs, cache, prefill):
                pruned = True
                masks = self.adapter.layer_masks(tokens.hidden, tokens.valid if self.has_padding else None)
            if i in captured:
                scoring_inputs[i] = tokens.hidden
            tokens.hidden = self._run_layer(i, layer, tokens, masks, cache, use_cache, **kwargs)
            if i in snapshot_layers:
                self.snapshots[i] = (tokens.hidden, tokens.original_index)
        hidden = lm.norm(tokens.hidden)
        self.record.kept_index = tokens.original_index
        if pruned and cache is not None:
            # the decode steps of this prefill find it by the cache object (`decode_state(cache)`)
            state = DecodeState(self.adapter, self.segments, seq_len, self.has_padding, self.conventions)
            state.compact = self.renumbered  # some stage renumbered: layers from it on continue their own numbering
            if self.conventions.earlier_cache == "trim" and any(any(stage.merged) for stage in self.record.stages):
                # inserted at K: the trimmed earlier layers hold placeholder rows for them
                state.prefix_born = tokens.born
            if decode_layer is not None:
                candidates = getattr(self.strategy, "decode_candidates", None)
                visual = tokens.visual
                if candidates is not None:
                    visual = visual & candidates(visual, tokens.original_index, self.sample_ctx).to(visual.device)
                state.hook = DecodeHook(self.strategy, self.config, decode_layer, visual, self.record)
            _DECODE_STATES[cache] = state
        logits = self.adapter.lm_head(slice_logits_to_keep(hidden, args.get("logits_to_keep", 0)))
        loss = None
        if args.get("labels") is not None:
            loss = self._loss(logits, args["labels"], tokens.original_index)
        output = self.adapter.output(loss, logits, cache, prefill)
        return output if return_dict else output.to_tuple()

    def _decode_layer(self, kernel: str) -> int | None:
        """L of the strategy's decode hook (`DecodeHook`), checked against this model, or None (no hook)."""
        decode_layer = getattr(self.strategy, "decode_layer", None)
        layer = decode_layer(self.config) if decode_layer is not None else None
        if layer is None:
            return None
        name, count = self.config.strategy, self.adapter.num_layers
        if not 1 <= layer < count:
            raise ValueError(
                f"strategy {name!r} prunes the KV cache of decoder layers >= {layer} at decode steps: the language "
                f"model has {count} decoder layers, so that layer must be in [1, {count - 1}]"
            )
        if kernel not in ("eager", "sdpa"):
            raise ValueError(
                f"strategy {name!r} prunes the KV cache at decode steps with per-layer masks, which "
                f"attn_implementation={kernel!r} cannot take; load the model with attn_implementation='sdpa' or 'eager'"
            )
        if self.conventions.earlier_cache == "keep" and self.config.prune_layers[-1] > layer - 1:
            raise ValueError(
                f"strategy {name!r} reads layer {layer - 1}'s cache at decode steps, which must hold the kept tokens: "
                f"prune at a layer <= {layer - 1} (prune_layer={self.config.prune_layer}), or earlier_cache='trim'"
            )
        return layer

    def _run_layer(self, i: int, layer, tokens: TokenState, masks: dict, cache, use_cache: bool, **kwargs):
        """Decoder layer `i` on the current tokens, then the adapter's after-layer hook; the new hidden states."""
        tokens.hidden = layer(
            tokens.hidden,
            attention_mask=masks[self.adapter.layer_kind(i)],
            position_embeddings=(tokens.cos, tokens.sin),
            past_key_values=cache,
            use_cache=use_cache,
            **kwargs,
        )
        return self.adapter.after_layer(i, tokens, self.prefill_tokens)

    def _pop_options(self, kwargs):
        for unsupported in ("output_attentions", "output_hidden_states"):
            if kwargs.pop(unsupported, False):
                raise ValueError(
                    f"{unsupported}=True is not available in a pruned forward (sequence lengths change between "
                    "layers); read ctx['hidden_states'] inside a strategy, or set VTRConfig(enabled=False)"
                )
        return_dict = kwargs.pop("return_dict", True)
        use_cache = kwargs.pop("use_cache", None)
        if use_cache is None:
            use_cache = getattr(self.adapter.language_model.config, "use_cache", True)
        return use_cache, return_dict

    @staticmethod
    def _empty_cache(cache, use_cache: bool, config):
        if not use_cache:
            return None
        if cache is None:
            return DynamicCache(config=config)
        if not isinstance(cache, DynamicCache):
            raise ValueError(
                f"pruning shortens the KV cache, which needs a DynamicCache; got {type(cache).__name__} "
                "(do not set cache_implementation='static' with VTR)"
            )
        if cache.get_seq_length() > 0:
            raise ValueError(
                "a pruned prefill must start from an empty KV cache (the image must be in the first forward); "
                f"this cache already holds {cache.get_seq_length()} tokens"
            )
        return cache

    def _prune_stage(self, stage: int, prune_at: int, tokens: TokenState, scoring_inputs, cache, prefill) -> bool:
        """Score, select and gather at layer `prune_at` (`scoring_inputs`: layer -> its input, for the scoring
        layer's Q/K). Returns True if the sequence changed."""
        start = time.perf_counter()
        batch, seq_len = tokens.visual.shape
        info = self.info  # read back with the previous sync, before the layers ran
        counts = [row[2] for row in info]
        stage_record = StageRecord(
            layer=prune_at,
            budget=self.config.stage_budget(stage).describe(),
            seq_len_before=seq_len,
            seq_len_after=seq_len,
            image_tokens_before=counts,
            image_tokens_kept=list(counts),
            kept_positions=[],
            scoring_layer=self.scoring[stage],
        )
        self.record.stages.append(stage_record)
        if sum(counts) == 0:
            stage_record.kept_positions = [tokens.original_index[b, :0] for b in range(batch)]
            return False
        layer_idx = self.scoring[stage]
        if self.conventions.scoring_layer == "own":  # layer K's own q/k on the hidden states entering it
            scores = self._score(stage, layer_idx, tokens, tokens.hidden, None, info, prefill)
        else:  # the attention inside layer K-1 or the nearest attention layer before it (-1: a pre-LLM stage)
            scores = self._score(stage, layer_idx, tokens, scoring_inputs.pop(layer_idx, None), cache, info, prefill)
        keep_visual = self._select(stage, scores, tokens.visual, info)
        if self.conventions.token_merge:
            changed = self._merge_stage(stage, prune_at, tokens, scores, keep_visual, info, cache, stage_record)
            stage_record.scoring_ms = (time.perf_counter() - start) * 1000
            return changed
        keep_rows = ~tokens.visual | keep_visual
        # Host sync (one per stage): rows and visual tokens kept per sample, and the next stage's spans
        # measured in kept-row coordinates (shifted by each sample's re-padding below).
        rank = keep_rows.cumsum(1) - 1
        next_info = _span_info(tokens.visual & keep_visual, tokens.valid & keep_rows, rank)
        host = torch.cat([keep_rows.sum(1, keepdim=True), keep_visual.sum(1, keepdim=True), next_info], 1).tolist()
        kept = [[row[0] for row in host], [row[1] for row in host]]
        new_len = max(kept[0])
        pad = [new_len - n for n in kept[0]]
        self.info = [[a + p, e + p, c, n + p] for (a, e, c, n), p in zip((row[2:] for row in host), pad)]
        stage_record.image_tokens_kept = kept[1]
        stage_record.seq_len_after = new_len
        # kept visual rows first (in order), then slice each sample's count: no data-dependent shapes
        order = torch.sort((~keep_visual).to(torch.int8), dim=1, stable=True).indices
        stage_record.kept_positions = [tokens.original_index[b, order[b, : kept[1][b]]] for b in range(batch)]
        changed = any(n != seq_len for n in kept[0])
        if changed:
            # stable sort puts dropped rows first and kept rows last, each in their original order
            index = torch.sort(keep_rows.to(torch.int8), dim=1, stable=True).indices[:, seq_len - new_len :]
            new_valid = keep_rows.gather(1, index)
            tokens.gather(index, new_valid)
            self.has_padding = self.has_padding or len(set(kept[0])) > 1
            self._after_gather(stage, prune_at, tokens, index, cache)
        stage_record.scoring_ms = (time.perf_counter() - start) * 1000
        return changed

    def _merge_stage(self, stage, prune_at, tokens: TokenState, scores, keep_visual, info, cache, record) -> bool:
        """Prune and insert the strategy's merged tokens (`merge_tokens`). Each merged token goes right after the
        row the strategy names for it (default: the sample's last kept visual row, SparseVLM's end of the visual
        segment; VisionZip: its image's last row; the pool baseline: its cell) and takes the RoPE position and
        identity of a representative dropped token (`compact` then renumbers it with the rest); it exists
        from layer `prune_at` on (`born`): under `earlier_cache="keep"` the layers before never hold it,
        under `"trim"` their cache rows for it are placeholders that no decode step may attend to
        (`DecodeState.hide_unborn`). Merged rows are visual tokens for later stages, which may keep, drop or
        recycle them again (as SparseVLM does); `kept_positions` lists real tokens only. Per-sample host
        syncs: this path is for methods that merge, not the batched fast path."""
        batch, seq_len = tokens.visual.shape
        device = tokens.visual.device
        orders, inserts, kept_visual_counts, merged_counts, mixes = [], [], [], [], {}
        for b, (span_start, span_end, count, _) in enumerate(info):
            keep_b = (~tokens.visual[b] | keep_visual[b]).nonzero().reshape(-1)
            kept_visual = keep_visual[b].nonzero().reshape(-1)
            dropped = (tokens.visual[b] & ~keep_visual[b]).nonzero().reshape(-1)
            merged, reps = None, torch.empty(0, dtype=torch.long, device=device)
            anchor = int(kept_visual.max()) if kept_visual.numel() else span_start - 1
            after = torch.empty(0, dtype=torch.long, device=device)
            if count and dropped.numel():
                out = self.strategy.merge_tokens(
                    tokens.hidden[b, dropped],
                    scores[b, dropped],
                    self.config,
                    stage=stage,
                    layer_idx=prune_at - 1,
                    dropped_index=dropped,
                    kept_index=kept_visual,
                    image_token_range=(span_start, span_end),
                    vtr_ctx=self.sample_ctx[b],
                )
                if out is not None:
                    merged, which = out[0], out[1].to(device)
                    reps = dropped[which]
                    after = out[2].to(device) if len(out) > 2 and out[2] is not None else None
                    if after is None:
                        after = torch.full_like(reps, anchor)
                    mix = out[3] if len(out) > 3 else None
                    if (
                        merged.shape[0] != reps.numel()
                        or after.shape != reps.shape
                        or (mix is not None and tuple(mix.shape) != (reps.numel(), dropped.numel()))
                    ):
                        raise ValueError(
                            f"strategy {self.config.strategy!r}.merge_tokens returned {merged.shape[0]} merged tokens, "
                            f"{reps.numel()} representatives and {after.numel()} insertion rows"
                            + (f" and a {tuple(mix.shape)} mix" if mix is not None else "")
                            + f" (for {dropped.numel()} dropped tokens); they must match"
                        )
                    if mix is not None:  # the adapter's per-token extras of the merged tokens, mixed alike
                        extras = {name: tokens.tensors[name][b, dropped] for name in self.prefill_tokens.extras}
                        mixes[b] = self.adapter.merged_extras(extras, mix.to(device), self.prefill_tokens)
            # kept rows in order, each merged token right after its row (merged ones in their given order)
            keys = torch.cat([2 * keep_b, 2 * after + 1])
            perm = torch.sort(keys, stable=True).indices
            slot = torch.cat([torch.full_like(keep_b, -1), torch.arange(reps.numel(), device=device)])[perm]
            orders.append(torch.cat([keep_b, reps])[perm])
            inserts.append((slot, merged))
            kept_visual_counts.append(kept_visual.numel())
            merged_counts.append(reps.numel())
        new_len = max(o.numel() for o in orders)
        index = torch.zeros(batch, new_len, dtype=torch.long, device=device)
        new_valid = torch.zeros(batch, new_len, dtype=torch.bool, device=device)
        for b, order in enumerate(orders):
            index[b, new_len - order.numel() :] = order
            new_valid[b, new_len - order.numel() :] = True
        real = keep_visual & ~tokens.merged
        record.kept_positions = [tokens.original_index[b, real[b]] for b in range(batch)]
        tokens.gather(index, new_valid)
        for b, (slot, merged) in enumerate(inserts):
            if merged is not None and merged.numel():
                rows = (slot >= 0).nonzero().reshape(-1) + new_len - slot.numel()
                tokens.hidden[b, rows] = merged[slot[slot >= 0]].to(tokens.hidden.dtype)
                for name, values in mixes.get(b, {}).items():
                    tokens.tensors[name][b, rows] = values[slot[slot >= 0]].to(tokens.tensors[name].dtype)
                tokens.born[b, rows] = prune_at
                tokens.visual[b, rows] = True  # a candidate at later stages
                tokens.merged[b, rows] = True
        self.has_padding = self.has_padding or len({o.numel() for o in orders}) > 1
        self._after_gather(stage, prune_at, tokens, index, cache)
        arange = torch.arange(new_len, device=device).expand(batch, -1)
        self.info = _span_info(tokens.visual, tokens.valid, arange).tolist()
        record.image_tokens_kept = kept_visual_counts
        record.merged = merged_counts
        record.seq_len_after = new_len
        return True

    def _after_gather(self, stage: int, prune_at: int, tokens: TokenState, index: torch.Tensor, cache) -> None:
        """After a stage shortened the sequence: renumber positions (`compact`, as the strategy's
        `stage_positions` says for this stage), trim the cache of the layers before (`trim`), and open the
        segment of layers that run on these rows."""
        if self.strategy.stage_positions(stage, self.conventions.positions, self.config) == "compact":
            self.renumbered = True
            tokens.positions = compact_positions(tokens.positions, tokens.valid)
            tokens.cos, tokens.sin = self.adapter.rotary(tokens.hidden, tokens.positions)
        if cache is not None and self.conventions.earlier_cache == "trim":
            for cache_layer in cache.layers[:prune_at]:
                cache_layer.keys = gather_seq(cache_layer.keys, index, 2)
                cache_layer.values = gather_seq(cache_layer.values, index, 2)
        self.segments.append(Segment(prune_at, tokens.valid, _next_position(tokens.positions, tokens.valid)))

    def _score(self, stage, layer_idx, tokens: TokenState, scoring_input, cache, info, prefill) -> torch.Tensor:
        """Scores [batch, seq] (float32; only visual positions are read), one compute_scores call per sample."""
        batch, seq_len = tokens.visual.shape
        attention = None
        if layer_idx >= 0 and self.strategy.stage_needs_attention(stage, self.config):
            layer = self.adapter.language_model.layers[layer_idx]
            attention = scoring_attention(
                layer, scoring_input, tokens.cos, tokens.sin, tokens.valid, cache, layer_idx, self.adapter.rope_fn
            )
        scores = torch.zeros(batch, seq_len, dtype=torch.float32, device=tokens.visual.device)
        order = torch.sort((~tokens.visual).to(torch.int8), dim=1, stable=True).indices  # visual rows first
        for b, (start, end, count, length) in enumerate(info):
            if count == 0:
                continue
            ctx = dict(
                layer_idx=layer_idx,
                stage=stage,
                hidden_states=tokens.hidden[b : b + 1, :length],
                image_token_indices=order[b, :count],
                position_ids=tokens.positions[b, :length],
                batch_index=b,
                anchor_index=self.adapter.anchor_row(end),
                prior_attention=lambda end, b=b, k=layer_idx, t=tokens: self._prior_attention(b, end, k, t),
                original_index=tokens.original_index[b, :length],
                valid=tokens.valid[b, :length],
                final_norm=self.adapter.language_model.norm,
                snapshots={
                    -1: (self.layer0.hidden[b : b + 1], self.layer0.original_index[b]),
                    **{k: (h[b : b + 1], idx[b]) for k, (h, idx) in self.snapshots.items()},
                },
                **{k: (v[b] if isinstance(v, list) else v) for k, v in prefill.strategy_ctx.items()},
                **{k: functools.partial(fn, b) for k, fn in prefill.lazy_ctx.items()},
            )
            state = self.sample_ctx[b]
            state.update(ctx, image_token_range=(start, end))
            view = attention.sample(b, length) if attention is not None else None
            out = self.strategy.compute_scores(view, (start, end), self.config, vtr_ctx=state, **ctx)
            if not isinstance(out, torch.Tensor) or out.numel() != end - start:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(
                    f"strategy {self.config.strategy!r}.compute_scores must return a tensor of {end - start} scores "
                    f"(one per position of image_token_range {(start, end)}); got {got}"
                )
            scores[b, start:end] = out.detach().reshape(-1).to(scores.device, torch.float32)
        return scores

    def _prior_attention(self, b: int, end: int, layer_idx: int, tokens: TokenState):
        """A prior forward for sample `b`: the prompt cut after row `end - 1` of the current sequence (e.g.
        `anchor_index + 1`: prefix and visuals, no question) runs through layers [0, layer_idx) with the
        earlier stages' drops applied at their layers; returns the lazy attention of layer `layer_idx` over
        that prefix, `[1, heads, end, end]` in current-sequence rows (re-padding rows masked). Costs a
        host sync and the layers, and only when a strategy asks for it."""
        if layer_idx < 0:
            raise ValueError("a prior forward needs a scoring layer (prune_layer >= 1)")
        last = int(tokens.original_index[b, end - 1])
        prefix = TokenState(**{name: t[b : b + 1, : last + 1] for name, t in self.layer0.tensors.items()})
        stages = {s.layer: s.kept_positions[b] for s in self.record.stages[:-1]}  # earlier stages only
        layers = self.adapter.language_model.layers
        for i in range(layer_idx + 1):
            if i in stages:
                keep = ~prefix.visual[0] | torch.isin(prefix.original_index[0], stages[i])
                index = keep.nonzero().reshape(1, -1)
                prefix.gather(index, torch.ones_like(index, dtype=torch.bool))
            if i == layer_idx:
                break
            padded = not bool(prefix.valid.all())
            masks = self.adapter.layer_masks(prefix.hidden, prefix.valid if padded else None)
            prefix.hidden = self._run_layer(i, layers[i], prefix, masks, None, False)
        shift = end - prefix.visual.shape[1]  # this sample's left re-padding in the current sequence
        if shift > 0:
            rows = torch.arange(end, device=prefix.hidden.device)[None]
            prefix.gather((rows - shift).clamp_min(0), rows >= shift)
        return scoring_attention(
            layers[layer_idx],
            prefix.hidden,
            prefix.cos,
            prefix.sin,
            prefix.valid,
            None,
            layer_idx,
            self.adapter.rope_fn,
        )

    def _select(self, stage, scores, visual, info) -> torch.Tensor:
        """[batch, seq] bool: the visual tokens to keep. One batched Top-K unless the strategy overrides
        `select_tokens` (then it is called per sample)."""
        if type(self.strategy).select_tokens is PruningStrategy.select_tokens:
            budget, limit = self.config.stage_budget(stage), None
            if budget.keep_tokens is None and budget.score_threshold is None:
                current = visual.sum(1)
                limit = self.strategy.ratio_keep_count(self.config, stage, current, self.original_counts)
            return select_batch(scores, visual, budget, limit)
        keep = torch.zeros_like(visual)
        for b, (start, end, count, _) in enumerate(info):
            if count:
                candidates = visual[b, start:end]
                chosen = self.strategy.select_tokens(scores[b, start:end][candidates], count, self.config, stage=stage)
                rows = torch.arange(start, end, device=visual.device)[candidates][chosen.to(visual.device)]
                keep[b, rows] = True
        return keep

    def _loss(self, logits, labels, original_index):
        """Next-token loss on the pruned sequence: each kept row predicts the label that followed it."""
        if logits.shape[1] != original_index.shape[1]:
            raise ValueError("labels with logits_to_keep are not supported in a pruned forward")
        next_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
        gathered = gather_seq(next_labels, original_index.clamp_min(0), 1).masked_fill(original_index < 0, -100)
        model = self.adapter.model
        vocab = model.config.get_text_config().vocab_size
        return model.loss_function(logits=logits, labels=None, shift_labels=gathered, vocab_size=vocab, **self.kwargs)


# ----------------------------------------------------------------------------------------------- model mixin


def _decode_layer_hook(layer_idx: int):
    def hook(module, args, kwargs):
        cache = kwargs.get("past_key_values")
        state = decode_state(cache)
        if state is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] == 0 or "new_valid" not in state.step:
            return None
        updates = state.layer_inputs(layer_idx, kwargs, cache, hidden)
        if updates is None:
            return None
        return args, {**kwargs, **updates}

    return hook


def _query_len(args: dict) -> int:
    """How many new tokens a forward's `input_ids` (or `inputs_embeds`) carry."""
    ids = args.get("input_ids")
    return (ids if ids is not None else args["inputs_embeds"]).shape[1]


def _refuse_unmapped_cache(args: dict, cache, past: int) -> None:
    """A cache with no decode state that can only be a pruned prefill's (a `copy.deepcopy` of one loses the
    state): full-attention layers of different lengths, or a 2-D mask longer than the cache plus the new
    tokens. Decoding on it would be wrong, so it is refused with the reason."""
    query_len, mask = _query_len(args), args.get("attention_mask")
    lengths = {layer.get_seq_length() for layer in getattr(cache, "layers", ()) if type(layer) is DynamicLayer}
    too_long = mask is not None and mask.ndim == 2 and mask.shape[1] > past + query_len
    if len(lengths) > 1 or too_long:
        raise ValueError(
            "this KV cache looks like a pruned prefill's that lost its decode state (a copy.deepcopy of it, which "
            "is not supported: run the prefill again instead)"
            + (f": its layers hold {sorted(lengths)} tokens" if len(lengths) > 1 else "")
            + (
                f": the attention_mask covers {mask.shape[1]} tokens, the cache {past} plus {query_len} new ones"
                if too_long
                else ""
            )
        )


class VTRModelMixin:
    """Mixed into a fork's subclass of the stock `...ForConditionalGeneration` (listed first).

    The subclass sets `vtr_adapter_class` and `vtr_stock_class`, restates the stock `forward` signature
    (generate() inspects it) and makes its body
    `return self.vtr_forward(super().forward, *self.forward_arguments(locals()))`.
    """

    vtr_adapter_class: type[BackboneAdapter] = BackboneAdapter
    vtr_stock_class: type | None = None

    def _vtr_setup(self, vtr_config: VTRConfig | None) -> None:
        self.vtr_last: VTRRecord | None = None
        self.vtr_adapter = self.vtr_adapter_class(self)
        self.set_vtr_config(vtr_config if vtr_config is not None else VTRConfig(enabled=False))
        if not getattr(self, "_vtr_hooked", False):
            # Decode steps run the stock forward, which builds one mask and one set of rotary tables for all
            # layers, fitted to layer 0. After a pruned prefill a layer may differ: its cache holds other rows
            # (earlier_cache="keep"), it continues other positions (positions="compact"), or it holds
            # placeholder rows of tokens inserted at a later layer. A pre-hook per decoder layer gives that
            # layer its own mask / tables; it does nothing unless the cache carries a pruned prefill's DecodeState.
            for i, layer in enumerate(self.vtr_adapter.language_model.layers):
                layer.register_forward_pre_hook(_decode_layer_hook(i), with_kwargs=True)
            self._vtr_hooked = True

    @classmethod
    def from_stock(cls, model, vtr_config: VTRConfig | None = None):
        """Turn an already loaded stock model into this class, in place (no weights are copied)."""
        stock = cls.vtr_stock_class
        if stock is not None and not isinstance(model, stock):
            raise TypeError(f"expected a {stock.__name__}, got {type(model).__name__}")
        model.__class__ = cls
        model._vtr_setup(vtr_config)
        return model

    def vtr_conventions(self):
        """The conventions the current config runs with on this backbone (`VTRConfig.conventions`)."""
        return self.vtr_config.conventions(mrope=self.vtr_adapter.mrope)

    def set_vtr_config(self, vtr_config: VTRConfig) -> None:
        """Validate against this model and keep it. A config given no budget gets the backbone's default
        (`adapter.default_keep_tokens`); an explicit budget always wins. A schedule left unset moves onto a hybrid
        decoder's attention layers (`snap_schedule`, with a warning); an explicit one is checked (`check_layer_kinds`)."""
        if not isinstance(vtr_config, VTRConfig):
            raise TypeError(f"vtr_config must be a VTRConfig, got {type(vtr_config).__name__}")
        default = getattr(self.vtr_adapter, "default_keep_tokens", None)
        if vtr_config.budget_defaulted and default is not None and vtr_config.keep_tokens != default:
            layers_defaulted = vtr_config.prune_layer_defaulted
            vtr_config = dataclasses.replace(vtr_config, keep_tokens=default)
            # still "left unset by the user", for the method's schedule below
            vtr_config.budget_defaulted, vtr_config.prune_layer_defaulted = True, layers_defaulted
        if vtr_config.enabled:  # a method's own schedule for what the user left unset (PDrop, CLSE)
            method = get_strategy(vtr_config.strategy)
            missing = method.missing_facts(self.vtr_adapter)
            if missing:
                raise ValueError(
                    f"strategy {vtr_config.strategy!r} is not supported on {type(self).__name__}: it needs "
                    f"{', '.join(missing)}, which this model family does not provide (see `scripts/vtr_run --list`)"
                )
            layers_defaulted = vtr_config.prune_layer_defaulted
            updates = method.schedule_defaults(vtr_config, self.vtr_adapter.num_layers)
            if updates:
                vtr_config = dataclasses.replace(vtr_config, **updates)
            if layers_defaulted:
                vtr_config = self._default_schedule_on_layer_kinds(vtr_config)
        vtr_config.validate_for_model(self.vtr_adapter.num_layers)
        if vtr_config.enabled:
            check_layer_kinds(vtr_config, self.vtr_adapter.layer_types, self.vtr_adapter.mrope)
        self.vtr_config = vtr_config

    def _default_schedule_on_layer_kinds(self, vtr_config: VTRConfig) -> VTRConfig:
        """A default schedule moved onto this decoder's attention layers (`snap_schedule`; a no-op unless it is
        hybrid), with a warning that says where to."""
        adapter = self.vtr_adapter
        types = adapter.layer_types
        layers = snap_schedule(vtr_config, types, adapter.mrope)
        if layers is None:  # some stage fits nowhere: the checks say which
            try:
                check_layer_kinds(vtr_config, types, adapter.mrope)
            except ValueError as error:
                raise ValueError(
                    f"{vtr_config.strategy!r}'s default schedule does not fit this hybrid decoder (give prune_layer): "
                    f"{error}"
                ) from None
        if layers == vtr_config.prune_layers:
            return vtr_config
        recurrent = [i for i, kind in enumerate(types) if kind in RECURRENT_LAYER_TYPES]
        logger.warning(
            "VTRConfig: %r's default prune_layer %s moved to %s on this hybrid decoder (linear attention in layers %s): "
            "a stage scores with the attention of an attention layer (see engine.scoring_layers); set prune_layer to "
            "choose",
            vtr_config.strategy,
            vtr_config.prune_layer,
            layers if len(layers) > 1 else layers[0],
            _ranges(recurrent),
        )
        moved = dataclasses.replace(vtr_config, prune_layer=layers if len(layers) > 1 else layers[0])
        moved.budget_defaulted, moved.prune_layer_defaulted = vtr_config.budget_defaulted, True
        return moved

    def generate(self, *args, **kwargs):
        if self.vtr_config.enabled and self.vtr_adapter.has_visual_input(kwargs):
            # encode here as the pruned prefill does (keeping what methods read, e.g. vision states), and
            # hand generate() the result as pre-encoded features (without gradients, as generate() runs)
            with torch.no_grad():
                kwargs = self.vtr_adapter.pre_encode(kwargs)
            generation_config = kwargs.get("generation_config") or self.generation_config
            use_cache = kwargs.get("use_cache", getattr(generation_config, "use_cache", True))
            if use_cache is False:
                raise ValueError(
                    "generate(use_cache=False) with visual token reduction would re-run the pruned prefill at every "
                    "step and re-select tokens with the newest token as the query; use use_cache=True (the "
                    "default), or VTRConfig(enabled=False) for the unpruned model"
                )
        return super().generate(*args, **kwargs)

    def _reorder_cache(self, past_key_values, beam_idx):
        """generate()'s beam search reorders the cache here (it calls a model's `_reorder_cache` when there is one):
        as the stock code, then the per-row state of a strategy's decode hook (`DecodeHook.reorder`) alike."""
        past_key_values.reorder_cache(beam_idx)
        state = decode_state(past_key_values)
        if state is not None and state.hook is not None:
            state.hook.reorder(beam_idx)
        return past_key_values

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, is_first_iteration=False, **kwargs):
        cache = kwargs.get("past_key_values")
        state = decode_state(cache)
        if state is not None and is_first_iteration and next_sequence_length is not None:
            # generate() continuing a conversation on a pruned cache (full history as input) cut the history at
            # the cache's shortened length; the new tokens start after the whole conversation the cache holds
            embeds = kwargs.get("inputs_embeds")
            total = (embeds if embeds is not None else input_ids).shape[1]
            held = state.conversation_length(cache)
            if total <= held:
                raise ValueError(
                    f"this pruned KV cache holds a conversation of {held} tokens; to continue it with generate(), "
                    f"pass the whole history plus at least one new token ({total} given)"
                )
            next_sequence_length = total - held
        return super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, is_first_iteration=is_first_iteration, **kwargs
        )

    @staticmethod
    def forward_arguments(local_vars: dict) -> tuple[dict, dict]:
        """(named arguments, extra kwargs) of a subclass's `forward`, from its `locals()` taken first thing.
        `use_cache` travels with the extra kwargs, where the stock models and the engine read it."""
        args = {k: v for k, v in local_vars.items() if k not in ("self", "kwargs", "__class__")}
        kwargs = dict(local_vars.get("kwargs") or {})
        if args.get("use_cache", None) is not None:
            kwargs["use_cache"] = args["use_cache"]
        args.pop("use_cache", None)
        return args, kwargs

    def vtr_forward(self, stock_forward, args: dict, kwargs: dict):
        """Route one forward call: decode step after a pruned prefill, stock forward, or pruned prefill."""
        adapter = self.vtr_adapter
        has_visual = adapter.has_visual_input(args)
        cache = args.get("past_key_values")
        state = decode_state(cache)
        if state is not None and has_visual:
            raise ValueError(
                "this KV cache holds a pruned prefill: a follow-up turn on it may add text only, since a new image "
                "would need its own pruning and positions among tokens already dropped; start a new conversation "
                "(all images in the first forward) for another image"
            )
        if state is not None:
            args["attention_mask"], args["position_ids"] = state.map_inputs(
                args.get("attention_mask"), args.get("position_ids"), cache, _query_len(args)
            )
            return stock_forward(**args, **kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        if past:
            _refuse_unmapped_cache(args, cache, past)
        if cache is None or past == 0 or has_visual:  # a new prompt (not a decode step)
            self.vtr_last = None
        if not self.vtr_config.enabled or not has_visual:
            return stock_forward(**adapter.stock_inputs(args, cache), **kwargs)
        self.vtr_config.validate_for_model(adapter.num_layers)
        prefill = PrunedPrefill(adapter, self.vtr_config, args, kwargs)
        output = prefill.run()
        self.vtr_last = prefill.record
        return output
