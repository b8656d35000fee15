"""Small random Video-LLaVA checkpoints on disk, built offline (tests, the demo, the bench).

The result is an ordinary `LanguageBind/Video-LLaVA-7B-hf`-style folder (config, safetensors, tokenizer,
image and video processor settings, chat template) that loads through the real `from_pretrained` path.
Default shape: 32 px frames of 8 px patches, so an image is 16 tokens and an 8-frame video 8 x 17 = 136
(CLS kept per frame, as in the real model's 8 x 257 = 2056).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

#: The Video-LLaVA conversation format: `USER: <video>\n{question} ASSISTANT:` (one `<image>`/`<video>` line
#: per visual item, each followed by a newline).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }} "
    "{% elif message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'video' %}<video>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for item in message['content'] %}{{ item['text'] }}{% endfor %}</s>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

_TEXT = [
    "USER: What is happening in the video? ASSISTANT: A person walks a dog along the beach at sunset.",
    "Describe the video in detail. Is there a cat, a car, a ball or a tree? What color is it?",
    "Answer the question using a single word or phrase. yes no one two three left right up down",
    "The man opens the door, picks up a red cup and drinks. Then the camera moves to the window.",
]


def build_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on a few built-in sentences, with Video-LLaVA's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<image>", "<video>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TEXT, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
        padding_side="left",
    )


def tiny_config(
    tokenizer,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vision_hidden_size: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 2,
    num_frames: int = 8,
):
    from transformers import CLIPVisionConfig, LlamaConfig, VideoLlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=vision_hidden_size,
        intermediate_size=vision_hidden_size * 4,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden_size,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=8192,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    patches = (image_size // patch_size) ** 2
    return VideoLlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_seq_length=patches,
        video_seq_length=(patches + 1) * num_frames,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_processor(tokenizer, config):
    """The stock `VideoLlavaProcessor` with `FrameVideoProcessor` for videos (no torchvision needed)."""
    from transformers import VideoLlavaImageProcessor

    from .processing import FrameVideoProcessor, VideoLlavaFrameProcessor

    size = config.vision_config.image_size
    shape = {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}}
    return VideoLlavaFrameProcessor(
        image_processor=VideoLlavaImageProcessor(**shape),
        video_processor=FrameVideoProcessor(**shape),
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_video_llava(path, *, seed: int = 0, overwrite: bool = False, **shape) -> Path:
    """Write a random Video-LLaVA checkpoint + processor to `path` (kept when it already holds this shape).

    `shape`: the keyword arguments of `tiny_config` (image_size, patch_size, hidden_size, num_layers,
    num_heads, num_kv_heads, intermediate_size, vision_hidden_size, vision_layers, vision_heads, num_frames).
    """
    from transformers import VideoLlavaForConditionalGeneration

    path = Path(path)
    stamp = path / "vtr_tiny.json"
    wanted = {"seed": seed, **shape}
    if not overwrite and stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return path
    tokenizer = build_tokenizer()
    config = tiny_config(tokenizer, **shape)
    torch.manual_seed(seed)
    model = VideoLlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # random init gives near-uniform attention; larger embeddings make scores differ
        model.model.language_model.embed_tokens.weight.normal_(0, 1.0)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tiny_processor(tokenizer, config).save_pretrained(path)
    stamp.write_text(json.dumps(wanted))
    return path


def demo_frames(num_frames: int = 8, size: int = 224):
    """uint8 [t, size, size, 3]: a ball moving across a drawn scene, made here so nothing is downloaded."""
    import numpy as np
    from PIL import Image, ImageDraw

    frames = []
    for t in range(num_frames):
        img = Image.new("RGB", (size, size), (135, 190, 235))
        d = ImageDraw.Draw(img)
        s = size / 224
        d.rectangle([0, 160 * s, size, size], fill=(70, 150, 60))
        d.rectangle([40 * s, 100 * s, 110 * s, 165 * s], fill=(190, 60, 50))
        x = (20 + 180 * t / max(1, num_frames - 1)) * s
        d.ellipse([x - 14 * s, 130 * s, x + 14 * s, 158 * s], fill=(250, 210, 60))
        frames.append(np.asarray(img))
    return np.stack(frames)


def bench_case(shape: dict, cache_dir, model: str | None = None) -> dict:
    """What scripts/bench.py needs for this fork: a checkpoint (random and Video-LLaVA-shaped: 224 px frames of
    14 px patches, 8 frames x 257 tokens = 2,056 visual tokens; or `model`), a batch builder and the
    vision-only step (video tower + projector). `shape`: hidden_size, num_layers, num_heads, num_kv_heads,
    intermediate_size of the language model."""
    from .prompts import encode, video_prompt

    full = dict(image_size=224, patch_size=14, vision_hidden_size=64, **shape)
    if model is None:
        name = "bench-video-llava-{hidden_size}x{num_layers}-kv{num_kv_heads}".format(**full)
        model = str(build_tiny_video_llava(Path(cache_dir) / name, **full))
    frames = demo_frames(8, 224)

    def inputs(processor, batch: int):
        return encode(processor, [video_prompt("What happens in the video?")] * batch, videos=[frames] * batch)

    def vision(vtr_model, batch_inputs):
        vtr_model.model.get_video_features(
            pixel_values_videos=batch_inputs["pixel_values_videos"],
            vision_feature_layer=vtr_model.config.vision_feature_layer,
        )

    return dict(path=model, inputs=inputs, vision=vision, description="Video-LLaVA, one 8-frame 224 px video")
