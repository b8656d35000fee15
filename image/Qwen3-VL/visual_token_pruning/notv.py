"""Stock transformers processors where torchvision cannot load: the pieces a fork's processing.py builds them from.

transformers' video processors (`BaseVideoProcessor` subclasses) and fast image processors are torchvision
backends, and a processor's class check looks its video processor up through names that exist only with
torchvision. Where torchvision is missing (or installed but unable to load beside this torch), a fork builds
the same stock processor from:

- `NoTVVideo`, then the stock video class, then `TorchOnlyBackend` (in that order of bases): the stock video
  processor with only its torchvision calls replaced. Resizing by `torch.nn.functional.interpolate` (the
  resample mode the processor asks for, antialiased: the kernel torchvision itself calls), normalisation in
  plain torch, and file decoding by `video_io` (decord, PyAV fallback; `read_video`). Frame sampling, sizes
  and the output layout are the stock methods. A stock video module that imports torchvision itself is
  imported under `torchvision_placeholder()`;
- `stock_processor_class(name)`: the stock processor class, with only its class check widened to accept
  those video processors and the stock class's name saved;
- `from_saved(...)`: that processor built from a checkpoint's saved configs, tokenizer and chat template
  (one notice line on stderr);
- `name_stock_classes(path, ...)`: a saved processor's configs name the stock classes, as a hub checkpoint
  does, so `AutoProcessor` loads it where torchvision is.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import sys
import types
from pathlib import Path

import torch
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_utils import PILImageResampling
from transformers.video_utils import VideoMetadata

from . import video_io

NOTICE = (
    "{package}: torchvision is unavailable, so the {family} processor uses the PIL image processor "
    "and a torch/decord video processor (same outputs layout as the stock one)"
)
#: PIL resample filter -> torch.nn.functional.interpolate mode (torchvision's own mapping, for these three)
_MODES = {
    PILImageResampling.NEAREST: "nearest-exact",
    PILImageResampling.BILINEAR: "bilinear",
    PILImageResampling.BICUBIC: "bicubic",
}


def torchvision_available() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


class TorchOnlyBackend(TorchvisionBackend):
    """The two torchvision calls the video path makes, in plain torch."""

    def resize(self, image: torch.Tensor, size, resample=None, antialias: bool = True, **kwargs) -> torch.Tensor:
        if not (size.height and size.width):
            raise ValueError(f"resize needs an explicit height and width, got {size}")
        # None: torchvision's default, bilinear
        resample = PILImageResampling.BILINEAR if resample is None else PILImageResampling(resample)
        if resample not in _MODES:
            raise ValueError(
                f"resample={resample.name} needs torchvision; without it the video processor resizes with "
                f"{', '.join(r.name for r in _MODES)}"
            )
        mode = _MODES[resample]
        shape = image.shape
        flat = image.reshape(-1, *shape[-3:])
        smooth = {} if mode == "nearest-exact" else {"antialias": antialias, "align_corners": False}
        out = torch.nn.functional.interpolate(
            flat if flat.dtype == torch.uint8 else flat.float(),
            size=(size.height, size.width),
            mode=mode,
            **smooth,
        )
        return out.reshape(*shape[:-2], size.height, size.width)

    def normalize(self, image: torch.Tensor, mean, std, inplace: bool = False, **kwargs) -> torch.Tensor:
        mean = torch.as_tensor(mean, dtype=image.dtype, device=image.device).reshape(-1, 1, 1)
        std = torch.as_tensor(std, dtype=image.dtype, device=image.device).reshape(-1, 1, 1)
        return (image - mean) / std


class NoTVVideo:
    """What every torchvision-free video processor adds to its stock class (listed first among its bases)."""

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


@contextlib.contextmanager
def torchvision_placeholder():
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


def stock_video_class(module: str, name: str):
    """The stock video processor class `name` of transformers' `module`; a module that imports torchvision
    (for type annotations) is imported under `torchvision_placeholder()` where torchvision cannot load."""
    try:
        return getattr(importlib.import_module(module), name)
    except Exception:  # torchvision missing, or installed but unable to load beside this torch
        sys.modules.pop(module, None)
        with torchvision_placeholder():
            return getattr(importlib.import_module(module), name)


@functools.cache
def stock_processor_class(name: str):
    """The stock processor class `name` (e.g. "Qwen3VLProcessor"); only its class check, which looks the video
    processor up through torchvision-backed names, also accepts the `NoTVVideo` video processors, and it
    saves the stock class's name."""
    import transformers

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and isinstance(argument, NoTVVideo):
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


def from_saved(
    pretrained,
    processor_class: str,
    image_class,
    video_class,
    *,
    family: str,
    video_defaults: dict | None = None,
    **kwargs,
):
    """The stock processor `processor_class` built from a checkpoint's saved configs without torchvision:
    `image_class` (a PIL image processor) and `video_class` (a `NoTVVideo` one) from the saved image and video
    processor configs (`video_defaults` fill keys the video config lacks; no video config: the class's
    defaults), the tokenizer, and the processor config with its chat template (else the tokenizer's).
    Prints one notice line naming `family` to stderr. `kwargs`: hub options, as for `from_pretrained`."""
    from transformers import AutoTokenizer
    from transformers.image_processing_base import ImageProcessingMixin
    from transformers.video_processing_utils import BaseVideoProcessor

    print(NOTICE.format(package=__package__, family=family), file=sys.stderr)
    cls = stock_processor_class(processor_class)
    image_dict = _saved_config(ImageProcessingMixin.get_image_processor_dict, pretrained, kwargs, "image")
    video_dict = _saved_config(BaseVideoProcessor.get_video_processor_dict, pretrained, kwargs, "video", OSError)
    parts = {
        "image_processor": image_class(**image_dict),
        "tokenizer": AutoTokenizer.from_pretrained(pretrained, **kwargs),
        "video_processor": video_class(**{**(video_defaults or {}), **video_dict}),
    }
    processor_dict, rest = cls.get_processor_dict(pretrained, **kwargs)
    if not processor_dict.get("chat_template"):
        processor_dict["chat_template"] = getattr(parts["tokenizer"], "chat_template", None)
    return cls.from_args_and_dict([parts[name] for name in cls.get_attributes()], processor_dict, **rest)


def _saved_config(read, pretrained, kwargs: dict, kind: str, missing=()) -> dict:
    """A sub-processor's saved config without the class names (they name torchvision-backed classes); {}
    when the checkpoint has none and `missing` is the error that says so."""
    try:
        data, _ = read(pretrained, **kwargs)
    except missing:
        return {}
    return {k: v for k, v in data.items() if k not in (f"{kind}_processor_type", "processor_class")}


def name_stock_classes(path, *, image: str, video: str, processor: str) -> None:
    """Name the stock classes in a processor saved at `path`, as a hub checkpoint does: `image` as the image
    processor's type, `video` as the video processor's, `processor` as the processor class (in each config
    file the folder holds, and in the configs processor_config.json nests)."""
    path = Path(path)
    keys = {"image_processor": ("image_processor_type", image), "video_processor": ("video_processor_type", video)}
    for name, key, value in (
        ("preprocessor_config.json", *keys["image_processor"]),
        ("video_preprocessor_config.json", *keys["video_processor"]),
        ("processor_config.json", "processor_class", processor),
    ):
        file = path / name
        if file.is_file():
            data = json.loads(file.read_text())
            data[key] = value
            for nested, (nested_key, nested_value) in keys.items():
                if isinstance(data.get(nested), dict):
                    data[nested][nested_key] = nested_value
            file.write_text(json.dumps(data, indent=2))
