"""Qwen3-VL's processor where torchvision cannot load.

The stock `Qwen3VLProcessor` needs `Qwen3VLVideoProcessor` (a torchvision backend) and, by default, the
fast image processor (torchvision too). Where torchvision imports, `load_processor` returns the stock
processor unchanged. Otherwise it builds the same `Qwen3VLProcessor` class (so the prompt expansion, the
per-frame `<t seconds>` timestamps and `mm_token_type_ids` are the stock code) around:

- images: transformers' PIL `Qwen2VLImageProcessorPil` (the stock slow image processor);
- videos: `Qwen3VLVideoProcessorNoTV`, the stock `Qwen3VLVideoProcessor` with only its torchvision calls
  replaced: resizing by `torch.nn.functional.interpolate` (bicubic, antialiased: the kernel torchvision
  itself calls), normalisation in plain torch, and file decoding by `video_io` (decord, PyAV fallback).
  Frame sampling, `smart_resize`, the temporal padding and the patch layout are the stock methods.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers.image_processing_backends import TorchvisionBackend
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
from transformers.video_utils import VideoMetadata

from . import video_io
from .model_args import PROCESSOR_FILES, check_checkpoint

_FALLBACK_NOTICE = (
    "visual_token_pruning: torchvision is unavailable, so Qwen3-VL's processor uses the PIL image processor and "
    "a torch/decord video processor (same outputs layout as the stock one)"
)


class _TorchOnlyBackend(TorchvisionBackend):
    """The two torchvision calls the video path makes, in plain torch."""

    def resize(self, image: torch.Tensor, size, resample=None, antialias: bool = True, **kwargs) -> torch.Tensor:
        if not (size.height and size.width):
            raise ValueError(f"resize needs an explicit height and width, got {size}")
        shape = image.shape
        flat = image.reshape(-1, *shape[-3:])
        out = torch.nn.functional.interpolate(
            flat if flat.dtype == torch.uint8 else flat.float(),
            size=(size.height, size.width),
            mode="bicubic",
            antialias=antialias,
            align_corners=False,
        )
        return out.reshape(*shape[:-2], size.height, size.width)

    def normalize(self, image: torch.Tensor, mean, std, inplace: bool = False, **kwargs) -> torch.Tensor:
        mean = torch.as_tensor(mean, dtype=image.dtype, device=image.device).reshape(-1, 1, 1)
        std = torch.as_tensor(std, dtype=image.dtype, device=image.device).reshape(-1, 1, 1)
        return (image - mean) / std


class Qwen3VLVideoProcessorNoTV(Qwen3VLVideoProcessor, _TorchOnlyBackend):
    """The stock Qwen3-VL video processor without torchvision (see the module docstring).

    Videos may be file paths (decoded with `video_io`, frames sampled by the stock `sample_frames`: `fps`
    frames per second, at least `min_frames`, at most `max_frames`, or exactly `num_frames`), uint8 arrays
    `[t, h, w, 3]`, or lists of PIL frames; pass `video_metadata` with arrays to get true timestamps."""

    def convert_to_rgb(self, video: torch.Tensor):
        if video.shape[-3] == 1:
            return video.expand(*video.shape[:-3], 3, *video.shape[-2:])
        if video.shape[-3] == 4:
            return video[..., :3, :, :]
        return video

    def fetch_videos(self, video_url_or_urls, sample_indices_fn=None):
        if isinstance(video_url_or_urls, (list, tuple)):
            return list(zip(*[self.fetch_videos(x, sample_indices_fn=sample_indices_fn) for x in video_url_or_urls]))
        return read_video(video_url_or_urls, sample_indices_fn)

    def to_dict(self):
        out = super().to_dict()
        out["video_processor_type"] = "Qwen3VLVideoProcessor"  # what the stock loader reads back
        return out


def _processor_class():
    from transformers import Qwen3VLProcessor

    class Qwen3VLProcessorNoTV(Qwen3VLProcessor):
        """The stock processor; only its class check, which looks the video processor up through
        torchvision-backed mappings, accepts `Qwen3VLVideoProcessorNoTV`."""

        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and isinstance(argument, Qwen3VLVideoProcessorNoTV):
                return type(argument)
            return super().check_argument_for_proper_class(argument_name, argument)

    return Qwen3VLProcessorNoTV


def read_video(path, sample_indices_fn=None):
    """Decode the frames of `path` chosen by `sample_indices_fn(metadata=VideoMetadata)` (all frames when
    None), with decord, else PyAV. Returns (uint8 [t, h, w, 3] array, VideoMetadata)."""
    chosen = {}

    def pick(total, fps):
        metadata = VideoMetadata(total_num_frames=total, fps=fps or None, duration=total / fps if fps else None)
        indices = range(total) if sample_indices_fn is None else sample_indices_fn(metadata=metadata)
        chosen["metadata"] = metadata
        return [int(i) for i in indices]

    clip = video_io.load_video(path, pick=pick)
    metadata = chosen["metadata"]
    metadata.frames_indices = list(clip.indices)
    metadata.height, metadata.width = clip.frames.shape[1:3]
    metadata.video_backend = clip.backend
    return clip.frames, metadata


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
):
    """A `Qwen3VLProcessor` around the PIL image processor and the torchvision-free video processor."""
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
    video_processor = Qwen3VLVideoProcessorNoTV(
        patch_size=patch_size,
        merge_size=merge_size,
        temporal_patch_size=temporal_patch_size,
        cap_pixels_per_frame=False,
        **video_size,
        **(video_kwargs or {}),
    )
    return _processor_class()(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=chat_template,
    )


def stock_layout(path) -> None:
    """Name the stock classes in a saved processor's configs, as a hub checkpoint does."""
    path = Path(path)
    for name, key, value in (
        ("preprocessor_config.json", "image_processor_type", "Qwen2VLImageProcessor"),
        ("video_preprocessor_config.json", "video_processor_type", "Qwen3VLVideoProcessor"),
        ("processor_config.json", "processor_class", "Qwen3VLProcessor"),
    ):
        file = path / name
        if file.is_file():
            data = json.loads(file.read_text())
            data[key] = value
            file.write_text(json.dumps(data, indent=2))


def _torchvision_available() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


def load_processor(pretrained: str, min_pixels: int | None = None, max_pixels: int | None = None, **kwargs):
    """The checkpoint's processor: the stock `AutoProcessor` where torchvision imports; else the same
    `Qwen3VLProcessor` built from the checkpoint's tokenizer and processor configs (one notice line).
    `min_pixels` / `max_pixels` replace that bound of the IMAGE processor's pixel budget; the bound not given
    stays the checkpoint's, and videos keep the checkpoint's video budget."""
    from transformers import AutoProcessor, AutoTokenizer

    check_checkpoint(pretrained, PROCESSOR_FILES)
    if _torchvision_available():
        processor = AutoProcessor.from_pretrained(pretrained, **kwargs)
    else:
        from transformers.image_processing_base import ImageProcessingMixin
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        print(_FALLBACK_NOTICE, file=sys.stderr)
        image_dict, _ = ImageProcessingMixin.get_image_processor_dict(pretrained, **kwargs)
        image_dict = {k: v for k, v in image_dict.items() if k not in ("image_processor_type", "processor_class")}
        image_processor = Qwen2VLImageProcessorPil(**image_dict)
        video_processor = Qwen3VLVideoProcessorNoTV(**_video_dict(pretrained, **kwargs))
        tokenizer = AutoTokenizer.from_pretrained(pretrained, **kwargs)
        template = getattr(tokenizer, "chat_template", None) or _chat_template(pretrained)
        processor = _processor_class()(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=video_processor,
            chat_template=template,
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


def _video_dict(pretrained, **kwargs) -> dict:
    from transformers.video_processing_utils import BaseVideoProcessor

    try:
        data, _ = BaseVideoProcessor.get_video_processor_dict(pretrained, **kwargs)
    except OSError:  # no video config in the checkpoint: the stock defaults
        data = {}
    data = {k: v for k, v in data.items() if k not in ("video_processor_type", "processor_class")}
    data.setdefault("cap_pixels_per_frame", False)
    return data


def _chat_template(pretrained) -> str | None:
    for name in ("chat_template.jinja", "chat_template.json"):
        file = Path(pretrained) / name
        if file.is_file():
            text = file.read_text()
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return None
