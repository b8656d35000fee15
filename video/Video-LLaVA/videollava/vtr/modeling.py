"""`VTRVideoLlavaForConditionalGeneration`: the stock transformers Video-LLaVA with physical visual token pruning.

This fork's only model code: an adapter that tells the shared engine (engine.py, a copy-checked file)
what Video-LLaVA's tokens are, and a subclass of the stock class whose forward is one call into the
engine. No parameters are added; `LanguageBind/Video-LLaVA-7B-hf` loads and saves as it is.

    <image>  -> image_tower -> layer `vision_feature_layer`, CLS dropped -> projector:  256 tokens (224 px / 14)
    <video>  -> video_tower, per frame, CLS KEPT -> projector:               8 frames x 257 = 2056 tokens
    both kinds in one prompt: every visual position is a candidate, under one global budget

Strategies get `patch_grid` (16, 16), `video_frames` (t, 0 without a video), `frame_tokens` (257),
`vision_tower` (the towers' layer count; CLS: yes) and `project` (the one projector, per token), and on request
`visual_grid()` ([num_visual, 3]: group = the image or frame, numbered 0.. in prompt order, row, col; CLS
rows -1), `video_grid()` ([(t, h, w)] per video of the sample), `frames()` ([num_visual, 2]: (video, frame), the
sample's videos and each video's frames numbered 0.. in order, a frame's CLS row included; image rows (-1, -1))
and, per visual token in prompt order, from the tower that encoded it (a view is an image or a frame):
    vision_importance()   the CLS query's attention in the vision layer the projector reads
    vision_features()     the tower features the projector reads (the feature layer(s), before it)
    vision_cls()          the CLS features of that layer, of the token's own image or frame
    vision_layer(i=None)  {cls, received, keys} of tower layer i (None: the one the projector reads)
A video frame's CLS row is one of its visual tokens: its values are those of the frame's row 0 (its own
self-attention, the CLS features themselves). Positions are 1-D (0..seq-1, or `position_ids`), so decode
needs nothing special.
"""

from __future__ import annotations

import functools

import torch
from transformers import VideoLlavaForConditionalGeneration
from transformers.models.video_llava.modeling_video_llava import VideoLlavaCausalLMOutputWithPast

from .config import VTRConfig
from .engine import (
    BackboneAdapter,
    PrefillTokens,
    StageRecord,
    VTRModelMixin,
    VTRRecord,
    clip_cls_attention,
    clip_layer_attention,
    number_groups,
    register_vtr_classes,
    scatter_visual,
)

__all__ = ["StageRecord", "VTRRecord", "VTRVideoLlavaForConditionalGeneration", "VideoLlavaAdapter"]


class VideoLlavaAdapter(BackboneAdapter):
    """Video-LLaVA: `<image>` placeholders take an image's patch features, `<video>` placeholders a video's
    frames one after the other (CLS first in each frame). Every one of them is a candidate."""

    #: Budget when the user gives none (VTRConfig.budget_defaulted): a quarter of an 8-frame video
    #: (2 frames' worth of the 2056 tokens); an image prompt (256 tokens) then keeps everything.
    default_keep_tokens = 514
    output_class = VideoLlavaCausalLMOutputWithPast
    pixel_inputs = ("pixel_values", "pixel_values_images", "pixel_values_videos")
    encoded_modalities = ("image", "video")
    encoder_arguments = ("vision_feature_layer", "vision_feature_select_strategy")
    facts = (
        "patch_grid",
        "visual_grid",
        "frames",
        "vision_importance",
        "vision_features",
        "vision_layer",
        "vision_tower",
        "vision_cls",
        "project",
    )

    # ------------------------------------------------------------------ encoding

    def encode_inputs(self, args: dict) -> dict:
        """{"image": ..., "video": ...}: the stock `get_image_features` / `get_video_features` outputs (or the
        pre-encoded ones in `mm_encoder_outputs`), keeping the tower states `vision_importance` reads."""
        model, config = self.model.model, self.model.config
        encoded = dict(args.get("mm_encoder_outputs") or {})
        images = args.get("pixel_values")
        if args.get("pixel_values_images") is not None:
            if images is not None:
                raise ValueError("give the images as pixel_values or as pixel_values_images, not both")
            images = args["pixel_values_images"]
        layer = args.get("vision_feature_layer")
        layer = layer if layer is not None else config.vision_feature_layer
        select = args.get("vision_feature_select_strategy") or config.vision_feature_select_strategy
        pixels = {"image": images, "video": args.get("pixel_values_videos")}
        for modality, values in pixels.items():
            if values is None:
                continue
            if encoded.get(modality) is not None:
                raise ValueError(f"give the {modality}s as pixels or as mm_encoder_outputs['{modality}'], not both")
            keep = self.encoder_states(layer)
            if modality == "image":
                out = model.get_image_features(
                    pixel_values=values,
                    vision_feature_layer=layer,
                    vision_feature_select_strategy=select,
                    return_dict=True,
                    output_hidden_states=keep,
                )
            else:
                if values.ndim != 5:
                    raise ValueError(
                        f"pixel_values_videos must be [videos, frames, 3, height, width]; got {tuple(values.shape)}"
                    )
                out = model.get_video_features(
                    pixel_values_videos=values, vision_feature_layer=layer, return_dict=True, output_hidden_states=keep
                )
                out.vtr_frames = values.shape[1]
            out.vtr_layer, out.vtr_select = layer, select if modality == "image" else "full"
            encoded[modality] = out
        for modality, out in encoded.items():  # features encoded elsewhere: the model's own settings
            if out is not None and not hasattr(out, "vtr_layer"):
                out.vtr_layer, out.vtr_select = layer, select if modality == "image" else "full"
                if modality == "video":
                    out.vtr_frames = config.video_seq_length // (self.patch_grid()[0] * self.patch_grid()[1] + 1)
        return encoded

    @staticmethod
    def _features(out, dtype, device) -> torch.Tensor | None:
        """[1, tokens, hidden]: all projected features of one modality, in placeholder order."""
        if out is None:
            return None
        feats = out.pooler_output
        feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats]) if isinstance(feats, (list, tuple)) else feats
        return feats.reshape(1, -1, feats.shape[-1]).to(device, dtype)

    def prefill_tokens(self, args: dict) -> PrefillTokens:
        input_ids, inputs_embeds = self.input_embeddings(args)
        encoded = self.encode_inputs(args)
        image, video = (
            self._features(encoded.get(m), inputs_embeds.dtype, inputs_embeds.device) for m in self.encoded_modalities
        )
        image_mask, video_mask = self.model.model.get_placeholder_mask(
            input_ids, inputs_embeds=inputs_embeds, image_features=image, video_features=video
        )
        hidden = inputs_embeds
        if image is not None:
            hidden = hidden.masked_scatter(image_mask, image[0])
        if video is not None:
            hidden = hidden.masked_scatter(video_mask, video[0])
        masks = {"image": image_mask[..., 0] & (image is not None), "video": video_mask[..., 0] & (video is not None)}
        visual = masks["image"] | masks["video"]
        side = self.patch_grid()
        video_out = encoded.get("video")
        return self.prefill(
            args,
            hidden,
            visual,
            output_extras={
                "image_hidden_states": image[0] if image is not None else None,
                "video_hidden_states": video[0] if video is not None else None,
            },
            strategy_ctx={
                "patch_grid": side,
                "video_frames": getattr(video_out, "vtr_frames", 0) if video_out is not None else 0,
                "frame_tokens": side[0] * side[1] + 1,
                "project": self.project,
                "vision_tower": self.vision_tower(),
            },
            lazy_ctx=self._lazy_facts(visual, masks, encoded),
        )

    # ------------------------------------------------------------------ per-sample facts for strategies

    def patch_grid(self) -> tuple[int, int]:
        """(rows, cols) of one image's or frame's patch grid (16 x 16 for 224 px / 14 px)."""
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        return (side, side)

    def _item_coords(self, modality: str, count: int, frames: int) -> torch.Tensor:
        """[count, tokens per item, 3]: (group, row, col) of every position of each image or video; one
        group per image or frame, numbered within the modality; a frame's CLS row is (-1, -1, -1)."""
        rows, cols = self.patch_grid()
        r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        grid = torch.stack([torch.zeros_like(r), r, c], -1).reshape(-1, 3)
        if modality == "image":
            out = grid.repeat(count, 1, 1)  # [count, h*w, 3]
            out[..., 0] = torch.arange(count).view(-1, 1)
            return out
        frame = torch.cat([torch.full((1, 3), -1), grid])  # CLS first, as the tower orders it
        out = frame.repeat(count * frames, 1, 1)  # [count * frames, 1 + h*w, 3]
        group = torch.arange(count * frames).view(-1, 1)
        out[:, 1:, 0] = group
        return out.reshape(count, frames * frame.shape[0], 3)

    def _item_facts(self, modality: str, out, kind) -> dict:
        """name -> [items, tokens per item, ...]: the facts of `kind` ("importance", "features", "cls", or
        ("layer", i): {cls, received, keys} of tower layer i) at each placeholder of each encoded image or video
        (a video's frames one after the other, CLS row first in each), in the order the tower encoded them (the
        original samples, before any beam expansion)."""
        tower = self.model.model.image_tower if modality == "image" else self.model.model.video_tower
        encoder = getattr(tower, "vision_model", tower).encoder
        if kind == "importance":
            index = self.feature_states(out.vtr_layer)[-1] - 1
            state = self._tower_state(out, index, "vision_importance")
            views = {"importance": clip_cls_attention(encoder.layers[index], state)}
        elif kind in ("features", "cls"):  # the stock projector's input: the feature layers side by side
            states = [self._tower_state(out, i, f"vision_{kind}") for i in self.feature_states(out.vtr_layer)]
            features = torch.cat(states, dim=-1)
            views = {kind: features[:, :1].expand_as(features) if kind == "cls" else features}
        else:  # ("layer", i): tower layer i (0-based; None: the one producing the projector's input)
            index = kind[1] if kind[1] is not None else self.feature_states(out.vtr_layer)[-1] - 1
            state = self._tower_state(out, index, f"vision_layer({index})")
            views = clip_layer_attention(encoder.layers[index], state)
        rows = slice(1, None) if out.vtr_select == "default" else slice(None)  # images: CLS dropped or kept
        frames = getattr(out, "vtr_frames", 1)
        return {
            name: value[:, rows].reshape(-1, frames * value[:, rows].shape[1], *value.shape[2:])
            for name, value in views.items()
        }

    @staticmethod
    def _tower_state(out, index: int, what: str) -> torch.Tensor:
        """[views, tokens, width]: the tower's hidden state `index` (the input of layer `index`), kept by
        `encode_inputs`; a clear error when these encoded features lack it."""
        states = getattr(out, "hidden_states", None)
        if states is None or states[index] is None:
            raise ValueError(
                f"{what} needs the vision tower's hidden states (state {index}), which these encoded features lack; "
                "pass pixel values (generate() and forward() encode them keeping what the strategy's "
                "vision_layers() names)"
            )
        return states[index]

    def _lazy_facts(self, visual, masks, encoded) -> dict:
        """`visual_grid(b)`, `video_grid(b)`, `frames(b)`, `vision_importance(b)`, `vision_features(b)`,
        `vision_cls(b)` and `vision_layer(b, i)`, computed on request (host syncs)."""
        names = {"importance": "vision_importance", "features": "vision_features", "cls": "vision_cls"}
        cache = {}

        def per_token(kind) -> dict:
            """name -> [batch, seq, ...]: the facts of `kind` at every visual position (image and video
            placeholders alike; -1 / zeros elsewhere)."""
            if kind in cache:
                return cache[kind]
            tables, offset = {}, 0
            for modality in self.encoded_modalities:
                out, mask = encoded.get(modality), masks[modality]
                if out is None:
                    continue
                per_item = self._tokens_per_item(out)
                counts = (mask.sum(1) // per_item).tolist()
                if kind == "coords":  # for every item of the batch as it is (beams included)
                    items = self._item_coords(modality, sum(counts), getattr(out, "vtr_frames", 1))
                    items[..., 0] = torch.where(items[..., 0] >= 0, items[..., 0] + offset, -1)
                    offset += int(items[..., 0].max()) + 1 if items.numel() else 0
                    facts, what = {"coords": items}, "visual_grid"
                else:  # for the encoded items (the original samples)
                    facts, what = self._item_facts(modality, out, kind), names.get(kind, "vision_layer")
                flat = {name: items.reshape(-1, *items.shape[2:]) for name, items in facts.items()}
                scatter_visual(tables, mask, flat, f"{what} ({modality}s)", fill=-1 if kind == "coords" else 0)
            cache[kind] = tables
            return tables

        def per_sample(b: int, kind: str) -> torch.Tensor:
            return per_token(kind)[kind][b][visual[b]]

        def vision_layer(b: int, layer: int | None = None) -> dict:
            kind = ("layer", None if layer is None else self.tower_layer(layer))
            return {name: table[b][visual[b]] for name, table in per_token(kind).items()}

        def video_grid(b: int):
            out = encoded.get("video")
            if out is None:
                return []
            per_item = self._tokens_per_item(out)
            return [(out.vtr_frames, *self.patch_grid())] * (int(masks["video"][b].sum()) // per_item)

        def frames(b: int) -> torch.Tensor:
            """[num_visual, 2]: (video, frame) of each visual token of sample b; every video is its frames one
            after the other, each frame's rows (CLS first) the same count, so a token's place among the sample's
            video tokens says both. Image rows (-1, -1). The layout alone decides it, so beam copies agree."""
            video = masks["video"][b][visual[b]]
            out = encoded.get("video")
            if out is None:
                return torch.full((video.shape[0], 2), -1, dtype=torch.long, device=video.device)
            per_video = self._tokens_per_item(out)
            place = video.long().cumsum(0) - 1
            pairs = torch.stack([place // per_video, place % per_video // (per_video // out.vtr_frames)], -1)
            return torch.where(video[:, None], pairs, -1)

        return {
            "visual_grid": lambda b: number_groups(per_sample(b, "coords")),
            **{name: functools.partial(per_sample, kind=kind) for kind, name in names.items()},
            "vision_layer": vision_layer,
            "video_grid": video_grid,
            "frames": frames,
        }

    def _tokens_per_item(self, out) -> int:
        """Placeholders per image (CLS dropped unless `full`) or per video (every frame with its CLS)."""
        rows, cols = self.patch_grid()
        return getattr(out, "vtr_frames", 1) * (rows * cols + (out.vtr_select == "full"))


class VTRVideoLlavaForConditionalGeneration(VTRModelMixin, VideoLlavaForConditionalGeneration):
    """Stock Video-LLaVA + visual token reduction, configured by `self.vtr_config`."""

    vtr_adapter_class = VideoLlavaAdapter
    vtr_stock_class = VideoLlavaForConditionalGeneration

    def __init__(self, config, vtr_config: VTRConfig | None = None):
        super().__init__(config)
        self._vtr_setup(vtr_config)

    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        pixel_values_images=None,
        pixel_values_videos=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        vision_feature_layer=None,
        vision_feature_select_strategy=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        mm_encoder_outputs=None,
        **kwargs,
    ):
        args, kwargs = self.forward_arguments(locals())
        images = args.pop("pixel_values_images")  # the processor's legacy name; the stock model renames it too
        if images is not None:
            if args["pixel_values"] is not None:
                raise ValueError("give the images as pixel_values or as pixel_values_images, not both")
            args["pixel_values"] = images
        return self.vtr_forward(super().forward, args, kwargs)


#: model_type of a checkpoint's config -> the VTR class that loads it.
VTR_CLASSES = {"video_llava": VTRVideoLlavaForConditionalGeneration}
register_vtr_classes(VTR_CLASSES)  # Video-LLaVA checkpoints load (lm_head included) as with the stock class
