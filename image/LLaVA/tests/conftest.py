"""Shared fixtures: one tiny random LLaVA saved to disk and loaded back through `from_pretrained`."""

import sys
from pathlib import Path

import pytest
from transformers import AutoProcessor, LlavaForConditionalGeneration

from llava.vtr.tiny import build_tiny_llava, demo_image

sys.path.insert(0, str(Path(__file__).parent))
from llava_testlib import chat  # noqa: E402


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    # 64 image tokens, 4 layers, GQA (4 query heads, 2 kv heads).
    return str(build_tiny_llava(tmp_path_factory.mktemp("tiny-llava")))


@pytest.fixture(scope="session")
def processor(tiny_path):
    return AutoProcessor.from_pretrained(tiny_path)


@pytest.fixture(scope="session")
def image():
    return demo_image(64)


@pytest.fixture(scope="session")
def single_inputs(processor, image):
    return processor(images=image, text=chat(processor), return_tensors="pt")


@pytest.fixture(scope="session")
def batch_inputs(processor, image):
    """Two prompts of different lengths: the shorter one is left-padded."""
    texts = [chat(processor), chat(processor, "Describe the picture in detail. Is there a cat, a dog or a car?")]
    flipped = image.transpose(0)  # a different image for the second sample
    return processor(images=[image, flipped], text=texts, return_tensors="pt", padding=True)


@pytest.fixture(scope="session")
def stock_models(tiny_path):
    return {
        impl: LlavaForConditionalGeneration.from_pretrained(tiny_path, attn_implementation=impl).eval()
        for impl in ("eager", "sdpa")
    }
