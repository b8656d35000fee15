"""Load original LLaVA-format checkpoints (e.g. `liuhaotian/llava-v1.5-7b`) as the HF LLaVA model.

The original release is a `LlavaLlamaForCausalLM`: Llama weights under `model.*` / `lm_head`, the
projector under `model.mm_projector.{0,2}` (`mlp2x_gelu`), and only the *name* of the CLIP vision tower
(`mm_vision_tower`), whose weights come from that CLIP checkpoint. Its tokenizer has no `<image>` token
(the original code splices image features in at a sentinel id). Conversion on load:

- config: a `LlavaConfig` from the Llama fields, the CLIP tower's vision config, the select layer /
  feature, and `<image>` appended to the tokenizer (embedding and LM-head rows padded with the mean row;
  the image token's own embedding is never used, it is replaced by image features);
- weights: `model.layers.* -> model.language_model.layers.*` (likewise embed_tokens, norm),
  `model.mm_projector.0/2 -> model.multi_modal_projector.linear_1/2`, the tower from its CLIP checkpoint;
- processor: the tower's CLIP image processor + the extended tokenizer.

Preprocessing note: the original code pads images to a square ("pad" aspect ratio); the HF processor
resizes and centre-crops, as llava-hf checkpoints do.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .config import VTRConfig
from .modeling import VTRLlavaForConditionalGeneration

IMAGE_TOKEN = "<image>"


def _local_dir(path: str, patterns: list[str]) -> Path:
    if os.path.isdir(path):
        return Path(path)
    from huggingface_hub import snapshot_download  # hub ids: the real path, not exercised offline

    return Path(snapshot_download(path, allow_patterns=patterns))


def _read_config(path: str) -> dict | None:
    if os.path.isdir(path):
        file = Path(path) / "config.json"
        return json.loads(file.read_text()) if file.exists() else None
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(path, "config.json")).read_text())
    except Exception:
        return None


def is_original_llava(path: str) -> bool:
    """True for an original LLaVA release (has `mm_vision_tower`, is not a llava-hf LlavaConfig)."""
    cfg = _read_config(path)
    return bool(cfg) and "mm_vision_tower" in cfg and "text_config" not in cfg


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


def _rename(key: str) -> str | None:
    if key.startswith("model.mm_projector."):
        index, rest = key.removeprefix("model.mm_projector.").split(".", 1)
        linear = {"0": "linear_1", "2": "linear_2"}.get(index)
        if linear is None:
            raise ValueError(f"unexpected projector weight {key!r}: only mm_projector_type=mlp2x_gelu is supported")
        return f"model.multi_modal_projector.{linear}.{rest}"
    if key.startswith("model.vision_tower."):
        return None  # the tower comes from its own CLIP checkpoint
    if key.startswith("model."):
        return "model.language_model." + key.removeprefix("model.")
    if key == "lm_head.weight":
        return key
    raise ValueError(f"unexpected weight {key!r} in an original LLaVA checkpoint")


def _pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    if weight.shape[0] >= rows:
        return weight
    extra = weight.float().mean(0, keepdim=True).expand(rows - weight.shape[0], -1).to(weight.dtype)
    return torch.cat([weight, extra], 0)


def convert_original_llava(path: str, vision_tower: str | None = None, dtype=None):
    """Return (VTRLlavaForConditionalGeneration with VTR disabled, LlavaProcessor) for an original checkpoint."""
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

    folder = _local_dir(path, ["*.json", "*.model", "*.safetensors", "*.bin", "*.txt"])
    cfg = json.loads((folder / "config.json").read_text())
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
        vocab_size=vocab,
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_parameters={"rope_type": "default", "rope_theta": cfg.get("rope_theta", 10000.0)},
        hidden_act=cfg.get("hidden_act", "silu"),
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
    model = model.to(dtype) if dtype is not None else model.float()
    model.eval()

    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor.from_pretrained(tower),
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
    )
    return model, processor
