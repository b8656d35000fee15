"""The Python API: load a checkpoint with a `VTRConfig`, or wrap a stock model you already hold.

LLaVA-1.5 (`llava-hf/llava-1.5-*`, model_type `llava`), LLaVA-1.6 (`llava-hf/llava-v1.6-*`, model_type
`llava_next`) and LLaVA-OneVision (`llava-hf/llava-onevision-*`, model_type `llava_onevision`; also a converted
LLaVA-Video) are told apart by the checkpoint's config; an original-format release is pointed at its converter
(`convert.py`); anything else is refused with a clear error.
"""

from __future__ import annotations

from .config import VTRConfig
from .model_args import check_checkpoint
from .modeling import VTR_CLASSES


def vtr_class_for(pretrained: str, **kwargs) -> type:
    """The VTR class for a checkpoint (hub id or local folder), chosen from its config's model_type."""
    from transformers import AutoConfig

    check_checkpoint(pretrained)
    _refuse_original(pretrained)
    keys = ("revision", "trust_remote_code", "cache_dir", "token", "local_files_only")
    model_type = AutoConfig.from_pretrained(pretrained, **{k: v for k, v in kwargs.items() if k in keys}).model_type
    if model_type not in VTR_CLASSES:
        raise ValueError(
            f"{pretrained} is a {model_type!r} checkpoint; the LLaVA fork handles {sorted(VTR_CLASSES)} "
            "(LLaVA-1.5, LLaVA-1.6, LLaVA-OneVision / LLaVA-Video). InternVL, Qwen3-VL and Video-LLaVA have their "
            "own forks."
        )
    return VTR_CLASSES[model_type]


def load_model(pretrained: str, vtr_config: VTRConfig | None = None, **from_pretrained_kwargs):
    """Load a llava-hf LLaVA-1.5, LLaVA-1.6 or LLaVA-OneVision checkpoint (hub id or local folder) as its VTR class.

    `from_pretrained_kwargs` go to transformers unchanged (dtype, device_map, attn_implementation, ...).
    No `vtr_config`: nothing is pruned (VTRConfig(enabled=False)), as with `from_pretrained` on the VTR class
    and `wrap`; pass a VTRConfig to prune, e.g. VTRConfig() for FastV at the backbone's default budget.
    """
    cls = vtr_class_for(pretrained, **from_pretrained_kwargs)
    model = cls.from_pretrained(pretrained, **from_pretrained_kwargs)
    model.set_vtr_config(vtr_config if vtr_config is not None else VTRConfig(enabled=False))
    return model.eval()


def wrap(model, vtr_config: VTRConfig | None = None):
    """Add VTR to an already loaded stock `LlavaForConditionalGeneration`, `LlavaNextForConditionalGeneration` or
    `LlavaOnevisionForConditionalGeneration`, in place; returns it.
    No `vtr_config`: nothing is pruned until `set_vtr_config`."""
    for cls in VTR_CLASSES.values():
        if isinstance(model, cls.vtr_stock_class):
            return cls.from_stock(model, vtr_config)
    raise TypeError(
        "expected a LlavaForConditionalGeneration, LlavaNextForConditionalGeneration or "
        f"LlavaOnevisionForConditionalGeneration, got {type(model).__name__}"
    )


def load_processor(pretrained: str, **kwargs):
    """The checkpoint's processor (hub id or local folder): the stock `AutoProcessor`; a LLaVA-OneVision
    checkpoint where torchvision cannot load gets the stock processor class around torchvision-free image and
    video processors (processing.py). `kwargs` go to transformers unchanged."""
    from .processing import load_processor

    _refuse_original(pretrained)
    return load_processor(pretrained, **kwargs)


def _refuse_original(pretrained: str) -> None:
    """An original (LLaVA / LLaVA-NeXT release format) checkpoint: a clear error naming its converter (its config
    alone would build a default-size model of random weights; its folder has no processor config)."""
    from .convert import is_original_llava, is_original_onevision

    for is_original, convert in (
        (is_original_onevision, "convert_original_onevision"),
        (is_original_llava, "convert_original_llava"),
    ):
        if is_original(pretrained):
            raise ValueError(
                f"{pretrained} is an original (LLaVA / LLaVA-NeXT release format) checkpoint: convert it with "
                f"llava.vtr.convert.{convert}({pretrained!r}), or run it through lmms-eval, which converts on load"
            )
