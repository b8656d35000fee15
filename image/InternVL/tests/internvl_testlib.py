"""Helpers for the InternVL fork's tests: prompts, the VTR model loader, and the oracle with InternVL's
embedding step (stock vision features scattered into the `<IMG_CONTEXT>` positions)."""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import vtr_oracle
from vtr_oracle import stage_drops  # noqa: F401 (re-exported for the fork's tests)

from internvl_vtr import VTRConfig, load_model
from internvl_vtr.tiny import demo_image

QUESTION = "What is shown in the image?"


def chat(processor, question=QUESTION, images=1, videos=0):
    content = [{"type": "image"}] * images + [{"type": "video"}] * videos + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def clip(num_frames: int):
    """A clip of `num_frames` frames (uint8 [t, h, w, 3]): the scene drifting right."""
    base = np.asarray(demo_image(48, 40))
    return np.stack([np.roll(base, 6 * t, axis=1) for t in range(num_frames)])


def vtr_model(path, impl="sdpa", **cfg):
    return load_model(path, VTRConfig(**cfg), attn_implementation=impl)


def internvl_embed(stock, inputs):
    """InternVL's merged input embeddings, from the stock model's own pieces."""
    model, config = stock.model, stock.config
    input_ids = inputs["input_ids"]
    embeds = model.get_input_embeddings()(input_ids)
    if "pixel_values" in inputs:
        features = model.get_image_features(
            pixel_values=inputs["pixel_values"],
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            return_dict=True,
        ).pooler_output
        embeds = embeds.masked_scatter(
            (input_ids == config.image_token_id)[..., None], features.reshape(-1, embeds.shape[-1])
        )
    return embeds


def oracle_forward(stock, inputs, prune_stages, prompt_len, position_ids=None, conventions=None):
    return vtr_oracle.oracle_forward(stock, inputs, prune_stages, prompt_len, internvl_embed, position_ids, conventions)


def oracle_greedy(stock, inputs, prune_stages, steps):
    return vtr_oracle.oracle_greedy(stock, inputs, prune_stages, steps, internvl_embed)


def greedy(model, inputs, steps):
    out = model.generate(
        **inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
        return_dict_in_generate=True, output_logits=True,
    )  # fmt: skip
    return out.sequences[:, inputs["input_ids"].shape[1] :], torch.stack(out.logits, 1)


@dataclass
class BackboneCase:
    """What the shared contract test (test_contract.py) needs from this fork, per model family."""

    name: str
    path: str  # a tiny checkpoint saved to disk
    stock: dict  # attn_implementation -> the stock model
    single: dict  # one prompt with one image
    batch: dict  # two prompts, left-padded, different images
    text_only: dict  # one prompt without an image
    visual_token_id: int
    embed: Callable = internvl_embed  # merged input embeddings for the oracle
    video: dict | None = None  # two prompts, left-padded, one video each (different), with `frame_index`
