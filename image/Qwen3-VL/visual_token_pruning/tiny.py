"""Build small random Qwen-VL checkpoints on disk, fully offline (tests, the demo, the benchmark).

The result is an ordinary hub-style folder (config, safetensors, tokenizer, chat template, image and video
processor configs naming the stock classes) that loads through the real `from_pretrained` path, exactly
like a downloaded `Qwen/Qwen3-VL-*-Instruct`, `Qwen/Qwen2.5-VL-*-Instruct`, `Qwen/Qwen2-VL-*-Instruct` or
`Qwen/Qwen3.5-*` checkpoint. Qwen3-VL's vision tower has DeepStack layers; Qwen2.5-VL's runs window attention
(2 x 2 merged tokens per window in the tiny shape) with full attention in its last block; Qwen3.5's decoder is
hybrid (Gated DeltaNet linear attention and gated full attention, `layer_types`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

#: Qwen3-VL's chat template, reduced to what the tests and the plugin use (roles, images, videos, text).
QWEN3_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

_CORPUS = [
    "user What is shown in the image? assistant A red house with a blue roof under the sun.",
    "Describe the picture in detail. Is there a cat, a dog, a car or a tree?",
    "How many objects are there? Answer the question using a single word or phrase.",
    "yes no one two three four five left right top bottom color shape large small",
    "<0.5 seconds> <1.5 seconds> <2.5 seconds> 0 1 2 3 4 5 6 7 8 9 . seconds What happens in the video?",
]


def build_tokenizer(vocab_size: int = 360):
    """A byte-level BPE tokenizer trained on a tiny built-in corpus, with Qwen3-VL's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
        padding_side="left",
    )


#: The tests' Qwen3.5 decoder: linear (L) and full (F) attention as L L F L F L L, the smallest layout with a linear
#: layer 0 (the decode reference layer is not 0), no full layer below K=3 (attention methods refused there), a K
#: whose K-1 is linear (4 scores from layer 2), a two-stage attention schedule (3 and 6: the second scores from
#: layer 4), full layers for scoring_layer="own" (2 and 4) and linear layers after the last stage.
QWEN3_5_TEST_LAYERS = ["linear_attention"] * 2 + ["full_attention", "linear_attention"] * 2 + ["linear_attention"]


def tiny_qwen3_vl_config(
    tokenizer,
    *,
    patch_size: int = 4,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vision_hidden_size: int = 32,
    vision_depth: int = 3,
    deepstack_visual_indexes: tuple = (0, 1),
    num_position_embeddings: int = 64,
    layer_types: list[str] | None = None,
    moe: bool = False,
    family: str = "qwen3_vl",
):
    """A Qwen-VL config (`family`: qwen3_vl, qwen2_5_vl, qwen2_vl or qwen3_5): text head_dim 16 with M-RoPE
    sections (4, 2, 2). Qwen3-VL: DeepStack features from vision blocks `deepstack_visual_indexes` are added after
    the first len(...) decoder layers. Qwen2.5-VL: windows of 2 x 2 merged tokens, the last vision block and
    every other one before it full-attention. Qwen3.5: decoder layers of the kinds `layer_types` (its length is
    the layer count; None: the stock layout, full attention in every 4th layer), linear attention with value heads
    = `num_heads`, key heads half of them, head dims hidden / heads; attention head_dim hidden / heads but at least
    32, the stock partial rotary on a quarter of it (M-RoPE sections over head_dim / 8 frequencies, interleaved:
    (2, 1, 1) in the tiny shape); no DeepStack. `moe`: Qwen3-VL-MoE or Qwen3.5-MoE (4 experts, 2 per
    token; Qwen3.5 adds a shared expert)."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2VLConfig,
        Qwen3_5Config,
        Qwen3_5MoeConfig,
        Qwen3VLConfig,
        Qwen3VLMoeConfig,
    )

    if family not in FAMILIES:
        raise ValueError(f"unknown Qwen-VL family {family!r}; choose one of {sorted(FAMILIES)}")
    if moe and family not in MOE_CLASSES:
        raise ValueError(f"{family!r} has no MoE variant; MoE families: {sorted(MOE_CLASSES)}")

    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in _TOKEN_FIELDS.items()}
    head_dim = max(32, hidden_size // num_heads) if family == "qwen3_5" else hidden_size // num_heads
    half = head_dim // 8 if family == "qwen3_5" else head_dim // 2  # rotary frequencies
    mrope = [half - 2 * (half // 4), half // 4, half // 4]
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=4096,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": mrope,
            **({"mrope_interleaved": True} if family in ("qwen3_vl", "qwen3_5") else {}),
        },
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=intermediate_size // 2)
    vision = dict(depth=vision_depth, num_heads=2, patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2)
    if family not in ("qwen3_vl", "qwen3_5"):
        text.update(bos_token_id=None)  # the stock default (151643) lies outside the tiny vocabulary
    if family == "qwen2_vl":
        text.pop("head_dim")
        vision.update(embed_dim=vision_hidden_size, hidden_size=hidden_size, mlp_ratio=2)
        config_class = Qwen2VLConfig
    elif family == "qwen2_5_vl":
        text.pop("head_dim")
        vision.update(
            hidden_size=vision_hidden_size,
            intermediate_size=vision_hidden_size * 2,
            out_hidden_size=hidden_size,
            window_size=patch_size * 2 * 2,  # 2 x 2 merged tokens per window
            fullatt_block_indexes=list(range(vision_depth - 1, -1, -2))[::-1],
            tokens_per_second=4,  # transformers' config default: frame groups 2 positions apart at 4 fps
        )
        config_class = Qwen2_5_VLConfig
    elif family == "qwen3_5":
        key_heads = max(1, num_heads // 2)
        text["rope_parameters"]["partial_rotary_factor"] = 0.25
        text.update(
            linear_num_key_heads=key_heads,
            linear_num_value_heads=num_heads,
            linear_key_head_dim=hidden_size // num_heads,
            linear_value_head_dim=hidden_size // num_heads,
            linear_conv_kernel_dim=4,
        )
        if layer_types is not None:
            text.update(layer_types=list(layer_types), num_hidden_layers=len(layer_types))
        if moe:  # no dense MLP at all: routed experts and a shared one
            text.pop("intermediate_size")
            text.update(shared_expert_intermediate_size=intermediate_size // 2)
        vision.update(
            hidden_size=vision_hidden_size,
            intermediate_size=vision_hidden_size * 2,
            out_hidden_size=hidden_size,
            num_position_embeddings=num_position_embeddings,
        )
        config_class = Qwen3_5MoeConfig if moe else Qwen3_5Config
    else:
        vision.update(
            hidden_size=vision_hidden_size,
            intermediate_size=vision_hidden_size * 2,
            out_hidden_size=hidden_size,
            num_position_embeddings=num_position_embeddings,
            deepstack_visual_indexes=list(deepstack_visual_indexes),
        )
        config_class = Qwen3VLMoeConfig if moe else Qwen3VLConfig
    return config_class(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)


#: family (a checkpoint's model_type) -> (stock model class name, stock processor class name)
FAMILIES = {
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", "Qwen3VLProcessor"),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
    "qwen3_5": ("Qwen3_5ForConditionalGeneration", "Qwen3VLProcessor"),
}
#: family -> its MoE variant's stock model class name
MOE_CLASSES = {"qwen3_vl": "Qwen3VLMoeForConditionalGeneration", "qwen3_5": "Qwen3_5MoeForConditionalGeneration"}


_TOKEN_FIELDS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}


def tiny_processor(
    tokenizer,
    patch_size: int,
    *,
    min_pixels: int = 32 * 32,
    max_pixels: int = 128 * 128,
    processor_class: str = "Qwen3VLProcessor",
):
    """The processor this fork builds without torchvision (see processing.py), for a tiny checkpoint."""
    from .processing import build_processor

    return build_processor(
        tokenizer,
        processor_class=processor_class,
        patch_size=patch_size,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        chat_template=QWEN3_VL_CHAT_TEMPLATE,
    )


def build_tiny_qwen3_vl(
    path, *, seed: int = 0, overwrite: bool = False, moe: bool = False, family: str = "qwen3_vl", **shape
) -> Path:
    """Write a random Qwen-VL checkpoint + processor to `path` (kept if it already holds the same shape):
    Qwen3-VL (or Qwen3-VL-MoE), or `family="qwen2_5_vl"` / `"qwen2_vl"` / `"qwen3_5"` (or Qwen3.5-MoE). Defaults:
    4 px patches merged 2x2, so a 64 x 64 image is 64 visual tokens."""
    import transformers

    path = Path(path)
    stamp = path / "vtr_tiny.json"
    if family == "qwen3_vl":
        wanted = {"seed": seed, "moe": moe, **shape}
    else:
        wanted = {"seed": seed, "family": family, **({"moe": True} if moe else {}), **shape}
    if not overwrite and stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return path
    tokenizer = build_tokenizer()
    processor_shape = {k: shape.pop(k) for k in ("min_pixels", "max_pixels") if k in shape}
    # knobs of parts the family lacks: DeepStack (Qwen3-VL only), a learned vision position table (Qwen3-VL, Qwen3.5)
    foreign = {"qwen3_vl": (), "qwen3_5": ("deepstack_visual_indexes",)}.get(
        family, ("deepstack_visual_indexes", "num_position_embeddings")
    )
    config = tiny_qwen3_vl_config(
        tokenizer, moe=moe, family=family, **{k: v for k, v in shape.items() if k not in foreign}
    )
    torch.manual_seed(seed)
    model_class = getattr(transformers, MOE_CLASSES[family] if moe else FAMILIES[family][0])
    model = model_class(config).eval()
    with torch.no_grad():  # random init gives near-uniform attention; a larger scale makes scores discriminative
        model.model.language_model.embed_tokens.weight.normal_(0, 1.0)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor_class = FAMILIES[family][1]
    processor = tiny_processor(
        tokenizer, config.vision_config.patch_size, processor_class=processor_class, **processor_shape
    )
    save_processor(processor, path, processor_class)
    stamp.write_text(json.dumps(wanted))
    return path


def save_processor(processor, path, processor_class: str = "Qwen3VLProcessor") -> None:
    """Save as a hub checkpoint lays it out: the stock processor classes are named in the configs, so
    `AutoProcessor` loads them where torchvision exists, and `load_processor` falls back here."""
    from .processing import stock_layout

    processor.save_pretrained(path)
    stock_layout(path, processor_class)


def demo_image(size: int = 448, height: int | None = None):
    """A small synthetic scene (sky, sun, house, tree, grass), drawn here so nothing is downloaded."""
    from PIL import Image, ImageDraw

    height = height or size
    img = Image.new("RGB", (size, height), (135, 190, 235))
    d = ImageDraw.Draw(img)
    s, t = size / 336, height / 336
    d.rectangle([0, 240 * t, size, height], fill=(70, 150, 60))
    d.ellipse([250 * s, 25 * t, 310 * s, 85 * t], fill=(250, 210, 60))
    d.rectangle([70 * s, 150 * t, 190 * s, 250 * t], fill=(190, 60, 50))
    d.polygon([(55 * s, 150 * t), (130 * s, 90 * t), (205 * s, 150 * t)], fill=(60, 60, 150))
    d.rectangle([115 * s, 200 * t, 145 * s, 250 * t], fill=(90, 50, 20))
    d.rectangle([230 * s, 170 * t, 245 * s, 250 * t], fill=(100, 60, 30))
    d.ellipse([205 * s, 120 * t, 270 * s, 185 * t], fill=(30, 110, 40))
    return img


def demo_video(num_frames: int = 8, size: int = 64):
    """[t, h, w, 3] uint8 frames of the demo scene with the sun moving right (no file needed)."""
    import numpy as np
    from PIL import ImageDraw

    frames = []
    for i in range(num_frames):
        img = demo_image(size)
        d = ImageDraw.Draw(img)
        x = (i + 1) * size // (num_frames + 2)
        d.ellipse([x, 2, x + size // 8, 2 + size // 8], fill=(250, 250, 250))
        frames.append(np.asarray(img))
    return np.stack(frames)


#: The vision side of the built-in demo / bench models: Qwen3-VL's 16 px patches merged 2 x 2 (one visual
#: token per 32 x 32 pixels), a small ViT with three DeepStack layers, and the real processor pixel budget.
VISION_SHAPE = dict(
    patch_size=16,
    vision_hidden_size=64,
    vision_depth=4,
    deepstack_visual_indexes=(1, 2, 3),
    num_position_embeddings=2304,
    min_pixels=256 * 256,
    max_pixels=4096 * 4096,
)


def bench_case(shape: dict, cache_dir, model: str | None = None, image=(896, 672), family: str = "qwen3_vl") -> dict:
    """What scripts/bench.py needs for this fork: a checkpoint (random, of `family`: Qwen3-VL-shaped with
    DeepStack, Qwen2.5-VL with window attention, Qwen2-VL, or Qwen3.5 with its hybrid decoder's stock layout,
    full attention in every 4th layer; or `model`), a batch builder and the vision-only step. The default 896 x 672 image is 56 x 42 patches of 16 px, merged 2 x 2: 588 visual
    tokens (the processors keep the aspect ratio)."""
    if model is None:
        full = dict(VISION_SHAPE, **shape)
        tag = family.replace("_", "")
        name = f"bench-{tag}-" + "{hidden_size}x{num_layers}-kv{num_kv_heads}".format(**full)
        model = str(build_tiny_qwen3_vl(Path(cache_dir) / name, family=family, **full))

    def inputs(processor, batch: int):
        content = [{"type": "image"}, {"type": "text", "text": "What is shown in the image?"}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        picture = demo_image(*image)
        return processor(images=[picture] * batch, text=[prompt] * batch, return_tensors="pt", padding=True)

    def vision(vtr_model, batch_inputs):
        vtr_model.model.get_image_features(batch_inputs["pixel_values"], batch_inputs["image_grid_thw"])

    what = {
        "qwen3_vl": "Qwen3-VL, one {}x{} image (16 px patches merged 2x2, DeepStack)",
        "qwen2_5_vl": "Qwen2.5-VL, one {}x{} image (16 px patches merged 2x2, window attention)",
        "qwen2_vl": "Qwen2-VL, one {}x{} image (16 px patches merged 2x2)",
        "qwen3_5": "Qwen3.5, one {}x{} image (16 px patches merged 2x2; hybrid decoder: 3 of 4 layers Gated DeltaNet)",
    }[family].format(*image)
    return dict(path=model, inputs=inputs, vision=vision, description=what)
