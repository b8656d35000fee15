"""The Python API: load a checkpoint with a `VTRConfig`, or wrap a stock model you already hold.

Qwen3-VL (`Qwen/Qwen3-VL-*-Instruct`, model_type `qwen3_vl`), Qwen3-VL-MoE (`qwen3_vl_moe`), Qwen2.5-VL
(`Qwen/Qwen2.5-VL-*-Instruct`, `qwen2_5_vl`), Qwen2-VL (`Qwen/Qwen2-VL-*-Instruct`, `qwen2_vl`) and Qwen3.5
(`Qwen/Qwen3.5-*`, `qwen3_5`; its MoE variants `qwen3_5_moe`) are told apart by the checkpoint's config; anything
else is refused with a clear error. Qwen3.5's decoder is hybrid (linear-attention layers between full-attention
ones): methods that read attention score from a full-attention layer (`engine.scoring_layers`), a prune layer
without one before it is refused, and a schedule left unset moves onto the nearest layers that work.
"""

from __future__ import annotations

from .config import VTRConfig
from .model_args import checkpoint_model_type
from .modeling import VTR_CLASSES
from .processing import load_processor

__all__ = ["load_model", "load_processor", "vtr_class_for", "wrap"]


def vtr_class_for(pretrained: str, **kwargs) -> type:
    """The VTR class for a checkpoint (hub id or local folder), chosen from its config's model_type."""
    model_type = checkpoint_model_type(pretrained, **kwargs)
    if model_type not in VTR_CLASSES:
        raise ValueError(
            f"{pretrained} is a {model_type!r} checkpoint; the Qwen-VL fork handles {sorted(VTR_CLASSES)}. "
            "LLaVA, InternVL and Video-LLaVA have their own forks."
        )
    return VTR_CLASSES[model_type]


def load_model(pretrained: str, vtr_config: VTRConfig | None = None, **from_pretrained_kwargs):
    """Load a Qwen3-VL, Qwen3-VL-MoE, Qwen2.5-VL, Qwen2-VL, Qwen3.5 or Qwen3.5-MoE checkpoint (hub id or local
    folder) as its VTR class.

    `from_pretrained_kwargs` go to transformers unchanged (dtype, device_map, attn_implementation, ...).
    No `vtr_config`: nothing is pruned (VTRConfig(enabled=False)), as with `from_pretrained` on the VTR class
    and `wrap`; pass a VTRConfig to prune, e.g. VTRConfig() for FastV at the backbone's default budget.
    """
    cls = vtr_class_for(pretrained, **from_pretrained_kwargs)
    model = cls.from_pretrained(pretrained, **from_pretrained_kwargs)
    model.set_vtr_config(vtr_config if vtr_config is not None else VTRConfig(enabled=False))
    return model.eval()


def wrap(model, vtr_config: VTRConfig | None = None):
    """Add VTR to an already loaded stock Qwen-VL model (`Qwen3VLForConditionalGeneration`, its MoE variant,
    `Qwen2_5_VLForConditionalGeneration`, `Qwen2VLForConditionalGeneration`, `Qwen3_5ForConditionalGeneration`, its
    MoE variant), in place. No `vtr_config`: nothing is pruned until `set_vtr_config`."""
    # the MoE class first: a subclass check against the dense class must not catch it
    for cls in sorted(VTR_CLASSES.values(), key=lambda c: "Moe" not in c.__name__):
        if isinstance(model, cls.vtr_stock_class):
            return cls.from_stock(model, vtr_config)
    names = ", ".join(cls.vtr_stock_class.__name__ for cls in VTR_CLASSES.values())
    raise TypeError(f"expected one of {names}; got {type(model).__name__}")
