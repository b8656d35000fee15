"""lmms-eval model `internvl_vtr`: any VTR strategy on InternVL2.5 / InternVL3 from the command line.

Registered through lmms-eval's `lmms_eval.models` entry-point group (image/InternVL/pyproject.toml):

    python -m lmms_eval --model internvl_vtr \\
        --model_args pretrained=OpenGVLab/InternVL3-2B-hf,strategy=fastv,keep_tokens=256,prune_layer=2,max_patches=6 \\
        --tasks mme --batch_size 4 --output_path ./results/fastv

Everything shared (every `VTRConfig` field as a key, unknown keys exit 2, batched generation with left
padding, loglikelihood pruned on the context, the efficiency record) is `lmms_eval_base.VTRLmms`; this file
adds InternVL's loading keys (`min_patches`, `max_patches`: tiles per image, a thumbnail added when there
are several; `num_frames`: frames per video, one tile each), the chat prompt (the checkpoint's own
template, visuals before the question) and the visuals: PIL images and videos given as file paths. The
processor's `frame_index` (which `<img>` blocks are video frames) goes to the model with the other inputs, so the
video methods (evs, vidcom2, ...) run on video docs.
Unlike lmms-eval's own `internvl_hf`, batches are real (no forced batch 1) and a generation error stops
the run instead of becoming an empty answer.
"""

from __future__ import annotations

from pathlib import Path

from .api import load_model, load_processor
from .config import VTRConfig
from .lmms_eval_base import VTRLmms, as_image, install_compat
from .video_io import VideoError

#: Placeholders lmms-eval task prompts may carry; the visuals are placed by the chat template instead.
TASK_PLACEHOLDERS = ("<image>", "<video>")


class InternVLVTR(VTRLmms):
    """InternVL2.5 / InternVL3 (`-hf` checkpoints) with visual token reduction; images and videos."""

    name = "internvl_vtr"
    default_pretrained = "OpenGVLab/InternVL3-2B-hf"
    EXTRA_LOAD_ARGS = {"min_patches": int | None, "max_patches": int | None, "num_frames": int}

    @classmethod
    def check_load_args(cls, load: dict) -> None:
        low, high = load.get("min_patches"), load.get("max_patches")
        for key, value in (("min_patches", low), ("max_patches", high), ("num_frames", load.get("num_frames", 8))):
            if value is not None and value < 1:
                raise ValueError(f"{key}={value}: must be >= 1")
        if low is not None and high is not None and low > high:
            raise ValueError(f"min_patches={low} > max_patches={high}")

    def load_backbone(self, load: dict, **kwargs):
        model = load_model(self.pretrained, VTRConfig(enabled=False), **kwargs)
        self.num_frames = load.get("num_frames", 8)
        processor_kwargs = {k: load[k] for k in ("revision", "min_patches", "max_patches") if load.get(k) is not None}
        return model, load_processor(self.pretrained, num_frames=self.num_frames, **processor_kwargs)

    def visual_token_ids(self) -> list[int]:
        return [self._model.config.image_token_id]

    def prepare_visuals(self, visuals: list) -> list:
        out = []
        for v in visuals:
            image = as_image(v)
            if image is not None:
                out.append(image)
            elif isinstance(v, (str, Path)):
                if not Path(v).is_file():
                    raise VideoError(f"video file not found: {v}")
                out.append(str(v))
            else:
                raise ValueError(f"internvl_vtr takes images (PIL) and videos (a file path); got a {type(v).__name__}")
        return out

    def build_prompt(self, context: str, visuals: list) -> str:
        for placeholder in TASK_PLACEHOLDERS:
            context = context.replace(placeholder + "\n", "").replace(placeholder, "")
        content = [{"type": "video" if isinstance(v, str) else "image"} for v in visuals]
        content.append({"type": "text", "text": context})
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def encode(self, prompts: list[str], visuals: list[list]):
        images = [v for sample in visuals for v in sample if not isinstance(v, str)]
        videos = [v for sample in visuals for v in sample if isinstance(v, str)]
        video_kwargs = dict(num_frames=self.num_frames, do_sample_frames=True) if videos else {}
        inputs = self.processor(
            images=images or None,
            videos=videos or None,
            text=prompts,
            return_tensors="pt",
            padding=True,
            **video_kwargs,
        ).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self._model.dtype)
        return inputs


#: Every loading key internvl_vtr accepts (the shared ones and InternVL's own), with its type.
LOAD_ARGS = InternVLVTR.load_args()

install_compat(InternVLVTR)
