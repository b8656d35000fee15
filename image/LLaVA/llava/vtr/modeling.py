"""`VTRLlavaForConditionalGeneration`: the stock transformers LLaVA with physical visual token pruning.

A subclass of `LlavaForConditionalGeneration` that adds no parameters (stock checkpoints load as they
are). Only a prefill that carries an image and has VTR enabled takes the pruned path; everything else,
decode steps included, is the stock forward (decode steps only get their attention mask and positions
re-mapped onto the shortened cache).

The pruned prefill runs the stock decoder layers itself, on the kernel the model was loaded with:

    layers [0, K)     all tokens
    scoring           attention of layer K-1, recomputed causally from its own Q/K (see attention.py)
    prune             hidden states, padding mask, positions (RoPE follows them) and the KV cache of
                      layers [0, K) are gathered down to the kept tokens
    layers [K, ...)   kept tokens only; a list of prune layers repeats the last two steps.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, LlavaForConditionalGeneration
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.masking_utils import create_causal_mask
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.llama import modeling_llama
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast

from .attention import ScoringAttention
from .config import VTRConfig
from .strategy import get_strategy


@dataclass
class StageRecord:
    """What one prune stage did, per sample."""

    layer: int  # K: layers from index K on run pruned; scores came from layer K-1
    budget: str
    seq_len_before: int
    seq_len_after: int
    image_tokens_before: list[int]
    image_tokens_kept: list[int]
    # Original (prompt) positions of the image tokens kept, one LongTensor per sample.
    kept_positions: list[torch.Tensor]


@dataclass
class VTRRecord:
    """What the last pruned forward kept. `model.vtr_last` after each call (None for unpruned calls)."""

    strategy: str
    original_len: int
    stages: list[StageRecord] = field(default_factory=list)
    # [batch, final_len]: original position of each row of the pruned sequence (-1 for re-padding).
    kept_index: torch.Tensor | None = None


class _DecodeState:
    """Attached to a KV cache that a pruned prefill shortened; maps later decode inputs onto it."""

    def __init__(self, prefix_valid: torch.Tensor, original_len: int):
        self.prefix_valid = prefix_valid  # [batch, pruned_len] bool
        self.original_len = original_len
        self.pruned_len = prefix_valid.shape[1]
        self.has_padding = not bool(prefix_valid.all())

    def map_inputs(self, attention_mask, position_ids, cache, query_len: int):
        decoded = cache.get_seq_length() - self.pruned_len  # tokens appended since the prefill
        batch = self.prefix_valid.shape[0]
        if attention_mask is not None:
            expected = self.original_len + decoded + query_len
            if attention_mask.ndim != 2 or attention_mask.shape[1] != expected:
                raise ValueError(
                    f"after a pruned prefill, decode steps need a 2-D attention_mask over the original prompt plus "
                    f"the new tokens ({expected} columns); got shape {tuple(attention_mask.shape)}"
                )
            prefix = self.prefix_valid.to(attention_mask.dtype)
            attention_mask = torch.cat([prefix, attention_mask[:, self.original_len :]], dim=1)
        elif self.has_padding:
            new = torch.ones(batch, decoded + query_len, dtype=torch.long, device=self.prefix_valid.device)
            attention_mask = torch.cat([self.prefix_valid.long(), new], dim=1)
        if position_ids is None:
            # What the stock model would use had nothing been pruned: positions continue the original prompt.
            start = self.original_len + decoded
            position_ids = torch.arange(start, start + query_len, device=self.prefix_valid.device)
            position_ids = position_ids.unsqueeze(0).expand(batch, -1)
        return attention_mask, position_ids


@dataclass
class _Sequence:
    """Per-token state of a pruned prefill, all [batch, seq, ...] and shortened together."""

    hidden: torch.Tensor
    is_image: torch.Tensor  # bool
    valid: torch.Tensor  # bool: False = padding
    positions: torch.Tensor  # original RoPE positions
    original_index: torch.Tensor  # index in the prompt (-1 = re-padding)
    cos: torch.Tensor
    sin: torch.Tensor

    def gather(self, index: torch.Tensor, new_valid: torch.Tensor) -> None:
        """Keep the rows `index` [batch, new_len]; rows where `new_valid` is False become masked re-padding."""
        self.hidden = _gather_seq(self.hidden, index, 1)
        self.cos, self.sin = _gather_seq(self.cos, index, 1), _gather_seq(self.sin, index, 1)
        self.is_image = _gather_seq(self.is_image, index, 1) & new_valid
        self.valid = _gather_seq(self.valid, index, 1) & new_valid
        self.positions = _gather_seq(self.positions, index, 1).masked_fill(~new_valid, 0)
        self.original_index = _gather_seq(self.original_index, index, 1).masked_fill(~new_valid, -1)


def _gather_seq(t: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """Gather `t` along its sequence dimension `dim` with a [batch, new_len] index."""
    if t.shape[0] != index.shape[0]:
        t = t.expand(index.shape[0], *t.shape[1:])
    shape = [1] * t.ndim
    shape[0], shape[dim] = index.shape
    full = list(t.shape)
    full[dim] = index.shape[1]
    return torch.gather(t, dim, index.reshape(shape).expand(full))


def _rope_fn(attention_module):
    """`apply_rotary_pos_emb` of the module's own model family (Llama, Mistral, Qwen2, ...)."""
    module = sys.modules.get(type(attention_module).__module__)
    return getattr(module, "apply_rotary_pos_emb", modeling_llama.apply_rotary_pos_emb)


def scoring_attention(layer, layer_input, cos, sin, key_valid, cache, layer_idx) -> ScoringAttention:
    """Lazy causal attention probabilities of decoder `layer` for input `layer_input` [batch, seq, hidden]."""
    attn = layer.self_attn
    rope = _rope_fn(attn)
    normed = layer.input_layernorm(layer_input)
    batch, seq, _ = normed.shape
    head_dim = attn.head_dim
    q_norm = getattr(attn, "q_norm", None)  # Qwen3-style per-head norms
    k_norm = getattr(attn, "k_norm", None)

    def query_fn(rows: torch.Tensor) -> torch.Tensor:
        q = attn.q_proj(normed[:, rows]).view(batch, rows.numel(), -1, head_dim)
        if q_norm is not None:
            q = q_norm(q)
        q = q.transpose(1, 2)
        return rope(q, q, cos[:, rows], sin[:, rows])[0]

    if cache is not None:
        keys = cache.layers[layer_idx].keys  # exactly what the kernel attended to (post-RoPE)
    else:
        k = attn.k_proj(normed).view(batch, seq, -1, head_dim)
        if k_norm is not None:
            k = k_norm(k)
        k = k.transpose(1, 2)
        keys = rope(k, k, cos, sin)[1]
    num_heads = attn.config.num_attention_heads
    return ScoringAttention(query_fn, keys, key_valid, num_heads=num_heads, scaling=attn.scaling)


class VTRLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """Stock LLaVA + visual token reduction, configured by `self.vtr_config`."""

    # Checkpoints load and save in exactly the stock LLaVA layout (see the registration below the class).

    def __init__(self, config, vtr_config: VTRConfig | None = None):
        super().__init__(config)
        self.vtr_last: VTRRecord | None = None
        self.set_vtr_config(vtr_config if vtr_config is not None else VTRConfig(enabled=False))

    @classmethod
    def from_stock(cls, model: LlavaForConditionalGeneration, vtr_config: VTRConfig | None = None):
        """Turn an already loaded stock `LlavaForConditionalGeneration` into this class, in place."""
        if not isinstance(model, LlavaForConditionalGeneration):
            raise TypeError(f"expected a LlavaForConditionalGeneration, got {type(model).__name__}")
        model.__class__ = cls
        model.vtr_last = None
        model.set_vtr_config(vtr_config if vtr_config is not None else VTRConfig(enabled=False))
        return model

    def set_vtr_config(self, vtr_config: VTRConfig) -> None:
        if not isinstance(vtr_config, VTRConfig):
            raise TypeError(f"vtr_config must be a VTRConfig, got {type(vtr_config).__name__}")
        vtr_config.validate_for_model(self.config.text_config.num_hidden_layers)
        self.vtr_config = vtr_config

    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        vision_feature_layer=None,
        vision_feature_select_strategy=None,
        labels=None,
        logits_to_keep=0,
        image_sizes=None,
        mm_encoder_outputs=None,
        **kwargs,
    ):
        stock_args = dict(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            labels=labels,
            logits_to_keep=logits_to_keep,
            image_sizes=image_sizes,
            mm_encoder_outputs=mm_encoder_outputs,
        )
        has_image = pixel_values is not None or bool(mm_encoder_outputs and mm_encoder_outputs.get("image") is not None)
        state = getattr(past_key_values, "_vtr_state", None)
        if state is not None and not has_image:
            query_len = (input_ids if input_ids is not None else inputs_embeds).shape[1]
            stock_args["attention_mask"], stock_args["position_ids"] = state.map_inputs(
                attention_mask, position_ids, past_key_values, query_len
            )
            return super().forward(**stock_args, **kwargs)
        self.vtr_last = None
        if not self.vtr_config.enabled or not has_image:
            return super().forward(**stock_args, **kwargs)
        self.vtr_config.validate_for_model(self.config.text_config.num_hidden_layers)
        return self._pruned_forward(**stock_args, **kwargs)

    # ------------------------------------------------------------------ pruned prefill

    def _merge_image_features(self, input_ids, inputs_embeds, pixel_values, mm_encoder_outputs, **vision_kwargs):
        """The stock LlavaModel merge (image features scattered into the placeholder positions), also
        returning where the image tokens are."""
        model = self.model
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = model.get_input_embeddings()(input_ids)
        image_output = (mm_encoder_outputs or {}).get("image")
        if image_output is None:
            image_output = model.get_image_features(pixel_values=pixel_values, return_dict=True, **vision_kwargs)
        image_features = torch.cat(image_output.pooler_output, dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
        placeholder = model.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, image_features=image_features)
        inputs_embeds = inputs_embeds.masked_scatter(placeholder, image_features)
        return inputs_embeds, placeholder[..., 0], image_features

    def _pruned_forward(
        self,
        input_ids,
        pixel_values,
        attention_mask,
        position_ids,
        past_key_values,
        inputs_embeds,
        vision_feature_layer,
        vision_feature_select_strategy,
        labels,
        logits_to_keep,
        image_sizes,
        mm_encoder_outputs,
        **kwargs,
    ):
        cfg = self.vtr_config
        for unsupported in ("output_attentions", "output_hidden_states"):
            if kwargs.pop(unsupported, False):
                raise ValueError(
                    f"{unsupported}=True is not available in a pruned forward (sequence lengths change between "
                    "layers); read ctx['hidden_states'] inside a strategy, or set VTRConfig(enabled=False)"
                )
        return_dict = kwargs.pop("return_dict", True)
        use_cache = kwargs.pop("use_cache", None)
        if use_cache is None:
            use_cache = getattr(self.config.text_config, "use_cache", True)
        vision_kwargs = {"vision_feature_layer": vision_feature_layer}
        vision_kwargs["vision_feature_select_strategy"] = vision_feature_select_strategy
        if image_sizes is not None:
            vision_kwargs["image_sizes"] = image_sizes
        hidden, is_image, image_features = self._merge_image_features(
            input_ids, inputs_embeds, pixel_values, mm_encoder_outputs, **vision_kwargs
        )

        lm = self.model.language_model
        batch, seq_len, _ = hidden.shape
        device = hidden.device
        if not use_cache:
            past_key_values = None
        elif past_key_values is None:
            past_key_values = DynamicCache(config=lm.config)
        elif not isinstance(past_key_values, DynamicCache):
            raise ValueError(
                f"pruning shortens the KV cache, which needs a DynamicCache; got {type(past_key_values).__name__} "
                "(do not set cache_implementation='static' with VTR)"
            )
        elif past_key_values.get_seq_length() > 0:
            raise ValueError(
                "a pruned prefill must start from an empty KV cache (the image must be in the first forward); "
                f"this cache already holds {past_key_values.get_seq_length()} tokens"
            )
        if attention_mask is not None and attention_mask.shape != (batch, seq_len):
            raise ValueError(
                f"attention_mask must be [batch, seq] = {(batch, seq_len)}, got {tuple(attention_mask.shape)}"
            )
        if position_ids is None:
            position_ids = torch.arange(seq_len, device=device).unsqueeze(0)
        positions = position_ids.expand(batch, -1)
        cos, sin = lm.rotary_emb(hidden, positions)
        seq = _Sequence(
            hidden=hidden,
            is_image=is_image,
            valid=attention_mask.bool() if attention_mask is not None else torch.ones_like(is_image),
            positions=positions,
            original_index=torch.arange(seq_len, device=device).unsqueeze(0).expand(batch, -1),
            cos=cos,
            sin=sin,
        )

        strategy = get_strategy(cfg.strategy)()
        sample_ctx = [{} for _ in range(batch)]  # one vtr_ctx per sample, shared by its prune stages
        record = VTRRecord(strategy=cfg.strategy, original_len=seq_len)
        layers = lm.layers[: lm.config.num_hidden_layers]

        def layer_mask():
            padding = None if bool(seq.valid.all()) else seq.valid
            return create_causal_mask(
                config=lm.config, inputs_embeds=seq.hidden, attention_mask=padding, past_key_values=None
            )

        stages = {k: stage for stage, k in enumerate(cfg.prune_layers)}
        mask = layer_mask()
        pruned = False
        scoring_input = None  # input of the scoring layer (index K-1), kept for recomputing its Q/K
        for i, layer in enumerate(layers):
            if i in stages:  # prune between layer i-1 (the scoring layer) and layer i
                index, new_valid = self._select(
                    stages[i], i, strategy, sample_ctx, record, scoring_input, seq, past_key_values
                )
                if index is not None:
                    pruned = True
                    seq.gather(index, new_valid)
                    if past_key_values is not None:
                        for cache_layer in past_key_values.layers[:i]:
                            cache_layer.keys = _gather_seq(cache_layer.keys, index, 2)
                            cache_layer.values = _gather_seq(cache_layer.values, index, 2)
                    mask = layer_mask()
            if i + 1 in stages:
                scoring_input = seq.hidden
            seq.hidden = layer(
                seq.hidden,
                attention_mask=mask,
                position_embeddings=(seq.cos, seq.sin),
                past_key_values=past_key_values,
                use_cache=use_cache,
                **kwargs,
            )
        hidden = lm.norm(seq.hidden)

        record.kept_index = seq.original_index
        self.vtr_last = record
        if pruned and past_key_values is not None:
            past_key_values._vtr_state = _DecodeState(seq.valid, seq_len)

        logits = self.lm_head(slice_logits_to_keep(hidden, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self._pruned_loss(logits, labels, seq.original_index, **kwargs)
        output = LlavaCausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=past_key_values, image_hidden_states=image_features
        )
        return output if return_dict else output.to_tuple()

    def _pruned_loss(self, logits, labels, original_index, **kwargs):
        """Next-token loss on the pruned sequence: each kept row predicts the label that followed it in the
        original prompt."""
        if logits.shape[1] != original_index.shape[1]:
            raise ValueError("labels with logits_to_keep are not supported in a pruned forward")
        next_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
        gathered = _gather_seq(next_labels, original_index.clamp_min(0), 1).masked_fill(original_index < 0, -100)
        return self.loss_function(
            logits=logits, labels=None, shift_labels=gathered, vocab_size=self.config.text_config.vocab_size, **kwargs
        )

    def _select(self, stage, prune_at, strategy, sample_ctx, record, scoring_input, seq, cache):
        """Score and select for every sample; return the gather index [batch, new_len] and its validity
        (False marks left re-padding when samples keep different counts), or (None, None) if nothing changes."""
        cfg = self.vtr_config
        is_image = seq.is_image
        batch, seq_len = is_image.shape
        layer_idx = prune_at - 1
        attention = None
        if strategy.needs_attention and bool(is_image.any()):
            layer = self.model.language_model.layers[layer_idx]
            attention = scoring_attention(layer, scoring_input, seq.cos, seq.sin, seq.valid, cache, layer_idx)
        stage_record = StageRecord(
            layer=prune_at,
            budget=cfg.stage_budget(stage).describe(),
            seq_len_before=seq_len,
            seq_len_after=seq_len,
            image_tokens_before=[],
            image_tokens_kept=[],
            kept_positions=[],
        )
        keeps = []
        for b in range(batch):
            image_idx = is_image[b].nonzero().reshape(-1)
            stage_record.image_tokens_before.append(image_idx.numel())
            if image_idx.numel() == 0:
                keeps.append(torch.arange(seq_len, device=is_image.device))
                stage_record.image_tokens_kept.append(0)
                stage_record.kept_positions.append(image_idx)
                continue
            span = (int(image_idx[0]), int(image_idx[-1]) + 1)
            info = dict(
                layer_idx=layer_idx,
                stage=stage,
                hidden_states=seq.hidden[b : b + 1],
                image_token_indices=image_idx,
                position_ids=seq.positions[b],
                batch_index=b,
            )
            ctx = sample_ctx[b]
            ctx.update(info, image_token_range=span)
            scores = strategy.compute_scores(
                attention.sample(b) if attention is not None else None, span, cfg, vtr_ctx=ctx, **info
            )
            span_len = span[1] - span[0]
            if not isinstance(scores, torch.Tensor) or scores.numel() != span_len:
                got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
                raise ValueError(
                    f"strategy {cfg.strategy!r}.compute_scores must return a tensor of {span_len} scores "
                    f"(one per position of image_token_range {span}); got {got}"
                )
            candidates = is_image[b, span[0] : span[1]]
            scores = scores.reshape(-1).to(candidates.device)[candidates]
            chosen = strategy.select_tokens(scores, scores.numel(), cfg, stage=stage)
            kept_image = image_idx[chosen.to(image_idx.device)]
            keep = ~is_image[b]
            keep[kept_image] = True
            keeps.append(keep.nonzero().reshape(-1))
            stage_record.image_tokens_kept.append(kept_image.numel())
            stage_record.kept_positions.append(seq.original_index[b, kept_image])
        new_len = max(k.numel() for k in keeps)
        stage_record.seq_len_after = new_len
        record.stages.append(stage_record)
        if new_len == seq_len and all(k.numel() == seq_len for k in keeps):
            return None, None
        index = torch.zeros(batch, new_len, dtype=torch.long, device=is_image.device)
        new_valid = torch.zeros(batch, new_len, dtype=torch.bool, device=is_image.device)
        for b, keep in enumerate(keeps):
            index[b, new_len - keep.numel() :] = keep
            new_valid[b, new_len - keep.numel() :] = True
        return index, new_valid


# transformers skips its built-in key renaming for classes defined outside the library; register LLaVA's own
# mapping under this class name so llava-hf checkpoints load (and save) exactly as with the stock class.
register_checkpoint_conversion_mapping(
    VTRLlavaForConditionalGeneration.__name__, get_checkpoint_conversion_mapping("llava"), overwrite=True
)
