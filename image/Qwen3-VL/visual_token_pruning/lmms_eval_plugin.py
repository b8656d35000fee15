"""lmms-eval models `qwen3_vl_vtr`, `qwen2_5_vl_vtr`, `qwen2_vl_vtr` and `qwen3_5_vtr`: any VTR strategy on
Qwen3-VL, Qwen2.5-VL, Qwen2-VL or Qwen3.5 (images and videos) from the command line.

Registered through lmms-eval's `lmms_eval.models` entry-point group (image/Qwen3-VL/pyproject.toml):

    python -m lmms_eval --model qwen2_5_vl_vtr \\
        --model_args pretrained=Qwen/Qwen2.5-VL-7B-Instruct,strategy=fastv,keep_tokens=128,prune_layer=2 \\
        --tasks mme --batch_size 4 --output_path ./results/fastv

Besides every `VTRConfig` field and the shared loading keys, each takes the pixel and frame keys of its
lmms-eval counterpart (`qwen3_vl`, `qwen2_5_vl`, `qwen2_vl`, `qwen3_5`): `min_pixels` / `max_pixels` (the image
processor's pixel bounds; Qwen2.5-VL, Qwen2-VL and Qwen3.5 default to their counterparts' values, Qwen3-VL keeps the
checkpoint's; a bound not given stays that default; Qwen3-VL's and Qwen3.5's videos keep theirs), `max_num_frames`
and `fps` (video frame sampling: `fps` frames per second, at most `max_num_frames`, 32 by default, Qwen3.5's 768 as its
counterpart; Qwen2.5-VL and Qwen2-VL sample 2 per second when `fps` is not given and size each frame within the
pixel bounds and at most 768 tokens, as qwen-vl-utils does for their counterparts), `system_prompt` (the
counterparts' "You are a helpful assistant."; empty for none) and `enable_thinking` (given to the chat template,
as the counterparts do; where it is on, the answer is what follows the think block, empty when that block never
closed; Qwen3.5 thinks by default and may write 1024 new tokens where the task sets no limit, as `qwen3_5`; it
stays greedy unless the task samples, where `qwen3_5` samples at temperature 0.7). A doc's visuals may be PIL images and video file paths, several per
prompt; all of them share one budget. Each model takes checkpoints of its own family and names the right
model for another. Inputs go to the device of the model's embeddings (never a hard-coded "cuda"), and
preprocessing needs no torchvision (processing.py).
"""

from __future__ import annotations

from pathlib import Path

from .api import load_model, load_processor
from .config import VTRConfig
from .lmms_eval_base import VTRLmms, as_image, install_compat
from .model_args import checkpoint_model_type
from .video_io import VideoError

#: qwen-vl-utils' largest video frame (768 tokens of 28 x 28 pixels)
VIDEO_MAX_PIXELS = 768 * 28 * 28


class QwenVLVTR(VTRLmms):
    """What the Qwen-VL families' lmms-eval models share; each family states its name, checkpoints and
    defaults below."""

    # (checks of their shared keys, e.g. from vtr_run)
    name = "qwen3_vl_vtr / qwen2_5_vl_vtr / qwen2_vl_vtr / qwen3_5_vtr"
    EXTRA_LOAD_ARGS = {
        "min_pixels": int | None,
        "max_pixels": int | None,
        "max_num_frames": int,
        "fps": float | None,
        "system_prompt": str,
        "enable_thinking": bool,
    }
    FOLDER_KEYS = ("enable_thinking",)
    #: the model_types this model takes
    model_types: tuple[str, ...] = ()
    #: (min_pixels, max_pixels) when not given (None: the checkpoint's), as the lmms-eval counterpart
    default_pixels: tuple[int | None, int | None] = (None, None)
    #: frames per second sampled from a video file when `fps` is not given (None: the processor's own)
    default_fps: float | None = None
    #: video frames sized within the pixel bounds, at most 768 tokens, as qwen-vl-utils sizes the counterpart's
    size_video_frames = False
    #: at most this many frames from a video when `max_num_frames` is not given
    default_max_frames = 32
    #: `enable_thinking` when not given (None: the chat template's own default, answers kept whole)
    default_thinking: bool | None = None

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
        model_type = checkpoint_model_type(self.pretrained, **kwargs)
        if model_type not in self.model_types:
            right = next((m.name for m in MODELS if model_type in m.model_types), None)
            raise ValueError(
                f"{self.pretrained} is a {model_type!r} checkpoint; {self.name} takes {', '.join(self.model_types)}"
                + (f": use --model {right}" if right else "")
            )
        model = load_model(self.pretrained, VTRConfig(enabled=False), **kwargs)
        extra = {"revision": load["revision"]} if "revision" in load else {}
        low, high = self.pixel_bounds(load)
        return model, load_processor(self.pretrained, min_pixels=low, max_pixels=high, **extra)

    def pixel_bounds(self, load: dict) -> tuple[int | None, int | None]:
        """(min_pixels, max_pixels): as given, else the family's defaults (None: the checkpoint's)."""
        low, high = self.default_pixels
        return load.get("min_pixels", low), load.get("max_pixels", high)

    def configure(self, load: dict) -> None:
        video = self.processor.video_processor
        video.max_frames = load.get("max_num_frames", self.default_max_frames)
        video.min_frames = min(video.min_frames, video.max_frames)
        self.fps = load.get("fps", self.default_fps)
        if self.size_video_frames:
            # frames sized as qwen-vl-utils sizes the counterpart's: the pixel bounds, at most 768 tokens
            low, high = self.pixel_bounds(load)
            size = {"shortest_edge": low, "longest_edge": max(min(high, VIDEO_MAX_PIXELS), int(low * 1.05))}
            video.size = size if isinstance(video.size, dict) else type(video.size)(**size)
        self.system_prompt = load.get("system_prompt", "You are a helpful assistant.")
        self.thinking = load.get("enable_thinking", self.default_thinking)

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
                raise ValueError(f"{self.name} takes PIL images and video file paths; got a {type(v).__name__}")
        return prepared

    def build_prompt(self, context: str, visuals: list) -> str:
        content = [{"type": kind} for kind, _ in visuals]
        for placeholder in ("<image>", "<video>"):  # the chat template places the visuals itself
            context = context.replace(placeholder + "\n", "").replace(placeholder, "")
        content.append({"type": "text", "text": context.strip()})
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages = [*system, {"role": "user", "content": content}]
        thinking = {} if self.thinking is None else {"enable_thinking": self.thinking}
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, **thinking)

    def answer_of(self, text: str) -> str:
        """With thinking on, what follows the think block (as the counterparts strip it); empty where it never
        closed (the answer was not reached)."""
        return text.partition("</think>")[2].strip() if self.thinking else text

    def encode(self, prompts: list[str], visuals: list[list]):
        images = [v for sample in visuals for kind, v in sample if kind == "image"]
        videos = [v for sample in visuals for kind, v in sample if kind == "video"]
        kwargs = {"fps": self.fps} if videos and self.fps is not None else {}
        if kwargs and self.default_fps is not None:  # Qwen2-VL's video processor samples only when asked
            kwargs["do_sample_frames"] = True
        inputs = self.processor(
            images=images or None, videos=videos or None, text=prompts, return_tensors="pt", padding=True, **kwargs
        )
        inputs = inputs.to(self.device)
        for key in ("pixel_values", "pixel_values_videos"):
            if key in inputs:
                inputs[key] = inputs[key].to(self._model.dtype)
        return inputs


class Qwen3VLVTR(QwenVLVTR):
    """Qwen3-VL and Qwen3-VL-MoE (hub or local checkpoints) with visual token reduction."""

    name = "qwen3_vl_vtr"
    default_pretrained = "Qwen/Qwen3-VL-4B-Instruct"
    model_types = ("qwen3_vl", "qwen3_vl_moe")


class Qwen2_5_VLVTR(QwenVLVTR):
    """Qwen2.5-VL with visual token reduction; pixel bounds as lmms-eval's `qwen2_5_vl`."""

    name = "qwen2_5_vl_vtr"
    default_pretrained = "Qwen/Qwen2.5-VL-7B-Instruct"
    model_types = ("qwen2_5_vl",)
    default_pixels = (256 * 28 * 28, 1605632)
    default_fps = 2.0
    size_video_frames = True


class Qwen2VLVTR(QwenVLVTR):
    """Qwen2-VL with visual token reduction; pixel bounds as lmms-eval's `qwen2_vl`."""

    name = "qwen2_vl_vtr"
    default_pretrained = "Qwen/Qwen2-VL-7B-Instruct"
    model_types = ("qwen2_vl",)
    default_pixels = (3136, 602112)
    default_fps = 2.0
    size_video_frames = True


class Qwen3_5VTR(QwenVLVTR):
    """Qwen3.5 and Qwen3.5-MoE (a hybrid linear/full-attention decoder) with visual token reduction; image pixel
    bounds, frames and thinking as lmms-eval's `qwen3_5`."""

    name = "qwen3_5_vtr"
    default_pretrained = "Qwen/Qwen3.5-4B"
    model_types = ("qwen3_5", "qwen3_5_moe")
    default_pixels = (64 * 32 * 32, 128 * 32 * 32)
    default_max_frames = 768
    default_thinking = True
    MAX_NEW_TOKENS = 1024


MODELS = (Qwen3VLVTR, Qwen2_5_VLVTR, Qwen2VLVTR, Qwen3_5VTR)


#: Every loading key the Qwen-VL models accept (the shared ones and their own), with its type.
LOAD_ARGS = QwenVLVTR.load_args()

install_compat(QwenVLVTR)
