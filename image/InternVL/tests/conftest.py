"""Shared fixtures: tiny random InternVL checkpoints saved to disk and loaded back through `from_pretrained`
(model and processor; here the processor takes the no-torchvision path)."""

import sys
from pathlib import Path

import pytest
from transformers import InternVLForConditionalGeneration

from internvl_vtr import load_processor
from internvl_vtr.tiny import build_tiny_internvl, demo_image

sys.path.insert(0, str(Path(__file__).parent))
from internvl_testlib import BackboneCase, chat, clip  # noqa: E402

# 32 px tiles of 4 px patches: 16 visual tokens per tile; up to 4 tiles + thumbnail. A 64 x 64 image gives
# 2 x 2 tiles + thumbnail = 80 tokens, a 64 x 32 one 2 x 1 + thumbnail = 48. Qwen2 decoder, 4 layers, GQA.
SQUARE, WIDE = (64, 64), (64, 32)


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    return str(build_tiny_internvl(tmp_path_factory.mktemp("tiny-internvl")))


@pytest.fixture(scope="session")
def processor(tiny_path):
    return load_processor(tiny_path)


@pytest.fixture(scope="session")
def image():
    return demo_image(*SQUARE)


@pytest.fixture(scope="session")
def single_inputs(processor, image):
    return processor(images=image, text=chat(processor), return_tensors="pt")


@pytest.fixture(scope="session")
def batch_inputs(processor, image):
    """Two prompts of different lengths and tile counts (5 and 3 tiles): the shorter one is left-padded."""
    texts = [chat(processor, "Describe the picture in detail. Is there a cat, a dog or a car?"), chat(processor)]
    wide = demo_image(*WIDE).transpose(0)
    return processor(images=[image, wide], text=texts, return_tensors="pt", padding=True)


def two_videos(processor, frames):
    """Two video prompts (the clip, then played backwards; one tile per frame), left-padded."""
    texts = [
        chat(processor, "What happens in the video?", images=0, videos=1),
        chat(processor, "Why?", images=0, videos=1),
    ]
    return processor(videos=[frames, frames[::-1].copy()], text=texts, return_tensors="pt", padding=True)


@pytest.fixture(scope="session")
def frames():
    """A 3-frame clip (uint8 [t, h, w, 3])."""
    return clip(3)


@pytest.fixture(scope="session")
def video_inputs(processor, frames):
    """Two 3-frame video prompts, left-padded."""
    return two_videos(processor, frames)


@pytest.fixture(scope="session")
def video_batch(processor):
    """Two 4-frame video prompts, left-padded, with the processor's `frame_index` (every block a frame: 0..3 per
    video)."""
    inputs = two_videos(processor, clip(4))
    assert inputs["frame_index"].tolist() == [0, 1, 2, 3] * 2
    return inputs


@pytest.fixture(scope="session")
def stock_models(tiny_path):
    return {
        impl: InternVLForConditionalGeneration.from_pretrained(tiny_path, attn_implementation=impl).eval()
        for impl in ("eager", "sdpa")
    }


@pytest.fixture(scope="session")
def backbone(tiny_path, processor, stock_models, single_inputs, batch_inputs, video_batch):
    """The contract test's view of this fork (InternVL3-shaped: Qwen2 decoder)."""
    text_only = processor(text="<|im_start|>user\nSay something short.<|im_end|>\n", return_tensors="pt")
    token = stock_models["eager"].config.image_token_id
    return BackboneCase(
        "InternVL3", tiny_path, stock_models, single_inputs, batch_inputs, text_only, token, video=video_batch
    )
