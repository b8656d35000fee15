"""lmms-eval model `video_llava_vtr`: any VTR strategy on Video-LLaVA from the command line.

Registered through lmms-eval's `lmms_eval.models` entry points (video/Video-LLaVA/pyproject.toml):

    python -m lmms_eval --model video_llava_vtr \\
        --model_args pretrained=LanguageBind/Video-LLaVA-7B-hf,strategy=fastv,keep_tokens=514,prune_layer=2,num_frames=8 \\
        --tasks <video task> --batch_size 4 --output_path ./results/fastv

Every `VTRConfig` field is a `--model_args` key, plus the shared loading keys, `num_frames` (frames sampled
uniformly per video, default 8 as Video-LLaVA was trained) and `conv_mode` (below). A doc's visuals may be video paths (lmms-eval's
video tasks hand over a path string; decoded by `video_io`, decord first, PyAV otherwise) and images (PIL, or
an image file path), in any mix: each becomes its `<video>`/`<image>` line of the Video-LLaVA prompt
(`prompts.chat_prompt`, a newline after each placeholder). `conv_mode` picks the prompt format, as
run_video_qa's `--conv_mode` does: `llava_v1` (default) is the original Video-LLaVA evaluation's conversation
with its system line first; `plain` leaves the system line out (`USER: <video>\n{question} ASSISTANT:`, the
HF model card's). lmms-eval 0.7.3's own `video_llava` model crashes on every video (`read_video(path, 8)`
against a keyword-only argument); this one does not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .api import load_model, load_processor
from .config import VTRConfig
from .lmms_eval_base import VTRLmms, as_image, install_compat
from .prompts import CONV_SYSTEM, chat_prompt, encode
from .video_io import VIDEO_EXTENSIONS, load_video


class VideoLlavaVTR(VTRLmms):
    """Video-LLaVA (`LanguageBind/Video-LLaVA-7B-hf`) with visual token reduction, videos and images."""

    name = "video_llava_vtr"
    default_pretrained = "LanguageBind/Video-LLaVA-7B-hf"
    EXTRA_LOAD_ARGS = {"num_frames": int, "conv_mode": str}

    @classmethod
    def check_load_args(cls, load: dict) -> None:
        if load.get("num_frames", 8) < 1:
            raise ValueError(f"num_frames={load['num_frames']}: must be >= 1")
        if load.get("conv_mode", "llava_v1") not in CONV_SYSTEM:
            raise ValueError(f"conv_mode={load['conv_mode']!r}: choose one of {list(CONV_SYSTEM)}")

    def load_backbone(self, load: dict, **kwargs):
        model = load_model(self.pretrained, VTRConfig(enabled=False), **kwargs)
        processor = load_processor(self.pretrained, **({"revision": load["revision"]} if "revision" in load else {}))
        return model, processor

    def configure(self, load: dict) -> None:
        self.num_frames = load.get("num_frames", 8)
        self.conv_mode = load.get("conv_mode", "llava_v1")

    def prepare_visuals(self, visuals: list) -> list:
        """Each visual as ("video", uint8 frames [t, h, w, 3]) or ("image", RGB PIL image)."""
        out = []
        for v in visuals:
            image = as_image(v)
            if image is not None:
                out.append(("image", image))
            elif isinstance(v, (str, Path)):
                if Path(v).suffix.lower() not in VIDEO_EXTENSIONS and not Path(v).is_file():
                    raise ValueError(f"{self.name}: {v!r} is neither a video file nor an image file")
                out.append(("video", load_video(v, num_frames=self.num_frames).frames))
            elif isinstance(v, np.ndarray) and v.ndim in (3, 4) and v.shape[-1] == 3:  # a picture / frames
                out.append(("image", Image.fromarray(v)) if v.ndim == 3 else ("video", v))
            else:
                raise ValueError(f"{self.name} takes video paths and images; got a {type(v).__name__}")
        return out

    def build_prompt(self, context: str, visuals: list) -> str:
        videos = sum(kind == "video" for kind, _ in visuals)
        images = len(visuals) - videos
        return chat_prompt(context, self.conv_mode, num_videos=videos, num_images=images)

    def encode(self, prompts: list[str], visuals: list[list]):
        videos = [v for sample in visuals for kind, v in sample if kind == "video"]
        images = [v for sample in visuals for kind, v in sample if kind == "image"]
        inputs = encode(self.processor, prompts, videos=videos or None, images=images or None).to(self.device)
        for key in ("pixel_values", "pixel_values_videos"):
            if key in inputs:
                inputs[key] = inputs[key].to(self._model.dtype)
        return inputs


#: Every loading key video_llava_vtr accepts (the shared ones and Video-LLaVA's own), with its type.
LOAD_ARGS = VideoLlavaVTR.load_args()

install_compat(VideoLlavaVTR)
