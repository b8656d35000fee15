"""lmms-eval model `qwen3_vl_vtr`: any VTR strategy on Qwen3-VL (images and videos) from the command line.

Registered through lmms-eval's `lmms_eval.models` entry-point group (image/Qwen3-VL/pyproject.toml):

    python -m lmms_eval --model qwen3_vl_vtr \\
        --model_args pretrained=Qwen/Qwen3-VL-4B-Instruct,strategy=fastv,keep_tokens=128,prune_layer=2 \\
        --tasks mme --batch_size 4 --output_path ./results/fastv

Besides every `VTRConfig` field and the shared loading keys, it takes `min_pixels` / `max_pixels` (the
image processor's pixel bounds; a bound not given stays the checkpoint's, videos keep theirs), `max_num_frames` and `fps` (video frame sampling: `fps` frames per
second, at most `max_num_frames`). A doc's visuals may be PIL images and video file paths, several per
prompt; all of them share one budget. Inputs go to the device of the model's embeddings (never a
hard-coded "cuda"), and preprocessing needs no torchvision (processing.py).
"""

from __future__ import annotations

from pathlib import Path

from .api import load_model, load_processor
from .config import VTRConfig
from .lmms_eval_base import VTRLmms, as_image, install_compat
from .video_io import VideoError


class Qwen3VLVTR(VTRLmms):
    """Qwen3-VL and Qwen3-VL-MoE (hub or local checkpoints) with visual token reduction."""

    name = "qwen3_vl_vtr"
    default_pretrained = "Qwen/Qwen3-VL-4B-Instruct"
    EXTRA_LOAD_ARGS = {"min_pixels": int | None, "max_pixels": int | None, "max_num_frames": int, "fps": float | None}

    @classmethod
    def check_load_args(cls, load: dict) -> None:
        for key in ("min_pixels", "max_pixels", "max_num_frames"):
            if load.get(key) is not None and load[key] < 1:
                raise ValueError(f"{key}={load[key]}: must be >= 1")
        if load.get("fps") is not None and load["fps"] <= 0:
            raise ValueError(f"fps={load['fps']}: must be > 0")
        low, high = load.get("min_pixels"), load.get("max_pixels")
        if low is not None and high is not None and low > high:
            raise ValueError(f"min_pixels={low} is larger than max_pixels={high}")

    def load_backbone(self, load: dict, **kwargs):
        model = load_model(self.pretrained, VTRConfig(enabled=False), **kwargs)
        extra = {"revision": load["revision"]} if "revision" in load else {}
        processor = load_processor(
            self.pretrained, min_pixels=load.get("min_pixels"), max_pixels=load.get("max_pixels"), **extra
        )
        return model, processor

    def configure(self, load: dict) -> None:
        video = self.processor.video_processor
        video.max_frames = load.get("max_num_frames", 32)
        video.min_frames = min(video.min_frames, video.max_frames)
        self.fps = load.get("fps")

    def prepare_visuals(self, visuals: list) -> list:
        """[("image", RGB image) | ("video", path)], in the doc's order."""
        prepared = []
        for v in visuals:
            image = as_image(v)
            if image is not None:
                prepared.append(("image", image))
            elif isinstance(v, (str, Path)):
                if not Path(v).is_file():
                    raise VideoError(f"video file not found: {v}")
                prepared.append(("video", str(v)))
            else:
                raise ValueError(f"qwen3_vl_vtr takes PIL images and video file paths; got a {type(v).__name__}")
        return prepared

    def build_prompt(self, context: str, visuals: list) -> str:
        content = [{"type": kind} for kind, _ in visuals]
        for placeholder in ("<image>", "<video>"):  # the chat template places the visuals itself
            context = context.replace(placeholder + "\n", "").replace(placeholder, "")
        content.append({"type": "text", "text": context.strip()})
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def encode(self, prompts: list[str], visuals: list[list]):
        images = [v for sample in visuals for kind, v in sample if kind == "image"]
        videos = [v for sample in visuals for kind, v in sample if kind == "video"]
        kwargs = {"fps": self.fps} if videos and self.fps is not None else {}
        inputs = self.processor(
            images=images or None, videos=videos or None, text=prompts, return_tensors="pt", padding=True, **kwargs
        )
        inputs = inputs.to(self.device)
        for key in ("pixel_values", "pixel_values_videos"):
            if key in inputs:
                inputs[key] = inputs[key].to(self._model.dtype)
        return inputs


#: Every loading key qwen3_vl_vtr accepts (the shared ones and Qwen3-VL's own), with its type.
LOAD_ARGS = Qwen3VLVTR.load_args()

install_compat(Qwen3VLVTR)
