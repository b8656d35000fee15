"""The Python API: load a checkpoint with a `VTRConfig`, or wrap a stock model you already hold.

InternVL2.5 and InternVL3 `-hf` checkpoints (model_type `internvl`, e.g. `OpenGVLab/InternVL3-2B-hf`,
`OpenGVLab/InternVL2_5-8B-hf`) share one class; anything else is refused with a clear error.
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
        hint = " (the original OpenGVLab remote-code checkpoints: use their `-hf` conversions)"
        raise ValueError(
            f"{pretrained} is a {model_type!r} checkpoint; the InternVL fork handles {sorted(VTR_CLASSES)} "
            f"(InternVL2.5 and InternVL3 `-hf` checkpoints){hint}. LLaVA, Qwen3-VL and Video-LLaVA have their own forks."
        )
    return VTR_CLASSES[model_type]


def load_model(pretrained: str, vtr_config: VTRConfig | None = None, **from_pretrained_kwargs):
    """Load an InternVL `-hf` checkpoint (hub id or local folder) as its VTR class.

    `from_pretrained_kwargs` go to transformers unchanged (dtype, device_map, attn_implementation, ...).
    No `vtr_config`: nothing is pruned (VTRConfig(enabled=False)), as with `from_pretrained` on the VTR class
    and `wrap`; pass a VTRConfig to prune, e.g. VTRConfig() for FastV at the backbone's default budget.
    """
    cls = vtr_class_for(pretrained, **from_pretrained_kwargs)
    model = cls.from_pretrained(pretrained, **from_pretrained_kwargs)
    model.set_vtr_config(vtr_config if vtr_config is not None else VTRConfig(enabled=False))
    return model.eval()


def wrap(model, vtr_config: VTRConfig | None = None):
    """Add VTR to an already loaded stock `InternVLForConditionalGeneration`, in place; returns it.
    No `vtr_config`: nothing is pruned until `set_vtr_config`."""
    for cls in VTR_CLASSES.values():
        if isinstance(model, cls.vtr_stock_class):
            return cls.from_stock(model, vtr_config)
    raise TypeError(f"expected an InternVLForConditionalGeneration, got {type(model).__name__}")
