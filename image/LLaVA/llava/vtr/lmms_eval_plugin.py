"""lmms-eval models `llava_vtr` (LLaVA-1.5 / 1.6) and `llava_onevision_vtr` (LLaVA-OneVision and LLaVA-Video,
images and videos): any VTR strategy from the command line.

Registered through lmms-eval's `lmms_eval.models` entry-point group (image/LLaVA/pyproject.toml), so
after `make install` they need no file copied into lmms-eval:

    python -m lmms_eval --model llava_vtr \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,strategy=fastv,keep_tokens=64,prune_layer=2 \\
        --tasks mme --batch_size 1 --output_path ./results/fastv
    python -m lmms_eval --model llava_onevision_vtr \\
        --model_args pretrained=llava-hf/llava-onevision-qwen2-7b-ov-hf,strategy=fastv,keep_ratio=0.25,max_frames_num=32 \\
        --tasks videomme --batch_size 1 --output_path ./results/ov-fastv

`--model_args` takes every `VTRConfig` field by name (typed from the dataclass; lists `[3,7,16]` or
`3;7;16`) and the loading keys in `LOAD_ARGS` (`ONEVISION_LOAD_ARGS`); anything else is an error listing
the valid keys. Each model takes its own checkpoints and names the other for the rest. See docs/lmms-eval.md.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from . import lmms_eval_compat as compat
from .api import load_model, load_processor
from .config import VTRConfig
from .convert import convert_original_llava, convert_original_onevision, is_original_llava, is_original_onevision
from .lmms_eval_base import VTRLmms, as_image, install_compat
from .model_args import checkpoint_model_type, parse_model_args, split_args
from .video_io import VideoError, load_video

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
CHATML_SYSTEM = "Answer the questions."
#: Prompt formats: `auto` picks the checkpoint's own (see `default_conv_template`).
CONV_TEMPLATES = ("auto", "vicuna_v1", "mistral_instruct", "chatml_direct", "plain", "hf")


def default_conv_template(config, tokenizer) -> str:
    """The conversation a checkpoint was trained with: LLaVA-1.5 and 1.6-vicuna `vicuna_v1`, 1.6-mistral
    `mistral_instruct` (`[INST] ... [/INST]`), 1.6-34b (Nous-Hermes-2-Yi, ChatML) `chatml_direct`."""
    if config.get_text_config().model_type == "mistral":
        return "mistral_instruct"
    if "<|im_start|>" in tokenizer.get_vocab():
        return "chatml_direct"
    return "vicuna_v1"


class LlavaVTR(VTRLmms):
    """LLaVA-1.5 (llava-hf or original release checkpoints) and LLaVA-1.6 (llava-hf `llava-v1.6-*`, anyres)
    with visual token reduction."""

    name = "llava_vtr"
    default_pretrained = "llava-hf/llava-1.5-7b-hf"
    EXTRA_LOAD_ARGS = {"conv_template": str, "vision_tower": str | None}

    @classmethod
    def check_load_args(cls, load: dict) -> None:
        if load.get("conv_template", "auto") not in CONV_TEMPLATES:
            raise ValueError(f"conv_template={load['conv_template']!r}: choose one of {list(CONV_TEMPLATES)}")

    def load_backbone(self, load: dict, **kwargs):
        pretrained = self.pretrained
        if is_original_onevision(pretrained):
            raise ValueError(f"{pretrained} is a LLaVA-OneVision checkpoint: use --model llava_onevision_vtr")
        if is_original_llava(pretrained):
            return convert_original_llava(pretrained, vision_tower=load.get("vision_tower"), **_conversion(kwargs))
        if load.get("vision_tower") is not None:
            raise ValueError(f"vision_tower: {pretrained} holds its own vision tower (only original releases name one)")
        if checkpoint_model_type(pretrained, **kwargs) == "llava_onevision":
            raise ValueError(f"{pretrained} is a LLaVA-OneVision checkpoint: use --model llava_onevision_vtr")
        model = load_model(pretrained, VTRConfig(enabled=False), **kwargs)
        processor = load_processor(pretrained, **({"revision": load["revision"]} if "revision" in load else {}))
        return model, processor

    def configure(self, load: dict) -> None:
        self.conv_template = load.get("conv_template", "auto")
        if self.conv_template == "auto":
            self.conv_template = default_conv_template(self._model.config, self.tokenizer)

    def visual_token_ids(self) -> list[int]:
        return [self._model.config.image_token_id]

    def prepare_visuals(self, visuals: list) -> list:
        images = [as_image(v) for v in visuals]
        for v, image in zip(visuals, images):
            if image is None:
                raise ValueError(
                    f"llava_vtr takes images (PIL, or an image file path); got {type(v).__name__} {v!r:.80}"
                    + (" (videos: --model llava_onevision_vtr)" if isinstance(v, (str, Path)) else "")
                )
        return images

    def build_prompt(self, context: str, visuals: list) -> str:
        if IMAGE_TOKEN not in context and visuals:
            context = "\n".join([IMAGE_TOKEN] * len(visuals)) + "\n" + context
        if self.conv_template == "plain":
            return context
        if self.conv_template == "hf":
            return self.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "text", "text": context}]}], add_generation_prompt=True
            )
        if self.conv_template == "mistral_instruct":
            return f"[INST] {context} [/INST]"
        if self.conv_template == "chatml_direct":
            return (
                f"<|im_start|>system\n{CHATML_SYSTEM}<|im_end|><|im_start|>user\n{context}<|im_end|>"
                "<|im_start|>assistant\n"
            )
        return f"{VICUNA_SYSTEM} USER: {context} ASSISTANT:"

    def encode(self, prompts: list[str], visuals: list[list]):
        images = [image for sample in visuals for image in sample]
        inputs = self.processor(images=images or None, text=prompts, return_tensors="pt", padding=True).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self._model.dtype)
        return inputs


#: lmms-eval's `qwen_1_5` conversation (LLaVA-NeXT's conv_qwen, ChatML), which its `llava_onevision` model uses
QWEN_SYSTEM = "You are a helpful assistant."
ONEVISION_CONV_TEMPLATES = ("auto", "qwen_1_5", "hf")
PLACEHOLDER = re.compile(f"({re.escape(IMAGE_TOKEN)}|{re.escape(VIDEO_TOKEN)})")


def frame_indices(
    total: int, num_frames: int, fps: float | None = None, video_fps: float | None = None, force_sample: bool = False
) -> list[int]:
    """The frames read from a video of `total` frames at `fps`. Without `video_fps`, lmms-eval's `llava_onevision`
    rule (lmms_eval/models/simple/llava_onevision.py, `Llava_OneVision.load_video`, lmms-eval 0.7.3):
    `np.linspace(0, total - 1, num_frames, dtype=int)`, `num_frames` frame numbers evenly spaced from the first
    frame to the last, rounded down (a clip shorter than that repeats frames). With `video_fps`, its `llava_vid`
    rule (`LlavaVid.load_video`), LLaVA-Video's official evaluation: every round(fps / video_fps)-th frame from the
    first, unless that gives more than `num_frames` or `force_sample` is set, then the linspace rule."""
    if video_fps is not None and fps:
        picks = list(range(0, total, max(1, round(fps / video_fps))))
        if len(picks) <= num_frames and not force_sample:
            return picks
    return np.linspace(0, total - 1, num_frames, dtype=int).tolist()


class LlavaOnevisionVTR(VTRLmms):
    """LLaVA-OneVision and LLaVA-Video (llava-hf `llava_onevision` checkpoints, or original lmms-lab releases
    converted on load) with visual token reduction: images (anyres_max tiles; several images per doc as base
    views, as the stock processor lays them out) and video files (`max_frames_num` frames each, sampled as
    lmms-eval's `llava_onevision` samples them: `frame_indices`)."""

    name = "llava_onevision_vtr"
    default_pretrained = "llava-hf/llava-onevision-qwen2-7b-ov-hf"
    FOLDER_KEYS = ("max_frames_num", "video_fps", "force_sample", "mm_newline_position", "mm_spatial_pool_mode")
    EXTRA_LOAD_ARGS = {
        "conv_template": str,
        "max_frames_num": int,
        "video_fps": float | None,
        "force_sample": bool,
        "vision_tower": str | None,
        "mm_newline_position": str | None,
        "mm_spatial_pool_mode": str | None,
    }

    @classmethod
    def check_load_args(cls, load: dict) -> None:
        from .modeling import NEWLINE_POSITIONS, POOL_MODES

        for key, choices in (("mm_newline_position", NEWLINE_POSITIONS), ("mm_spatial_pool_mode", POOL_MODES)):
            if load.get(key) is not None and load[key] not in choices:
                raise ValueError(f"{key}={load[key]!r}: choose one of {list(choices)}")
        if load.get("conv_template", "auto") not in ONEVISION_CONV_TEMPLATES:
            raise ValueError(f"conv_template={load['conv_template']!r}: choose one of {list(ONEVISION_CONV_TEMPLATES)}")
        if load.get("max_frames_num", 1) < 1:
            raise ValueError(f"max_frames_num={load['max_frames_num']}: must be >= 1")
        if load.get("video_fps") is not None and not load["video_fps"] > 0:
            raise ValueError(f"video_fps={load['video_fps']}: must be > 0")
        if load.get("force_sample") and load.get("video_fps") is None:
            raise ValueError(
                "force_sample: only with video_fps (without it every video is sampled max_frames_num times)"
            )

    def load_backbone(self, load: dict, **kwargs):
        pretrained = self.pretrained
        if is_original_onevision(pretrained):
            return convert_original_onevision(pretrained, vision_tower=load.get("vision_tower"), **_conversion(kwargs))
        if is_original_llava(pretrained):  # the original release layout, not recognised as OneVision
            raise ValueError(f"{pretrained} is an original LLaVA-1.5/1.6 release: use --model llava_vtr")
        if load.get("vision_tower") is not None:
            raise ValueError(f"vision_tower: {pretrained} holds its own vision tower (only original releases name one)")
        model_type = checkpoint_model_type(pretrained, **kwargs)
        if model_type != "llava_onevision":
            other = " (LLaVA-1.5 / 1.6: use --model llava_vtr)" if model_type in ("llava", "llava_next") else ""
            raise ValueError(f"{pretrained} is a {model_type!r} checkpoint; {self.name} takes llava_onevision{other}")
        model = load_model(pretrained, VTRConfig(enabled=False), **kwargs)
        processor = load_processor(pretrained, **({"revision": load["revision"]} if "revision" in load else {}))
        return model, processor

    def configure(self, load: dict) -> None:
        # the checkpoint's video layout unless given, as lmms-eval's llava_onevision / llava_vid override it
        # (LLaVA-Video's official evaluation: mm_spatial_pool_mode=average)
        from .modeling import video_layout
        from .processing import with_video_layout

        config = self._model.config
        for key in ("mm_newline_position", "mm_spatial_pool_mode"):
            if load.get(key) is not None:
                setattr(config, key, load[key])
        with_video_layout(self.processor, *video_layout(config))
        self.max_frames_num = load.get("max_frames_num", 32)
        self.video_fps, self.force_sample = load.get("video_fps"), load.get("force_sample", False)
        self.conv_template = load.get("conv_template", "auto")
        if self.conv_template == "auto":  # every OneVision / LLaVA-Video release is a Qwen2 (ChatML) model
            self.conv_template = "qwen_1_5" if "<|im_start|>" in self.tokenizer.get_vocab() else "hf"

    def prepare_visuals(self, visuals: list) -> list:
        """[("image", RGB image) | ("video", uint8 frames [t, h, w, 3])], in the doc's order; a video file's
        `max_frames_num` frames are decoded here (decord, PyAV as fallback)."""
        prepared = []
        for v in visuals:
            image = as_image(v)
            if image is not None:
                prepared.append(("image", image))
            elif isinstance(v, (str, Path)):
                if not Path(v).is_file():
                    raise VideoError(
                        f"video file not found: {v} ({self.name} takes PIL images, image files and video files)"
                    )
                clip = load_video(
                    v,
                    pick=lambda total, fps: frame_indices(
                        total, self.max_frames_num, fps, self.video_fps, self.force_sample
                    ),
                )
                prepared.append(("video", clip.frames))
            else:
                raise ValueError(
                    f"{self.name} takes PIL images, image file paths and video file paths; "
                    f"got {type(v).__name__} {v!r:.80}"
                )
        return prepared

    def build_prompt(self, context: str, visuals: list) -> str:
        """`qwen_1_5`: lmms-eval's conversation; the doc's visuals as placeholders before the question (images
        `<image>`, videos `<video>`, space-joined as lmms-eval joins several), or, where the question holds
        `<image>` / `<video>` placeholders, one per visual in the doc's order, each made its visual's kind.
        `hf`: the processor's chat template, the visuals first."""
        tokens = [IMAGE_TOKEN if kind == "image" else VIDEO_TOKEN for kind, _ in visuals]
        if self.conv_template == "hf":
            content = [{"type": kind} for kind, _ in visuals]
            text = PLACEHOLDER.sub("", context.replace(IMAGE_TOKEN + "\n", "").replace(VIDEO_TOKEN + "\n", ""))
            content.append({"type": "text", "text": text.strip()})
            return self.processor.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True
            )
        parts = PLACEHOLDER.split(context)
        given = len(parts) // 2
        if given == 0 and tokens:
            context = " ".join(tokens) + "\n" + context
        elif given != len(tokens):
            raise ValueError(
                f"the prompt holds {given} <image>/<video> placeholders for {len(tokens)} visuals: {context!r:.120}"
            )
        else:
            parts[1::2] = tokens
            context = "".join(parts)
        return (
            f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\n{context}<|im_end|>\n"
            "<|im_start|>assistant\n"
        )

    def encode(self, prompts: list[str], visuals: list[list]):
        # images nested per prompt: the processor tiles a prompt's only image and gives several images of one
        # prompt a base view each (its batch_num_images), as lmms-eval's llava_onevision treats multi-image docs
        images = [[v for kind, v in sample if kind == "image"] for sample in visuals]
        videos = [v for sample in visuals for kind, v in sample if kind == "video"]
        kwargs = {"do_sample_frames": False} if videos else {}  # the frames are sampled already
        inputs = self.processor(
            images=images if any(images) else None,
            videos=videos or None,
            text=prompts,
            return_tensors="pt",
            padding=True,
            **kwargs,
        ).to(self.device)
        for key in ("pixel_values", "pixel_values_videos"):
            if key in inputs:
                inputs[key] = inputs[key].to(self._model.dtype)
        return inputs


def _conversion(kwargs: dict) -> dict:
    """The from_pretrained keyword arguments of `load_backbone` that a conversion of an original release takes
    (dtype, attention kernel, device map, revision); any other is refused by name."""
    options = {k: v for k, v in kwargs.items() if k != "trust_remote_code"}
    unknown = sorted(set(options) - {"dtype", "attn_implementation", "device_map", "revision"})
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not supported when converting an original-format checkpoint")
    return options


class LlavaModels:
    """This fork's two lmms-eval models, for the checks that do not name one (`lmms_eval_base.validate_model_args`,
    as scripts/vtr_run calls it) and the results folder names (see `install_compat`)."""

    name = "llava_vtr / llava_onevision_vtr"
    models = (LlavaVTR, LlavaOnevisionVTR)

    @classmethod
    def validate_model_args(cls, arg_string: str, additional_config: dict | None = None) -> None:
        """Accept `--model_args` that one of the models accepts; else raise the error of the model that knows
        every key given, or, when none does, name the unknown key among all the keys of both."""
        errors = []
        for model in cls.models:
            try:
                return model.validate_model_args(arg_string, additional_config)
            except ValueError as error:
                errors.append((model, error))
        keys = set(split_args(arg_string))
        for model, error in errors:
            if keys <= set(model.load_args()) | set(VTRConfig.field_names()):
                raise error
        parse_model_args(split_args(arg_string), {k: v for m in cls.models for k, v in m.load_args().items()})
        raise errors[0][1]

    @classmethod
    def folder_name(cls, model_args: str, base: str) -> str | None:
        """The loaded model's name for its `--model_args` (its backbone's default budget filled in), else the
        first model's that accepts them."""
        live = [type(model) for model in list(compat.LIVE_MODELS) if isinstance(model, cls.models)]
        for model in dict.fromkeys([*live, *cls.models]):
            name = model.folder_name(model_args, base)
            if name is not None:
                return name
        return None


#: Every loading key llava_vtr accepts (the shared ones and LLaVA's own), with its type.
LOAD_ARGS = LlavaVTR.load_args()
#: Every loading key llava_onevision_vtr accepts, with its type.
ONEVISION_LOAD_ARGS = LlavaOnevisionVTR.load_args()

install_compat(LlavaModels)
