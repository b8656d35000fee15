"""The Python API: load a checkpoint with a `VTRConfig`, or wrap a stock model you already hold."""

from __future__ import annotations

from .config import VTRConfig
from .modeling import VTRLlavaForConditionalGeneration


def load_model(pretrained: str, vtr_config: VTRConfig | None = None, **from_pretrained_kwargs):
    """Load a llava-hf checkpoint (hub id or local folder) as a `VTRLlavaForConditionalGeneration`.

    `from_pretrained_kwargs` go to transformers unchanged (dtype, device_map, attn_implementation, ...).
    """
    model = VTRLlavaForConditionalGeneration.from_pretrained(pretrained, **from_pretrained_kwargs)
    model.set_vtr_config(vtr_config if vtr_config is not None else VTRConfig())
    return model.eval()


def wrap(model, vtr_config: VTRConfig | None = None):
    """Add VTR to an already loaded stock `LlavaForConditionalGeneration`, in place; returns it."""
    return VTRLlavaForConditionalGeneration.from_stock(model, vtr_config if vtr_config is not None else VTRConfig())


def load_processor(pretrained: str, **kwargs):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(pretrained, **kwargs)
