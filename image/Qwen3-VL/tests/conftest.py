"""Shared fixtures: tiny random Qwen3-VL (dense and MoE, with DeepStack), Qwen2.5-VL and Qwen2-VL checkpoints
saved to disk and loaded back through `from_pretrained`, and the processors this fork builds without
torchvision."""

import sys
from pathlib import Path

import pytest
import transformers
from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

from visual_token_pruning import load_processor
from visual_token_pruning.tiny import FAMILIES, build_tiny_qwen3_vl, demo_image, demo_video

sys.path.insert(0, str(Path(__file__).parent))
from qwen3vl_testlib import BackboneCase, chat, image_video_batch, video_batch, visual_ids  # noqa: E402


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    # 4 px patches merged 2x2: a 64 x 64 image is 64 visual tokens; 4 layers, GQA, DeepStack after layers 0, 1.
    return str(build_tiny_qwen3_vl(tmp_path_factory.mktemp("tiny-qwen3-vl")))


@pytest.fixture(scope="session")
def moe_path(tmp_path_factory):
    return str(build_tiny_qwen3_vl(tmp_path_factory.mktemp("tiny-qwen3-vl-moe"), moe=True))


@pytest.fixture(scope="session")
def processor(tiny_path):
    return load_processor(tiny_path)


@pytest.fixture(scope="session")
def image():
    return demo_image(64)


@pytest.fixture(scope="session")
def single_inputs(processor, image):
    return processor(images=image, text=chat(processor), return_tensors="pt")


@pytest.fixture(scope="session")
def batch_inputs(processor, image):
    """Two prompts of different lengths and image sizes (64 and 48 visual tokens): left-padded."""
    texts = [chat(processor), chat(processor, "Describe the picture in detail. Is there a cat, a dog or a car?")]
    other = demo_image(64, height=48).transpose(0)
    return processor(images=[image, other], text=texts, return_tensors="pt", padding=True)


@pytest.fixture(scope="session")
def video_inputs(processor):
    """One prompt with an image and an 8-frame video (4 frame groups of 16 tokens, each with its timestamp)."""
    text = chat(processor, "What happens in the video?", images=1, videos=1)
    video = demo_video(8, 32)
    return processor(
        images=demo_image(48), videos=[video], text=text, return_tensors="pt", video_metadata=[_metadata(8)]
    )


def _metadata(frames, fps=4.0):
    return {"total_num_frames": frames, "fps": fps, "frames_indices": list(range(frames))}


@pytest.fixture(scope="session")
def stock_models(tiny_path):
    return {
        impl: Qwen3VLForConditionalGeneration.from_pretrained(tiny_path, attn_implementation=impl).eval()
        for impl in ("eager", "sdpa")
    }


@pytest.fixture(scope="session")
def moe_stock(moe_path):
    return Qwen3VLMoeForConditionalGeneration.from_pretrained(moe_path, attn_implementation="eager").eval()


#: contract-test name -> model_type of the tiny checkpoint
CONTRACT_FAMILIES = {"qwen3-vl": "qwen3_vl", "qwen2.5-vl": "qwen2_5_vl", "qwen2-vl": "qwen2_vl"}


@pytest.fixture(scope="session")
def family_paths(tmp_path_factory, tiny_path):
    """model_type -> a tiny checkpoint of that family (built on first use)."""
    paths = {"qwen3_vl": tiny_path}

    def get(family):
        if family not in paths:
            paths[family] = str(build_tiny_qwen3_vl(tmp_path_factory.mktemp(f"tiny-{family}"), family=family))
        return paths[family]

    return get


@pytest.fixture(scope="session", params=list(CONTRACT_FAMILIES))
def backbone(request, tiny_path, processor, stock_models, single_inputs, batch_inputs, family_paths):
    """The contract test's view of this fork: Qwen3-VL on an image batch, Qwen2.5-VL and Qwen2-VL on a
    padded image + video batch (Qwen2.5-VL's frame groups sit 2 positions apart in time); every family on a
    padded batch of two videos (4 and 5 frame groups; Qwen3-VL's with a timestamp before each group)."""
    family = CONTRACT_FAMILIES[request.param]
    if family == "qwen3_vl":
        path, proc, stock, single, batch = tiny_path, processor, stock_models, single_inputs, batch_inputs
    else:
        path = family_paths(family)
        proc = load_processor(path)
        stock_class = getattr(transformers, FAMILIES[family][0])
        stock = {impl: stock_class.from_pretrained(path, attn_implementation=impl).eval() for impl in ("eager", "sdpa")}
        single = proc(images=demo_image(64), text=chat(proc), return_tensors="pt")
        batch = image_video_batch(proc)
    text_only = proc(text=chat(proc, images=0), return_tensors="pt")
    ids = visual_ids(stock["eager"].config)
    return BackboneCase(request.param, path, stock, single, batch, text_only, ids, video=video_batch(proc))
