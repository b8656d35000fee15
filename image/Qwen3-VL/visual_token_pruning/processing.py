"""The Qwen-VL processors where torchvision cannot load.

The stock `Qwen3VLProcessor` (Qwen3-VL and Qwen3.5), `Qwen2_5_VLProcessor` and `Qwen2VLProcessor` need their
video processor (`Qwen3VLVideoProcessor` / `Qwen2VLVideoProcessor`, torchvision backends) and, by default, the
fast image processor (torchvision too). Where torchvision imports, `load_processor` returns the stock processor
unchanged. Otherwise it builds the same stock processor class (so the prompt expansion, Qwen3-VL's per-frame
`<t seconds>` timestamps, Qwen2.5-VL's `second_per_grid_ts` and `mm_token_type_ids` are the stock code)
around:

- images: transformers' PIL `Qwen2VLImageProcessorPil` (the stock slow image processor);
- videos: the stock video processor with only its torchvision calls replaced (`NoTV` subclasses, built from
  `notv`): resizing by `torch.nn.functional.interpolate` (bicubic, antialiased: the kernel torchvision
  itself calls), normalisation in plain torch, and file decoding by `video_io` (decord, PyAV fallback).
  Frame sampling, `smart_resize`, the temporal padding and the patch layout are the stock methods.
  `Qwen2VLVideoProcessor`'s module imports torchvision only for type annotations; where torchvision is
  missing it is imported under placeholder modules that are removed again right after.
"""

from __future__ import annotations

import functools

from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

from .model_args import PROCESSOR_FILES, check_checkpoint, checkpoint_model_type
from .notv import (
    NoTVVideo,
    TorchOnlyBackend,
    from_saved,
    name_stock_classes,
    stock_processor_class,
    stock_video_class,
    torchvision_available,
)


class Qwen3VLVideoProcessorNoTV(NoTVVideo, Qwen3VLVideoProcessor, TorchOnlyBackend):
    """The stock Qwen3-VL video processor without torchvision (see the module docstring).

    Videos may be file paths (decoded with `video_io`, frames sampled by the stock `sample_frames`: `fps`
    frames per second, at least `min_frames`, at most `max_frames`, or exactly `num_frames`), uint8 arrays
    `[t, h, w, 3]`, or lists of PIL frames; pass `video_metadata` with arrays to get true timestamps."""

    stock_name = "Qwen3VLVideoProcessor"


@functools.cache
def qwen2_vl_video_class():
    """`Qwen2VLVideoProcessorNoTV`: the stock Qwen2-VL / Qwen2.5-VL video processor without torchvision."""
    stock = stock_video_class("transformers.models.qwen2_vl.video_processing_qwen2_vl", "Qwen2VLVideoProcessor")

    class Qwen2VLVideoProcessorNoTV(NoTVVideo, stock, TorchOnlyBackend):
        """The stock Qwen2-VL / Qwen2.5-VL video processor without torchvision (see the module docstring):
        every frame given is used unless `do_sample_frames=True`, as in the stock one."""

        stock_name = "Qwen2VLVideoProcessor"

    return Qwen2VLVideoProcessorNoTV


#: processor class (as a checkpoint's processor_config.json names it) -> (family, its video processor)
FAMILIES = {
    "Qwen3VLProcessor": ("Qwen3-VL", lambda: Qwen3VLVideoProcessorNoTV),
    "Qwen2_5_VLProcessor": ("Qwen2.5-VL", qwen2_vl_video_class),
    "Qwen2VLProcessor": ("Qwen2-VL", qwen2_vl_video_class),
}
#: model_type of a checkpoint's config -> its processor class
PROCESSOR_FOR = {
    "qwen3_vl": "Qwen3VLProcessor",
    "qwen3_vl_moe": "Qwen3VLProcessor",
    "qwen3_5": "Qwen3VLProcessor",
    "qwen3_5_moe": "Qwen3VLProcessor",
    "qwen2_5_vl": "Qwen2_5_VLProcessor",
    "qwen2_vl": "Qwen2VLProcessor",
}


def build_processor(
    tokenizer,
    *,
    patch_size: int = 16,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    video_min_pixels: int | None = None,
    video_max_pixels: int | None = None,
    chat_template: str | None = None,
    image_kwargs: dict | None = None,
    video_kwargs: dict | None = None,
    processor_class: str = "Qwen3VLProcessor",
):
    """A stock Qwen-VL processor (`processor_class`, a key of `FAMILIES`) around the PIL image processor and
    the torchvision-free video processor."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image_size = {}
    if min_pixels is not None or max_pixels is not None:
        image_size["size"] = {"shortest_edge": min_pixels or 56 * 56, "longest_edge": max_pixels or 28 * 28 * 1280}
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch_size,
        merge_size=merge_size,
        temporal_patch_size=temporal_patch_size,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        **image_size,
        **(image_kwargs or {}),
    )
    video_size = {}
    if video_min_pixels is not None or video_max_pixels is not None or min_pixels is not None:
        low = video_min_pixels or min_pixels or 128 * 32 * 32
        high = video_max_pixels or (max_pixels * 4 if max_pixels else 32 * 32 * 768)
        video_size["size"] = {"shortest_edge": low, "longest_edge": high}
    video_processor = FAMILIES[processor_class][1]()(
        patch_size=patch_size,
        merge_size=merge_size,
        temporal_patch_size=temporal_patch_size,
        cap_pixels_per_frame=False,
        **video_size,
        **(video_kwargs or {}),
    )
    return stock_processor_class(processor_class)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=chat_template,
    )


def stock_layout(path, processor_class: str = "Qwen3VLProcessor") -> None:
    """Name the stock classes in a saved processor's configs, as a hub checkpoint does."""
    video = "Qwen3VLVideoProcessor" if processor_class == "Qwen3VLProcessor" else "Qwen2VLVideoProcessor"
    name_stock_classes(path, image="Qwen2VLImageProcessor", video=video, processor=processor_class)


def load_processor(pretrained: str, min_pixels: int | None = None, max_pixels: int | None = None, **kwargs):
    """The checkpoint's processor: the stock `AutoProcessor` where torchvision imports; else the same stock
    processor class (Qwen3-VL and Qwen3.5, Qwen2.5-VL or Qwen2-VL, from the checkpoint's model_type) built from the
    checkpoint's tokenizer and processor configs (one notice line).
    `min_pixels` / `max_pixels` replace that bound of the IMAGE processor's pixel budget; the bound not given
    stays the checkpoint's, and videos keep the checkpoint's video budget."""
    from transformers import AutoProcessor

    check_checkpoint(pretrained, PROCESSOR_FILES)
    if torchvision_available():
        processor = AutoProcessor.from_pretrained(pretrained, **kwargs)
    else:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        processor_class = _processor_class_of(pretrained, **kwargs)
        family, video_class = FAMILIES[processor_class]
        processor = from_saved(
            pretrained,
            processor_class,
            Qwen2VLImageProcessorPil,
            video_class(),
            family=family,
            video_defaults={"cap_pixels_per_frame": False},
            **kwargs,
        )
    if min_pixels is not None or max_pixels is not None:
        image = processor.image_processor
        current = image.size  # the fast image processor keeps a SizeDict, the slow one a dict
        low = current["shortest_edge"] if min_pixels is None else min_pixels
        high = current["longest_edge"] if max_pixels is None else max_pixels
        if low > high:
            raise ValueError(
                f"min_pixels={low} is larger than max_pixels={high} (the bound not given is the checkpoint's)"
            )
        size = {"shortest_edge": low, "longest_edge": high}
        image.size = size if isinstance(current, dict) else type(current)(**size)
    return processor


def _processor_class_of(pretrained, **kwargs) -> str:
    model_type = checkpoint_model_type(pretrained, **kwargs)
    if model_type not in PROCESSOR_FOR:
        raise ValueError(
            f"{pretrained} is a {model_type!r} checkpoint; this fork's processors serve {sorted(PROCESSOR_FOR)}"
        )
    return PROCESSOR_FOR[model_type]
