"""Video-LLaVA prompts and model inputs.

    video_prompt("What happens?")                  'USER: <video>\\nWhat happens? ASSISTANT:'
    chat_prompt("What happens?")                   '{system} USER: <video>\\nWhat happens? ASSISTANT:'
    encode(processor, [prompt], videos=[frames])   BatchFeature for model(**x) / model.generate(**x)

The newline right after the last placeholder matters for PriorTR: the anchor row (the token after the
visual span) is then the same token whatever the question, so its question-free prior is too. lmms-eval's
own Video-LLaVA prompt has no newline there; ours does.

`chat_prompt` is the prompt the evaluations use (run_video_qa and the lmms-eval model alike): by default the
conversation of the original Video-LLaVA evaluation (PKU-YuanGroup/Video-LLaVA, `conv_mode="llava_v1"`), whose
system line comes first; `conv_mode="plain"` leaves the system line out (the HF model card's prompt).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["CONV_SYSTEM", "chat_prompt", "encode", "video_prompt"]

#: The system line of each prompt format (`chat_prompt`); llava_v1 is the original evaluation's.
CONV_SYSTEM = {
    "llava_v1": "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "plain": "",
}


def video_prompt(question: str, num_videos: int = 1, num_images: int = 0) -> str:
    """`USER: <video>\\n{question} ASSISTANT:` with one `<video>\\n` per video, then one `<image>\\n` per image."""
    if not isinstance(question, str):
        raise ValueError(f"question must be a string, got {type(question).__name__}")
    for name, n in (("num_videos", num_videos), ("num_images", num_images)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {n!r}")
    return "USER: " + "<video>\n" * num_videos + "<image>\n" * num_images + f"{question.strip()} ASSISTANT:"


def chat_prompt(question: str, conv_mode: str = "llava_v1", num_videos: int = 1, num_images: int = 0) -> str:
    """`{system} USER: <video>\\n{question} ASSISTANT:` with the system line of `conv_mode` (none for plain).
    A question that places its own `<video>`/`<image>` placeholders is used as it is."""
    if conv_mode not in CONV_SYSTEM:
        raise ValueError(f"conv_mode={conv_mode!r}: choose one of {list(CONV_SYSTEM)}")
    if "<video>" in question or "<image>" in question:
        prompt = f"USER: {question.strip()} ASSISTANT:"
    else:
        prompt = video_prompt(question, num_videos=num_videos, num_images=num_images)
    return f"{CONV_SYSTEM[conv_mode]} {prompt}" if CONV_SYSTEM[conv_mode] else prompt


def _frames(video) -> np.ndarray:
    frames = getattr(video, "frames", video)  # a video_io.VideoClip or its frames
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"a video must be uint8 frames [t, height, width, 3]; got shape {frames.shape}")
    return frames


def encode(processor, prompts, videos: Sequence | None = None, images: Sequence | None = None):
    """Tokenize `prompts` (a string or a list) with their videos and images, left-padded, as torch tensors.

    videos: uint8 numpy [t, h, w, 3] per `<video>` (e.g. `video_io.load_video(path).frames`), in placeholder
    order across the batch; images: PIL images or uint8 arrays per `<image>`. Works with the fallback
    processor (no torchvision) and with the stock one. Returns `input_ids`, `attention_mask`,
    `pixel_values_videos` [videos, t, 3, H, W] and `pixel_values` [images, 3, H, W] as present."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a string or a non-empty list of strings")
    videos = [_frames(v) for v in videos] if videos is not None and len(videos) else None
    images = list(images) if images is not None and len(images) else None
    for name, token, given in (
        ("videos", processor.video_token, videos),
        ("images", processor.image_token, images),
    ):
        wanted = sum(p.count(token) for p in prompts)
        if wanted != len(given or []):
            raise ValueError(
                f"the prompts hold {wanted} {token} placeholder(s) but {len(given or [])} {name} were given"
            )
    if videos is not None and len({v.shape[0] for v in videos}) > 1:
        raise ValueError(f"videos in one batch need the same number of frames; got {[v.shape[0] for v in videos]}")
    extra = {"return_legacy_image_output": False} if images is not None else {}
    return processor(
        text=prompts, videos=videos, images=images, padding=True, padding_side="left", return_tensors="pt", **extra
    )
