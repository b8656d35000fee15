"""Helpers for the LLaVA fork's tests: prompts, the VTR model loader, and the oracle with LLaVA's embedding step."""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import vtr_oracle
from vtr_oracle import stage_drops  # noqa: F401 (re-exported for the fork's tests)

from llava.vtr import VTRConfig, load_model
from llava.vtr.tiny import demo_video

QUESTION = "What is shown in the image?"


def chat(processor, question=QUESTION, images=1):
    content = [{"type": "image"}] * images + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def ov_chat(processor, question="What is shown?", kinds=("image", "video")):
    """A LLaVA-OneVision user turn: a placeholder per entry of `kinds` ("image" / "video"), then the question."""
    content = [{"type": kind} for kind in kinds] + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def ov_videos(processor):
    """Two prompts, left-padded, one 4-frame video each (the second the first played backwards), questions of
    different lengths; `processor` expands `<video>` in its model's video layout."""
    texts = [
        ov_chat(processor, "What moves?", kinds=("video",)),
        ov_chat(processor, "Describe the video in detail. Is there a car?", kinds=("video",)),
    ]
    videos = [demo_video(4, 64), demo_video(4, 64)[::-1].copy()]
    return processor(text=texts, videos=videos, return_tensors="pt", padding=True)


def hand_video(frames, grid=None, first_row: int = 10):
    """A `Video` (strategy/video.py) of features `frames` [T, N, D] at rows `first_row`.. of a prompt, frame after
    frame; its tokens' (row, col) `grid` [N, 2] (default: a one-row grid, (0, j) for token j)."""
    from llava.vtr.strategy.video import Video

    count, per_frame = frames.shape[:2]
    index = torch.arange(count * per_frame).reshape(count, per_frame)
    if grid is None:
        grid = torch.stack([torch.zeros(per_frame, dtype=torch.long), torch.arange(per_frame)], -1)
    return Video(index + first_row, index, frames, grid.expand(count, per_frame, 2))


def vtr_model(path, impl="sdpa", **cfg):
    return load_model(path, VTRConfig(**cfg), attn_implementation=impl)


def llava_embed(stock, inputs):
    """LLaVA's merged input embeddings: the stock vision features scattered into the image placeholders."""
    model = stock.model
    input_ids = inputs["input_ids"]
    embeds = model.get_input_embeddings()(input_ids)
    if "pixel_values" in inputs:
        cfg = stock.config
        extra = {"image_sizes": inputs["image_sizes"]} if "image_sizes" in inputs else {}
        feats = model.get_image_features(
            pixel_values=inputs["pixel_values"],
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            return_dict=True,
            **extra,
        ).pooler_output
        embeds = embeds.masked_scatter((input_ids == stock.config.image_token_id)[..., None], torch.cat(feats, 0))
    return embeds


def onevision_embed(stock, inputs):
    """LLaVA-OneVision's merged input embeddings: the stock image features (anyres, per-row newlines) and video
    features (pooled frames, one newline) scattered into their placeholders."""
    model, cfg = stock.model, stock.config
    input_ids = inputs["input_ids"]
    embeds = model.get_input_embeddings()(input_ids)
    select = dict(
        vision_feature_layer=cfg.vision_feature_layer, vision_feature_select_strategy=cfg.vision_feature_select_strategy
    )
    if inputs.get("pixel_values") is not None:
        feats = model.get_image_features(
            pixel_values=inputs["pixel_values"],
            image_sizes=inputs["image_sizes"],
            batch_num_images=inputs.get("batch_num_images"),
            return_dict=True,
            **select,
        ).pooler_output
        embeds = embeds.masked_scatter((input_ids == cfg.image_token_id)[..., None], torch.cat(feats, 0))
    if inputs.get("pixel_values_videos") is not None:
        feats = model.get_video_features(pixel_values_videos=inputs["pixel_values_videos"], return_dict=True, **select)
        embeds = embeds.masked_scatter((input_ids == cfg.video_token_id)[..., None], feats.pooler_output.flatten(0, 1))
    return embeds


def oracle_forward(stock, inputs, prune_stages, prompt_len, position_ids=None, conventions=None):
    return vtr_oracle.oracle_forward(stock, inputs, prune_stages, prompt_len, llava_embed, position_ids, conventions)


def oracle_greedy(stock, inputs, prune_stages, steps):
    return vtr_oracle.oracle_greedy(stock, inputs, prune_stages, steps, llava_embed)


@dataclass
class BackboneCase:
    """What the shared contract test (test_contract.py) needs from this fork, per model family."""

    name: str
    path: str  # a tiny checkpoint saved to disk
    stock: dict  # attn_implementation -> the stock model
    single: dict  # one prompt with one image
    batch: dict  # two prompts, left-padded, different images
    text_only: dict  # one prompt without an image
    visual_token_id: int | list[int]  # LLaVA-OneVision: its image and video tokens
    embed: Callable = llava_embed  # merged input embeddings for the oracle
    video: dict | None = None  # two prompts, left-padded, one video each (different); None: takes no videos
