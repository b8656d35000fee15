"""The Video-LLaVA processor, also where torchvision is missing.

transformers' `VideoLlavaVideoProcessor` is a torchvision-backed video processor: without torchvision it
cannot even be constructed, so `AutoProcessor.from_pretrained` fails on every Video-LLaVA checkpoint.
`load_processor` keeps the stock path where torchvision imports; elsewhere it builds the stock
`VideoLlavaProcessor` around `FrameVideoProcessor`, which runs each frame through the checkpoint's own
(PIL/numpy) `VideoLlavaImageProcessor` with the video processor's settings: resize the shortest edge,
centre crop, rescale, CLIP normalisation. Token counts and tensor layout are the stock ones
(`pixel_values_videos` [videos, frames, 3, H, W]; 257 tokens per 224 px frame); pixel values can differ
from torchvision's resize in the last bits.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from transformers import VideoLlavaProcessor
from transformers.image_processing_utils import BatchFeature
from transformers.video_processing_utils import VideoProcessorMixin

from .model_args import PROCESSOR_FILES, check_checkpoint

__all__ = ["FrameVideoProcessor", "VideoLlavaFrameProcessor", "load_processor"]

VIDEO_CONFIG = "video_preprocessor_config.json"
# The settings of transformers' VideoLlavaVideoProcessor (video_processing_video_llava.py) this class honours.
_FRAME_KEYS = (
    "size",
    "crop_size",
    "do_resize",
    "do_center_crop",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "resample",
    "do_convert_rgb",
)
_WARNED = False  # the fallback announces itself once per process
_STOCK_DEFAULTS = {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}}


class FrameVideoProcessor(VideoProcessorMixin):
    """Video frames -> `pixel_values_videos` [videos, frames, 3, H, W] through a `VideoLlavaImageProcessor`.

    Videos: one uint8 array [t, h, w, 3] (or a list of frames) per video, as `video_io.load_video` returns
    them. Saved as the stock `VideoLlavaVideoProcessor` config, so a folder written here loads with the
    stock class where torchvision exists.
    """

    model_input_names = ["pixel_values_videos"]

    def __init__(self, **settings):
        from transformers import VideoLlavaImageProcessor

        settings = {**_STOCK_DEFAULTS, **{k: v for k, v in settings.items() if k in _FRAME_KEYS}}
        super().__init__()
        self.settings = settings
        self.frame_processor = VideoLlavaImageProcessor(**settings)

    def __call__(self, videos, return_tensors=None, **kwargs):
        return self.preprocess(videos, return_tensors=return_tensors)

    def preprocess(self, videos, return_tensors=None, **kwargs):
        if isinstance(videos, np.ndarray) and videos.ndim == 4:
            videos = [videos]
        if not isinstance(videos, (list, tuple)) or not videos:
            raise ValueError("videos: expected a uint8 array [frames, height, width, 3] or a list of them")
        out = []
        for i, video in enumerate(videos):
            frames = list(video)  # an array [t, h, w, 3] or a list of frames
            if not frames:
                raise ValueError(f"video {i} has no frames")
            pixels = self.frame_processor(frames, return_tensors="np", return_legacy_image_output=False)
            out.append(pixels["pixel_values"])
        if len({v.shape for v in out}) > 1:
            raise ValueError(f"videos in one call must have the same number of frames; got {[v.shape[0] for v in out]}")
        return BatchFeature({"pixel_values_videos": np.stack(out)}, tensor_type=return_tensors)

    def to_dict(self):
        data = {k: (v.value if hasattr(v, "value") else v) for k, v in self.frame_processor.to_dict().items()}
        data = {k: v for k, v in data.items() if k in _FRAME_KEYS}
        return {**data, "video_processor_type": "VideoLlavaVideoProcessor", "processor_class": "VideoLlavaProcessor"}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        path = Path(save_directory) / VIDEO_CONFIG
        path.write_text(self.to_json_string())
        return [str(path)]


class VideoLlavaFrameProcessor(VideoLlavaProcessor):
    """The stock `VideoLlavaProcessor`, accepting a `FrameVideoProcessor` (transformers checks the video
    processor's class against a registry that is a placeholder without torchvision). Saves as the stock class."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and isinstance(argument, FrameVideoProcessor):
            return FrameVideoProcessor
        return super().check_argument_for_proper_class(argument_name, argument)

    def to_dict(self):
        return {**super().to_dict(), "processor_class": "VideoLlavaProcessor"}


def _stock_available() -> bool:
    """torchvision really imports (an installed one built for another torch fails at import time)."""
    try:
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


def _read_json(pretrained: str, name: str, **hub) -> dict:
    from transformers.utils import cached_file

    path = cached_file(pretrained, name, _raise_exceptions_for_missing_entries=False, **hub)
    return json.loads(Path(path).read_text()) if path else {}


def load_processor(pretrained: str, **kwargs):
    """The checkpoint's `VideoLlavaProcessor` (hub id or local folder).

    With torchvision: `AutoProcessor.from_pretrained` as is. Without: the stock `VideoLlavaProcessor` built
    from the checkpoint's tokenizer, image processor, processor settings and chat template, with
    `FrameVideoProcessor` for videos (one line says so, once)."""
    from transformers import AutoProcessor, AutoTokenizer, VideoLlavaImageProcessor

    check_checkpoint(pretrained, PROCESSOR_FILES)
    if _stock_available():
        return AutoProcessor.from_pretrained(pretrained, **kwargs)
    global _WARNED
    if not _WARNED:
        print(
            "videollava.vtr: torchvision is not installed; videos go through the PIL frame processor", file=sys.stderr
        )
        _WARNED = True
    hub = {k: v for k, v in kwargs.items() if k in ("revision", "cache_dir", "token", "local_files_only")}
    # processor_config.json holds the sub-processors' settings in newer checkpoints; older ones keep them
    # in preprocessor_config.json (images) and video_preprocessor_config.json (videos)
    settings = _read_json(pretrained, "processor_config.json", **hub)
    image_settings = settings.get("image_processor") or _read_json(pretrained, "preprocessor_config.json", **hub)
    video_settings = settings.get("video_processor") or _read_json(pretrained, VIDEO_CONFIG, **hub) or image_settings
    image_processor = VideoLlavaImageProcessor(**{k: v for k, v in image_settings.items() if k in _FRAME_KEYS})
    keys = ("patch_size", "vision_feature_select_strategy", "num_additional_image_tokens")
    return VideoLlavaFrameProcessor(
        image_processor=image_processor,
        video_processor=FrameVideoProcessor(**video_settings),
        tokenizer=AutoTokenizer.from_pretrained(pretrained, **hub),
        chat_template=_chat_template(pretrained, **hub),
        **{k: settings[k] for k in keys if settings.get(k) is not None},
    )


def _chat_template(pretrained: str, **hub) -> str | None:
    from transformers.utils import cached_file

    path = cached_file(pretrained, "chat_template.jinja", _raise_exceptions_for_missing_entries=False, **hub)
    if path:
        return Path(path).read_text()
    data = _read_json(pretrained, "chat_template.json", **hub)
    return data.get("chat_template")
