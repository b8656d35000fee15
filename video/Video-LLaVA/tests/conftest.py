"""Shared fixtures: one tiny random Video-LLaVA saved to disk and loaded back through `from_pretrained`, and
small mp4 files written with PyAV and decoded by the fork's video_io (decord, PyAV fallback)."""

import sys
from pathlib import Path

import pytest
import torch
from transformers import VideoLlavaForConditionalGeneration

from videollava.vtr import load_processor
from videollava.vtr.prompts import encode, video_prompt
from videollava.vtr.tiny import build_tiny_video_llava, demo_frames
from videollava.vtr.video_io import load_video, write_test_video

sys.path.insert(0, str(Path(__file__).parent))
from videollava_testlib import BackboneCase  # noqa: E402

# Tiny models gain nothing from intra-op threads, and on a shared machine (other test runs beside this one)
# OpenMP's spinning threads made each forward ~30x slower here; one thread keeps the suite fast.
torch.set_num_threads(1)

LONG_QUESTION = "Describe the video in detail. Is there a cat, a car or a ball?"


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    # 32 px frames of 8 px patches: an image is 16 tokens, an 8-frame video 8 x 17 = 136; 4 layers, GQA 4/2.
    return str(build_tiny_video_llava(tmp_path_factory.mktemp("tiny-video-llava")))


@pytest.fixture(scope="session")
def processor(tiny_path):
    return load_processor(tiny_path)


@pytest.fixture(scope="session")
def video_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    return [
        write_test_video(root / "a.mp4", num_frames=16, size=(64, 48), fps=8),
        write_test_video(root / "v_b.mp4", num_frames=24, size=(48, 64), fps=12),
    ]


@pytest.fixture(scope="session")
def clips(video_files):
    """Two decoded 8-frame clips (uint8 [8, h, w, 3])."""
    return [load_video(path, num_frames=8).frames for path in video_files]


@pytest.fixture(scope="session")
def image():
    return demo_frames(1, 64)[0]


@pytest.fixture(scope="session")
def stock_models(tiny_path):
    return {
        impl: VideoLlavaForConditionalGeneration.from_pretrained(tiny_path, attn_implementation=impl).eval()
        for impl in ("eager", "sdpa")
    }


@pytest.fixture(scope="session")
def video_single(processor, clips):
    return encode(processor, [video_prompt("What happens in the video?")], videos=clips[:1])


@pytest.fixture(scope="session")
def video_batch(processor, clips):
    """Two video prompts of different lengths: the shorter one is left-padded."""
    return encode(processor, [video_prompt("What happens?"), video_prompt(LONG_QUESTION)], videos=clips)


@pytest.fixture(scope="session")
def image_single(processor, image):
    return encode(processor, [video_prompt("What is shown?", num_videos=0, num_images=1)], images=[image])


@pytest.fixture(scope="session")
def image_batch(processor, image):
    prompts = [video_prompt("What is shown?", 0, 1), video_prompt("Is there a car or a tree? What color is it?", 0, 1)]
    return encode(processor, prompts, images=[image, image[:, ::-1].copy()])


@pytest.fixture(scope="session")
def mixed_batch(processor, clips, image):
    """A prompt with a video and an image (one global budget) beside a video-only prompt; padded."""
    prompts = [video_prompt("What happens, and what is in the picture?", 1, 1), video_prompt("What happens?")]
    return encode(processor, prompts, videos=clips, images=[image])


@pytest.fixture(scope="session", params=["video", "image"])
def backbone(request, tiny_path, processor, stock_models, video_batch):
    """The contract test's view of this fork: one case per kind of visual input, each with the padded video
    batch for the video methods (the model takes videos whichever kind the case's other batches hold)."""
    single, batch = (request.getfixturevalue(f"{request.param}_{n}") for n in ("single", "batch"))
    text_only = encode(processor, ["USER: Say something short. ASSISTANT:"])
    config = stock_models["eager"].config
    token = config.video_token_id if request.param == "video" else config.image_token_id
    name = f"video-llava-{request.param}"
    return BackboneCase(name, tiny_path, stock_models, single, batch, text_only, token, video=video_batch)
