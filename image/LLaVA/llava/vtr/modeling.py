"""`VTRLlavaForConditionalGeneration`: the stock transformers LLaVA with physical visual token pruning.

This file is the LLaVA fork's only model code: an adapter that tells the shared engine (engine.py, a
copy-checked file) what LLaVA's tokens are, and a subclass of the stock class whose forward is one call
into the engine. It adds no parameters (stock checkpoints load and save as they are). Only a prefill that
carries an image and has VTR enabled is pruned; decode steps run the stock forward with their mask and
positions re-mapped onto the shortened cache.
"""

from __future__ import annotations

import importlib

import torch
from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast
from transformers.models.llava_next.modeling_llava_next import LlavaNextCausalLMOutputWithPast

from .config import VTRConfig
from .engine import BackboneAdapter, PrefillTokens, StageRecord, VTRModelMixin, VTRRecord

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

    @property
    def rope_fn(self):
        # The text model may be Llama (Vicuna), Mistral or Qwen2: use its own family's rotary function.
        module = importlib.import_module(type(self.language_model).__module__)
        return module.apply_rotary_pos_emb

    def has_visual_input(self, args: dict) -> bool:
        encoded = args.get("mm_encoder_outputs") or {}
        return args.get("pixel_values") is not None or encoded.get("image") is not None

    def prefill_tokens(self, args: dict) -> PrefillTokens:
        model = self.model.model
        input_ids, inputs_embeds = args.get("input_ids"), args.get("inputs_embeds")
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = model.get_input_embeddings()(input_ids)
        image_output = (args.get("mm_encoder_outputs") or {}).get("image")
        if image_output is None:
            vision_kwargs = {k: args.get(k) for k in ("vision_feature_layer", "vision_feature_select_strategy")}
            if args.get("image_sizes") is not None:
                vision_kwargs["image_sizes"] = args["image_sizes"]
            image_output = model.get_image_features(
                pixel_values=args["pixel_values"], return_dict=True, **vision_kwargs
            )
        features = torch.cat(image_output.pooler_output, dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
        placeholder = model.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, image_features=features)
        hidden = inputs_embeds.masked_scatter(placeholder, features)
        batch, seq_len, _ = hidden.shape
        mask = args.get("attention_mask")
        positions = args.get("position_ids")
        if positions is None:
            positions = torch.arange(seq_len, device=hidden.device).unsqueeze(0)
        positions = positions.expand(batch, -1)
        cos, sin = self.language_model.rotary_emb(hidden, positions)
        visual = placeholder[..., 0]
        return PrefillTokens(
            hidden=hidden,
            visual=visual,
            valid=mask.bool() if mask is not None else torch.ones_like(visual),
            positions=positions,
            cos=cos,
            sin=sin,
            output_extras={"image_hidden_states": features},
            strategy_ctx={"patch_grid": self.patch_grid()},
        )

    def patch_grid(self) -> tuple[int, int]:
        """(rows, cols) of one image's (LLaVA-1.6: one tile's) feature grid (24 x 24 for 336px / 14px)."""
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        return (side, side)

    def output(self, loss, logits, cache, tokens: PrefillTokens):
        return self.output_class(loss=loss, logits=logits, past_key_values=cache, **tokens.output_extras)


class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-1.6 (anyres): an image becomes the base view plus up to 4 tiles, unpadded to the image's aspect
    ratio, with one `image_newline` token closing every feature row of the tiles. Every position the stock
    model fills (base, tiles, newlines) is a candidate; `llava.vtr.visualize.patch_coordinates` maps a
    position back to (tile, row, col). `image_sizes` goes to the vision side as in the stock model."""

    #: How LLaVA-1.6 was evaluated when the user gives no budget.
    default_keep_tokens = 320
    output_class = LlavaNextCausalLMOutputWithPast


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
        return self.vtr_forward(super().forward, stock_args, kwargs)


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
        stock_args = dict(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            labels=labels,
            logits_to_keep=logits_to_keep,
            mm_encoder_outputs=mm_encoder_outputs,
        )
        if use_cache is not None:
            kwargs["use_cache"] = use_cache
        return self.vtr_forward(super().forward, stock_args, kwargs)


#: model_type of a checkpoint's config -> the VTR class that loads it.
VTR_CLASSES = {"llava": VTRLlavaForConditionalGeneration, "llava_next": VTRLlavaNextForConditionalGeneration}

# transformers skips its built-in key renaming for classes defined outside the library; register the stock
# mappings under these class names so llava-hf checkpoints load (and save) exactly as with the stock classes.
for _model_type, _cls in VTR_CLASSES.items():
    register_checkpoint_conversion_mapping(
        _cls.__name__, get_checkpoint_conversion_mapping(_model_type), overwrite=True
    )
