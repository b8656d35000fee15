"""Build small random InternVL checkpoints on disk, fully offline (tests, the demo, the bench).

The folder has the layout of a hub `OpenGVLab/InternVL3-*-hf` checkpoint: config + safetensors, a Qwen2-style
tokenizer with InternVL's special tokens (`<img>`, `</img>`, `<IMG_CONTEXT>`, `<video>`), and the processor
files the stock `InternVLProcessor` reads (`processor_config.json`, `preprocessor_config.json` naming the
`GotOcr2ImageProcessor`, `video_preprocessor_config.json` naming the `InternVLVideoProcessor`, the chat
template). It loads through the real `from_pretrained` path, exactly like a downloaded checkpoint.

Default tiny shape: 32 px tiles of 4 px patches (8 x 8 patches, pixel-shuffled to 4 x 4 = 16 visual tokens
per tile), up to 4 tiles + a thumbnail per image, a 4-layer Qwen2 decoder with GQA.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

#: The chat template of the InternVL3 `-hf` checkpoints (chatml; an image is `<IMG_CONTEXT>` + newline, which
#: the processor expands to `<img><IMG_CONTEXT>*256*tiles</img>`, a video `<video>` + newline).
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif item['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

#: The InternVL processors' image statistics (ImageNet mean/std, as in the hub preprocessor configs).
IMAGE_MEAN = [0.485, 0.456, 0.406]
IMAGE_STD = [0.229, 0.224, 0.225]

SPECIAL_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}

_CORPUS = [
    "<|im_start|>user\nWhat is shown in the image?<|im_end|>\n<|im_start|>assistant\nA red house with a blue roof.",
    "Describe the picture in detail. Is there a cat, a dog, a car or a tree?",
    "How many objects are there? Answer the question using a single word or phrase.",
    "Frame1: Frame2: Frame3: Frame4: What happens in the video? Answer with the option's letter.",
    "yes no one two three four five left right top bottom color shape large small A B C D",
    "The quick brown fox jumps over the lazy dog. A chart, a table, some text and a person.",
]


def build_tokenizer(vocab_size: int = 360):
    """A byte-level BPE tokenizer trained on a tiny built-in corpus, with Qwen2's chat tokens and InternVL's
    image tokens as special tokens (`tokenizer.start_image_token`, `.context_image_token`, ... as the hub
    tokenizer config declares them)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *SPECIAL_TOKENS.values()]
    tok = Tokenizer(models.BPE())
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
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=dict(SPECIAL_TOKENS),
        padding_side="left",
    )


def tiny_internvl_config(
    tokenizer,
    *,
    text_model: str = "qwen2",
    image_size: int = 32,
    patch_size: int = 4,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vision_hidden_size: int = 32,
    vision_layers: int = 2,
):
    """An InternVLConfig: InternViT-style vision tower (CLS token, layer scale), pixel shuffle 0.5, MLP
    projector, and a Qwen2 (InternVL3) or Llama (InternVL2.5 `-hf` conversions of InternLM2) decoder."""
    from transformers import InternVLConfig, InternVLVisionConfig, LlamaConfig, Qwen2Config

    vision = InternVLVisionConfig(
        hidden_size=vision_hidden_size,
        intermediate_size=vision_hidden_size * 2,
        num_hidden_layers=vision_layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        use_mean_pooling=True,
    )
    text_class = {"qwen2": Qwen2Config, "llama": LlamaConfig}[text_model]
    text = text_class(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=32768,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    side = image_size // patch_size // 2  # after the 0.5 pixel shuffle
    return InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS["context_image_token"]),
        image_seq_length=side * side,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )


def _random_model(config, seed: int):
    from transformers import InternVLForConditionalGeneration

    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    with torch.no_grad():
        # Random init gives near-uniform attention; a larger embedding scale makes scores discriminative.
        model.model.language_model.embed_tokens.weight.normal_(0, 1.0)
        # InternViT initialises its CLS token and position table to zero; random ones give the CLS query
        # (vision_importance) a non-trivial attention pattern.
        embeddings = model.model.vision_tower.embeddings
        embeddings.cls_token.normal_(0, 1.0)
        embeddings.position_embeddings.normal_(0, 1.0)
    return model


def write_processor_files(path: Path, tokenizer, config, *, min_patches: int = 1, max_patches: int = 4) -> None:
    """Tokenizer + the processor files of a hub InternVL `-hf` checkpoint, for this config's tile size."""
    tokenizer.save_pretrained(path)
    size = config.vision_config.image_size
    size = {"height": size[0], "width": size[1]}
    common = dict(
        do_convert_rgb=True,
        do_normalize=True,
        do_rescale=True,
        do_resize=True,
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
        rescale_factor=1 / 255,
        resample=3,  # bicubic
        size=size,
    )
    image = dict(
        common,
        crop_to_patches=False,
        min_patches=min_patches,
        max_patches=max_patches,
        processor_class="InternVLProcessor",
    )
    image["image_processor_type"] = "GotOcr2ImageProcessor"
    video = dict(common, initial_shift=True, do_sample_frames=False, processor_class="InternVLProcessor")
    video["video_processor_type"] = "InternVLVideoProcessor"
    processor = {"processor_class": "InternVLProcessor", "image_seq_length": config.image_seq_length}
    (path / "preprocessor_config.json").write_text(json.dumps(image, indent=2))
    (path / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
    (path / "processor_config.json").write_text(json.dumps(processor, indent=2))
    (path / "chat_template.jinja").write_text(INTERNVL_CHAT_TEMPLATE)


def build_tiny_internvl(path, *, seed: int = 0, overwrite: bool = False, max_patches: int = 4, **shape) -> Path:
    """Write a random InternVL checkpoint + processor files to `path` (kept if it already holds the same shape).
    `shape`: keyword arguments of `tiny_internvl_config` (text_model="llama" for an InternVL2.5-style one)."""
    path = Path(path)
    stamp = path / "vtr_tiny.json"
    wanted = {"seed": seed, "max_patches": max_patches, **shape}
    if not overwrite and stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return path
    tokenizer = build_tokenizer()
    config = tiny_internvl_config(tokenizer, **shape)
    model = _random_model(config, seed)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    write_processor_files(path, tokenizer, config, max_patches=max_patches)
    stamp.write_text(json.dumps(wanted))
    return path


def demo_image(width: int = 448, height: int | None = None):
    """A small synthetic scene (sky, sun, house, tree, grass), drawn here so nothing is downloaded."""
    from PIL import Image, ImageDraw

    height = height or width
    img = Image.new("RGB", (width, height), (135, 190, 235))
    d = ImageDraw.Draw(img)
    sx, sy = width / 336, height / 336
    d.rectangle([0, 240 * sy, width, height], fill=(70, 150, 60))
    d.ellipse([250 * sx, 25 * sy, 310 * sx, 85 * sy], fill=(250, 210, 60))
    d.rectangle([70 * sx, 150 * sy, 190 * sx, 250 * sy], fill=(190, 60, 50))
    d.polygon([(55 * sx, 150 * sy), (130 * sx, 90 * sy), (205 * sx, 150 * sy)], fill=(60, 60, 150))
    d.rectangle([115 * sx, 200 * sy, 145 * sx, 250 * sy], fill=(90, 50, 20))
    d.rectangle([230 * sx, 170 * sy, 245 * sx, 250 * sy], fill=(100, 60, 30))
    d.ellipse([205 * sx, 120 * sy, 270 * sx, 185 * sy], fill=(30, 110, 40))
    return img


#: A realistic InternVL tile: 448 px / 14 px patches, pixel-shuffled to 256 tokens (the real InternViT is
#: wider; a narrow tower keeps the random model small, the token counts are the real ones).
TILE_SHAPE = dict(image_size=448, patch_size=14, vision_hidden_size=64)


def bench_case(shape: dict, cache_dir, model: str | None = None, max_patches: int = 6, image=(896, 672)) -> dict:
    """What scripts/bench.py needs for this fork: a checkpoint (random InternVL3-shaped, 448 px tiles of 256
    tokens, or `model`), a batch builder and the vision-only step. The default 896 x 672 image with
    `max_patches=6` is tiled 3 x 2 + a thumbnail: 7 tiles, 1,792 visual tokens."""
    if model is None:
        full = dict(TILE_SHAPE, **shape)
        name = "bench-internvl-{hidden_size}x{num_layers}-kv{num_kv_heads}-p{max_patches}".format(
            max_patches=max_patches, **full
        )
        model = str(build_tiny_internvl(Path(cache_dir) / name, max_patches=max_patches, **full))

    def inputs(processor, batch: int):
        content = [{"type": "image"}, {"type": "text", "text": "What is shown in the image?"}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        picture = demo_image(*image)
        return processor(images=[picture] * batch, text=[prompt] * batch, return_tensors="pt", padding=True)

    def vision(vtr_model, batch_inputs):
        config = vtr_model.config
        vtr_model.model.get_image_features(
            pixel_values=batch_inputs["pixel_values"],
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        )

    what = f"InternVL, one {image[0]}x{image[1]} image, max_patches={max_patches} (448 px tiles + thumbnail)"
    return dict(path=model, inputs=inputs, vision=vision, description=what)
