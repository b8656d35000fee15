"""Shared fixtures: one tiny random LLaVA saved to disk and loaded back through `from_pretrained`."""

import sys
from pathlib import Path

import pytest
from transformers import (
    AutoProcessor,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
)

from llava.vtr import load_processor
from llava.vtr.tiny import build_tiny_llava, build_tiny_llava_next, build_tiny_llava_onevision, demo_image, demo_video

sys.path.insert(0, str(Path(__file__).parent))
from llava_testlib import BackboneCase, chat, onevision_embed, ov_chat, ov_videos  # noqa: E402


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


# LLaVA-OneVision: 32 px SigLIP views of 8 px patches (16 tokens), anyres_max_2 (a 2 x 2 tiling shrinks to 5 x 5),
# video frames pooled to 2 x 2. A square image gives 16 + 5 x 6 = 46 tokens, a wide one 16 + 4 x 9 = 52; a
# 4-frame video 4 x 4 + 1 = 17.
@pytest.fixture(scope="session")
def ov_path(tmp_path_factory):
    return str(build_tiny_llava_onevision(tmp_path_factory.mktemp("tiny-llava-onevision")))


@pytest.fixture(scope="session")
def ov_processor(ov_path):
    return load_processor(ov_path)


@pytest.fixture(scope="session")
def ov_stock(ov_path):
    return {
        impl: LlavaOnevisionForConditionalGeneration.from_pretrained(ov_path, attn_implementation=impl).eval()
        for impl in ("eager", "sdpa")
    }


@pytest.fixture(scope="session")
def ov_single(ov_processor):
    """One prompt: an image and a 4-frame video."""
    return ov_processor(
        text=ov_chat(ov_processor), images=demo_image(64), videos=[demo_video(4, 64)], return_tensors="pt"
    )


@pytest.fixture(scope="session")
def ov_batch(ov_processor):
    """Two prompts, left-padded: a square image and a video; a wide image and another video, a longer question."""
    texts = [ov_chat(ov_processor), ov_chat(ov_processor, "Describe the picture in detail. Is there a car?")]
    images = [demo_image(64), demo_image(64).resize((96, 40))]
    videos = [demo_video(4, 64), demo_video(4, 64)[::-1].copy()]
    return ov_processor(text=texts, images=images, videos=videos, return_tensors="pt", padding=True)


@pytest.fixture(scope="session")
def ov_video_batch(ov_processor):
    """Two prompts, left-padded, one 4-frame video each: 4 x 4 + 1 = 17 tokens a video."""
    return ov_videos(ov_processor)


@pytest.fixture(scope="session", params=["llava-1.5", "llava-1.6", "llava-onevision"])
def backbone(request):
    """The contract test's view of this fork: one case per model family it serves."""
    if request.param == "llava-onevision":
        path, processor, stock = (request.getfixturevalue(n) for n in ("ov_path", "ov_processor", "ov_stock"))
        single, batch = request.getfixturevalue("ov_single"), request.getfixturevalue("ov_batch")
        text_only = processor(text="<|im_start|>user\nSay something short.<|im_end|>\n", return_tensors="pt")
        tokens = [stock["eager"].config.image_token_id, stock["eager"].config.video_token_id]
        video = request.getfixturevalue("ov_video_batch")
        return BackboneCase(request.param, path, stock, single, batch, text_only, tokens, onevision_embed, video)
    if request.param == "llava-1.5":
        path, processor, stock = (request.getfixturevalue(n) for n in ("tiny_path", "processor", "stock_models"))
        single, batch = request.getfixturevalue("single_inputs"), request.getfixturevalue("batch_inputs")
    else:
        path, processor, stock = (request.getfixturevalue(n) for n in ("next_path", "next_processor", "next_stock"))
        single, batch = request.getfixturevalue("square"), request.getfixturevalue("two_shapes")
    text_only = processor(text="USER: Say something short. ASSISTANT:", return_tensors="pt")
    token = stock["eager"].config.image_token_id
    return BackboneCase(request.param, path, stock, single, batch, text_only, token)
