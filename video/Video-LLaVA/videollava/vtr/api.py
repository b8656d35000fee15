"""The Python API: load a Video-LLaVA checkpoint with a `VTRConfig`, or wrap a stock model you already hold.

Checkpoints of model_type `video_llava` (`LanguageBind/Video-LLaVA-7B-hf` and its fine-tunes) are
accepted; anything else is refused with a clear error naming the fork that handles it.
"""

from __future__ import annotations

from .config import VTRConfig
from .model_args import check_checkpoint
from .modeling import VTRVideoLlavaForConditionalGeneration
from .processing import load_processor

__all__ = ["load_model", "load_processor", "wrap"]

_HUB_KEYS = ("revision", "trust_remote_code", "cache_dir", "token", "local_files_only")


def load_model(pretrained: str, vtr_config: VTRConfig | None = None, **from_pretrained_kwargs):
    """Load a Video-LLaVA checkpoint (hub id or local folder) as `VTRVideoLlavaForConditionalGeneration`.

    `from_pretrained_kwargs` go to transformers unchanged (dtype, device_map, attn_implementation, ...).
    No `vtr_config`: nothing is pruned (VTRConfig(enabled=False)), as with `from_pretrained` on the VTR class
    and `wrap`; pass a VTRConfig to prune, e.g. VTRConfig() for FastV at the backbone's default budget.
    """
    from transformers import AutoConfig

    check_checkpoint(pretrained)
    hub = {k: v for k, v in from_pretrained_kwargs.items() if k in _HUB_KEYS}
    model_type = AutoConfig.from_pretrained(pretrained, **hub).model_type
    if model_type != "video_llava":
        raise ValueError(
            f"{pretrained} is a {model_type!r} checkpoint; the Video-LLaVA fork handles 'video_llava' only "
            "(LLaVA-1.5/1.6, InternVL and Qwen3-VL have their own forks)"
        )
    model = VTRVideoLlavaForConditionalGeneration.from_pretrained(pretrained, **from_pretrained_kwargs)
    model.set_vtr_config(vtr_config if vtr_config is not None else VTRConfig(enabled=False))
    return model.eval()


def wrap(model, vtr_config: VTRConfig | None = None):
    """Add VTR to an already loaded stock `VideoLlavaForConditionalGeneration`, in place; returns it.
    No `vtr_config`: nothing is pruned until `set_vtr_config`."""
    return VTRVideoLlavaForConditionalGeneration.from_stock(model, vtr_config)
