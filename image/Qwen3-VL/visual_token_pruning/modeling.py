"""The stock transformers Qwen-VL families with physical visual token pruning: Qwen2-VL, Qwen2.5-VL,
Qwen3-VL (dense and MoE), Qwen3.5 (dense and MoE).

This file is the fork's only model code: one adapter per family telling the shared engine (engine.py, a
copy-checked file) what its tokens are, and subclasses of the stock classes whose forward is one call into
the engine. No parameters are added; stock checkpoints load as they are. The families share everything
below except what `QwenVLAdapter`'s subclasses state:

    prefill_tokens   images and videos encoded by the stock vision tower, merged into the embeddings;
                     visual = every <|image_pad|> / <|video_pad|> position (all images and all frame groups
                     of a prompt share one budget)
    positions        M-RoPE [b, s, 3] from the stock `get_rope_index` on the UNPRUNED prompt (or the rows
                     generate() passes, its text row split off); gathered with the kept tokens, so RoPE sees
                     the original positions. Qwen2.5-VL's temporal row is absolute time (`second_per_grid_ts`
                     x `tokens_per_second` per frame group), so it is not the group's start position
    visual_grid      (group, row, col): a group is one image or one frame group (two frames per temporal
                     patch); it starts where the visual run breaks, the temporal row changes or the raster
                     order restarts; row / col are the height / width rows minus the group's smallest
    frames           (video, frame): the video numbered within its sample, the frame = one temporal group of its
                     `video_grid_thw` (t groups of (h / 2) * (w / 2) tokens in raster order, as the tower emits
                     them); Qwen3-VL's timestamp text between frame groups is not visual, so a frame's tokens
                     are contiguous and frames are not; images (-1, -1)
    vision_importance  the mean attention each merged token receives in the vision tower's last block,
                     recomputed from that block's input (Qwen2.5-VL: in its window order, mapped back)
    vision_layer(i)  vision block i's (None: the last block's) `received` (as vision_importance) and `keys`
                     (after the vision RoPE, mean over heads and the 2 x 2 merge) per merged token, recomputed
                     from the block's input (kept when encoding: the last block's and the strategy's
                     `vision_layers`); `cls` is None: these ViTs have no CLS token
    vision_tower     {"depth": the vision blocks, "cls": False}
    after_layer(i)   Qwen3-VL's DeepStack: for i < len(deepstack_visual_indexes), the i-th DeepStack feature
                     of each visual token still present is added to its row (Qwen3.5 has no DeepStack)
    layer kinds      Qwen3.5's decoder is hybrid: Gated DeltaNet (linear attention, a recurrent state) in most
                     layers, gated full attention in every `full_attention_interval`-th (`layer_types`). The shared
                     engine runs both kinds on the kept rows from K on and scores from the nearest full-attention
                     layer at or before K-1 (engine.scoring_layers); the adapter states nothing more
    decode           generate() passes the M-RoPE rows itself (continuing the original prompt); a decode
                     given no positions continues from each sample's largest prompt position + 1
    anchor           the first row after the visual span: `<|vision_end|>` (PriorTR's prior row)
"""

from __future__ import annotations

import importlib

import torch
from transformers import (
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5MoeForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeForConditionalGeneration,
)
from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast

from .config import VTRConfig
from .engine import (
    BackboneAdapter,
    PrefillTokens,
    StageRecord,
    VTRModelMixin,
    VTRRecord,
    _next_position,
    register_vtr_classes,
    scatter_visual,
)

__all__ = [
    "Qwen2VLAdapter",
    "Qwen2_5_VLAdapter",
    "Qwen3VLAdapter",
    "Qwen3_5Adapter",
    "StageRecord",
    "VTRQwen2VLForConditionalGeneration",
    "VTRQwen2_5_VLForConditionalGeneration",
    "VTRQwen3VLForConditionalGeneration",
    "VTRQwen3VLMoeForConditionalGeneration",
    "VTRQwen3_5ForConditionalGeneration",
    "VTRQwen3_5MoeForConditionalGeneration",
    "VTRRecord",
]

MODALITIES = (("image", "pixel_values", "image_grid_thw"), ("video", "pixel_values_videos", "video_grid_thw"))
#: query rows per step of a vision block's attention recompute (vision_importance, vision_layer)
QUERY_CHUNK = 1024


class QwenVLAdapter(BackboneAdapter):
    """What the Qwen-VL families share (see the module docstring); Qwen2-VL is exactly this."""

    output_class = CausalLMOutputWithPast
    mrope = True  # M-RoPE positions: methods' Qwen-VL ports (`mrope_positions`) apply
    facts = ("patch_grid", "visual_grid", "frames", "vision_importance", "vision_layer", "vision_tower")
    pixel_inputs = ("pixel_values", "pixel_values_videos")
    encoded_modalities = ("image", "video")
    #: forward() arguments that `get_rope_index` also reads (Qwen2.5-VL: the seconds per temporal patch)
    rope_inputs: tuple[str, ...] = ()

    # ------------------------------------------------------------------ encoding

    def encode(self, modality: str, pixels: torch.Tensor, grid_thw: torch.Tensor):
        """The stock `get_image_features` / `get_video_features`, also keeping the inputs of the vision blocks
        the facts recompute (`vision_layers`) and the grid (generate() drops it once visuals are encoded)."""
        if grid_thw is None:
            raise ValueError(f"{modality} pixels need {modality}_grid_thw (the processor returns it)")
        fn = getattr(self.model.model, f"get_{modality}_features")
        out = fn(pixels, grid_thw, return_dict=True, output_hidden_states=self.vision_layers())
        out.vtr_grid_thw = grid_thw
        return out

    @property
    def vision_depth(self) -> int:
        """The vision tower's block count."""
        return self.model.config.vision_config.depth

    def vision_tower(self) -> dict:
        """The `vision_tower` fact: the ViT's block count; it has no CLS token."""
        return {"depth": self.vision_depth, "cls": False}

    def vision_layers(self) -> list[int]:
        """The tower hidden states to keep (state i is the input of block i): the last block's (read by
        `vision_importance` and `vision_layer()`) and those of the blocks the strategy reads through
        `vision_layer(i)` (its `vision_layers(config, tower)`)."""
        inputs = self.strategy_vision_layers()
        return sorted({self.vision_depth - 1, *inputs})

    def encode_inputs(self, args: dict) -> dict:
        encoded = dict(args.get("mm_encoder_outputs") or {})
        for name, pixels, grid in MODALITIES:
            if args.get(pixels) is not None:
                if encoded.get(name) is not None:
                    raise ValueError(f"pass either {pixels} or mm_encoder_outputs[{name!r}], not both")
                encoded[name] = self.encode(name, args[pixels], args.get(grid))
        return encoded

    # ------------------------------------------------------------------ the prefill

    def prefill_tokens(self, args: dict) -> PrefillTokens:
        model = self.model.model
        input_ids, embeds = self.input_embeddings(args)
        encoded = self.encode_inputs(args)
        visual = torch.zeros(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
        masks = {}
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
            masks[name] = mask
        for name, _, grid in MODALITIES:  # a caller's pre-encoded outputs carry their grids
            if encoded.get(name) is not None and args.get(grid) is None:
                args = {**args, grid: getattr(encoded[name], "vtr_grid_thw", None)}
        positions = self._positions(args, input_ids, args.get("attention_mask"), *visual.shape)  # [3, b, s]
        group, row, col = self._grid(visual, positions)
        tokens = self.prefill(
            args,
            embeds,
            visual,
            positions=positions.permute(1, 2, 0),
            strategy_ctx={"patch_grid": self._first_grids(group, row, col), "vision_tower": self.vision_tower()},
            lazy_ctx=self._lazy_facts(visual, group, row, col, masks, encoded),
        )
        # what the stock prefill leaves there: each sample's next position minus its real length
        next_position = _next_position(tokens.positions, tokens.valid)
        model.rope_deltas = (next_position - tokens.valid.sum(1)).unsqueeze(1)
        self.visual_extras(tokens, encoded, masks)
        return tokens

    def visual_extras(self, tokens: PrefillTokens, encoded: dict, masks: dict) -> None:
        """Anything more a family carries per prefill (Qwen3-VL: DeepStack). Default: nothing."""

    def _positions(self, args, input_ids, attention_mask, batch, seq_len) -> torch.Tensor:
        positions = args.get("position_ids")
        if positions is None:
            if input_ids is None:
                raise ValueError("Qwen-VL needs position_ids (M-RoPE) when only inputs_embeds is given")
            if args.get("mm_token_type_ids") is None:
                raise ValueError(
                    "Qwen-VL needs mm_token_type_ids (0 text, 1 image, 2 video; the processor returns it) to compute "
                    "the M-RoPE positions of hand-built inputs"
                )
            config = self.model.config
            for (name, _, grid), token in zip(MODALITIES, (config.image_token_id, config.video_token_id)):
                if args.get(grid) is None and bool((input_ids == token).any()):
                    raise ValueError(
                        f"the prompt's {name} tokens need {grid} for their M-RoPE positions (the processor returns it)"
                    )
            positions, _ = self.model.model.get_rope_index(
                input_ids,
                args["mm_token_type_ids"],
                image_grid_thw=args.get("image_grid_thw"),
                video_grid_thw=args.get("video_grid_thw"),
                attention_mask=attention_mask,
                **{name: args.get(name) for name in self.rope_inputs},
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

    def decode_positions(self, state, decoded: int, query_len: int, batch: int) -> torch.Tensor:
        """[3, batch, query_len]: each sample continues from its prompt's max position + 1 (what generate()
        passes; the stock model without positions crashes on a 2-D mask, or counts the shortened cache)."""
        steps = torch.arange(query_len, device=state.next_position.device)
        positions = state.next_position[:, None] + decoded + steps[None]
        return positions[None].expand(3, batch, query_len)

    def stock_inputs(self, args: dict, cache) -> dict:
        """A decode step after an UNPRUNED prefill given no positions gets [3, batch, query_len]: the text
        positions (from the 2-D mask when there is one, else the cache length) plus the prompt's
        `rope_deltas`, which is what the stock model means to compute (5.23 crashes on a 2-D mask there)."""
        deltas = self.model.model.rope_deltas
        if (
            args.get("position_ids") is not None
            or cache is None
            or deltas is None
            or self.has_visual_input(args)
            or cache.get_seq_length() == 0
        ):
            return args
        ids = args.get("input_ids")
        batch, query_len = (ids if ids is not None else args["inputs_embeds"]).shape[:2]
        mask = args.get("attention_mask")
        if mask is not None and mask.ndim == 2:
            text = (mask.long().cumsum(-1) - 1)[:, -query_len:]
        else:
            past = cache.get_seq_length()
            device = (ids if ids is not None else args["inputs_embeds"]).device
            text = torch.arange(past, past + query_len, device=device).expand(batch, -1)
        deltas = deltas.repeat_interleave(batch // deltas.shape[0], dim=0).to(text.device)
        return {**args, "position_ids": (text + deltas)[None].expand(3, -1, -1)}

    # ------------------------------------------------------------------ per-sample facts for strategies

    @staticmethod
    def _grid(visual: torch.Tensor, positions: torch.Tensor):
        """[b, s] each: the visual group of every token (-1 off the visuals) and its (row, col) in it. A group
        (an image, or a frame group of a video) starts where the run of visual tokens starts, where the
        temporal row changes, or where the raster order restarts (frames that share a temporal value)."""
        t, h, w = positions

        def before(x):
            return torch.cat([x[:, :1], x[:, :-1]], 1)

        after_visual = torch.nn.functional.pad(visual[:, :-1], (1, 0), value=False)
        restart = (h < before(h)) | ((h == before(h)) & (w <= before(w)))
        new = visual & (~after_visual | (t != before(t)) | restart)
        group = (new.long().cumsum(1) - 1).masked_fill(~visual, -1)
        index = group.clamp_min(0)
        big = torch.iinfo(h.dtype).max

        def offset(x):
            low = torch.full_like(x, big).scatter_reduce(1, index, torch.where(visual, x, big), "amin")
            return (x - low.gather(1, index)).masked_fill(~visual, -1)

        return group, offset(h), offset(w)

    @staticmethod
    def _first_grids(group, row, col) -> list[tuple[int, int]]:
        """Per sample, (rows, cols) of its first image or frame group after the 2 x 2 merge ((0, 0): none);
        one host sync for the batch."""
        first = group == 0
        rows = torch.where(first, row, -1).amax(1) + 1
        cols = torch.where(first, col, -1).amax(1) + 1
        return [tuple(rc) for rc in torch.stack([rows, cols], 1).tolist()]

    def _lazy_facts(self, visual, group, row, col, masks, encoded) -> dict:
        """`visual_grid(b)`, `frames(b)`, `vision_importance(b)` and `vision_layer(b, i)`, computed on request
        (each vision block, and the frame table, once per prefill)."""
        cache = {}

        def block(b: int, index: int, what: str) -> dict:
            if index not in cache:
                cache[index] = self._vision_layer(visual, masks, encoded, index, what)
            return {name: per_sample[b] for name, per_sample in cache[index].items()}

        def vision_layer(b: int, layer: int | None = None) -> dict:
            index = self.vision_depth - 1 if layer is None else self.tower_layer(layer)
            return {"cls": None, **block(b, index, f"vision_layer({layer})")}

        def importance(b: int) -> torch.Tensor:
            return block(b, self.vision_depth - 1, "vision_importance")["received"]

        def grid(b: int) -> torch.Tensor:
            return torch.stack([group[b], row[b], col[b]], -1)[visual[b]]

        def frames(b: int) -> torch.Tensor:
            if "frames" not in cache:
                cache["frames"] = self._frame_table(visual, masks, encoded)
            return cache["frames"][b, visual[b]]

        return {"visual_grid": grid, "frames": frames, "vision_importance": importance, "vision_layer": vision_layer}

    def _frame_table(self, visual, masks, encoded) -> torch.Tensor:
        """[b, s, 2] long: (video, frame) at every video token, (-1, -1) elsewhere. The encoded videos' grids
        (`vtr_grid_thw`: the original samples, in batch and prompt order) give each token its video and its
        temporal group; `scatter_visual` hands every beam copy its sample's rows; videos are then numbered
        from 0 within each sample."""
        table = torch.full((*visual.shape, 2), -1, dtype=torch.long, device=visual.device)
        mask = masks.get("video")
        if mask is None:
            return table
        grid = getattr(encoded["video"], "vtr_grid_thw", None)
        if grid is None:
            raise ValueError(
                "frames needs the videos' video_grid_thw, which these encoded features lack; pass pixel values "
                "(generate() and forward() encode them through this fork, keeping the grid)"
            )
        per_frame = (grid[:, 1] * grid[:, 2] // self.model.model.visual.spatial_merge_size**2).tolist()
        ids = {"video": [], "frame": []}
        for index, (t, size) in enumerate(zip(grid[:, 0].tolist(), per_frame)):
            ids["video"].append(torch.full((t * size,), index))
            ids["frame"].append(torch.arange(t).repeat_interleave(size))
        tables = {}
        scatter_visual(tables, mask, {k: torch.cat(v) for k, v in ids.items()}, "frames", fill=-1)
        first = tables["video"].masked_fill(~mask, len(per_frame)).amin(1, keepdim=True)  # each sample's first video
        table[mask] = torch.stack([tables["video"] - first, tables["frame"]], -1)[mask]
        return table

    def _vision_layer(self, visual, masks, encoded, layer: int, what: str) -> dict[str, list[torch.Tensor]]:
        """name -> per sample [num_visual, ...]: vision block `layer`'s `received` [num_visual] and `keys`
        [num_visual, head_dim] (`_block_facts`) at each visual token in prompt order, from the outputs that
        encoded its modality (beam search: each sample's repeated for its beams)."""
        tables = {}
        for name, mask in masks.items():
            scatter_visual(
                tables, mask, self._block_facts(encoded[name], layer, what), f"{what} ({name})", dtype=torch.float32
            )
        return {key: [table[b, visual[b]] for b in range(visual.shape[0])] for key, table in tables.items()}

    def _block_facts(self, out, layer: int, what: str) -> dict[str, torch.Tensor]:
        """{received [n], keys [n, head_dim]} of vision block `layer` per merged token of `out` (its images or
        videos in order): the attention each patch receives (mean over heads and over the query patches of the
        span it attends within: its image or frame group, or Qwen2.5-VL's window in a windowed block) and its
        keys as the block attends with them (after the vision RoPE, mean over heads), each then the mean over
        the token's 2 x 2 patches. These ViTs have no CLS token; the block's attention is recomputed in float32
        from its input, in query chunks, and no other block's is."""
        visual_model = self.model.model.visual
        hidden_states = getattr(out, "hidden_states", None)
        grid = getattr(out, "vtr_grid_thw", None)
        if hidden_states is None or grid is None or len(hidden_states) <= layer or hidden_states[layer] is None:
            raise ValueError(
                f"{what} needs the input of vision block {layer}, which these encoded features lack; pass pixel "
                "values (generate() and forward() encode them through this fork, keeping the blocks the strategy's "
                "vision_layers() names)"
            )
        block = visual_model.blocks[layer]
        x = block.norm1(hidden_states[layer])
        cos, sin, cu_seqlens, restore = self._block_layout(visual_model, x, grid, layer)
        attn = block.attn
        n = x.shape[0]
        q, k, _ = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        rope = importlib.import_module(type(visual_model).__module__).apply_rotary_pos_emb_vision
        q, k = rope(q, k, cos, sin)
        received = torch.zeros(n, dtype=torch.float32, device=x.device)
        bounds = cu_seqlens.tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):
            ks = k[start:end].transpose(0, 1).float()
            # query rows in chunks, so that a large image never holds its whole [heads, len, len] map
            for first in range(start, end, QUERY_CHUNK):
                qs = q[first : min(first + QUERY_CHUNK, end)].transpose(0, 1).float()
                probs = torch.softmax(qs @ ks.transpose(-1, -2) * attn.scaling, dim=-1)  # [heads, chunk, len]
                received[start:end] += probs.sum(dim=(0, 1))
            received[start:end] /= attn.num_heads * (end - start)
        unit = visual_model.spatial_merge_size**2
        merged = {
            "received": received.reshape(-1, unit).mean(-1),
            "keys": k.float().mean(1).reshape(-1, unit, k.shape[-1]).mean(1),
        }
        return merged if restore is None else {name: value[restore] for name, value in merged.items()}

    def _block_layout(self, visual_model, x, grid, layer: int):
        """(cos, sin, cu_seqlens, restore) of vision block `layer` as the stock tower runs it: its rotary
        tables and attention bounds over the patches in the tower's order, and the index that puts merged
        tokens back in prompt order (None: already in it)."""
        from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids

        position_ids = get_vision_position_ids(grid, visual_model.spatial_merge_size, kwargs={})
        cos, sin = visual_model.rotary_pos_emb(x, position_ids)
        cu_seqlens, _ = get_vision_attention_seqlens(grid, visual_model.config, kwargs={})
        return cos, sin, cu_seqlens, None


class Qwen2VLAdapter(QwenVLAdapter):
    """Qwen2-VL: positions, vision tower and merge as `QwenVLAdapter`."""


class Qwen2_5_VLAdapter(QwenVLAdapter):
    """Qwen2.5-VL: the temporal M-RoPE row is absolute time (`second_per_grid_ts`), and the vision tower runs
    on patches reordered by window (window attention except in `fullatt_block_indexes`), restoring the order
    after the merger; `vision_importance` and `vision_layer` recompute a block in that order (within windows
    or whole images as that block attends) and map it back."""

    rope_inputs = ("second_per_grid_ts",)

    def _block_layout(self, visual_model, x, grid, layer: int):
        from transformers.vision_utils import (
            get_vision_attention_seqlens,
            get_vision_position_ids,
            get_vision_window_index,
        )

        window_index, cu_window_seqlens = get_vision_window_index(
            grid,
            spatial_merge_size=visual_model.spatial_merge_size,
            window_size=visual_model.window_size,
            patch_size=visual_model.patch_size,
            kwargs={},
        )
        position_ids = get_vision_position_ids(grid, visual_model.spatial_merge_size, kwargs={})
        cos, sin = visual_model.rotary_pos_emb(x, position_ids)
        cos, sin = (visual_model.permute_input_for_window_attn(t, window_index, seq_len=x.shape[0]) for t in (cos, sin))
        if layer in visual_model.fullatt_block_indexes:
            cu_seqlens, _ = get_vision_attention_seqlens(grid, visual_model.config, kwargs={})
        else:
            cu_seqlens = cu_window_seqlens
        return cos, sin, cu_seqlens, torch.argsort(window_index)


class Qwen3VLAdapter(QwenVLAdapter):
    """Qwen3-VL: DeepStack. The features of vision blocks `deepstack_visual_indexes` are added to the visual
    rows after the first decoder layers; each token carries its flat row in those features
    (`extras["deepstack_row"]`) through every gather, and the features ride in `adapter_state`."""

    def visual_extras(self, tokens: PrefillTokens, encoded: dict, masks: dict) -> None:
        hidden, visual = tokens.hidden, tokens.visual
        batch, seq_len = visual.shape
        if not masks:
            return
        # DeepStack features laid out like the sequence ([b * s, hidden] per layer, zero off the visual rows)
        deepstack = []
        for layer in range(len(self.model.config.vision_config.deepstack_visual_indexes)):
            full = torch.zeros_like(hidden)
            for name, mask in masks.items():
                features = torch.cat(encoded[name].deepstack_features[layer])
                full = full.masked_scatter(mask[..., None], features.to(hidden.device, hidden.dtype))
            deepstack.append(full.reshape(batch * seq_len, -1))
        row = torch.arange(batch * seq_len, device=hidden.device).reshape(batch, seq_len)
        tokens.extras["deepstack_row"] = row.masked_fill(~visual, -1)
        tokens.adapter_state["deepstack"] = deepstack

    def merged_extras(self, extras: dict, mix: torch.Tensor, prefill: PrefillTokens) -> dict:
        """Merged tokens (pool's cells, VisionZip's contextual tokens) get their DeepStack features mixed as their
        states were: new feature rows, the same weights over the dropped tokens' rows."""
        features, rows = prefill.adapter_state.get("deepstack"), extras.get("deepstack_row")
        if features is None or rows is None:
            return {}
        visual = (rows >= 0).to(mix.device)  # DeepStack reaches visual tokens only
        if mix.is_sparse:  # a video method's arrangement (strategy/video.py)
            mix = mix.coalesce()
            on = visual[mix.indices()[1]]
            weights = torch.sparse_coo_tensor(
                mix.indices()[:, on], mix.values()[on].float(), mix.shape, check_invariants=False
            )
        else:
            weights = mix.float() * visual[None]
        for i, table in enumerate(features):
            added = weights.to(table.device) @ table[rows.clamp_min(0)].float()
            features[i] = torch.cat([table, added.to(table.dtype)])
        first = features[0].shape[0] - mix.shape[0]
        return {"deepstack_row": torch.arange(first, first + mix.shape[0], device=rows.device)}

    def after_layer(self, layer_idx: int, tokens, prefill: PrefillTokens) -> torch.Tensor:
        features = prefill.adapter_state.get("deepstack")
        if features is None or layer_idx >= len(features):
            return tokens.hidden
        row = tokens.deepstack_row
        present = tokens.visual & (row >= 0)
        added = features[layer_idx].to(tokens.hidden.device)[row.clamp_min(0)]  # [b, s, hidden]
        return torch.where(present[..., None], tokens.hidden + added, tokens.hidden)


class _VTRQwenVLMixin(VTRModelMixin):
    def __init__(self, config, vtr_config: VTRConfig | None = None):
        super().__init__(config)
        self._vtr_setup(vtr_config)


class VTRQwen2VLForConditionalGeneration(_VTRQwenVLMixin, Qwen2VLForConditionalGeneration):
    """Stock Qwen2-VL + visual token reduction, configured by `self.vtr_config`."""

    vtr_adapter_class = Qwen2VLAdapter
    vtr_stock_class = Qwen2VLForConditionalGeneration

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
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


class VTRQwen2_5_VLForConditionalGeneration(_VTRQwenVLMixin, Qwen2_5_VLForConditionalGeneration):
    """Stock Qwen2.5-VL + visual token reduction, configured by `self.vtr_config`."""

    vtr_adapter_class = Qwen2_5_VLAdapter
    vtr_stock_class = Qwen2_5_VLForConditionalGeneration

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        pixel_values=None,
        pixel_values_videos=None,
        image_grid_thw=None,
        video_grid_thw=None,
        mm_token_type_ids=None,
        second_per_grid_ts=None,
        logits_to_keep=0,
        mm_encoder_outputs=None,
        **kwargs,
    ):
        return self.vtr_forward(super().forward, *self.forward_arguments(locals()))


class VTRQwen3VLForConditionalGeneration(_VTRQwenVLMixin, Qwen3VLForConditionalGeneration):
    """Stock Qwen3-VL + visual token reduction, configured by `self.vtr_config`."""

    vtr_adapter_class = Qwen3VLAdapter
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


def _refuse_router_logits(model, output_router_logits, args: dict) -> None:
    """MoE router logits are per layer over the whole sequence, which a pruned forward does not keep."""
    if output_router_logits and model.vtr_config.enabled and model.vtr_adapter.has_visual_input(args):
        raise ValueError(
            "output_router_logits=True is not available in a pruned forward (sequence lengths change between "
            "layers); set VTRConfig(enabled=False) for the router logits"
        )


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    """Qwen3-VL-MoE: the same text-model interface (decoder layers return hidden states; DeepStack and
    M-RoPE as in the dense model); routing is per token, so dropped tokens simply never reach the experts."""

    output_class = MoeCausalLMOutputWithPast


class VTRQwen3VLMoeForConditionalGeneration(_VTRQwenVLMixin, Qwen3VLMoeForConditionalGeneration):
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
        _refuse_router_logits(self, output_router_logits, locals())
        return self.vtr_forward(super().forward, *self.forward_arguments(locals()))


class Qwen3_5Adapter(QwenVLAdapter):
    """Qwen3.5: Qwen3-VL's vision tower without DeepStack (images, videos with timestamps, M-RoPE as Qwen3-VL:
    interleaved, here on a partial rotary) and a hybrid decoder whose layer kinds the shared engine reads from
    `layer_types` (masks per kind, scoring from full-attention layers, the decode reference layer)."""


class Qwen3_5MoeAdapter(Qwen3_5Adapter):
    """Qwen3.5-MoE: Qwen3.5 with routed experts and a shared expert per token; dropped tokens never reach them."""

    output_class = MoeCausalLMOutputWithPast


class VTRQwen3_5ForConditionalGeneration(_VTRQwenVLMixin, Qwen3_5ForConditionalGeneration):
    """Stock Qwen3.5 + visual token reduction, configured by `self.vtr_config`."""

    vtr_adapter_class = Qwen3_5Adapter
    vtr_stock_class = Qwen3_5ForConditionalGeneration

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


class VTRQwen3_5MoeForConditionalGeneration(_VTRQwenVLMixin, Qwen3_5MoeForConditionalGeneration):
    """Stock Qwen3.5-MoE + visual token reduction."""

    vtr_adapter_class = Qwen3_5MoeAdapter
    vtr_stock_class = Qwen3_5MoeForConditionalGeneration

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
        _refuse_router_logits(self, output_router_logits, locals())
        return self.vtr_forward(super().forward, *self.forward_arguments(locals()))


#: model_type of a checkpoint's config -> the VTR class that loads it.
VTR_CLASSES = {
    "qwen2_vl": VTRQwen2VLForConditionalGeneration,
    "qwen2_5_vl": VTRQwen2_5_VLForConditionalGeneration,
    "qwen3_vl": VTRQwen3VLForConditionalGeneration,
    "qwen3_vl_moe": VTRQwen3VLMoeForConditionalGeneration,
    "qwen3_5": VTRQwen3_5ForConditionalGeneration,
    "qwen3_5_moe": VTRQwen3_5MoeForConditionalGeneration,
}
register_vtr_classes(VTR_CLASSES)
