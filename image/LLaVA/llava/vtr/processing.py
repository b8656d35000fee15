"""The processors of this fork's checkpoints; LLaVA-OneVision's also where torchvision cannot load.

LLaVA-1.5 and LLaVA-1.6 checkpoints load with the stock `AutoProcessor`. LLaVA-OneVision's stock
`LlavaOnevisionProcessor` needs its video processor (`LlavaOnevisionVideoProcessor`, a torchvision backend)
and, by default, the fast image processor (torchvision too). Where torchvision imports, `load_processor`
returns the stock processor unchanged. Otherwise it builds the same stock processor class (so the `<image>`
expansion, anyres_max tiling included, and the `<video>` expansion are the stock code) around:

- images: transformers' PIL `LlavaOnevisionImageProcessorPil` (the stock slow image processor);
- videos: `LlavaOnevisionVideoProcessorNoTV`, the stock video processor with only its torchvision calls
  replaced (see `notv`): resizing by `torch.nn.functional.interpolate` (bicubic, antialiased: the kernel
  torchvision itself calls), normalisation in plain torch, and file decoding by `video_io` (decord, PyAV
  fallback). Frame sampling (`do_sample_frames=True` with `num_frames=` or `fps=`) is the stock method.

Videos may be file paths, uint8 arrays `[t, h, w, 3]` or lists of PIL frames.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

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

#: LLaVA-OneVision's prompt format, as the llava-hf processors carry it (Qwen2 ChatML, no default system prompt; the images, then the videos, then the text of each turn).
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] if item['type'] == 'image' %}<image>\n{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'video' %}<video>\n{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'text' %}{{ item['text'] }}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


_STOCK = {
    "image": "LlavaOnevisionImageProcessor",
    "video": "LlavaOnevisionVideoProcessor",
    "processor": "LlavaOnevisionProcessor",
}


class LlavaOnevisionVideoProcessorNoTV(
    NoTVVideo,
    stock_video_class("transformers.models.llava_onevision.video_processing_llava_onevision", _STOCK["video"]),
    TorchOnlyBackend,
):
    """The stock LLaVA-OneVision video processor without torchvision (see the module docstring): every frame
    given is used unless `do_sample_frames=True`, as in the stock one."""

    stock_name = _STOCK["video"]


def onevision_processor(
    tokenizer,
    *,
    image_size: int = 384,
    patch_size: int = 14,
    grid_pinpoints: list | None = None,
    vision_aspect_ratio: str = "anyres_max_9",
    chat_template: str | None = None,
    image_kwargs: dict | None = None,
    video_kwargs: dict | None = None,
):
    """A stock `LlavaOnevisionProcessor` for a vision tower of `image_size` px views and `patch_size` px patches
    (`(image_size // patch_size) ** 2` tokens a view, all of them: vision_feature_select_strategy "full").
    Its image and video processors are the stock ones where torchvision loads, else the PIL image processor
    and `LlavaOnevisionVideoProcessorNoTV`; both resize to image_size x image_size. `grid_pinpoints`: the
    anyres tile layouts in px (default: the stock 1..6 x 1..6 views, scaled to `image_size`).
    `tokenizer` must hold the `<image>` and `<video>` tokens."""
    for token in ("<image>", "<video>"):
        if token not in tokenizer.get_vocab():
            raise ValueError(f"the tokenizer has no {token!r} token; add it (as a special token) first")
    if torchvision_available():
        import transformers

        image_class = transformers.LlavaOnevisionImageProcessor
        video_class = transformers.LlavaOnevisionVideoProcessor
        processor_class = transformers.LlavaOnevisionProcessor
    else:
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil as image_class,
        )

        video_class = LlavaOnevisionVideoProcessorNoTV
        processor_class = stock_processor_class(_STOCK["processor"])
    if grid_pinpoints is None:
        grid_pinpoints = [[image_size * rows, image_size * cols] for rows in range(1, 7) for cols in range(1, 7)]
    size = {"height": image_size, "width": image_size}
    image_processor = image_class(
        size=size, image_grid_pinpoints=[list(p) for p in grid_pinpoints], **(image_kwargs or {})
    )
    video_processor = video_class(size=size, **(video_kwargs or {}))
    return processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        num_image_tokens=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=vision_aspect_ratio,
        chat_template=chat_template,
    )


def with_video_layout(processor, newline_position: str = "one_token", pool_mode: str = "bilinear"):
    """`processor` (a `LlavaOnevisionProcessor`, in place) expanding each `<video>` into as many tokens as the model's
    LLaVA-NeXT video layout gives it (`modeling.video_layout`: e.g. LLaVA-Video's "grid" newlines, one after every
    pooled row of every frame); the stock layout ("one_token", "bilinear") leaves it the stock processor."""
    from .modeling import video_layout

    layout = video_layout(_Layout(newline_position, pool_mode))
    stock = getattr(type(processor), "vtr_stock", type(processor))
    if layout == ("one_token", "bilinear"):
        processor.__class__ = stock
        return processor
    processor.__class__ = _layout_class(stock)
    processor.video_layout = layout
    return processor


class _Layout:
    def __init__(self, newline_position, pool_mode):
        self.mm_newline_position, self.mm_spatial_pool_mode = newline_position, pool_mode


@functools.cache
def _layout_class(stock: type) -> type:
    from .modeling import pooled_side, video_tokens

    class VideoLayout(stock):
        vtr_stock = stock

        def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs) -> str:
            video = video_inputs["pixel_values_videos"][video_idx]
            frames = len(video) if isinstance(video, (list, tuple)) else video.shape[0]
            newline, pool = self.video_layout
            side = pooled_side(math.isqrt(self.num_image_tokens), pool)
            return self.video_token * video_tokens(frames, side, side, newline)

        def _get_num_multimodal_tokens(self, image_sizes=None, video_sizes=None, **kwargs):
            data = super()._get_num_multimodal_tokens(image_sizes=image_sizes, video_sizes=video_sizes, **kwargs)
            if video_sizes is not None:
                newline, pool = self.video_layout
                side = pooled_side(math.isqrt(self.num_image_tokens), pool)
                counts = [video_tokens(f, side, side, newline) for f, _, _ in video_sizes]
                data = dataclasses.replace(data, num_video_tokens=counts)
            return data

    VideoLayout.__name__ = VideoLayout.__qualname__ = stock.__name__  # saved configs name the stock class
    return VideoLayout


def save_processor(processor, path) -> None:
    """`processor.save_pretrained(path)`, the configs naming the stock classes (as a hub checkpoint does), so
    `AutoProcessor` loads it where torchvision exists and `load_processor` falls back without."""
    processor.save_pretrained(path)
    name_stock_classes(path, image=_STOCK["image"], video=_STOCK["video"], processor=_STOCK["processor"])


def load_processor(pretrained: str, **kwargs):
    """The checkpoint's processor (hub id or local folder): the stock `AutoProcessor`, except for a
    LLaVA-OneVision checkpoint where torchvision cannot load: then the stock `LlavaOnevisionProcessor` class
    built from the checkpoint's saved configs, tokenizer and chat template (one notice line on stderr).
    `kwargs` go to transformers (hub options: revision, cache_dir, ...)."""
    from transformers import AutoProcessor

    check_checkpoint(pretrained, PROCESSOR_FILES)
    onevision = _is_onevision(pretrained, **kwargs)
    if torchvision_available() or not onevision:
        processor = AutoProcessor.from_pretrained(pretrained, **kwargs)
    else:
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )

        processor = from_saved(
            pretrained,
            _STOCK["processor"],
            LlavaOnevisionImageProcessorPil,
            LlavaOnevisionVideoProcessorNoTV,
            family="LLaVA-OneVision",
            **kwargs,
        )
    layout = _saved_video_layout(pretrained, **kwargs) if onevision else None
    return with_video_layout(processor, *layout) if layout else processor


def _saved_video_layout(pretrained, **kwargs) -> tuple[str, str] | None:
    """The video layout the checkpoint's model config names (LLaVA-Video's), None without a model config."""
    from transformers import AutoConfig

    from .modeling import video_layout

    try:
        config = AutoConfig.from_pretrained(pretrained, **kwargs)
    except (OSError, ValueError):  # a folder of processor files only
        return None
    return video_layout(config)


def _is_onevision(pretrained, **kwargs) -> bool:
    """From the model config's model_type; for a folder of processor files only, from the processor class its
    processor_config.json names."""
    try:
        return checkpoint_model_type(pretrained, **kwargs) == "llava_onevision"
    except (OSError, ValueError):  # no model config
        file = Path(pretrained) / "processor_config.json"
        try:
            return file.is_file() and json.loads(file.read_text()).get("processor_class") == _STOCK["processor"]
        except ValueError:  # not JSON: AutoProcessor names the problem
            return False
