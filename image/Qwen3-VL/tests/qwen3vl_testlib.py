"""Helpers for the Qwen3-VL fork's tests: prompts, the VTR loader, and the oracle's Qwen-VL embedding step
(merged embeddings, M-RoPE positions from the stock `get_rope_index`, Qwen3-VL's DeepStack after the first
layers)."""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import vtr_oracle
from vtr_oracle import Embedded, stage_drops  # noqa: F401 (re-exported for the fork's tests)

from visual_token_pruning import VTRConfig, load_model
from visual_token_pruning.tiny import demo_image, demo_video

QUESTION = "What is shown in the image?"


def chat(processor, question=QUESTION, images=1, videos=0):
    content = [{"type": "image"}] * images + [{"type": "video"}] * videos + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def vtr_model(path, impl="sdpa", **cfg):
    return load_model(path, VTRConfig(**cfg), attn_implementation=impl)


def visual_ids(config):
    return [config.image_token_id, config.video_token_id]


def image_video_batch(processor):
    """Two left-padded prompts: an image and an 8-frame video at 4 fps (4 frame groups), and another image."""
    texts = [
        chat(processor, "What happens in the video?", images=1, videos=1),
        chat(processor, "Describe the picture in detail. Is there a cat, a dog or a car?"),
    ]
    return processor(
        images=[demo_image(48), demo_image(64, height=48)],
        videos=[demo_video(8, 32)],
        text=texts,
        return_tensors="pt",
        padding=True,
        video_metadata=[{"total_num_frames": 8, "fps": 4.0, "frames_indices": list(range(8))}],
    )


def video_batch(processor, videos=(((8, 32),), ((10, 40),)), images=(0, 0)):
    """Two left-padded prompts of different lengths: prompt i has `images[i]` images of 48 px, then the videos
    `videos[i]` ((frames, size in px) each, at 2 fps, so the Qwen3-VL processor samples every frame). Default:
    one video each, 8 frames of 32 px (4 frame groups of 4 x 4 tokens) and 10 frames of 40 px (5 of 5 x 5)."""
    texts = [
        chat(processor, "What happens in the video?", images=images[0], videos=len(videos[0])),
        chat(processor, "Describe the video in detail. Does the sun move?", images=images[1], videos=len(videos[1])),
    ]
    clips = [clip for prompt in videos for clip in prompt]
    return processor(
        images=[demo_image(48)] * sum(images) or None,
        videos=[demo_video(frames, size) for frames, size in clips],
        text=texts,
        return_tensors="pt",
        padding=True,
        video_metadata=[{"total_num_frames": n, "fps": 2.0, "frames_indices": list(range(n))} for n, _ in clips],
    )


def rope_index(model, inputs, ids=None, types=None, attention_mask=None) -> torch.Tensor:
    """[3, b, s]: the stock `get_rope_index` of `inputs` (its own ids and types unless given), with the grids and
    Qwen2.5-VL's second_per_grid_ts when the processor returned them (`model`: the inner `...Model`)."""
    positions, _ = model.get_rope_index(
        inputs["input_ids"] if ids is None else ids,
        inputs["mm_token_type_ids"] if types is None else types,
        image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"),
        attention_mask=attention_mask,
        **({"second_per_grid_ts": inputs["second_per_grid_ts"]} if "second_per_grid_ts" in inputs else {}),
    )
    return positions


def qwen_embed(stock, inputs):
    """The stock model's merge, written out: features scattered into the placeholders of the prompt, the
    3-row positions of the whole (prompt + decoded) sequence, and DeepStack added to every visual row."""
    model, config = stock.model, stock.config
    ids = inputs["input_ids"]
    types = inputs["mm_token_type_ids"]
    prompt_len = types.shape[1]
    types = torch.nn.functional.pad(types, (0, ids.shape[1] - prompt_len))  # decoded tokens are text
    embeds = model.get_input_embeddings()(ids)
    visual = torch.zeros_like(ids, dtype=torch.bool)
    joint = {}
    for name, pixels, grid, token in (
        ("image", "pixel_values", "image_grid_thw", config.image_token_id),
        ("video", "pixel_values_videos", "video_grid_thw", config.video_token_id),
    ):
        if inputs.get(pixels) is None:
            continue
        fn = model.get_image_features if name == "image" else model.get_video_features
        out = fn(inputs[pixels], inputs[grid], return_dict=True)
        mask = torch.zeros_like(visual)
        mask[:, :prompt_len] = ids[:, :prompt_len] == token
        embeds = embeds.masked_scatter(mask[..., None], torch.cat(out.pooler_output))
        visual |= mask
        joint[name] = (mask, [torch.cat(f) for f in getattr(out, "deepstack_features", None) or []])
    deepstack = []
    for layer in range(len(getattr(config.vision_config, "deepstack_visual_indexes", None) or [])):
        feats = embeds.new_zeros(int(visual.sum()), embeds.shape[-1])
        for mask, per_layer in joint.values():
            feats[mask[visual]] = per_layer[layer]
        deepstack.append(feats)
    positions = rope_index(model, inputs, ids, types, inputs.get("attention_mask"))

    def after_layer(i, hidden):
        if i >= len(deepstack) or not joint:
            return hidden
        hidden = hidden.clone()
        hidden[visual] = hidden[visual] + deepstack[i]
        return hidden

    return Embedded(embeds, positions, after_layer)


def oracle_forward(stock, inputs, prune_stages, prompt_len, conventions=None):
    return vtr_oracle.oracle_forward(stock, inputs, prune_stages, prompt_len, qwen_embed, conventions=conventions)


def oracle_greedy(stock, inputs, prune_stages, steps):
    return vtr_oracle.oracle_greedy(stock, inputs, prune_stages, steps, qwen_embed)


@dataclass
class BackboneCase:
    """What the shared contract test (test_contract.py) needs from this fork, per model family."""

    name: str
    path: str  # a tiny checkpoint saved to disk
    stock: dict  # attn_implementation -> the stock model
    single: dict  # one prompt with one image
    batch: dict  # two prompts, left-padded, different images
    text_only: dict  # one prompt without an image
    visual_token_id: list  # image and video placeholder ids
    embed: Callable = qwen_embed  # the oracle's embedding step
    video: dict | None = None  # two prompts, left-padded, each with one video (4 frame groups at least)
