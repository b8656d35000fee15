"""Helpers for the Video-LLaVA fork's tests: the VTR model loader and the oracle with Video-LLaVA's embedding step."""

from collections.abc import Callable
from dataclasses import dataclass

import vtr_oracle
from vtr_oracle import stage_drops  # noqa: F401 (re-exported for the fork's tests)

from videollava.vtr import VTRConfig, load_model


def vtr_model(path, impl="sdpa", **cfg):
    return load_model(path, VTRConfig(**cfg), attn_implementation=impl)


def videollava_embed(stock, inputs):
    """The merged input embeddings as the stock model builds them: image features (CLS dropped) into the
    `<image>` placeholders, every frame's features (CLS kept) into the `<video>` placeholders."""
    model, cfg = stock.model, stock.config
    input_ids = inputs["input_ids"]
    embeds = model.get_input_embeddings()(input_ids)
    images = inputs.get("pixel_values", inputs.get("pixel_values_images"))
    if images is not None:
        feats = model.get_image_features(
            pixel_values=images,
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            return_dict=True,
        ).pooler_output
        embeds = embeds.masked_scatter((input_ids == cfg.image_token_id)[..., None], feats.reshape(-1, feats.shape[-1]))
    if inputs.get("pixel_values_videos") is not None:
        feats = model.get_video_features(
            pixel_values_videos=inputs["pixel_values_videos"], vision_feature_layer=cfg.vision_feature_layer
        ).pooler_output
        embeds = embeds.masked_scatter((input_ids == cfg.video_token_id)[..., None], feats.reshape(-1, feats.shape[-1]))
    return embeds


def visual_mask(stock, inputs):
    """[batch, seq] bool: image and video placeholders."""
    ids = inputs["input_ids"]
    return (ids == stock.config.image_token_id) | (ids == stock.config.video_token_id)


def oracle_forward(stock, inputs, prune_stages, prompt_len, position_ids=None, conventions=None):
    return vtr_oracle.oracle_forward(
        stock, inputs, prune_stages, prompt_len, videollava_embed, position_ids, conventions
    )


def oracle_greedy(stock, inputs, prune_stages, steps, conventions=None):
    return vtr_oracle.oracle_greedy(stock, inputs, prune_stages, steps, videollava_embed, conventions)


@dataclass
class BackboneCase:
    """What the shared contract test (test_contract.py) needs from this fork, per prompt kind."""

    name: str
    path: str  # a tiny checkpoint saved to disk
    stock: dict  # attn_implementation -> the stock model
    single: dict  # one prompt with one visual item
    batch: dict  # two prompts, left-padded, different visuals
    text_only: dict  # one prompt without a visual
    visual_token_id: int
    embed: Callable = videollava_embed  # merged input embeddings for the oracle
    video: dict | None = None  # two prompts, left-padded, one video each (different); None: takes no videos
