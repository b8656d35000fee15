"""`load_processor`: the stock `InternVLProcessor` plus `frame_index`, also where torchvision cannot load.

transformers' InternVL video processor (and the fast image processor) import torchvision, so without it
`AutoProcessor.from_pretrained` fails even for images. Where torchvision imports, `load_processor` loads the stock
sub-processors into `VTRInternVLProcessor` (the stock processor that also returns `frame_index` when a call has
videos: which `<img>` blocks are video frames, for the VTR model's video methods). Elsewhere it builds the same
processor from the checkpoint's own files with the PIL image processor (`GotOcr2ImageProcessorPil`: the same
tiling, `crop_to_patches`, and statistics) and `InternVLVideoProcessorPil` below, and says so in one line.
Prompts, token counts and the other returned fields are the stock ones.

Videos: InternVL gives every frame one tile (the frame resized to the tile size, no cropping) and writes
`FrameN: <img><IMG_CONTEXT>*256</img>` per frame, frames joined by newlines. A video may be a file path
(decoded here with decord, PyAV as fallback: `video_io.py`; never torchvision), a uint8 array
[frames, h, w, 3], or a list of PIL frames.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import InternVLProcessor
from transformers.image_processing_utils import BatchFeature
from transformers.video_processing_utils import VideoProcessorMixin
from transformers.video_utils import make_batched_videos

from .model_args import PROCESSOR_FILES, check_checkpoint

HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "revision", "token", "subfolder")


def torchvision_imports() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # a wheel built against another torch fails with all kinds of errors
        return False
    return True


class InternVLVideoProcessorPil(VideoProcessorMixin):
    """The InternVL video processor without torchvision: each frame resized to one tile (bicubic), rescaled
    and normalised by the PIL image processor, exactly as a single-tile image. Returns
    `pixel_values_videos` [videos, frames, 3, tile, tile]; file paths are decoded to `num_frames` frames
    sampled uniformly (default 8)."""

    model_input_names = ["pixel_values_videos"]

    def __init__(self, image_processor=None, num_frames: int | None = None, **kwargs):
        super().__init__(**{k: v for k, v in kwargs.items() if k in ("size", "image_mean", "image_std")})
        if image_processor is None:
            from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

            image_processor = GotOcr2ImageProcessorPil(**kwargs)
        self.image_processor = image_processor
        self.num_frames = num_frames

    def to_dict(self):
        return {"video_processor_type": type(self).__name__, "num_frames": self.num_frames}

    def preprocess(self, videos, num_frames: int | None = None, return_tensors=None, **kwargs) -> BatchFeature:
        from .video_io import load_video

        num_frames = num_frames if num_frames is not None else self.num_frames
        if isinstance(videos, Path):
            videos = str(videos)
        if isinstance(videos, (list, tuple)):
            videos = [str(v) if isinstance(v, Path) else v for v in videos]
        clips = []
        for video in make_batched_videos(videos):
            if isinstance(video, str):
                video = load_video(video, num_frames=num_frames).frames
            elif num_frames is not None and len(video) > num_frames:
                picks = np.linspace(0, len(video) - 1, num_frames).round().astype(int)
                video = video[picks]
            frames = video.cpu().numpy() if isinstance(video, torch.Tensor) else np.asarray(video)
            if frames.ndim != 4 or frames.shape[0] == 0:
                raise ValueError(f"a video must be frames [t, h, w, 3] (or a file path); got shape {frames.shape}")
            out = self.image_processor(list(frames), crop_to_patches=False, return_tensors="pt")
            clips.append(out["pixel_values"])
        if len({c.shape[0] for c in clips}) > 1:
            raise ValueError(
                f"videos of one batch must have the same number of frames, got {[c.shape[0] for c in clips]}; "
                "pass num_frames"
            )
        return BatchFeature({"pixel_values_videos": torch.stack(clips)}, tensor_type=return_tensors)


class VTRInternVLProcessor(InternVLProcessor):
    """The stock `InternVLProcessor`, plus `frame_index` when a call has videos: [blocks] long, for each `<img>` block
    of the batch in batch and prompt order, its frame's index in its video (0, 1, ...), -1 for an image; e.g. an
    image then a 4-frame video: [-1, 0, 1, 2, 3]. The stock processor merges video frames into `pixel_values` beside
    the image tiles, so only it knows which blocks are frames; video reduction methods need that
    (`VTRInternVLForConditionalGeneration`'s forward argument). A stock model's forward ignores the field, its
    generate() refuses it: drop it there."""

    def __call__(self, images=None, text=None, videos=None, **kwargs) -> BatchFeature:
        inputs = super().__call__(images=images, text=text, videos=videos, **kwargs)
        if videos is None:
            return inputs
        index = self._frame_index([text] if isinstance(text, str) else text, inputs["input_ids"])
        text_kwargs = self._merge_kwargs(tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)["text_kwargs"]
        return BatchFeature({**inputs, "frame_index": index}, tensor_type=text_kwargs.get("return_tensors"))

    def _frame_index(self, texts: list[str], input_ids) -> list[int]:
        """Per `<img>` block: -1 for an image (one block of all its tiles), 0..frames-1 for a video (a block per
        frame), in the order the prompts place them, as the stock processor merges their pixels. The videos of one
        call have the same number of frames (the processors stack them): the blocks that are not images'."""
        order = [match.lastgroup for text in texts for match in self.multimodal_pattern.finditer(text)]
        blocks = sum(int(np.count_nonzero(np.asarray(row) == self.start_image_token_id)) for row in input_ids)
        frames = (blocks - order.count("image")) // order.count("video")
        return [frame for kind in order for frame in ([-1] if kind == "image" else range(frames))]


class InternVLProcessorPil(VTRInternVLProcessor):
    """`VTRInternVLProcessor`; only the sub-processor class check differs: transformers looks its video base class
    up through a torchvision-only registry, so it would refuse any video processor here."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and isinstance(argument, InternVLVideoProcessorPil):
            return InternVLVideoProcessorPil
        return super().check_argument_for_proper_class(argument_name, argument)


def _video_config(pretrained: str, hub_kwargs: dict) -> dict:
    from transformers.utils import cached_file

    path = cached_file(
        pretrained, "video_preprocessor_config.json", _raise_exceptions_for_missing_entries=False, **hub_kwargs
    )
    return json.loads(Path(path).read_text()) if path else {}


def load_processor(pretrained: str, num_frames: int | None = None, **kwargs):
    """The checkpoint's processor as a `VTRInternVLProcessor` (the stock sub-processors where torchvision imports;
    otherwise the PIL image processor and `InternVLVideoProcessorPil`, announced in one line on stderr). `kwargs`
    go to `from_pretrained` (e.g. `min_patches`/`max_patches` override the tile limits). `num_frames`: frames
    sampled uniformly from a video file (both paths; default: the checkpoint's setting, else 8)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    check_checkpoint(pretrained, PROCESSOR_FILES)
    if torchvision_imports():
        processor = VTRInternVLProcessor.from_pretrained(pretrained, **kwargs)
        if num_frames is not None:  # the stock video processor samples only when asked to
            processor.video_processor.num_frames, processor.video_processor.do_sample_frames = num_frames, True
        return processor
    print(
        "internvl_vtr: torchvision is not importable; using the PIL image processor (GotOcr2ImageProcessorPil) "
        "and a PIL video processor (frames decoded with decord/PyAV)",
        file=sys.stderr,
    )
    hub_kwargs = {k: v for k, v in kwargs.items() if k in HUB_KWARGS}
    image_kwargs = {k: v for k, v in kwargs.items() if k in ("min_patches", "max_patches", "crop_to_patches")}
    image_processor = AutoImageProcessor.from_pretrained(pretrained, backend="pil", **hub_kwargs, **image_kwargs)
    video = _video_config(pretrained, hub_kwargs)
    video_kwargs = {k: video[k] for k in ("size", "image_mean", "image_std", "resample") if k in video}
    tile = type(image_processor)(**{**image_processor.to_dict(), **video_kwargs, "crop_to_patches": False})
    video_processor = InternVLVideoProcessorPil(
        tile, num_frames=num_frames if num_frames is not None else video.get("num_frames")
    )
    tokenizer = AutoTokenizer.from_pretrained(pretrained, **hub_kwargs)
    processor_dict, instantiation = InternVLProcessor.get_processor_dict(pretrained, **hub_kwargs)
    rest = {k: v for k, v in kwargs.items() if k not in HUB_KWARGS and k not in image_kwargs}
    return InternVLProcessorPil.from_args_and_dict(
        [image_processor, tokenizer, video_processor], processor_dict, **instantiation, **rest
    )
