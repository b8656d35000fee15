"""`VTRInternVLForConditionalGeneration`: the stock transformers InternVL with physical visual token pruning.

The fork's only model code: an adapter telling the shared engine (engine.py, a copy-checked file) what
InternVL's tokens are, and a subclass of the stock class whose forward is one call into the engine. No new
parameters: hub `OpenGVLab/InternVL3-*-hf` / `InternVL2_5-*-hf` checkpoints load and save as they are.

InternVL's visual tokens: every 448 px tile (an image gives up to `max_patches` tiles plus a thumbnail; a
video frame is one tile) runs through InternViT (a CLS token + 32 x 32 patches); the patch features are
pixel-shuffled by 0.5 (each 2 x 2 block of patches becomes one token) and projected: 256 `<IMG_CONTEXT>`
tokens per tile, written as `<img>` + tiles + `</img>`, and for videos `FrameN: <img>...</img>` per frame
joined by newlines. Every `<IMG_CONTEXT>` token of a sample is a candidate under one global budget (also
across frames, whose tokens are not contiguous). PriorTR's anchor is the `\n` the chat template writes
after the last `</img>`. Positions are 1-D (Qwen2 / Llama decoders).

Which `<img>` blocks are video frames (the `frames` fact) is known to the processor only: it merges the frames into
`pixel_values` beside the image tiles, and a frame block is an image of one tile but for the `FrameN: ` text before
it, which the model cannot read without the tokenizer (and a prompt may write such text around its own images). So
the forward takes one more optional argument, `frame_index` [blocks] long: for each `<img>` block of the batch, in
batch and prompt order, its frame's index in its video (0, 1, ...; every video starts at 0), -1 for an image. E.g.
an image then a 4-frame video: [-1, 0, 1, 2, 3]. Without it, a prompt whose blocks all hold several tiles has no
video (a frame is one tile); one with a one-tile block makes `frames()` ask for it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import InternVLForConditionalGeneration
from transformers.models.internvl.modeling_internvl import InternVLCausalLMOutputWithPast

from .config import VTRConfig
from .engine import (
    BackboneAdapter,
    PrefillTokens,
    StageRecord,
    VTRModelMixin,
    VTRRecord,
    beam_repeats,
    register_vtr_classes,
)

__all__ = ["InternVLAdapter", "StageRecord", "VTRInternVLForConditionalGeneration", "VTRRecord"]


class InternVLAdapter(BackboneAdapter):
    """InternVL2.5 / InternVL3: candidates are the `<IMG_CONTEXT>` positions (all tiles, thumbnails and video
    frames); positions are the stock ones (`position_ids`, else 0..seq-1). Video frames are the `<img>` blocks the
    forward's `frame_index` marks (see the module docstring)."""

    #: Budget when the user gives none: 192 tokens, about 11% of an image tiled 6 + thumbnail (1,792 tokens),
    #: the share LLaVA-1.6 keeps by default (320 of 2,880).
    default_keep_tokens = 192
    output_class = InternVLCausalLMOutputWithPast
    facts = ("patch_grid", "visual_grid", "frames", "vision_importance", "vision_layer", "vision_tower")
    encoder_arguments = ("vision_feature_layer", "vision_feature_select_strategy")

    def anchor_row(self, span_end: int) -> int:
        """`span_end` is the row of the `</img>` closing the last tile or frame; the `\\n` after it sees the
        prefix and every visual token but no question."""
        return span_end + 1

    def encode_inputs(self, args: dict) -> dict:
        """`mm_encoder_outputs` with `pixel_values` encoded by the stock `get_image_features` (the config's
        feature layer and strategy unless given), keeping the hidden states the lazy facts read."""
        encoded = super().encode_inputs(args)
        if args.get("pixel_values") is None:
            return encoded
        if encoded.get("image") is not None:
            raise ValueError("pass either pixel_values or mm_encoder_outputs['image'], not both")
        encoded["image"] = self.encode_images(args["pixel_values"], **self.encoder_kwargs(args))
        return encoded

    def pre_encode(self, generate_kwargs: dict) -> dict:
        """As the engine's, and `frame_index` moves onto the encoded images (`vtr_frame_index`): it describes the
        original samples' blocks, which generate() must not expand per beam as it expands the prompt rows."""
        kwargs = super().pre_encode(generate_kwargs)
        frame_index = kwargs.pop("frame_index", None)
        if frame_index is not None and kwargs["mm_encoder_outputs"].get("image") is not None:
            kwargs["mm_encoder_outputs"]["image"].vtr_frame_index = frame_index  # on pre_encode's own copy
        return kwargs

    def stock_inputs(self, args: dict, cache) -> dict:
        """Without `frame_index`, which only the adapter reads."""
        return {key: value for key, value in args.items() if key != "frame_index"}

    def prefill_tokens(self, args: dict) -> PrefillTokens:
        input_ids, inputs_embeds = self.input_embeddings(args)
        image_output = self.encode_inputs(args)["image"]
        features = image_output.pooler_output.to(inputs_embeds.device, inputs_embeds.dtype)  # [tiles, T, d]
        placeholder = self.model.model.get_placeholder_mask(
            input_ids, inputs_embeds=inputs_embeds, image_features=features
        )
        visual = placeholder[..., 0]
        return self.prefill(
            args,
            inputs_embeds.masked_scatter(placeholder, features),
            visual,
            output_extras={"image_hidden_states": features},
            strategy_ctx={"patch_grid": self.patch_grid(), "vision_tower": self.vision_tower()},
            lazy_ctx=self._lazy_facts(visual, image_output, args.get("frame_index")),
        )

    # ------------------------------------------------------------------ per-tile facts for strategies

    def patch_grid(self) -> tuple[int, int]:
        """(rows, cols) of one tile's token grid after the pixel shuffle (16 x 16 for 448 px / 14 px)."""
        vision, ratio = self.model.config.vision_config, self.model.config.downsample_ratio
        rows, cols = (int(size // patch * ratio) for size, patch in zip(vision.image_size, vision.patch_size))
        return (rows, cols)

    def _lazy_facts(self, visual: torch.Tensor, image_output, frame_index: torch.Tensor | None) -> dict:
        """`visual_grid(b)`, `frames(b)`, `vision_importance(b)` and `vision_layer(b, i)`, computed on request (a
        host sync each). A sample's visual tokens are its tiles (or frames) in order, `rows * cols` tokens each,
        row-major; `frame_index` as the forward got it, else as generate() noted it on the encoded images."""
        rows, cols = self.patch_grid()
        per_tile = rows * cols
        used = getattr(image_output, "vtr_feature_layer", None)  # the feature layer the tiles were encoded with
        if frame_index is None:
            frame_index = getattr(image_output, "vtr_frame_index", None)
        cache = {}

        def counts():
            if "counts" not in cache:
                cache["counts"] = visual.sum(1).tolist()
            return cache["counts"]

        def visual_grid(b: int) -> torch.Tensor:
            n = counts()[b]
            index = torch.arange(n, device=visual.device)
            within = index % per_tile
            return torch.stack([index // per_tile, within // cols, within % cols], dim=-1)

        def sample_rows(b: int, total: int, what: str) -> slice:
            """Sample b's rows among the `total` encoded tile positions of the batch (all tiles, in order)."""
            # beam search repeats each sample k times in a row; the encoded tiles are the original samples'
            sample_counts = counts()
            repeats = beam_repeats(sum(sample_counts), total, what)
            sample_counts, b = sample_counts[::repeats], b // repeats
            first = sum(sample_counts[:b])
            if sum(sample_counts) != total:
                raise ValueError(
                    f"{what}: the visual tokens ({sample_counts}) do not line up with the {total} encoded tile "
                    "positions"
                )
            return slice(first, first + sample_counts[b])

        def vision_importance(b: int) -> torch.Tensor:
            if "importance" not in cache:
                cache["importance"] = self._cls_attention(image_output).reshape(-1)  # every tile of the batch
            importance = cache["importance"]
            return importance[sample_rows(b, importance.numel(), "vision_importance")].to(visual.device)

        def vision_layer(b: int, layer: int | None = None) -> dict:
            index = self._feature_index(used) - 1 if layer is None else self.tower_layer(layer)
            if ("layer", index) not in cache:  # every tile of the batch, [tiles * rows * cols, ...]
                facts = self._layer_attention(image_output, index)
                cache[("layer", index)] = {name: value.flatten(0, 1) for name, value in facts.items()}
            facts = cache[("layer", index)]
            chosen = sample_rows(b, facts["received"].shape[0], "vision_layer")
            return {name: value[chosen].to(visual.device) for name, value in facts.items()}

        def frames(b: int) -> torch.Tensor:
            if "blocks" not in cache:  # `<img>` blocks per prompt row
                cache["blocks"] = (visual & ~F.pad(visual[:, :-1], (1, 0))).sum(1).tolist()
            return self._frames(visual[b], self._block_frames(b, cache["blocks"], frame_index))

        return {
            "visual_grid": visual_grid,
            "frames": frames,
            "vision_importance": vision_importance,
            "vision_layer": vision_layer,
        }

    def _block_frames(self, b: int, blocks: list[int], frame_index: torch.Tensor | None) -> torch.Tensor | None:
        """Prompt row b's entries of `frame_index` (None without one): the index lists the original samples'
        blocks in batch order; generate() repeats each sample once per beam, in a row."""
        if frame_index is None:
            return None
        frame_index = torch.as_tensor(frame_index).reshape(-1)
        total, given = sum(blocks), frame_index.numel()
        repeats = total // given if given and total % given == 0 else 0
        if not repeats or sum(blocks[::repeats]) != given:
            raise ValueError(
                f"frame_index has {given} entries, but the prompts hold {blocks} <img> blocks: give one per block "
                "(its frame's index in its video, -1 for an image), in batch and prompt order"
            )
        sample_blocks, b = blocks[::repeats], b // repeats
        first = sum(sample_blocks[:b])
        return frame_index[first : first + sample_blocks[b]]

    def _frames(self, visual: torch.Tensor, block_frames: torch.Tensor | None) -> torch.Tensor:
        """[num_visual, 2] long (video, frame) of one prompt row's visual tokens (`visual` [seq] bool), from its
        blocks' frame indices (`_block_frames`): videos numbered 0, 1, ... at each frame 0, images (-1, -1).
        Without them only a row of multi-tile blocks is known (no video); a one-tile block is refused."""
        rows, cols = self.patch_grid()
        block = (visual & ~F.pad(visual[:-1], (1, 0))).cumsum(0)[visual] - 1  # each visual token's block
        tiles = torch.bincount(block) // (rows * cols)
        if block_frames is None:
            if bool((tiles == 1).any()):
                raise ValueError(
                    "frames: a one-tile <img> block may be an image or a video frame (only the processor knows); "
                    "pass frame_index to the forward / generate() (see internvl_vtr.modeling)"
                )
            frame = torch.full_like(tiles, -1)
        else:
            frame = block_frames.to(visual.device, torch.long)
            previous = F.pad(frame[:-1], (1, 0), value=-1)
            if bool(((frame < -1) | ((frame > 0) & (frame != previous + 1)) | ((frame >= 0) & (tiles != 1))).any()):
                raise ValueError(
                    f"frame_index {frame.tolist()} does not fit this prompt's <img> blocks of {tiles.tolist()} tiles: "
                    "a frame is one tile and a video's frames are numbered 0, 1, ... in order (-1 for an image)"
                )
        video = torch.where(frame >= 0, (frame == 0).cumsum(0) - 1, -1)
        return torch.stack([video, frame], -1)[block]

    def _feature_index(self, layer=None) -> int:
        """The tower hidden state the projector reads for feature layer `layer` (default: the config's; the last
        of several), 0-based; encoded features carry the forward's own as `vtr_feature_layer`."""
        return self.feature_states(layer)[-1]

    def _cls_attention(self, image_output) -> torch.Tensor:
        """[tiles, rows * cols]: the CLS query's attention (mean over heads) in the vision layer whose output
        the projector reads, recomputed for that one layer, summed over each 2 x 2 patch block that the
        pixel shuffle merges into one token (the stock `pixel_shuffle` does the grouping)."""
        index = self._feature_index(getattr(image_output, "vtr_feature_layer", None))
        hidden_states = getattr(image_output, "hidden_states", None)
        if hidden_states is None or hidden_states[index - 1] is None:
            raise ValueError(
                "vision_importance needs the vision tower's hidden states, which these pre-encoded image features "
                "lack; pass pixel_values (generate() does this for methods that set needs_vision_attention)"
            )
        layer = self.model.model.vision_tower.encoder.layer[index - 1]
        attn, x = layer.attention, hidden_states[index - 1]
        h = layer.layernorm_before(x)
        tiles, length, _ = h.shape
        q = attn.q_norm(attn.q_proj(h[:, :1])).view(tiles, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(h)).view(tiles, length, attn.num_heads, attn.head_dim).transpose(1, 2)
        probs = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * attn.scale, dim=-1)  # [t, heads, 1, len]
        patches = probs.mean(dim=1)[:, 0, 1:]  # CLS row, patch columns
        side = int(patches.shape[1] ** 0.5)
        grid = patches.reshape(tiles, side, side, 1)
        shuffled = self.model.model.pixel_shuffle(grid, scale_factor=self.model.config.downsample_ratio)
        return shuffled.sum(-1).reshape(tiles, -1)

    def _layer_attention(self, image_output, layer: int) -> dict:
        """{cls, received, keys} per tile and visual token, [tiles, rows * cols, ...], of tower layer `layer`
        (0-based), recomputed in float32 from the layer's input (kept by `encode_images` when the strategy names
        the layer in `vision_layers`), only this layer's attention map built: the CLS row's attention to each
        patch (mean over heads), the attention each patch receives (mean over heads and the tile's query rows,
        CLS included) and its keys (after `k_norm`, mean over heads), each then averaged over the 2 x 2
        patches the pixel shuffle merges into one token."""
        hidden_states = getattr(image_output, "hidden_states", None)
        if hidden_states is None or hidden_states[layer] is None:
            raise ValueError(
                f"vision_layer({layer}) needs the vision tower's hidden states entering that layer, which these "
                "encoded features lack; name the layer in the strategy's vision_layers()"
            )
        block = self.model.model.vision_tower.encoder.layer[layer]
        attn, h = block.attention, block.layernorm_before(hidden_states[layer])
        tiles, length, _ = h.shape
        q = attn.q_norm(attn.q_proj(h)).view(tiles, length, attn.num_heads, attn.head_dim).transpose(1, 2).float()
        k = attn.k_norm(attn.k_proj(h)).view(tiles, length, attn.num_heads, attn.head_dim).transpose(1, 2).float()
        probs = torch.softmax((q @ k.transpose(-1, -2)) * attn.scale, dim=-1).mean(dim=1)  # [tiles, len, len]
        return {
            "cls": self._merge_patches(probs[:, 0, 1:, None])[..., 0],  # the CLS row, patch columns
            "received": self._merge_patches(probs.mean(dim=1)[:, 1:, None])[..., 0],
            "keys": self._merge_patches(k.mean(dim=1)[:, 1:]),
        }

    def _merge_patches(self, per_patch: torch.Tensor) -> torch.Tensor:
        """[tiles, patches, c] -> [tiles, rows * cols, c]: the mean over the patches the stock `pixel_shuffle`
        merges into each visual token (it lays their channels side by side)."""
        tiles, patches, channels = per_patch.shape
        side = int(patches**0.5)
        grid = per_patch.reshape(tiles, side, side, channels)
        shuffled = self.model.model.pixel_shuffle(grid, scale_factor=self.model.config.downsample_ratio)
        return shuffled.reshape(tiles, -1, shuffled.shape[-1] // channels, channels).mean(dim=2)


class VTRInternVLForConditionalGeneration(VTRModelMixin, InternVLForConditionalGeneration):
    """Stock InternVL (2.5 / 3) + visual token reduction, configured by `self.vtr_config`."""

    vtr_adapter_class = InternVLAdapter
    vtr_stock_class = InternVLForConditionalGeneration

    def __init__(self, config, vtr_config: VTRConfig | None = None):
        super().__init__(config)
        self._vtr_setup(vtr_config)

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
        frame_index=None,  # the fork's own: which `<img>` blocks are video frames (module docstring)
        **kwargs,
    ):
        return self.vtr_forward(super().forward, *self.forward_arguments(locals()))


#: model_type of a checkpoint's config -> the VTR class that loads it.
VTR_CLASSES = {"internvl": VTRInternVLForConditionalGeneration}
register_vtr_classes(VTR_CLASSES)  # hub checkpoints load (and save) exactly as with the stock class
