"""Shared fixtures: one tiny random LLaVA saved to disk and loaded back through `from_pretrained`."""

import sys
from pathlib import Path

import pytest
from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

from llava.vtr.tiny import build_tiny_llava, build_tiny_llava_next, demo_image

sys.path.insert(0, str(Path(__file__).parent))
from llava_testlib import BackboneCase, chat  # noqa: E402


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


# LLaVA-1.6 (anyres): 32 px tiles of 8 px patches; a square image gives 88 visual tokens, a wide one 52.
@pytest.fixture(scope="session")
def next_path(tmp_path_factory):
    return str(build_tiny_llava_next(tmp_path_factory.mktemp("tiny-llava-next")))


@pytest.fixture(scope="session")
def next_processor(next_path):
    return AutoProcessor.from_pretrained(next_path)


@pytest.fixture(scope="session")
def next_stock(next_path):
    return {
        impl: LlavaNextForConditionalGeneration.from_pretrained(next_path, attn_implementation=impl).eval()
        for impl in ("eager", "sdpa")
    }


@pytest.fixture(scope="session")
def square(next_processor):
    return next_processor(images=demo_image(64), text=chat(next_processor), return_tensors="pt")


@pytest.fixture(scope="session")
def two_shapes(next_processor):
    """A square and a wide image: different tile counts, so different numbers of visual tokens; padded."""
    texts = [chat(next_processor), chat(next_processor, "Describe the picture in detail. Is there a car?")]
    images = [demo_image(64), demo_image(64).resize((96, 40))]
    return next_processor(images=images, text=texts, return_tensors="pt", padding=True)


@pytest.fixture(scope="session", params=["llava-1.5", "llava-1.6"])
def backbone(request):
    """The contract test's view of this fork: one case per model family it serves."""
    if request.param == "llava-1.5":
        path, processor, stock = (request.getfixturevalue(n) for n in ("tiny_path", "processor", "stock_models"))
        single, batch = request.getfixturevalue("single_inputs"), request.getfixturevalue("batch_inputs")
    else:
        path, processor, stock = (request.getfixturevalue(n) for n in ("next_path", "next_processor", "next_stock"))
        single, batch = request.getfixturevalue("square"), request.getfixturevalue("two_shapes")
    text_only = processor(text="USER: Say something short. ASSISTANT:", return_tensors="pt")
    token = stock["eager"].config.image_token_id
    return BackboneCase(request.param, path, stock, single, batch, text_only, token)
