"""The Qwen-VL processors where torchvision cannot load.

The stock `Qwen3VLProcessor`, `Qwen2_5_VLProcessor` and `Qwen2VLProcessor` need their video processor
(`Qwen3VLVideoProcessor` / `Qwen2VLVideoProcessor`, torchvision backends) and, by default, the fast image
processor (torchvision too). Where torchvision imports, `load_processor` returns the stock processor
unchanged. Otherwise it builds the same stock processor class (so the prompt expansion, Qwen3-VL's per-frame
`<t seconds>` timestamps, Qwen2.5-VL's `second_per_grid_ts` and `mm_token_type_ids` are the stock code)
around:

- images: transformers' PIL `Qwen2VLImageProcessorPil` (the stock slow image processor);
- videos: the stock video processor with only its torchvision calls replaced (`NoTV` subclasses):
  resizing by `torch.nn.functional.interpolate` (bicubic, antialiased: the kernel torchvision itself
  calls), normalisation in plain torch, and file decoding by `video_io` (decord, PyAV fallback). Frame
  sampling, `smart_resize`, the temporal padding and the patch layout are the stock methods.
  `Qwen2VLVideoProcessor`'s module imports torchvision only for type annotations; where torchvision is
  missing it is imported under placeholder modules that are removed again right after.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import types
from pathlib import Path

import torch
from transformers.image_processing_backends import TorchvisionBackend
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
from transformers.video_utils import VideoMetadata

from . import video_io
from .model_args import PROCESSOR_FILES, check_checkpoint, checkpoint_model_type

_FALLBACK_NOTICE = (
    "visual_token_pruning: torchvision is unavailable, so the {family} processor uses the PIL image processor "
    "and a torch/decord video processor (same outputs layout as the stock one)"
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


class _NoTVVideo:
    """What every torchvision-free video processor here adds to its stock class (listed first)."""

    stock_name = ""  # the stock class, as saved configs name it

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
        out["video_processor_type"] = self.stock_name  # what the stock loader reads back
        return out


class Qwen3VLVideoProcessorNoTV(_NoTVVideo, Qwen3VLVideoProcessor, _TorchOnlyBackend):
    """The stock Qwen3-VL video processor without torchvision (see the module docstring).

    Videos may be file paths (decoded with `video_io`, frames sampled by the stock `sample_frames`: `fps`
    frames per second, at least `min_frames`, at most `max_frames`, or exactly `num_frames`), uint8 arrays
    `[t, h, w, 3]`, or lists of PIL frames; pass `video_metadata` with arrays to get true timestamps."""

    stock_name = "Qwen3VLVideoProcessor"


@contextlib.contextmanager
def _torchvision_placeholder():
    """Importable `torchvision.transforms.v2.functional` placeholders for the duration of one import (only
    where torchvision is missing or cannot load); afterwards `sys.modules` holds what it held before."""
    names = [
        "torchvision",
        "torchvision.transforms",
        "torchvision.transforms.v2",
        "torchvision.transforms.v2.functional",
    ]
    saved = {name: sys.modules[name] for name in names if name in sys.modules}  # a partly loaded broken install
    for name in names:
        sys.modules[name] = types.ModuleType(name)
    try:
        yield
    finally:
        for name in names:
            if name in saved:
                sys.modules[name] = saved[name]
            else:
                sys.modules.pop(name, None)


@functools.cache
def qwen2_vl_video_class():
    """`Qwen2VLVideoProcessorNoTV`: the stock Qwen2-VL / Qwen2.5-VL video processor without torchvision."""
    try:
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    except Exception:  # torchvision missing, or installed but unable to load beside this torch
        sys.modules.pop("transformers.models.qwen2_vl.video_processing_qwen2_vl", None)
        with _torchvision_placeholder():
            from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    class Qwen2VLVideoProcessorNoTV(_NoTVVideo, Qwen2VLVideoProcessor, _TorchOnlyBackend):
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
    "qwen2_5_vl": "Qwen2_5_VLProcessor",
    "qwen2_vl": "Qwen2VLProcessor",
}


@functools.cache
def _processor_class(name: str = "Qwen3VLProcessor"):
    """The stock processor class `name`; only its class check, which looks the video processor up through
    torchvision-backed mappings, also accepts this module's torchvision-free video processors, and it saves
    the stock class's name."""
    import transformers

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and isinstance(argument, _NoTVVideo):
            return type(argument)
        return super(cls, self).check_argument_for_proper_class(argument_name, argument)

    def to_dict(self):
        out = super(cls, self).to_dict()
        out["processor_class"] = name  # what AutoProcessor reads back: the stock class
        return out

    cls = type(f"{name}NoTV", (getattr(transformers, name),), {})
    cls.check_argument_for_proper_class = check_argument_for_proper_class
    cls.to_dict = to_dict
    return cls


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
    return _processor_class(processor_class)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=chat_template,
    )


def stock_layout(path, processor_class: str = "Qwen3VLProcessor") -> None:
    """Name the stock classes in a saved processor's configs, as a hub checkpoint does."""
    path = Path(path)
    video = "Qwen3VLVideoProcessor" if processor_class == "Qwen3VLProcessor" else "Qwen2VLVideoProcessor"
    for name, key, value in (
        ("preprocessor_config.json", "image_processor_type", "Qwen2VLImageProcessor"),
        ("video_preprocessor_config.json", "video_processor_type", video),
        ("processor_config.json", "processor_class", processor_class),
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
    """The checkpoint's processor: the stock `AutoProcessor` where torchvision imports; else the same stock
    processor class (Qwen3-VL, Qwen2.5-VL or Qwen2-VL, from the checkpoint's model_type) built from the
    checkpoint's tokenizer and processor configs (one notice line).
    `min_pixels` / `max_pixels` replace that bound of the IMAGE processor's pixel budget; the bound not given
    stays the checkpoint's, and videos keep the checkpoint's video budget."""
    from transformers import AutoProcessor, AutoTokenizer

    check_checkpoint(pretrained, PROCESSOR_FILES)
    if _torchvision_available():
        processor = AutoProcessor.from_pretrained(pretrained, **kwargs)
    else:
        from transformers.image_processing_base import ImageProcessingMixin
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        processor_class = _processor_class_of(pretrained, **kwargs)
        family, video_class = FAMILIES[processor_class]
        print(_FALLBACK_NOTICE.format(family=family), file=sys.stderr)
        image_dict, _ = ImageProcessingMixin.get_image_processor_dict(pretrained, **kwargs)
        image_dict = {k: v for k, v in image_dict.items() if k not in ("image_processor_type", "processor_class")}
        image_processor = Qwen2VLImageProcessorPil(**image_dict)
        video_processor = video_class()(**_video_dict(pretrained, **kwargs))
        tokenizer = AutoTokenizer.from_pretrained(pretrained, **kwargs)
        template = getattr(tokenizer, "chat_template", None) or _chat_template(pretrained)
        processor = _processor_class(processor_class)(
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


def _processor_class_of(pretrained, **kwargs) -> str:
    model_type = checkpoint_model_type(pretrained, **kwargs)
    if model_type not in PROCESSOR_FOR:
        raise ValueError(
            f"{pretrained} is a {model_type!r} checkpoint; this fork's processors serve {sorted(PROCESSOR_FOR)}"
        )
    return PROCESSOR_FOR[model_type]


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
