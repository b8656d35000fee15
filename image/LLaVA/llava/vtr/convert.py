"""Load original LLaVA-format checkpoints as the HF LLaVA / LLaVA-OneVision models, converting on load.

LLaVA-1.5 (e.g. `liuhaotian/llava-v1.5-7b`, `convert_original_llava`): a `LlavaLlamaForCausalLM` with Llama
weights under `model.*` / `lm_head`, the projector under `model.mm_projector.{0,2}` (`mlp2x_gelu`), and only
the *name* of the CLIP vision tower (`mm_vision_tower`), whose weights come from that CLIP checkpoint. Its
tokenizer has no `<image>` token (the original code splices image features in at a sentinel id). Conversion:

- config: a `LlavaConfig` from the Llama fields, the CLIP tower's vision config, the select layer /
  feature, and `<image>` appended to the tokenizer (embedding and LM-head rows padded with the mean row;
  the image token's own embedding is never used, it is replaced by image features);
- weights: `model.layers.* -> model.language_model.layers.*` (likewise embed_tokens, norm),
  `model.mm_projector.0/2 -> model.multi_modal_projector.linear_1/2`, the tower from its CLIP checkpoint;
- processor: the tower's CLIP image processor + the extended tokenizer.

Preprocessing note: the original code pads images to a square ("pad" aspect ratio); the HF processor
resizes and centre-crops, as llava-hf checkpoints do.

LLaVA-OneVision and LLaVA-Video (e.g. `lmms-lab/llava-onevision-qwen2-7b-ov`, `lmms-lab/LLaVA-Video-7B-Qwen2`,
`convert_original_onevision`): LLaVA-NeXT's `LlavaQwenForCausalLM`, loaded into the stock
`LlavaOnevisionForConditionalGeneration`. The checkpoint holds every weight: Qwen2 under `model.*` / `lm_head`,
`model.mm_projector.{0,2}`, `model.image_newline` and the SigLIP tower under
`model.vision_tower.vision_tower.vision_model.*`, one layer short of the tower it names (so400m's 27th layer is
deleted by the original code, which reads the last remaining layer's output). Its tokenizer has `<image>` but
no `<video>`. Conversion:

- config: a `LlavaOnevisionConfig` from the Qwen2 fields, the named tower's SigLIP config with as many layers as
  the checkpoint holds and no head (`vision_feature_layer=-1`, strategy "full": the original's feature), the
  checkpoint's `image_aspect_ratio` (anyres_max_N) and `image_grid_pinpoints`, and `<video>` appended to the
  tokenizer (rows padded as above when the vocabulary has no room for it);
- weights: the language model and projector as above, `model.vision_tower.vision_tower.vision_model.* ->
  model.vision_tower.*`, `model.image_newline` as is; rotary `inv_freq` tables skipped, anything else refused;
- processor: `processing.onevision_processor` with the tower's SigLIP normalisation and a Qwen2 ChatML template.

Video layout: the stock class pools each frame bilinearly to half size and puts one newline after the whole
video (OneVision's `mm_newline_position="one_token"`). LLaVA-Video was trained with "grid" (a newline after
every pooled row of each frame): the checkpoint's `mm_newline_position` and `mm_spatial_pool_mode` go onto the
converted config, where `modeling.video_layout` makes the model and the processor lay its videos out that way.
Images are laid out as in the original code.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import torch

from .config import VTRConfig
from .modeling import VTRLlavaForConditionalGeneration, VTRLlavaOnevisionForConditionalGeneration

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
_WEIGHT_FILES = ["*.json", "*.model", "*.safetensors", "*.bin", "*.txt"]


def _local_dir(path: str, patterns: list[str], revision: str | None = None) -> Path:
    if os.path.isdir(path):
        return Path(path)
    from huggingface_hub import snapshot_download  # hub ids: the real path, not exercised offline

    return Path(snapshot_download(path, allow_patterns=patterns, revision=revision))


def _finish(model, cfg: dict, dtype=None, attn_implementation: str | None = None, device_map=None):
    """The converted `model` in eval mode with what `from_pretrained` would have applied: `dtype` (a torch dtype;
    "auto": the release's own `torch_dtype`; None: float32), the attention kernel, and `device_map` (a device, or
    "auto" / a module -> device dict, dispatched by accelerate)."""
    if dtype == "auto":
        dtype = getattr(torch, str(cfg.get("torch_dtype") or "float32"), None)
        dtype = dtype if isinstance(dtype, torch.dtype) else torch.float32
    model = model.to(dtype) if dtype is not None else model.float()
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    if device_map:
        if isinstance(device_map, (str, torch.device)) and str(device_map) != "auto":
            model.to(device_map)
        else:
            from accelerate import dispatch_model, infer_auto_device_map

            if device_map == "auto":
                device_map = infer_auto_device_map(model, no_split_module_classes=model._no_split_modules)
            dispatch_model(model, device_map=device_map)
    return model.eval()


def _read_config(path: str) -> dict | None:
    if os.path.isdir(path):
        file = Path(path) / "config.json"
        return json.loads(file.read_text()) if file.exists() else None
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(path, "config.json")).read_text())
    except Exception:
        return None


def _is_original(cfg: dict | None) -> bool:
    return bool(cfg) and "mm_vision_tower" in cfg and "text_config" not in cfg


def _is_onevision_config(cfg: dict) -> bool:
    return "LlavaQwenForCausalLM" in (cfg.get("architectures") or []) or "siglip" in str(cfg["mm_vision_tower"]).lower()


def is_original_llava(path: str) -> bool:
    """True for an original LLaVA(-1.5) release (has `mm_vision_tower`, is not a llava-hf LlavaConfig, and is not
    an original LLaVA-OneVision / LLaVA-Video release)."""
    cfg = _read_config(path)
    return _is_original(cfg) and not _is_onevision_config(cfg)


def is_original_onevision(path: str) -> bool:
    """True for an original LLaVA-OneVision / LLaVA-Video release (LLaVA-NeXT's `LlavaQwenForCausalLM` format:
    has `mm_vision_tower`, a SigLIP one or the LlavaQwen architecture; is not a llava-hf config)."""
    cfg = _read_config(path)
    return _is_original(cfg) and _is_onevision_config(cfg)


def _load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    state = {}
    if files:
        from safetensors.torch import load_file

        for f in files:
            state.update(load_file(str(f)))
        return state
    files = sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {folder}")
    for f in files:
        state.update(torch.load(f, map_location="cpu", weights_only=True))
    return state


def _projector_key(key: str) -> str:
    index, rest = key.removeprefix("model.mm_projector.").split(".", 1)
    linear = {"0": "linear_1", "2": "linear_2"}.get(index)
    if linear is None:
        raise ValueError(f"unexpected projector weight {key!r}: only mm_projector_type=mlp2x_gelu is supported")
    return f"model.multi_modal_projector.{linear}.{rest}"


def _rename(key: str) -> str | None:
    if key.startswith("model.mm_projector."):
        return _projector_key(key)
    if key.startswith("model.vision_tower."):
        return None  # the tower comes from its own CLIP checkpoint
    if key.startswith("model."):
        return "model.language_model." + key.removeprefix("model.")
    if key == "lm_head.weight":
        return key
    raise ValueError(f"unexpected weight {key!r} in an original LLaVA checkpoint")


def _text_fields(cfg: dict, vocab: int, **defaults) -> dict:
    """The decoder fields of an original release's config.json (Llama / Qwen2 names), `defaults` for the optional
    ones it may leave out (max_position_embeddings, rms_norm_eps, rope_theta: the family's own)."""
    return dict(
        vocab_size=vocab,
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
        max_position_embeddings=cfg.get("max_position_embeddings", defaults["max_position_embeddings"]),
        rms_norm_eps=cfg.get("rms_norm_eps", defaults["rms_norm_eps"]),
        rope_parameters={"rope_type": "default", "rope_theta": cfg.get("rope_theta", defaults["rope_theta"])},
        hidden_act=cfg.get("hidden_act", "silu"),
    )


def _pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    if weight.shape[0] >= rows:
        return weight
    extra = weight.float().mean(0, keepdim=True).expand(rows - weight.shape[0], -1).to(weight.dtype)
    return torch.cat([weight, extra], 0)


def convert_original_llava(
    path: str,
    vision_tower: str | None = None,
    dtype=None,
    attn_implementation: str | None = None,
    device_map=None,
    revision: str | None = None,
):
    """Return (VTRLlavaForConditionalGeneration with VTR disabled, LlavaProcessor) for an original checkpoint.
    `dtype` ("auto": the release's), `attn_implementation`, `device_map` and `revision` as `from_pretrained`'s."""
    from accelerate import init_empty_weights
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlavaConfig,
        LlavaProcessor,
    )

    folder = _local_dir(path, _WEIGHT_FILES, revision)
    cfg = json.loads((folder / "config.json").read_text())
    if _is_onevision_config(cfg):
        raise ValueError(f"{path} is an original LLaVA-OneVision / LLaVA-Video release: use convert_original_onevision")
    if cfg.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ValueError(f"mm_projector_type={cfg['mm_projector_type']!r} is not supported (only mlp2x_gelu)")
    tower = vision_tower or cfg["mm_vision_tower"]

    tokenizer = AutoTokenizer.from_pretrained(str(folder), padding_side="left")
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    vocab = max(len(tokenizer), cfg["vocab_size"])

    vision_config = CLIPVisionConfig.from_pretrained(tower)
    text_config = LlamaConfig(
        **_text_fields(cfg, vocab, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_id,
        image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2,
        vision_feature_layer=cfg.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy="default" if cfg.get("mm_vision_select_feature", "patch") == "patch" else "full",
        projector_hidden_act="gelu",
        pad_token_id=tokenizer.pad_token_id,
    )

    state = {}
    for key, value in _load_state_dict(folder).items():
        new = _rename(key)
        if new is not None:
            state[new] = value
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        state[key] = _pad_rows(state[key], vocab)
    clip = CLIPVisionModel.from_pretrained(tower)
    state.update({f"model.vision_tower.{k}": v for k, v in clip.state_dict().items()})

    with init_empty_weights():
        model = VTRLlavaForConditionalGeneration(config, VTRConfig(enabled=False))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"original LLaVA conversion: missing weights {missing[:5]}, unexpected {unexpected[:5]}")
    model = _finish(model, cfg, dtype, attn_implementation, device_map)

    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor.from_pretrained(tower),
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
    )
    return model, processor


_TOWER = "model.vision_tower.vision_tower.vision_model."
_SIGLIP_PARTS = ("embeddings", "encoder", "post_layernorm")
_QWEN2_PARTS = ("model.embed_tokens.", "model.layers.", "model.norm.")


def _rename_onevision(key: str) -> str | None:
    if key.endswith(".inv_freq"):
        return None  # rotary tables, rebuilt by the model
    if key.startswith(_TOWER) and key.removeprefix(_TOWER).split(".", 1)[0] in _SIGLIP_PARTS:
        return "model.vision_tower." + key.removeprefix(_TOWER)
    if key.startswith("model.mm_projector."):
        return _projector_key(key)
    if key == "model.image_newline":
        return key
    if key.startswith(_QWEN2_PARTS):
        return "model.language_model." + key.removeprefix("model.")
    if key == "lm_head.weight":
        return key
    raise ValueError(
        f"unexpected weight {key!r} in an original LLaVA-OneVision checkpoint "
        "(the stock LlavaOnevisionForConditionalGeneration has no place for it)"
    )


def _check_onevision(cfg: dict) -> None:
    """Refuse what the stock LLaVA-OneVision class cannot hold."""
    if cfg.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ValueError(f"mm_projector_type={cfg['mm_projector_type']!r} is not supported (only mlp2x_gelu)")
    merge = cfg.get("mm_patch_merge_type", "flat")
    if "unpad" not in merge:
        raise ValueError(f"mm_patch_merge_type={merge!r} is not supported (the stock class unpads: spatial_unpad)")
    if cfg.get("add_faster_video"):
        raise ValueError("add_faster_video=true is not supported (the stock class has no fast-frame tokens)")
    aspect = cfg.get("image_aspect_ratio")
    if not re.fullmatch(r"anyres_max_\d+", str(aspect)):
        raise ValueError(f"image_aspect_ratio={aspect!r} is not supported (the stock class tiles as anyres_max_N)")
    if cfg.get("rope_scaling"):
        raise ValueError(f"rope_scaling={cfg['rope_scaling']!r} is not supported (plain RoPE only)")


def _grid_pinpoints(value, view: int) -> list[list[int]]:
    """The anyres tile layouts in px: a list of [h, w], or LLaVA-NeXT's range string "(1x1),...,(6x6)"."""
    if not isinstance(value, str):
        return [list(p) for p in value]
    ends = [tuple(map(int, m)) for m in re.findall(r"\((\d+)x(\d+)\)", value)]
    if not ends:
        raise ValueError(f"image_grid_pinpoints={value!r}: expected [[h, w], ...] or '(1x1),...,(6x6)'")
    (r0, c0), (r1, c1) = ends[0], ends[-1]
    return [[r * view, c * view] for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)]


def _siglip_tower(tower: str):
    """The named SigLIP tower's `SiglipVisionConfig` and its image processor's mean / std (only its json files
    are read: the tower's weights are in the checkpoint)."""
    from transformers import SiglipVisionConfig

    try:
        folder = _local_dir(tower, ["*.json"])
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(
            f"cannot read the config of the vision tower {tower!r} (pass vision_tower=<folder or hub id>): {e}"
        ) from None
    if config.get("model_type") not in ("siglip", "siglip_vision_model"):
        raise ValueError(
            f"vision tower {tower!r} is a {config.get('model_type')!r} model; "
            "only SigLIP towers are supported for LLaVA-OneVision"
        )
    vision = SiglipVisionConfig.from_pretrained(str(folder))
    norm = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}  # SigLIP's
    file = folder / "preprocessor_config.json"
    if file.exists():
        saved = json.loads(file.read_text())
        norm = {k: saved.get(k, v) for k, v in norm.items()}
    return vision, norm


def convert_original_onevision(
    path: str,
    vision_tower: str | None = None,
    dtype=None,
    attn_implementation: str | None = None,
    device_map=None,
    revision: str | None = None,
):
    """Return (VTRLlavaOnevisionForConditionalGeneration with VTR disabled, LlavaOnevisionProcessor) for an
    original LLaVA-OneVision / LLaVA-Video checkpoint (folder or hub id). `vision_tower`: another copy (folder or
    hub id) of the SigLIP tower the checkpoint names, read for its config and normalisation only. `dtype`
    ("auto": the release's `torch_dtype`), `attn_implementation`, `device_map` and `revision` as `from_pretrained`'s."""
    from accelerate import init_empty_weights
    from transformers import AutoTokenizer, LlavaOnevisionConfig, Qwen2Config

    from .modeling import video_layout
    from .processing import ONEVISION_CHAT_TEMPLATE, onevision_processor, with_video_layout

    folder = _local_dir(path, _WEIGHT_FILES, revision)
    cfg = json.loads((folder / "config.json").read_text())
    if not _is_original(cfg):
        raise ValueError(f"{path} is not an original LLaVA-NeXT release (no mm_vision_tower in its config.json)")
    _check_onevision(cfg)
    vision_config, norm = _siglip_tower(vision_tower or cfg["mm_vision_tower"])

    weights = _load_state_dict(folder)
    state = {}
    for key, value in weights.items():
        new = _rename_onevision(key)
        if new is not None:
            state[new] = value
    del weights
    prefix = "model.vision_tower.encoder.layers."
    layers = {int(k.removeprefix(prefix).split(".", 1)[0]) for k in state if k.startswith(prefix)}
    if not layers or layers != set(range(len(layers))):
        raise ValueError(f"{path}: the SigLIP tower's encoder layers in the checkpoint are {sorted(layers)}")

    with warnings.catch_warnings():  # AutoTokenizer parses config.json as a LlavaConfig, which frowns on rope_scaling
        warnings.filterwarnings("ignore", message=".*rope_scaling.*", category=FutureWarning)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), padding_side="left")
    for token in (IMAGE_TOKEN, VIDEO_TOKEN):
        if token not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"extra_special_tokens": [token]}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    vocab = max(len(tokenizer), cfg["vocab_size"])

    # the original code deleted the tower's last layer and reads the output of the last one left
    vision_config.num_hidden_layers = len(layers)
    vision_config.vision_use_head = False
    text_config = Qwen2Config(
        **_text_fields(cfg, vocab, max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0),
        attention_dropout=cfg.get("attention_dropout", 0.0),
        use_sliding_window=cfg.get("use_sliding_window", False),
        sliding_window=cfg.get("sliding_window"),
        max_window_layers=cfg.get("max_window_layers", cfg["num_hidden_layers"]),
        tie_word_embeddings=False,  # a tied checkpoint's LM head is copied from the embeddings below
        bos_token_id=cfg.get("bos_token_id", tokenizer.bos_token_id),
        eos_token_id=cfg.get("eos_token_id", tokenizer.eos_token_id),
        pad_token_id=tokenizer.pad_token_id,
    )
    view = vision_config.image_size
    config = LlavaOnevisionConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        image_grid_pinpoints=_grid_pinpoints(cfg.get("image_grid_pinpoints", [[view, view]]), view),
        vision_aspect_ratio=cfg["image_aspect_ratio"],
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        **_layout_keys(cfg),
    )

    embed = "model.language_model.embed_tokens.weight"
    if "lm_head.weight" not in state and embed in state:
        state["lm_head.weight"] = state[embed].clone()  # tied in the original (Qwen2-0.5B)
    for key in (embed, "lm_head.weight"):
        if key in state:
            state[key] = _pad_rows(state[key], vocab)

    with init_empty_weights():
        model = VTRLlavaOnevisionForConditionalGeneration(config, VTRConfig(enabled=False))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # shapes that do not fit the config (e.g. another tower than the one trained)
        raise ValueError(f"original LLaVA-OneVision conversion of {path}: {e}".replace("\n", " ")) from None
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(
            f"original LLaVA-OneVision conversion: missing weights {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model = _finish(model, cfg, dtype, attn_implementation, device_map)

    processor = onevision_processor(
        tokenizer,
        image_size=view,
        patch_size=vision_config.patch_size,
        grid_pinpoints=config.image_grid_pinpoints,
        vision_aspect_ratio=config.vision_aspect_ratio,
        chat_template=ONEVISION_CHAT_TEMPLATE,
        image_kwargs=dict(norm),
        video_kwargs=dict(norm),
    )
    return model, with_video_layout(processor, *video_layout(config))


def _layout_keys(cfg: dict) -> dict:
    """The checkpoint's LLaVA-NeXT video layout keys that differ from the stock class's (LLaVA-NeXT's defaults when
    absent: "one_token", "bilinear"), for the converted config."""
    keys = {"mm_newline_position": "one_token", "mm_spatial_pool_mode": "bilinear"}
    return {key: cfg[key] for key, stock in keys.items() if cfg.get(key, stock) != stock}
