"""The Python API: load a checkpoint with a `VTRConfig`, or wrap a stock model you already hold.

Qwen3-VL (`Qwen/Qwen3-VL-*-Instruct`, model_type `qwen3_vl`) and Qwen3-VL-MoE (`qwen3_vl_moe`) are told
apart by the checkpoint's config; anything else is refused with a clear error.
"""

from __future__ import annotations

from .config import VTRConfig
from .model_args import check_checkpoint
from .modeling import VTR_CLASSES
from .processing import load_processor

__all__ = ["load_model", "load_processor", "vtr_class_for", "wrap"]


def vtr_class_for(pretrained: str, **kwargs) -> type:
    """The VTR class for a checkpoint (hub id or local folder), chosen from its config's model_type."""
    from transformers import AutoConfig

    check_checkpoint(pretrained)

    keys = ("revision", "trust_remote_code", "cache_dir", "token", "local_files_only")
    model_type = AutoConfig.from_pretrained(pretrained, **{k: v for k, v in kwargs.items() if k in keys}).model_type
    if model_type not in VTR_CLASSES:
        raise ValueError(
            f"{pretrained} is a {model_type!r} checkpoint; the Qwen3-VL fork handles {sorted(VTR_CLASSES)}. "
            "LLaVA, InternVL and Video-LLaVA have their own forks."
        )
    return VTR_CLASSES[model_type]


def load_model(pretrained: str, vtr_config: VTRConfig | None = None, **from_pretrained_kwargs):
    """Load a Qwen3-VL or Qwen3-VL-MoE checkpoint (hub id or local folder) as its VTR class.

    `from_pretrained_kwargs` go to transformers unchanged (dtype, device_map, attn_implementation, ...).
    No `vtr_config`: nothing is pruned (VTRConfig(enabled=False)), as with `from_pretrained` on the VTR class
    and `wrap`; pass a VTRConfig to prune, e.g. VTRConfig() for FastV at the backbone's default budget.
    """
    cls = vtr_class_for(pretrained, **from_pretrained_kwargs)
    model = cls.from_pretrained(pretrained, **from_pretrained_kwargs)
    model.set_vtr_config(vtr_config if vtr_config is not None else VTRConfig(enabled=False))
    return model.eval()


def wrap(model, vtr_config: VTRConfig | None = None):
    """Add VTR to an already loaded stock `Qwen3VLForConditionalGeneration` (or its MoE variant), in place.
    No `vtr_config`: nothing is pruned until `set_vtr_config`."""
    # the MoE class first: a subclass check against the dense class must not catch it
    for cls in sorted(VTR_CLASSES.values(), key=lambda c: "Moe" not in c.__name__):
        if isinstance(model, cls.vtr_stock_class):
            return cls.from_stock(model, vtr_config)
    raise TypeError(
        f"expected a Qwen3VLForConditionalGeneration or Qwen3VLMoeForConditionalGeneration, got {type(model).__name__}"
    )
