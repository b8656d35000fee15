"""`VTRLlavaForConditionalGeneration`: the stock transformers LLaVA with physical visual token pruning.

This file is the LLaVA fork's only model code: an adapter that tells the shared engine (engine.py, a
copy-checked file) what LLaVA's tokens are, and a subclass of the stock class whose forward is one call
into the engine. It adds no parameters (stock checkpoints load and save as they are). Only a prefill that
carries an image and has VTR enabled is pruned; decode steps run the stock forward with their mask and
positions re-mapped onto the shortened cache.
"""

from __future__ import annotations

import functools

import torch
from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast
from transformers.models.llava_next.modeling_llava_next import LlavaNextCausalLMOutputWithPast

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
    register_vtr_classes,
)

__all__ = [
    "LlavaAdapter",
    "LlavaNextAdapter",
    "StageRecord",
    "VTRLlavaForConditionalGeneration",
    "VTRLlavaNextForConditionalGeneration",
    "VTRRecord",
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


#: model_type of a checkpoint's config -> the VTR class that loads it.
VTR_CLASSES = {"llava": VTRLlavaForConditionalGeneration, "llava_next": VTRLlavaNextForConditionalGeneration}
register_vtr_classes(VTR_CLASSES)  # llava-hf checkpoints load (and save) exactly as with the stock classes
