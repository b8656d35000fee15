"""Build small random LLaVA checkpoints on disk, fully offline (tests, `make demo`, `make bench`).

The result is an ordinary llava-hf style folder (config, safetensors, tokenizer, processor) that loads
through the real `from_pretrained` path, exactly like a downloaded checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }} "
    "{% elif message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for item in message['content'] %}{{ item['text'] }}{% endfor %}</s>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

_CORPUS = [
    "USER: What is shown in the image? ASSISTANT: A red house with a blue roof under the sun.",
    "Describe the picture in detail. Is there a cat, a dog, a car or a tree?",
    "How many objects are there? Answer the question using a single word or phrase.",
    "yes no one two three four five left right top bottom color shape large small",
    "The quick brown fox jumps over the lazy dog. A chart, a table, some text and a person.",
]


def build_tokenizer(vocab_size: int = 320, image_token: bool = True, chatml: bool = False):
    """A byte-level BPE tokenizer trained on a tiny built-in corpus, with LLaVA's special tokens
    (`image_token=False`: without `<image>`, like the original LLaVA release's tokenizer; `chatml`: also
    `<video>`, `<|im_start|>` and `<|im_end|>`, as LLaVA-OneVision's Qwen2 tokenizer has them)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"] + (["<image>"] if image_token else [])
    specials += ["<video>", "<|im_start|>", "<|im_end|>"] if chatml else []
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens=({"image_token": "<image>"} if image_token else {})
        | ({"video_token": "<video>"} if chatml else {}),
        padding_side="left",
    )


def _tower_fields(width: int, layers: int, image_size: int, patch_size: int) -> dict:
    """A small vision tower's config fields (CLIP and SigLIP name them alike)."""
    return dict(
        hidden_size=width,
        intermediate_size=width * 2,
        num_hidden_layers=layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )


def _decoder_fields(tokenizer, hidden_size, intermediate_size, layers, heads, kv_heads) -> dict:
    """A small decoder's config fields (Llama and Qwen2 name them alike), its special tokens the tokenizer's."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_llava_config(
    tokenizer,
    *,
    image_size: int = 64,
    patch_size: int = 8,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vision_hidden_size: int = 32,
    vision_layers: int = 2,
    vision_feature_layer: int | list = -2,
):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        **_tower_fields(vision_hidden_size, vision_layers, image_size, patch_size), projection_dim=vision_hidden_size
    )
    text = LlamaConfig(
        **_decoder_fields(tokenizer, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads)
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default",
        pad_token_id=tokenizer.pad_token_id,
    )


def _random_model(model_class, config, seed: int):
    torch.manual_seed(seed)
    model = model_class(config).eval()
    # Random init gives near-uniform attention; a larger embedding scale makes scores discriminative.
    with torch.no_grad():
        model.model.language_model.embed_tokens.weight.normal_(0, 1.0)
    return model


def _processor(processor_class, image_processor, tokenizer, config):
    return processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


def _save(path: Path, model, processor, stamp: Path, wanted: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    stamp.write_text(json.dumps(wanted))
    return path


def build_tiny_llava(path, *, seed: int = 0, overwrite: bool = False, **shape) -> Path:
    """Write a random LLaVA checkpoint + processor to `path` (kept if it already holds the same shape)."""
    from transformers import CLIPImageProcessor, LlavaForConditionalGeneration, LlavaProcessor

    path = Path(path)
    stamp = path / "vtr_tiny.json"
    wanted = {"seed": seed, **shape}
    if not overwrite and stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return path
    tokenizer = build_tokenizer()
    config = tiny_llava_config(tokenizer, **shape)
    model = _random_model(LlavaForConditionalGeneration, config, seed)
    image_size = config.vision_config.image_size
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    return _save(path, model, _processor(LlavaProcessor, image_processor, tokenizer, config), stamp, wanted)


def build_tiny_llava_next(
    path,
    *,
    seed: int = 0,
    overwrite: bool = False,
    grid_pinpoints: tuple = ((32, 64), (64, 32), (64, 64)),
    **shape,
) -> Path:
    """Write a random LLaVA-1.6 (LLaVA-NeXT, anyres) checkpoint + processor to `path`.

    Defaults: 32 px tiles of 8 px patches (a 4 x 4 grid, 16 tokens per tile), tile layouts 1x2, 2x1 and
    2x2, so one image gives the base view plus up to 4 tiles, unpadded to its aspect ratio, plus one
    `image_newline` token per feature row: a small copy of the 336 px / 2,880-token real thing."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    path = Path(path)
    stamp = path / "vtr_tiny.json"
    shape = {"image_size": 32, "patch_size": 8, **shape}
    wanted = {"seed": seed, "kind": "llava_next", "grid_pinpoints": [list(p) for p in grid_pinpoints], **shape}
    if not overwrite and stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return path
    tokenizer = build_tokenizer()
    base = tiny_llava_config(tokenizer, **shape)
    config = LlavaNextConfig(
        vision_config=base.vision_config,
        text_config=base.text_config,
        image_token_index=base.image_token_id,
        image_grid_pinpoints=[list(p) for p in grid_pinpoints],
        vision_feature_layer=base.vision_feature_layer,
        vision_feature_select_strategy="default",
        pad_token_id=tokenizer.pad_token_id,
    )
    model = _random_model(LlavaNextForConditionalGeneration, config, seed)
    size = config.vision_config.image_size
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_grid_pinpoints=[list(p) for p in grid_pinpoints],
    )
    return _save(path, model, _processor(LlavaNextProcessor, image_processor, tokenizer, config), stamp, wanted)


def tiny_onevision_config(
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
    grid_pinpoints: tuple = ((32, 64), (64, 32), (64, 64)),
    vision_aspect_ratio: str = "anyres_max_2",
    newline_position: str | None = None,
    pool_mode: str | None = None,
):
    """`newline_position` / `pool_mode`: a LLaVA-NeXT video layout other than the stock class's (LLaVA-Video's
    "grid", lmms-eval's "average"), kept on the config as `mm_newline_position` / `mm_spatial_pool_mode`."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    vision = SiglipVisionConfig(
        **_tower_fields(vision_hidden_size, vision_layers, image_size, patch_size), vision_use_head=False
    )
    # eos `</s>`, not `<|im_end|>` as in the real model: the random model would end most answers at once (the prompt
    # is full of `<|im_end|>`), and the contract compares min_new_tokens generations with an oracle
    text = Qwen2Config(
        **_decoder_fields(tokenizer, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads)
    )
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=[list(p) for p in grid_pinpoints],
        vision_aspect_ratio=vision_aspect_ratio,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        pad_token_id=tokenizer.pad_token_id,
        **({"mm_newline_position": newline_position} if newline_position else {}),
        **({"mm_spatial_pool_mode": pool_mode} if pool_mode else {}),
    )


def build_tiny_llava_onevision(path, *, seed: int = 0, overwrite: bool = False, **shape) -> Path:
    """Write a random LLaVA-OneVision checkpoint + processor to `path` (kept if it already holds the same shape).

    Defaults: a 2-layer SigLIP of 32 px views and 8 px patches (4 x 4 = 16 tokens a view, 2 x 2 a pooled video
    frame), tile layouts 1x2, 2x1 and 2x2 and `anyres_max_2` (a 2 x 2 tiling is shrunk from 8 x 8 to 5 x 5
    features, as anyres_max_9 shrinks large images), a 4-layer Qwen2 decoder with GQA: a small copy of
    llava-onevision-qwen2-7b (384 px / 14 px: 729 tokens a view, 196 a frame)."""
    from transformers import LlavaOnevisionForConditionalGeneration

    from .modeling import video_layout
    from .processing import ONEVISION_CHAT_TEMPLATE, onevision_processor, save_processor, with_video_layout

    path = Path(path)
    stamp = path / "vtr_tiny.json"
    wanted = {"seed": seed, "kind": "llava_onevision", **shape}
    if "grid_pinpoints" in wanted:
        wanted["grid_pinpoints"] = [list(p) for p in wanted["grid_pinpoints"]]
    if not overwrite and stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return path
    tokenizer = build_tokenizer(chatml=True)
    config = tiny_onevision_config(tokenizer, **shape)
    model = _random_model(LlavaOnevisionForConditionalGeneration, config, seed)
    vision = config.vision_config
    processor = onevision_processor(
        tokenizer,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        grid_pinpoints=config.image_grid_pinpoints,
        vision_aspect_ratio=config.vision_aspect_ratio,
        chat_template=ONEVISION_CHAT_TEMPLATE,
    )
    with_video_layout(processor, *video_layout(config))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    save_processor(processor, path)
    stamp.write_text(json.dumps(wanted))
    return path


def demo_video(frames: int = 8, size: int = 64):
    """uint8 [frames, size, size, 3]: the demo scene with the sun moving right, drawn here (nothing downloaded)."""
    import numpy as np

    scene = np.asarray(demo_image(size)).copy()
    out = []
    for t in range(frames):
        frame = scene.copy()
        x = int((t + 1) * size / (frames + 2))
        frame[size // 8 : size // 4, x : x + size // 8] = (250, 210, 60)
        out.append(frame)
    return np.stack(out)


def build_tiny_original_llava(path, *, seed: int = 0, **shape):
    """Write a tiny checkpoint in the *original* LLaVA release format (`LlavaLlamaForCausalLM`, projector
    under `model.mm_projector`, a separate CLIP tower folder named by `mm_vision_tower`, a tokenizer with no
    `<image>` token). Returns (folder, reference): `reference` is a stock `LlavaForConditionalGeneration`
    holding the same weights, with `<image>` appended to the vocabulary as the conversion does."""
    from transformers import CLIPImageProcessor, LlavaForConditionalGeneration

    path = Path(path)
    tokenizer = build_tokenizer(image_token=False)
    base_vocab = len(tokenizer)
    reference_tokenizer = build_tokenizer(image_token=False)
    reference_tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    config = tiny_llava_config(reference_tokenizer, **shape)
    torch.manual_seed(seed)
    reference = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        reference.model.language_model.embed_tokens.weight.normal_(0, 1.0)

    tower = path / "clip-tower"
    reference.model.vision_tower.save_pretrained(tower)
    size = config.vision_config.image_size
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(tower)

    original = {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        **_original_text_fields(config.text_config, base_vocab),
        "mm_vision_tower": str(tower),
        "mm_hidden_size": config.vision_config.hidden_size,
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_projector_type": "mlp2x_gelu",
        "image_aspect_ratio": "pad",
    }
    path.mkdir(parents=True, exist_ok=True)
    _write_original(path, original, _original_weights(reference, base_vocab), tokenizer)
    return path, reference


def build_tiny_original_llava_video(path, *, seed: int = 0, newline_position: str = "grid", **shape):
    """Write a tiny checkpoint in the *original* LLaVA-NeXT release format of LLaVA-Video / LLaVA-OneVision
    (`LlavaQwenForCausalLM`: Qwen2 weights under `model.*` / `lm_head`, `model.mm_projector.{0,2}`,
    `model.image_newline` and the SigLIP tower under `model.vision_tower.vision_tower.vision_model`, holding one
    layer fewer than the tower folder named by `mm_vision_tower` describes, as the original code deletes the
    last one; a tokenizer with `<image>` but no `<video>`). `newline_position`: `mm_newline_position` ("grid":
    LLaVA-Video, "one_token": OneVision). Shapes as `tiny_onevision_config`. Returns (folder, reference):
    `reference` is a stock `LlavaOnevisionForConditionalGeneration` holding the same weights, with `<video>`
    appended to the vocabulary as the conversion does."""
    from transformers import LlavaOnevisionForConditionalGeneration

    def tokenizer_without_video():
        tok = build_tokenizer()
        tok.add_special_tokens({"extra_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        return tok

    path = Path(path)
    tokenizer = tokenizer_without_video()
    base_vocab = len(tokenizer)
    reference_tokenizer = tokenizer_without_video()
    reference_tokenizer.add_special_tokens({"extra_special_tokens": ["<video>"]}, replace_extra_special_tokens=False)
    config = tiny_onevision_config(reference_tokenizer, **shape)
    reference = _random_model(LlavaOnevisionForConditionalGeneration, config, seed)

    vision = config.vision_config
    tower = path / "siglip-tower"
    tower.mkdir(parents=True, exist_ok=True)
    # as google/siglip-so400m-patch14-384: a full SigLIP config (text and vision), one layer more than the checkpoint
    fields = ("hidden_size", "intermediate_size", "num_attention_heads", "image_size", "patch_size")
    tower_vision = {k: getattr(vision, k) for k in fields} | {"num_hidden_layers": vision.num_hidden_layers + 1}
    tower_config = {
        "architectures": ["SiglipModel"],
        "model_type": "siglip",
        "text_config": {"hidden_size": vision.hidden_size, "model_type": "siglip_text_model"},
        "vision_config": tower_vision | {"model_type": "siglip_vision_model"},
    }
    (tower / "config.json").write_text(json.dumps(tower_config, indent=2))
    siglip_processor = {
        "image_processor_type": "SiglipImageProcessor",
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"height": vision.image_size, "width": vision.image_size},
    }
    (tower / "preprocessor_config.json").write_text(json.dumps(siglip_processor, indent=2))

    text = config.text_config
    original = {
        "architectures": ["LlavaQwenForCausalLM"],
        "model_type": "llava",
        **_original_text_fields(text, base_vocab),
        "rope_scaling": None,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "sliding_window": text.max_position_embeddings,
        "max_window_layers": text.num_hidden_layers,
        "bos_token_id": text.bos_token_id,
        "eos_token_id": text.eos_token_id,
        "image_token_index": config.image_token_id,
        "mm_vision_tower": str(tower),
        "mm_hidden_size": vision.hidden_size,
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_projector_type": "mlp2x_gelu",
        "mm_resampler_type": None,
        "mm_patch_merge_type": "spatial_unpad",
        "mm_newline_position": newline_position,
        "mm_spatial_pool_mode": "bilinear",
        "mm_spatial_pool_stride": 2,
        "add_faster_video": False,
        "image_aspect_ratio": config.vision_aspect_ratio,
        "image_grid_pinpoints": config.image_grid_pinpoints,
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "tokenizer_model_max_length": text.max_position_embeddings,
        "torch_dtype": "float32",
    }
    weights = _original_weights(reference, base_vocab)
    weights["model.image_newline"] = reference.model.image_newline
    for key, value in reference.model.vision_tower.state_dict().items():
        weights[f"model.vision_tower.vision_tower.vision_model.{key}"] = value
    # older checkpoints also hold the rotary tables, which the conversion skips
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(
        text.hidden_size // text.num_attention_heads // 2
    )
    _write_original(path, original, weights, tokenizer)
    return path, reference


def _original_text_fields(text, base_vocab: int) -> dict:
    """The decoder fields of an original LLaVA release's config.json for the stock text config `text` (what
    `convert._text_fields` reads back)."""
    return {
        "vocab_size": base_vocab,
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
        "max_position_embeddings": text.max_position_embeddings,
        "rms_norm_eps": text.rms_norm_eps,
        "rope_theta": text.rope_parameters["rope_theta"],
        "hidden_act": "silu",
    }


def _original_weights(reference, base_vocab: int) -> dict:
    """The decoder and projector of a stock LLaVA-family `reference` under an original release's names
    (`model.*`, `lm_head`, `model.mm_projector.{0,2}`), the vocabulary cut back to the release's `base_vocab`."""
    weights = {}
    for key, value in reference.model.language_model.state_dict().items():
        weights[f"model.{key}"] = value[:base_vocab] if key == "embed_tokens.weight" else value
    weights["lm_head.weight"] = reference.lm_head.weight[:base_vocab]
    for index, linear in (("0", "linear_1"), ("2", "linear_2")):
        for kind, value in getattr(reference.model.multi_modal_projector, linear).state_dict().items():
            weights[f"model.mm_projector.{index}.{kind}"] = value
    return weights


def _write_original(path: Path, original: dict, weights: dict, tokenizer) -> None:
    """An original release's folder: its weights, config.json and tokenizer."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().clone() for k, v in weights.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(original, indent=2))
    tokenizer.save_pretrained(path)


def demo_image(size: int = 336):
    """A small synthetic scene (sky, sun, house, tree, grass), drawn here so nothing is downloaded."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (135, 190, 235))
    d = ImageDraw.Draw(img)
    s = size / 336
    d.rectangle([0, 240 * s, size, size], fill=(70, 150, 60))
    d.ellipse([250 * s, 25 * s, 310 * s, 85 * s], fill=(250, 210, 60))
    d.rectangle([70 * s, 150 * s, 190 * s, 250 * s], fill=(190, 60, 50))
    d.polygon([(55 * s, 150 * s), (130 * s, 90 * s), (205 * s, 150 * s)], fill=(60, 60, 150))
    d.rectangle([115 * s, 200 * s, 145 * s, 250 * s], fill=(90, 50, 20))
    d.rectangle([230 * s, 170 * s, 245 * s, 250 * s], fill=(100, 60, 30))
    d.ellipse([205 * s, 120 * s, 270 * s, 185 * s], fill=(30, 110, 40))
    return img


def bench_case(
    shape: dict, cache_dir, model: str | None = None, anyres: bool = False, onevision: bool = False, frames: int = 16
) -> dict:
    """What scripts/bench.py needs for this fork: a checkpoint (random, 336 px / 14 = 576 image tokens, or
    `model`), a batch builder and the vision-only step. `anyres`: LLaVA-1.6, a 672 px image = 2,928 tokens.
    `onevision`: LLaVA-OneVision (384 px / 14 SigLIP views), a video of `frames` frames = frames x 14 x 14 + 1
    tokens (16: 3,137)."""
    from .demo import build_prompt

    full = dict(image_size=384 if onevision else 336, patch_size=14, vision_hidden_size=64, **shape)
    if model is None:
        name = "bench-llava-{hidden_size}x{num_layers}-kv{num_kv_heads}".format(**full)
        if onevision:
            pinpoints = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]  # the real model's
            model = str(
                build_tiny_llava_onevision(
                    Path(cache_dir) / (name + "-onevision"),
                    grid_pinpoints=pinpoints,
                    vision_aspect_ratio="anyres_max_9",
                    **full,
                )
            )
        elif anyres:
            pinpoints = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))  # LLaVA-1.6's
            model = str(build_tiny_llava_next(Path(cache_dir) / (name + "-anyres"), grid_pinpoints=pinpoints, **full))
        else:
            model = str(build_tiny_llava(Path(cache_dir) / name, **full))

    def inputs(processor, batch: int):
        if onevision:
            content = [{"type": "video"}, {"type": "text", "text": "What happens in the video?"}]
            prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
            return processor(text=[prompt] * batch, videos=[demo_video(frames, 384)] * batch, return_tensors="pt")
        prompt = build_prompt(processor, "What is shown in the image?")
        image = demo_image(672 if anyres else 336)
        return processor(images=[image] * batch, text=[prompt] * batch, return_tensors="pt")

    def vision(vtr_model, batch_inputs):
        config = vtr_model.config
        select = dict(
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        )
        if onevision:
            vtr_model.model.get_video_features(pixel_values_videos=batch_inputs["pixel_values_videos"], **select)
            return
        extra = {"image_sizes": batch_inputs["image_sizes"]} if "image_sizes" in batch_inputs else {}
        vtr_model.model.get_image_features(pixel_values=batch_inputs["pixel_values"], **select, **extra)

    what = (
        f"LLaVA-OneVision, one {frames}-frame video"
        if onevision
        else "LLaVA-1.6, one 672 px image (anyres)"
        if anyres
        else "LLaVA-1.5, one 336 px image"
    )
    return dict(path=model, inputs=inputs, vision=vision, description=what)
