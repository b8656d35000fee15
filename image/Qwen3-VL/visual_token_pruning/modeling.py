"""`VTRQwen3VLForConditionalGeneration`: the stock transformers Qwen3-VL with physical visual token pruning.

This file is the fork's only model code: an adapter that tells the shared engine (engine.py, a
copy-checked file) what Qwen3-VL's tokens are, and subclasses of the stock classes (dense and MoE) whose
forward is one call into the engine. No parameters are added; stock checkpoints load as they are.

    prefill_tokens   images and videos encoded by the stock vision tower (features + DeepStack features),
                     merged into the embeddings; visual = every <|image_pad|> / <|video_pad|> position
                     (all images and all frame groups of a prompt share one budget)
    positions        M-RoPE [b, s, 3] from the stock `get_rope_index` on the UNPRUNED prompt (or the rows
                     generate() passes, its text row split off); gathered with the kept tokens, so RoPE
                     sees the original positions; masks are built without positions (no packed-sequence
                     inference from the gaps)
    after_layer(i)   DeepStack: for i < len(deepstack_visual_indexes), the i-th DeepStack feature of each
                     visual token still present is added to its row (`extras["deepstack_row"]` carries
                     each token's row in the feature tensors through every gather)
    decode           generate() passes the M-RoPE rows itself (continuing the original prompt); a decode
                     given no positions continues from each sample's largest prompt position + 1
    anchor           the first row after the visual span: `<|vision_end|>` (PriorTR's prior row)
"""

from __future__ import annotations

import importlib

import torch
from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast

from .config import VTRConfig
from .engine import BackboneAdapter, PrefillTokens, StageRecord, VTRModelMixin, VTRRecord

__all__ = [
    "Qwen3VLAdapter",
    "StageRecord",
    "VTRQwen3VLForConditionalGeneration",
    "VTRQwen3VLMoeForConditionalGeneration",
    "VTRRecord",
]

MODALITIES = (("image", "pixel_values", "image_grid_thw"), ("video", "pixel_values_videos", "video_grid_thw"))


class Qwen3VLAdapter(BackboneAdapter):
    """Qwen3-VL (dense and MoE). See the module docstring for the data flow."""

    output_class = CausalLMOutputWithPast

    def __init__(self, model):
        super().__init__(model)
        self._deepstack: list[torch.Tensor] | None = None  # per DeepStack layer: [num_visual, hidden], one prefill

    def has_visual_input(self, args: dict) -> bool:
        encoded = args.get("mm_encoder_outputs") or {}
        return any(args.get(pixels) is not None or encoded.get(name) is not None for name, pixels, _ in MODALITIES)

    # ------------------------------------------------------------------ encoding

    def encode(self, modality: str, pixels: torch.Tensor, grid_thw: torch.Tensor):
        """The stock `get_image_features` / `get_video_features`, also keeping the input of the last vision
        block (for `vision_importance`) and the grid (generate() drops it once visuals are encoded)."""
        if grid_thw is None:
            raise ValueError(f"{modality} pixels need {modality}_grid_thw (the processor returns it)")
        fn = getattr(self.model.model, f"get_{modality}_features")
        out = fn(pixels, grid_thw, return_dict=True, output_hidden_states=[-2])
        out.vtr_grid_thw = grid_thw
        return out

    def pre_encode(self, generate_kwargs: dict) -> dict:
        kwargs = dict(generate_kwargs)
        encoded = dict(kwargs.get("mm_encoder_outputs") or {})
        for name, pixels, grid in MODALITIES:
            if kwargs.get(pixels) is not None:
                if encoded.get(name) is not None:
                    raise ValueError(f"pass either {pixels} or mm_encoder_outputs[{name!r}], not both")
                encoded[name] = self.encode(name, kwargs.pop(pixels), kwargs.get(grid))
        kwargs["mm_encoder_outputs"] = encoded
        return kwargs

    # ------------------------------------------------------------------ the prefill

    def prefill_tokens(self, args: dict) -> PrefillTokens:
        model = self.model.model
        input_ids, embeds = args.get("input_ids"), args.get("inputs_embeds")
        if (input_ids is None) ^ (embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if embeds is None:
            embeds = model.get_input_embeddings()(input_ids)
        encoded = dict(args.get("mm_encoder_outputs") or {})
        for name, pixels, grid in MODALITIES:
            if args.get(pixels) is not None:
                if encoded.get(name) is not None:
                    raise ValueError(f"pass either {pixels} or mm_encoder_outputs[{name!r}], not both")
                encoded[name] = self.encode(name, args[pixels], args.get(grid))
        batch, seq_len, _ = embeds.shape
        visual = torch.zeros(batch, seq_len, dtype=torch.bool, device=embeds.device)
        deepstack, masks = [], {}
        for name, _, _ in MODALITIES:
            out = encoded.get(name)
            if out is None:
                continue
            features = torch.cat(out.pooler_output).to(embeds.device, embeds.dtype)
            kwargs = {"image_features" if name == "image" else "video_features": features}
            image_mask, video_mask = model.get_placeholder_mask(input_ids, inputs_embeds=embeds, **kwargs)
            mask = (image_mask if name == "image" else video_mask)[..., 0]
            embeds = embeds.masked_scatter(mask[..., None], features)
            visual |= mask
            masks[name] = (mask, [torch.cat(f) for f in out.deepstack_features])
        # DeepStack features laid out like the sequence ([b * s, hidden] per layer, zero off the visual rows);
        # each token carries its flat row through the engine's gathers (no host sync here)
        for layer in range(len(self.model.config.vision_config.deepstack_visual_indexes)):
            full = torch.zeros_like(embeds)
            for mask, per_layer in masks.values():
                full = full.masked_scatter(mask[..., None], per_layer[layer].to(embeds.device, embeds.dtype))
            deepstack.append(full.reshape(batch * seq_len, -1))
        self._deepstack = deepstack if masks else None
        row = torch.arange(batch * seq_len, device=embeds.device).reshape(batch, seq_len)
        mask = args.get("attention_mask")
        valid = mask.bool() if mask is not None else torch.ones_like(visual)
        positions = self._positions(args, input_ids, mask, batch, seq_len)  # [3, b, s]
        next_position = positions.masked_fill(~valid[None], -1).amax(dim=(0, 2)) + 1  # [b]
        model.rope_deltas = (next_position - valid.sum(1)).unsqueeze(1)  # what the stock prefill leaves there
        cos, sin = self.language_model.rotary_emb(embeds, positions)
        tokens = PrefillTokens(
            hidden=embeds,
            visual=visual,
            valid=valid,
            positions=positions.permute(1, 2, 0),
            cos=cos,
            sin=sin,
            extras={"deepstack_row": row.masked_fill(~visual, -1)},
            strategy_ctx={"patch_grid": self._first_grids(visual, positions)},
            lazy_ctx=self._lazy_facts(visual, positions, masks, encoded),
        )
        tokens.next_position = next_position
        return tokens

    def _positions(self, args, input_ids, attention_mask, batch, seq_len) -> torch.Tensor:
        positions = args.get("position_ids")
        if positions is None:
            if input_ids is None:
                raise ValueError("Qwen3-VL needs position_ids (M-RoPE) when only inputs_embeds is given")
            if args.get("mm_token_type_ids") is None:
                raise ValueError(
                    "Qwen3-VL needs mm_token_type_ids (0 text, 1 image, 2 video; the processor returns it) to compute "
                    "the M-RoPE positions of hand-built inputs"
                )
            positions, _ = self.model.model.get_rope_index(
                input_ids,
                args["mm_token_type_ids"],
                image_grid_thw=args.get("image_grid_thw"),
                video_grid_thw=args.get("video_grid_thw"),
                attention_mask=attention_mask,
            )
        elif positions.ndim == 3 and positions.shape[0] == 4:
            positions = positions[1:]  # generate() puts a text row first (for mask creation only)
        elif positions.ndim == 2:
            positions = positions[None].expand(3, -1, -1)
        if positions.ndim != 3 or positions.shape[0] != 3 or positions.shape[2] != seq_len:
            raise ValueError(
                f"position_ids must be [batch, seq], [3, batch, seq] or [4, batch, seq] with seq={seq_len}; "
                f"got {tuple(positions.shape)}"
            )
        return positions.expand(3, batch, seq_len)

    def after_layer(self, layer_idx: int, tokens) -> torch.Tensor:
        features = self._deepstack
        if features is None or layer_idx >= len(features):
            return tokens.hidden
        row = tokens.deepstack_row
        present = tokens.visual & (row >= 0)
        added = features[layer_idx].to(tokens.hidden.device)[row.clamp_min(0)]  # [b, s, hidden]
        return torch.where(present[..., None], tokens.hidden + added, tokens.hidden)

    def decode_positions(self, state, decoded: int, query_len: int, batch: int) -> torch.Tensor:
        """[3, batch, query_len]: each sample continues from its prompt's max position + 1 (what generate()
        passes; the stock model without positions crashes on a 2-D mask, or counts the shortened cache)."""
        start = getattr(state, "vtr_next_position", None)
        if start is None:
            raise ValueError("this cache's prefill did not record its M-RoPE positions; pass position_ids")
        steps = torch.arange(query_len, device=start.device)
        positions = start[:, None] + decoded + steps[None]
        return positions[None].expand(3, batch, query_len)

    def continued_positions(self, args: dict, cache) -> torch.Tensor:
        """[3, batch, query_len] for a decode step after an UNPRUNED prefill given no positions: the text
        positions (from the 2-D mask when there is one, else the cache length) plus the prompt's
        `rope_deltas`, which is what the stock model means to compute (5.23 crashes on a 2-D mask there)."""
        ids = args.get("input_ids")
        batch, query_len = (ids if ids is not None else args["inputs_embeds"]).shape[:2]
        mask = args.get("attention_mask")
        if mask is not None and mask.ndim == 2:
            text = (mask.long().cumsum(-1) - 1)[:, -query_len:]
        else:
            past = cache.get_seq_length()
            text = torch.arange(past, past + query_len, device=cache.layers[0].keys.device).expand(batch, -1)
        deltas = self.model.model.rope_deltas
        deltas = deltas.repeat_interleave(batch // deltas.shape[0], dim=0).to(text.device)
        return (text + deltas)[None].expand(3, -1, -1)

    def output(self, loss, logits, cache, tokens: PrefillTokens):
        self._deepstack = None  # one prefill's features; decode steps run the stock forward
        state = getattr(cache, "_vtr_state", None)
        if state is not None:  # the engine attached this prefill's DecodeState just before
            state.vtr_next_position = tokens.next_position
        return self.output_class(loss=loss, logits=logits, past_key_values=cache, **tokens.output_extras)

    # ------------------------------------------------------------------ per-sample facts for strategies

    @staticmethod
    def _grid_coords(visual_b: torch.Tensor, positions_b: torch.Tensor) -> torch.Tensor:
        """[n, 3] (group, row, col) of one sample's visual tokens from their M-RoPE positions: an image or a
        video frame group starts at position p with t = p, h = p + row, w = p + col."""
        pos = positions_b[:, visual_b]  # [3, n]
        starts = pos[0]
        group = torch.unique(starts, return_inverse=True)[1]
        return torch.stack([group, pos[1] - starts, pos[2] - starts], dim=-1)

    @staticmethod
    def _first_grids(visual, positions) -> list[tuple[int, int]]:
        """Per sample, (rows, cols) of its first image or frame group after the 2 x 2 merge ((0, 0): none);
        one host sync for the batch."""
        start = positions[0]
        first = torch.where(visual, start, torch.iinfo(start.dtype).max).amin(1, keepdim=True)
        in_first = visual & (start == first)
        rows = torch.where(in_first, positions[1] - start, -1).amax(1) + 1
        cols = torch.where(in_first, positions[2] - start, -1).amax(1) + 1
        return [tuple(rc) for rc in torch.stack([rows, cols], 1).tolist()]

    def _lazy_facts(self, visual, positions, masks, encoded) -> dict:
        cache = {}

        def importance(b: int) -> torch.Tensor:
            if "importance" not in cache:
                cache["importance"] = self._vision_importance(visual, masks, encoded)
            return cache["importance"][b]

        return {
            "visual_grid": lambda b: self._grid_coords(visual[b], positions[:, b]),
            "vision_importance": importance,
        }

    def _vision_importance(self, visual, masks, encoded) -> list[torch.Tensor]:
        """Per sample, [num_visual]: the mean attention each merged token receives in the last vision block
        (mean over heads, over the query patches of its own image or frame group, and over its 2 x 2
        patches). This ViT has no CLS token; that block's attention is recomputed from its input."""
        values = torch.zeros(visual.shape, dtype=torch.float32, device=visual.device)
        for name, (mask, _) in masks.items():
            received = self._merged_attention(encoded[name]).to(values.device)
            total = int(mask.sum())
            if total != received.numel():
                # generate(num_beams>1 / num_return_sequences>1) repeats each sample k times in a row; the
                # vision states it keeps are the original samples'
                k = total // max(received.numel(), 1)
                counts = mask.sum(1)[::k].tolist() if k >= 1 and total % max(received.numel(), 1) == 0 else []
                if sum(counts) != received.numel():
                    raise ValueError(f"vision_importance: the {name} tokens do not line up with the encoded {name}s")
                received = torch.cat([chunk for chunk in received.split(counts) for _ in range(k)])
            values[mask] = received
        return [values[b, visual[b]] for b in range(visual.shape[0])]

    def _merged_attention(self, out) -> torch.Tensor:
        visual_model = self.model.model.visual
        hidden_states = getattr(out, "hidden_states", None)
        grid = getattr(out, "vtr_grid_thw", None)
        if hidden_states is None or hidden_states[-2] is None or grid is None:
            raise ValueError(
                "vision_importance needs the vision tower's last-block input, which these pre-encoded features lack; "
                "pass pixel values (generate() encodes them through this fork, which keeps it)"
            )
        from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids

        block = visual_model.blocks[-1]
        x = block.norm1(hidden_states[-2])
        position_ids = get_vision_position_ids(grid, visual_model.spatial_merge_size, kwargs={})
        cos, sin = visual_model.rotary_pos_emb(x, position_ids)
        cu_seqlens, _ = get_vision_attention_seqlens(grid, visual_model.config, kwargs={})
        attn = block.attn
        n = x.shape[0]
        q, k, _ = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        rope = importlib.import_module(type(visual_model).__module__).apply_rotary_pos_emb_vision
        q, k = rope(q, k, cos, sin)
        received = torch.zeros(n, dtype=torch.float32, device=x.device)
        bounds = cu_seqlens.tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):
            qs, ks = q[start:end].transpose(0, 1).float(), k[start:end].transpose(0, 1).float()
            probs = torch.softmax(qs @ ks.transpose(-1, -2) * attn.scaling, dim=-1)  # [heads, len, len]
            received[start:end] = probs.mean(dim=(0, 1))
        unit = visual_model.spatial_merge_size**2
        return received.reshape(-1, unit).mean(-1)


class _VTRQwen3VLMixin(VTRModelMixin):
    vtr_adapter_class = Qwen3VLAdapter

    def __init__(self, config, vtr_config: VTRConfig | None = None):
        super().__init__(config)
        self._vtr_setup(vtr_config)

    def vtr_forward(self, stock_forward, args: dict, kwargs: dict):
        cache = args.get("past_key_values")
        if (
            args.get("position_ids") is None
            and cache is not None
            and getattr(cache, "_vtr_state", None) is None
            and not self.vtr_adapter.has_visual_input(args)
            and cache.get_seq_length() > 0
            and self.model.rope_deltas is not None
        ):
            args["position_ids"] = self.vtr_adapter.continued_positions(args, cache)
        return super().vtr_forward(stock_forward, args, kwargs)


class VTRQwen3VLForConditionalGeneration(_VTRQwen3VLMixin, Qwen3VLForConditionalGeneration):
    """Stock Qwen3-VL + visual token reduction, configured by `self.vtr_config`."""

    vtr_stock_class = Qwen3VLForConditionalGeneration

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        pixel_values=None,
        pixel_values_videos=None,
        image_grid_thw=None,
        video_grid_thw=None,
        mm_token_type_ids=None,
        logits_to_keep=0,
        mm_encoder_outputs=None,
        **kwargs,
    ):
        return self.vtr_forward(super().forward, *self.forward_arguments(locals()))


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    """Qwen3-VL-MoE: the same text-model interface (decoder layers return hidden states; DeepStack and
    M-RoPE as in the dense model); routing is per token, so dropped tokens simply never reach the experts."""

    output_class = MoeCausalLMOutputWithPast


class VTRQwen3VLMoeForConditionalGeneration(_VTRQwen3VLMixin, Qwen3VLMoeForConditionalGeneration):
    """Stock Qwen3-VL-MoE + visual token reduction."""

    vtr_adapter_class = Qwen3VLMoeAdapter
    vtr_stock_class = Qwen3VLMoeForConditionalGeneration

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        pixel_values=None,
        pixel_values_videos=None,
        image_grid_thw=None,
        video_grid_thw=None,
        mm_token_type_ids=None,
        output_router_logits=None,
        logits_to_keep=0,
        mm_encoder_outputs=None,
        **kwargs,
    ):
        if output_router_logits and self.vtr_config.enabled and self.vtr_adapter.has_visual_input(locals()):
            raise ValueError(
                "output_router_logits=True is not available in a pruned forward (sequence lengths change between "
                "layers); set VTRConfig(enabled=False) for the router logits"
            )
        return self.vtr_forward(super().forward, *self.forward_arguments(locals()))


#: model_type of a checkpoint's config -> the VTR class that loads it.
VTR_CLASSES = {"qwen3_vl": VTRQwen3VLForConditionalGeneration, "qwen3_vl_moe": VTRQwen3VLMoeForConditionalGeneration}

# transformers skips its built-in key renaming for classes defined outside the library; register the stock
# mappings under these class names so hub checkpoints load (and save) exactly as with the stock classes.
for _model_type, _cls in VTR_CLASSES.items():
    _mapping = get_checkpoint_conversion_mapping(_model_type)
    if _mapping is not None:
        register_checkpoint_conversion_mapping(_cls.__name__, _mapping, overwrite=True)
