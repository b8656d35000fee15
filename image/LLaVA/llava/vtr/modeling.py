"""`VTRLlavaForConditionalGeneration`: the stock transformers LLaVA with physical visual token pruning.

This file is the LLaVA fork's only model code: adapters that tell the shared engine (engine.py, a
copy-checked file) what the tokens of LLaVA-1.5, LLaVA-1.6 and LLaVA-OneVision (and LLaVA-Video, the same
architecture) are, and subclasses of the stock classes whose forward is one call into the engine. It adds no parameters (stock checkpoints load and save as they are). Only a prefill that
carries an image and has VTR enabled is pruned; decode steps run the stock forward with their mask and
positions re-mapped onto the shortened cache.
"""

from __future__ import annotations

import functools
import math

import torch
from transformers import (
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
)
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast
from transformers.models.llava_next.modeling_llava_next import LlavaNextCausalLMOutputWithPast
from transformers.models.llava_onevision.modeling_llava_onevision import (
    LlavaOnevisionCausalLMOutputWithPast,
    LlavaOnevisionModel,
    image_size_to_num_patches,
)

from .config import VTRConfig
from .engine import (
    BackboneAdapter,
    PrefillTokens,
    StageRecord,
    VTRModelMixin,
    VTRRecord,
    beam_repeats,
    clip_cls_attention,
    clip_layer_attention,
    number_groups,
    register_vtr_classes,
    scatter_visual,
)

__all__ = [
    "LlavaAdapter",
    "LlavaNextAdapter",
    "LlavaOnevisionAdapter",
    "StageRecord",
    "VTRLlavaForConditionalGeneration",
    "VTRLlavaNextForConditionalGeneration",
    "VTRLlavaOnevisionForConditionalGeneration",
    "VTRRecord",
    "video_layout",
]


class LlavaAdapter(BackboneAdapter):
    """LLaVA-1.5: one `<image>` placeholder expands to the projected patch features (576 for 336px/14);
    every one of them is a candidate. Positions are the stock ones (`position_ids`, else 0..seq-1)."""

    #: Budget when the user gives none (VTRConfig.budget_defaulted): how LLaVA-1.5 was evaluated.
    default_keep_tokens = 192
    output_class = LlavaCausalLMOutputWithPast
    facts = (
        "patch_grid",
        "visual_grid",
        "vision_importance",
        "vision_features",
        "vision_layer",
        "vision_tower",
        "vision_cls",
        "project",
    )
    encoder_arguments = ("vision_feature_layer", "vision_feature_select_strategy")

    def encode_inputs(self, args: dict) -> dict:
        """`mm_encoder_outputs` with `pixel_values` encoded by the stock `get_image_features` (the config's
        feature layer and strategy unless given), keeping the hidden states the lazy facts read and the
        image sizes (generate() drops `image_sizes` once the images are encoded)."""
        encoded = super().encode_inputs(args)
        if args.get("pixel_values") is None:
            return encoded
        if encoded.get("image") is not None:
            raise ValueError("pass either pixel_values or mm_encoder_outputs['image'], not both")
        vision_kwargs = self.encoder_kwargs(args)
        if args.get("image_sizes") is not None:
            vision_kwargs["image_sizes"] = args["image_sizes"]
        encoded["image"] = self.encode_images(args["pixel_values"], **vision_kwargs)
        encoded["image"].vtr_image_sizes = args.get("image_sizes")
        return encoded

    def prefill_tokens(self, args: dict) -> PrefillTokens:
        input_ids, inputs_embeds = self.input_embeddings(args)
        image_output = self.encode_inputs(args)["image"]
        features = torch.cat(image_output.pooler_output, dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
        placeholder = self.model.model.get_placeholder_mask(
            input_ids, inputs_embeds=inputs_embeds, image_features=features
        )
        visual = placeholder[..., 0]
        return self.prefill(
            args,
            inputs_embeds.masked_scatter(placeholder, features),
            visual,
            output_extras={"image_hidden_states": features},
            strategy_ctx={
                "patch_grid": self.patch_grid(),
                "project": self.project,
                "vision_tower": self.vision_tower(),
            },
            lazy_ctx=self._lazy_facts(visual, image_output, self._image_sizes(args, image_output)),
        )

    # ------------------------------------------------------------------ per-image facts for strategies

    def _lazy_facts(self, visual, image_output, image_sizes) -> dict:
        """`visual_grid(b)`, `vision_importance(b)`, `vision_features(b)`, `vision_cls(b)` and `vision_layer(b, i)`,
        computed on request (a host sync each)."""
        names = {
            "coords": "visual_grid",
            "importance": "vision_importance",
            "features": "vision_features",
            "cls": "vision_cls",
        }
        cache = {}

        def images_of(b: int, what: str, facts: list) -> list[int]:
            """The entries of `facts` (one per image, batch order) whose visual tokens sample b holds."""
            if "counts" not in cache:
                cache["counts"] = visual.sum(1).tolist()
            counts = cache["counts"]
            # beam search repeats each sample k times in a row; the images (and sizes) are the original samples'
            repeats = beam_repeats(sum(counts), sum(f.shape[0] for f in facts), f"{what} for sample {b}")
            counts, b = counts[::repeats], b // repeats
            chosen, first, need = [], sum(counts[:b]), counts[b]
            for j, fact in enumerate(facts):
                if first > 0:  # the images of earlier samples
                    first -= fact.shape[0]
                elif need > 0:
                    chosen.append(j)
                    need -= fact.shape[0]
            if need != 0 or first != 0 or not chosen:
                raise ValueError(
                    f"{what} for sample {b}: the visual tokens ({counts}) do not line up with the encoded images"
                )
            return chosen

        def per_sample(b: int, kind: str):
            if kind == "coords" and kind not in cache:  # per image, batch order
                cache[kind] = self._image_coords(image_sizes, int(visual.sum()))
            elif kind == "importance" and kind not in cache:
                cache[kind] = self._image_importance(image_output, image_sizes)
            elif kind == "features" and kind not in cache:
                cache[kind] = self._arrange(self._vision_features(image_output), image_sizes)
            elif kind == "cls" and kind not in cache:  # each view's CLS features on each of its positions
                patches = self._vision_features(image_output)
                cls = self._vision_features(image_output, cls=True)
                cache[kind] = self._arrange(cls[:, None].expand_as(patches), image_sizes)
            chosen = images_of(b, names[kind], cache[kind])
            if kind != "coords":
                return torch.cat([cache[kind][j] for j in chosen]).to(visual.device)
            grids = []  # a group id per (image of this sample, tile); -1 stays off-grid
            for n, j in enumerate(chosen):
                coords = cache["coords"][j]
                group = torch.where(coords[:, 0] >= 0, coords[:, 0] + 1000 * n, -1)
                grids.append(torch.stack([group, coords[:, 1], coords[:, 2]], -1))
            return torch.cat(grids).to(visual.device)

        def vision_layer(b: int, layer: int | None = None) -> dict:
            key = ("layer", self._feature_index(image_output) - 1 if layer is None else self.tower_layer(layer))
            if key not in cache:
                facts = self._layer_attention(image_output, key[1])
                cache[key] = {name: self._arrange(value, image_sizes) for name, value in facts.items()}
            chosen = images_of(b, "vision_layer", cache[key]["received"])
            return {name: torch.cat([v[j] for j in chosen]).to(visual.device) for name, v in cache[key].items()}

        facts = {name: functools.partial(per_sample, kind=kind) for kind, name in names.items()}
        return {**facts, "vision_layer": vision_layer}

    def _layer_attention(self, image_output, layer: int) -> dict:
        """{cls, received, keys} per view and patch position of tower layer `layer` (0-based), recomputed from
        the layer's input (kept by `encode_images` when the strategy names the layer in `vision_layers`)."""
        hidden_states = getattr(image_output, "hidden_states", None)
        if hidden_states is None or hidden_states[layer] is None:
            raise ValueError(
                f"vision_layer({layer}) needs the vision tower's hidden states entering that layer, which these "
                "encoded features lack; name the layer in the strategy's vision_layers()"
            )
        tower = self.model.model.vision_tower
        encoder = getattr(tower, "vision_model", tower).encoder
        facts = clip_layer_attention(encoder.layers[layer], hidden_states[layer])
        patches = slice(1, None) if self._patches_only(image_output) else slice(None)
        return {name: value[:, patches] for name, value in facts.items()}

    @staticmethod
    def _image_sizes(args, image_output):
        sizes = args.get("image_sizes")
        return sizes if sizes is not None else getattr(image_output, "vtr_image_sizes", None)

    def _image_coords(self, image_sizes, total: int) -> list[torch.Tensor]:
        """Per image of the batch, in order: (tile, row, col) of each of its visual positions."""
        from .visualize import patch_coordinates

        coords = patch_coordinates(self.model, None)
        return [coords] * (total // coords.shape[0])

    def _image_importance(self, image_output, image_sizes) -> list[torch.Tensor]:
        """Per image of the batch, in order: the CLS attention each of its visual positions gets."""
        return self._arrange(self._cls_attention(image_output), image_sizes)

    def _arrange(self, per_view: torch.Tensor, image_sizes) -> list[torch.Tensor]:
        """Per image of the batch, in order: the rows of `per_view` [views, patches, ...] at its visual
        positions (LLaVA-1.5: one view per image)."""
        return list(per_view)

    def _vision_features(self, image_output, cls: bool = False) -> torch.Tensor:
        """[views, patches, width]: the vision tower's features the projector reads (before it), per patch, the
        feature layers side by side where there are several (as the stock model joins them); with `cls`, [views,
        width]: the CLS token's features of those layers."""
        indices = self.feature_states(self._feature_layer(image_output))
        hidden_states = getattr(image_output, "hidden_states", None)
        if hidden_states is None or any(hidden_states[i] is None for i in indices):
            raise ValueError(
                "vision_features needs the vision tower's hidden states, which these pre-encoded image features "
                "lack; pass pixel_values (generate() does this for methods that set needs_vision_attention)"
            )
        if cls:
            return torch.cat([hidden_states[i][:, 0] for i in indices], dim=-1)
        first = 1 if self._patches_only(image_output) else 0
        return torch.cat([hidden_states[i][:, first:] for i in indices], dim=-1)

    def _feature_layer(self, image_output=None):
        """The `vision_feature_layer` the images were encoded with (the forward's, else the config's)."""
        layer = getattr(image_output, "vtr_feature_layer", None)
        return self.model.config.vision_feature_layer if layer is None else layer

    def _patches_only(self, image_output=None) -> bool:
        """Whether the projector read the patches without CLS (`vision_feature_select_strategy="default"`)."""
        select = getattr(image_output, "vtr_select_strategy", None) or self.model.config.vision_feature_select_strategy
        return select == "default"

    def _feature_index(self, image_output=None) -> int:
        """The tower hidden state the projector reads (the last of several feature layers), 0-based."""
        return self.feature_states(self._feature_layer(image_output))[-1]

    def _cls_attention(self, image_output) -> torch.Tensor:
        """[num_views, patches]: the CLS query's attention (mean over heads) in the vision layer whose output
        the projector reads, recomputed for that one layer from the tower's hidden states."""
        index = self._feature_index(image_output)
        hidden_states = getattr(image_output, "hidden_states", None)
        if hidden_states is None or hidden_states[index - 1] is None:
            raise ValueError(
                "vision_importance needs the vision tower's hidden states, which these pre-encoded image features "
                "lack; pass pixel_values (generate() does this for methods that set needs_vision_attention)"
            )
        tower = self.model.model.vision_tower
        encoder = getattr(tower, "vision_model", tower).encoder  # CLIPVisionModel, older or newer layout
        probs = clip_cls_attention(encoder.layers[index - 1], hidden_states[index - 1])
        return probs[:, 1:] if self._patches_only(image_output) else probs

    def patch_grid(self) -> tuple[int, int]:
        """(rows, cols) of one image's (LLaVA-1.6: one tile's) feature grid (24 x 24 for 336px / 14px)."""
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        return (side, side)


class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-1.6 (anyres): an image becomes the base view plus up to 4 tiles, unpadded to the image's aspect
    ratio, with one `image_newline` token closing every feature row of the tiles. Every position the stock
    model fills (base, tiles, newlines) is a candidate; `llava.vtr.visualize.patch_coordinates` maps a
    position back to (tile, row, col). `image_sizes` goes to the vision side as in the stock model."""

    #: How LLaVA-1.6 was evaluated when the user gives no budget.
    default_keep_tokens = 320
    output_class = LlavaNextCausalLMOutputWithPast

    def _image_coords(self, image_sizes, total: int) -> list[torch.Tensor]:
        from .visualize import patch_coordinates

        if image_sizes is None:
            raise ValueError("LLaVA-1.6's patch grid needs image_sizes (the processor returns them)")
        return [patch_coordinates(self.model, size) for size in image_sizes.tolist()]

    def _arrange(self, per_view: torch.Tensor, image_sizes) -> list[torch.Tensor]:
        """Each position's value from its own view (base view or tile; zeros for the row-closing newline
        tokens), packed as the stock model packs the features."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        config = self.model.config
        values = per_view if per_view.ndim == 3 else per_view[..., None]  # [views, patches, width]
        packed_all, first = [], 0
        for size in image_sizes.tolist():
            views = image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
            packed, _ = self.model.model.pack_image_features(
                [values[first : first + views]],
                torch.tensor([size]),
                vision_feature_select_strategy=config.vision_feature_select_strategy,
                image_newline=torch.zeros(values.shape[-1], dtype=values.dtype, device=values.device),
            )
            packed_all.append(packed[0] if per_view.ndim == 3 else packed[0][:, 0])
            first += views
        return packed_all


class LlavaOnevisionAdapter(BackboneAdapter):
    """LLaVA-OneVision (and LLaVA-Video, the same architecture): a SigLIP tower (no CLS token) and a Qwen2 decoder.

        <image>  one image alone in its sample: the base view, then its tiles (anyres_max: unpadded to the image's
                 aspect ratio, bilinearly shrunk when they exceed the `vision_aspect_ratio` maximum) as one grid
                 with an `image_newline` token closing every row;  several images in a sample: each its base view
                 and one newline
        <video>  each frame's patch grid pooled 2 x 2 (bilinear, ceil), the frames one after the other, then one
                 newline for the whole video
        images and videos in one prompt: every visual position is a candidate, under one budget

    Strategies get `patch_grid` (the sample's first image's base view, or its first video frame's pooled grid),
    `vision_tower` (SigLIP: no CLS) and, on request, per visual token in prompt order: `visual_grid()` (group = a
    base view, an image's tile grid, or a frame; newlines -1), `vision_importance()` (the attention a patch
    receives in the tower layer the projector reads, mean over heads and queries: there is no CLS query),
    `vision_features()` (the tower features the projector reads), `vision_layer(i)` ({cls: None, received, keys})
    and `frames()` ((video, frame), the videos numbered 0.. in the sample; a newline closing a frame's row or the
    frame carries that frame; images and the one newline closing a whole video (-1, -1)). The per-patch values
    follow the projected features through the stock model's own arrangement (unpadding, bilinear shrinking, frame
    pooling: `pack_image_features`, `apply_pooling`, `arrange_video`); newlines get zeros. Positions are 1-D
    (0..seq-1, or `position_ids`)."""

    #: Budget when the user gives none: a quarter of a 32-frame video's pooled tokens (32 x 14 x 14 / 4), the frame
    #: count and retention the video-reduction papers on this backbone report most.
    default_keep_tokens = 1568
    output_class = LlavaOnevisionCausalLMOutputWithPast
    pixel_inputs = ("pixel_values", "pixel_values_videos")
    encoded_modalities = ("image", "video")
    # (a forward's own `vision_aspect_ratio` is not one: the stock model encodes with the config's)
    encoder_arguments = ("vision_feature_layer", "vision_feature_select_strategy")
    facts = (
        "patch_grid",
        "visual_grid",
        "vision_importance",
        "vision_features",
        "vision_layer",
        "vision_tower",
        "frames",
    )

    def vision_tower(self) -> dict:
        return {"depth": self.model.config.vision_config.num_hidden_layers, "cls": False}

    def patch_grid(self) -> tuple[int, int]:
        """(rows, cols) of one image's base view (27 x 27 for 384 px / 14 px)."""
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        return (side, side)

    def frame_grid(self) -> tuple[int, int]:
        """(rows, cols) of one video frame after the 2 x 2 pooling (bilinear: 14 x 14 for 27 x 27; LLaVA-Video's
        average or max pooling: 13 x 13)."""
        return pooled_grid(self.model.config)

    # ------------------------------------------------------------------ encoding

    def encode_inputs(self, args: dict) -> dict:
        """{"image": ..., "video": ...}: the stock `get_image_features` / `get_video_features` outputs (or the
        pre-encoded ones in `mm_encoder_outputs`), keeping the tower states the lazy facts read, and noting on them
        what laid the tokens out (image sizes, images per sample, frames, feature layer, selection)."""
        encoded = super().encode_inputs(args)
        kwargs = self.encoder_kwargs(args)
        layer, select = kwargs["vision_feature_layer"], kwargs["vision_feature_select_strategy"]
        for modality, pixels in (("image", args.get("pixel_values")), ("video", args.get("pixel_values_videos"))):
            if pixels is None:
                continue
            if encoded.get(modality) is not None:
                raise ValueError(f"give the {modality}s as pixels or as mm_encoder_outputs['{modality}'], not both")
            keep = self.encoder_states(layer)
            if modality == "image":
                if args.get("image_sizes") is None:
                    raise ValueError("LLaVA-OneVision's images need image_sizes (the processor returns them)")
                out = self.model.model.get_image_features(
                    pixel_values=pixels,
                    image_sizes=args["image_sizes"],
                    batch_num_images=args.get("batch_num_images"),
                    return_dict=True,
                    output_hidden_states=keep,
                    **kwargs,
                )
                out.vtr_image_sizes, out.vtr_batch_num_images = args["image_sizes"], args.get("batch_num_images")
            else:
                if pixels.ndim != 5:
                    raise ValueError(
                        f"pixel_values_videos must be [videos, frames, 3, height, width]; got {tuple(pixels.shape)}"
                    )
                out = self.model.model.get_video_features(
                    pixel_values_videos=pixels,
                    vision_feature_layer=layer,
                    vision_feature_select_strategy=select,
                    return_dict=True,
                    output_hidden_states=keep,
                )
                out.vtr_frames = pixels.shape[1]
            out.vtr_feature_layer, out.vtr_select_strategy = layer, select
            encoded[modality] = out
        return encoded

    def prefill_tokens(self, args: dict) -> PrefillTokens:
        input_ids, inputs_embeds = self.input_embeddings(args)
        encoded = self.encode_inputs(args)
        features = {}
        for modality in self.encoded_modalities:
            out = encoded.get(modality)
            if out is not None:
                pooled = out.pooler_output
                pooled = torch.cat(list(pooled)) if modality == "image" else pooled.flatten(0, 1)
                features[modality] = pooled.to(inputs_embeds.device, inputs_embeds.dtype)
        image_mask, video_mask = self.model.model.get_placeholder_mask(
            input_ids,
            inputs_embeds=inputs_embeds,
            image_features=features.get("image"),
            video_features=features.get("video"),
        )
        hidden = inputs_embeds
        masks = {}
        for modality, mask in (("image", image_mask), ("video", video_mask)):
            if modality in features:
                hidden = hidden.masked_scatter(mask, features[modality])
                masks[modality] = mask[..., 0]
        visual = torch.zeros_like(image_mask[..., 0])
        for mask in masks.values():
            visual = visual | mask
        return self.prefill(
            args,
            hidden,
            visual,
            output_extras={
                "image_hidden_states": features.get("image"),
                "video_hidden_states": features.get("video"),
            },
            strategy_ctx={"patch_grid": self._first_grids(masks), "vision_tower": self.vision_tower()},
            lazy_ctx=self._lazy_facts(visual, masks, encoded, args),
        )

    def _first_grids(self, masks: dict) -> list[tuple[int, int]]:
        """Per sample: the base-view grid when its first visual token is an image's, else a frame's pooled grid."""
        image, video = masks.get("image"), masks.get("video")
        if video is None:
            return [self.patch_grid()] * next(iter(masks.values())).shape[0]
        if image is None:
            return [self.frame_grid()] * video.shape[0]
        first_image = torch.where(image.any(1), image.float().argmax(1), image.shape[1])
        first_video = torch.where(video.any(1), video.float().argmax(1), video.shape[1])
        return [
            self.patch_grid() if i < v else self.frame_grid()
            for i, v in zip(first_image.tolist(), first_video.tolist())
        ]

    # ------------------------------------------------------------------ per-token facts for strategies

    def _lazy_facts(self, visual, masks, encoded, args) -> dict:
        """`visual_grid(b)`, `vision_importance(b)`, `vision_features(b)`, `vision_layer(b, i)` and `frames(b)`,
        computed on request (host syncs), each tower layer's attention once per prefill."""
        cache = {}

        def table(kind, what: str) -> dict:
            """name -> [batch, seq, ...]: the facts of `kind` at every visual position (-1 / zeros elsewhere)."""
            if kind in cache:
                return cache[kind]
            tables, groups = {}, 0
            for modality, mask in masks.items():
                flat = self._flat_facts(modality, encoded[modality], kind, args, what)
                if kind == "coords":  # group ids unique across the modalities
                    value = flat["coords"]
                    flat["coords"] = torch.where(value[:, :1] >= 0, value + torch.tensor([groups, 0, 0]), value)
                    groups = int(flat["coords"][:, 0].max()) + 1
                fill = -1 if kind in ("coords", "frames") else 0
                scatter_visual(tables, mask, flat, f"{what} ({modality}s)", fill=fill)
            cache[kind] = tables
            return tables

        def grid(b: int) -> torch.Tensor:
            return number_groups(table("coords", "visual_grid")["coords"][b][visual[b]])

        def features(b: int) -> torch.Tensor:
            return table("features", "vision_features")["features"][b][visual[b]]

        def vision_layer(b: int, layer: int | None = None, what: str | None = None) -> dict:
            index = None if layer is None else self.tower_layer(layer)
            facts = table(("layer", index), what or f"vision_layer({layer})")
            return {"cls": None, **{name: t[b][visual[b]] for name, t in facts.items()}}

        def importance(b: int) -> torch.Tensor:  # the projector's layer's received attention: vision_layer()'s
            return vision_layer(b, what="vision_importance")["received"]

        def frames(b: int) -> torch.Tensor:  # the table numbers the batch's videos, renumbered from 0 per sample
            return number_groups(table("frames", "frames")["frames"][b][visual[b]])

        return {
            "visual_grid": grid,
            "vision_importance": importance,
            "vision_features": features,
            "vision_layer": vision_layer,
            "frames": frames,
        }

    def _flat_facts(self, modality: str, out, kind, args, what: str) -> dict:
        """name -> [visual tokens of the encoded items, ...]: the facts of `kind` ("coords", "frames", "features"
        or ("layer", i), i None for the layer whose output the projector reads) at each placeholder of each encoded
        image or video, in encoding order."""
        if kind == "coords":
            return {"coords": self._coords(modality, out, args)}
        if kind == "frames":
            return {"frames": self._frame_ids(modality, out)}
        layer = getattr(out, "vtr_feature_layer", None)
        states = self.feature_states(layer)
        if kind == "features":
            per_view = {"features": torch.cat([self._tower_state(out, i, what) for i in states], dim=-1)}
        else:
            index = states[-1] - 1 if kind[1] is None else kind[1]
            tower = self.model.model.vision_tower
            encoder = getattr(tower, "vision_model", tower).encoder
            state = self._tower_state(out, index, what)
            # a few views at a time: one view's map is 16 heads x 729 x 729 floats; a 32-frame video has 32 views
            chunks = [clip_layer_attention(encoder.layers[index], part, cls=False) for part in state.split(8)]
            per_view = {name: torch.cat([chunk[name] for chunk in chunks]) for name in ("received", "keys")}
        select = getattr(out, "vtr_select_strategy", None) or self.model.config.vision_feature_select_strategy
        rows = slice(1, None) if select == "default" else slice(None)
        return {name: self._arrange(modality, out, value[:, rows], args) for name, value in per_view.items()}

    @staticmethod
    def _tower_state(out, index: int, what: str) -> torch.Tensor:
        states = getattr(out, "hidden_states", None)
        if states is None or len(states) <= index or states[index] is None:
            raise ValueError(
                f"{what} needs the vision tower's hidden state {index}, which these encoded features lack; pass "
                "pixel values (generate() and forward() encode them keeping what the strategy's vision_layers() names)"
            )
        return states[index]

    def _views(self, out, args) -> tuple[list, list[int]]:
        """(image sizes, views per image) of the encoded images, as the stock `get_image_features` splits them."""
        sizes = getattr(out, "vtr_image_sizes", None)
        sizes = sizes if sizes is not None else args.get("image_sizes")
        if sizes is None:
            raise ValueError("LLaVA-OneVision's image layout needs image_sizes (the processor returns them)")
        per_sample = getattr(out, "vtr_batch_num_images", None)
        per_sample = per_sample if per_sample is not None else args.get("batch_num_images")
        sizes = sizes.tolist() if hasattr(sizes, "tolist") else list(sizes)
        tiled = [True] * len(sizes) if per_sample is None else [n == 1 for n in per_sample.tolist() for _ in range(n)]
        config = self.model.config
        views = [
            image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size) if tile else 1
            for size, tile in zip(sizes, tiled)
        ]
        return sizes, views

    def _arrange(self, modality: str, out, per_view: torch.Tensor, args) -> torch.Tensor:
        """[tokens, ...]: per-view values [views, patches, ...] laid out as the stock model lays out the projected
        features (images: `pack_image_features`; videos: `apply_pooling` per frame, then the video's newline),
        zeros at the newline tokens."""
        values = per_view.float() if per_view.ndim == 3 else per_view.float()[..., None]
        if modality == "image":
            sizes, views = self._views(out, args)
            flat = torch.cat([self._pack(item, size, out) for size, item in zip(sizes, values.split(views))])
        else:
            frames = self._frames(out)
            pooled = self.model.model.apply_pooling(values)  # [videos * frames, pooled patches, width]
            pooled = pooled.reshape(-1, frames * pooled.shape[1], pooled.shape[-1])
            newline = pooled.new_zeros(pooled.shape[-1])
            flat = arrange_video(self.model.config, pooled, frames, newline).flatten(0, 1)
        return flat if per_view.ndim == 3 else flat[:, 0]

    def _frames(self, out) -> int:
        """The frames per video of encoded videos: noted at encoding, else counted from their tokens (features
        encoded elsewhere, e.g. by the stock `get_video_features`)."""
        frames = getattr(out, "vtr_frames", None)
        if frames is None:
            newline = video_layout(self.model.config)[0]
            rows, cols = self.frame_grid()
            tokens = out.pooler_output.shape[1]
            frames = next((f for f in range(1, tokens + 1) if video_tokens(f, rows, cols, newline) == tokens), None)
            if frames is None:
                raise ValueError(
                    f"the encoded videos hold {tokens} tokens each, which no frame count gives in this model's video "
                    f"layout ({newline}, {rows} x {cols} a frame)"
                )
        return frames

    def _pack(self, views: torch.Tensor, size, out) -> torch.Tensor:
        """One image's values [views, patches, width] packed by the stock `pack_image_features` (zero newlines)."""
        aspect = self.model.config.vision_aspect_ratio
        newline = views.new_zeros(views.shape[-1])
        packed, _ = self.model.model.pack_image_features([views], [size], newline, vision_aspect_ratio=aspect)
        return packed[0]

    def _frame_ids(self, modality: str, out) -> torch.Tensor:
        """[tokens, 2] long: (video, frame) of each placeholder of the encoded images (all (-1, -1)) or videos (numbered
        in encoding order), laid out by `arrange_video`: a newline closing a frame's row ("grid") or the frame
        ("frame") carries that frame, the one newline closing the whole video ("one_token") (-1, -1)."""
        if modality == "image":
            return torch.full((sum(len(item) for item in out.pooler_output), 2), -1)
        videos, frames = out.pooler_output.shape[0], self._frames(out)
        rows, cols = self.frame_grid()
        ids = torch.stack(torch.meshgrid(torch.arange(videos), torch.arange(frames), indexing="ij"), -1)
        ids = arrange_video(self.model.config, ids.repeat_interleave(rows * cols, 1), frames, torch.full((2,), -1))
        ids = ids.reshape(-1, 2)
        if video_layout(self.model.config)[0] != "one_token":
            newlines = (ids[:, 0] < 0).nonzero()[:, 0]
            ids[newlines] = ids[newlines - 1]  # each follows the last token of the row or frame it closes
        return ids

    def _coords(self, modality: str, out, args) -> torch.Tensor:
        """[tokens, 3] long: (group, row, col) of each placeholder of the encoded images or videos, group ids
        unique over them (a base view, an image's tile grid, a frame), newlines (-1, -1, -1)."""
        if modality == "video":
            rows, cols = self.frame_grid()
            r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
            frame = torch.stack([torch.zeros_like(r), r, c], -1).reshape(-1, 3)
            videos, frames = out.pooler_output.shape[0], self._frames(out)
            grid = frame.repeat(videos * frames, 1, 1)
            grid[..., 0] = torch.arange(videos * frames).view(-1, 1)
            newline = torch.full((3,), -1)
            return arrange_video(self.model.config, grid.reshape(videos, -1, 3), frames, newline).reshape(-1, 3)
        rows, cols = self.patch_grid()
        r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        base = torch.stack([torch.zeros_like(r), r, c], -1).reshape(-1, 3)
        coords, group = [], 0
        for size, count in zip(*self._views(out, args)):
            # the stock layout of this image: a view of ones packed with zero newlines marks the real tokens
            tiles = self._pack(torch.ones(count, base.shape[0], 1), size, out)[base.shape[0] :, 0]
            newline = tiles == 0
            width = tiles.numel() // int(newline.sum())  # each row: its tokens and the newline closing it
            index = torch.arange(tiles.numel())
            grid = torch.stack([torch.full_like(index, group + 1), index // width, index % width], -1)
            grid[newline] = -1
            coords += [base + torch.tensor([group, 0, 0]), grid]
            group += 2
        return torch.cat(coords)


class VTRLlavaForConditionalGeneration(VTRModelMixin, LlavaForConditionalGeneration):
    """Stock LLaVA + visual token reduction, configured by `self.vtr_config`."""

    vtr_adapter_class = LlavaAdapter
    vtr_stock_class = LlavaForConditionalGeneration

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
        **kwargs,
    ):
        return self.vtr_forward(super().forward, *self.forward_arguments(locals()))


class VTRLlavaNextForConditionalGeneration(VTRModelMixin, LlavaNextForConditionalGeneration):
    """Stock LLaVA-1.6 (LLaVA-NeXT) + visual token reduction, configured by `self.vtr_config`."""

    vtr_adapter_class = LlavaNextAdapter
    vtr_stock_class = LlavaNextForConditionalGeneration

    def __init__(self, config, vtr_config: VTRConfig | None = None):
        super().__init__(config)
        self._vtr_setup(vtr_config)

    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        image_sizes=None,
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
        return self.vtr_forward(super().forward, *self.forward_arguments(locals()))


#: LLaVA-NeXT's video layouts (its `mm_newline_position` and `mm_spatial_pool_mode` config keys); the stock
#: OneVision class has the first of each fixed (llava-onevision-qwen2-*-ov's), LLaVA-Video-7B-Qwen2 was trained with
#: "grid" and evaluated (lmms-eval `llava_vid`) with "average".
NEWLINE_POSITIONS = ("one_token", "grid", "frame", "no_token")
POOL_MODES = ("bilinear", "average", "max")


def video_layout(config) -> tuple[str, str]:
    """(newline position, pool mode) of a LLaVA-OneVision config: its `mm_newline_position` / `mm_spatial_pool_mode`
    (LLaVA-NeXT's keys, kept on the config as extra attributes), else the stock class's ("one_token", "bilinear")."""
    newline = getattr(config, "mm_newline_position", None) or "one_token"
    pool = getattr(config, "mm_spatial_pool_mode", None) or "bilinear"
    if newline not in NEWLINE_POSITIONS:
        raise ValueError(
            f"mm_newline_position={newline!r} is not a LLaVA-NeXT video layout; choose one of {NEWLINE_POSITIONS}"
        )
    if pool not in POOL_MODES:
        raise ValueError(f"mm_spatial_pool_mode={pool!r} is not a LLaVA-NeXT pooling; choose one of {POOL_MODES}")
    return newline, pool


def pooled_side(side: int, pool: str) -> int:
    """A frame's side after LLaVA-NeXT's stride-2 pooling: bilinear resizes to ceil(side / 2), average and max
    pooling floor it (27 -> 14 or 13)."""
    return math.ceil(side / 2) if pool == "bilinear" else side // 2


def pooled_grid(config) -> tuple[int, int]:
    """(rows, cols) of a video frame of this config after its pooling."""
    side = pooled_side(config.vision_config.image_size // config.vision_config.patch_size, video_layout(config)[1])
    return (side, side)


def video_tokens(frames: int, rows: int, cols: int, newline_position: str) -> int:
    """The tokens of a video of `frames` pooled rows x cols frames under a `mm_newline_position` (see `arrange_video`)."""
    newlines = {"one_token": 1, "grid": frames * rows, "frame": frames, "no_token": 0}[newline_position]
    return frames * rows * cols + newlines


def arrange_video(config, pooled: torch.Tensor, frames: int, newline: torch.Tensor) -> torch.Tensor:
    """[videos, tokens, width]: pooled frames [videos, frames * rows * cols, width] with the `newline` vector [width]
    where the config's layout puts it: "one_token" once after the video (the stock class), "grid" after every row of
    every frame (LLaVA-Video), "frame" after every frame, "no_token" nowhere."""
    position = video_layout(config)[0]
    videos, _, width = pooled.shape
    rows, cols = pooled_grid(config)
    newline = newline.to(pooled.device, pooled.dtype)
    if position == "one_token":
        return torch.cat([pooled, newline.expand(videos, 1, width)], dim=1)
    if position == "no_token":
        return pooled
    if position == "grid":
        grid = pooled.reshape(videos, frames, rows, cols, width)
        grid = torch.cat([grid, newline.expand(videos, frames, rows, 1, width)], dim=3)
        return grid.reshape(videos, -1, width)
    per_frame = pooled.reshape(videos, frames, rows * cols, width)
    return torch.cat([per_frame, newline.expand(videos, frames, 1, width)], dim=2).reshape(videos, -1, width)


class LlavaVideoLayoutModel(LlavaOnevisionModel):
    """The stock `LlavaOnevisionModel` (weights, image path, tower, projector unchanged) whose videos follow the
    config's LLaVA-NeXT layout (`video_layout`): frames pooled 2 x 2 by `mm_spatial_pool_mode` and newlines placed
    by `mm_newline_position`. With the stock values ("one_token", "bilinear") it is the stock model exactly."""

    def apply_pooling(self, image_features):
        pool = video_layout(self.config)[1]
        if pool == "bilinear":
            return super().apply_pooling(image_features)
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        frames, _, width = image_features.shape
        grid = image_features.view(frames, side, side, width).permute(0, 3, 1, 2)
        pooled = (torch.nn.functional.avg_pool2d if pool == "average" else torch.nn.functional.max_pool2d)(grid, 2)
        return pooled.permute(0, 2, 3, 1).reshape(frames, -1, width)

    def get_video_features(
        self, pixel_values_videos, vision_feature_layer=None, vision_feature_select_strategy=None, **kwargs
    ):
        return_dict = kwargs.pop("return_dict", True)
        out = super().get_video_features(
            pixel_values_videos,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            return_dict=True,
            **kwargs,
        )
        if video_layout(self.config)[0] != "one_token":  # the stock code closed the video with one newline
            out.pooler_output = arrange_video(
                self.config, out.pooler_output[:, :-1], pixel_values_videos.shape[1], self.image_newline
            )
        return out if return_dict else out.to_tuple()


class VTRLlavaOnevisionForConditionalGeneration(VTRModelMixin, LlavaOnevisionForConditionalGeneration):
    """Stock LLaVA-OneVision (also LLaVA-Video: `video_layout`) + visual token reduction, configured by
    `self.vtr_config`."""

    vtr_adapter_class = LlavaOnevisionAdapter
    vtr_stock_class = LlavaOnevisionForConditionalGeneration

    def __init__(self, config, vtr_config: VTRConfig | None = None):
        video_layout(config)  # a layout it cannot run is refused before any weight is made
        super().__init__(config)
        self._vtr_setup(vtr_config)

    def _vtr_setup(self, vtr_config: VTRConfig | None) -> None:
        video_layout(self.config)  # (wrap() of a stock model too)
        self.model.__class__ = LlavaVideoLayoutModel  # no weights change; the stock model unless the layout differs
        super()._vtr_setup(vtr_config)

    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        image_sizes=None,
        pixel_values_videos=None,
        image_sizes_videos=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        vision_feature_layer=None,
        vision_feature_select_strategy=None,
        vision_aspect_ratio=None,
        batch_num_images=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        mm_encoder_outputs=None,
        **kwargs,
    ):
        return self.vtr_forward(super().forward, *self.forward_arguments(locals()))


#: model_type of a checkpoint's config -> the VTR class that loads it.
VTR_CLASSES = {
    "llava": VTRLlavaForConditionalGeneration,
    "llava_next": VTRLlavaNextForConditionalGeneration,
    "llava_onevision": VTRLlavaOnevisionForConditionalGeneration,
}
register_vtr_classes(VTR_CLASSES)  # llava-hf checkpoints load (and save) exactly as with the stock classes
