"""Shared fixtures: tiny random Qwen3-VL (dense and MoE, with DeepStack), Qwen2.5-VL, Qwen2-VL and Qwen3.5 (dense
and MoE, a hybrid decoder) checkpoints saved to disk and loaded back through `from_pretrained`, and the processors
this fork builds without torchvision."""

import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

from visual_token_pruning import load_processor
from visual_token_pruning.tiny import (
    FAMILIES,
    MOE_CLASSES,
    QWEN3_5_TEST_LAYERS,
    build_tiny_qwen3_vl,
    demo_image,
    demo_video,
)

sys.path.insert(0, str(Path(__file__).parent))
from qwen3vl_testlib import BackboneCase, chat, image_video_batch, video_batch, visual_ids  # noqa: E402

# Tiny models gain nothing from intra-op threads, and on a shared machine (other test runs beside this one) OpenMP's
# spinning threads make a forward many times slower (Video-LLaVA's conftest found the same); one thread keeps it fast.
torch.set_num_threads(1)


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


IMPLS = ("eager", "sdpa")
#: contract-test name -> model_type of the tiny checkpoint
CONTRACT_FAMILIES = {
    "qwen3-vl": "qwen3_vl",
    "qwen2.5-vl": "qwen2_5_vl",
    "qwen2-vl": "qwen2_vl",
    "qwen3.5": "qwen3_5",
    "qwen3.5-moe": "qwen3_5_moe",
}
#: the families with a hybrid decoder (linear-attention layers, `QWEN3_5_TEST_LAYERS`)
HYBRID = ("qwen3.5", "qwen3.5-moe")
#: contract tests that cannot hold as written on a hybrid decoder -> why, and where test_qwen3_5.py checks the same
#: against the physical-truncation oracle: the masking oracle cannot drop a token from a recurrent layer's state, the
#: literal ones hand every layer a 4-D mask (a linear-attention layer takes the 2-D padding), and some fixed prune
#: layers score from a linear layer here (refused: fastv at 1 and 2, "own" at 3)
HYBRID_SKIPS = {
    "test_every_method_keeps_its_budget_and_equals_the_oracle": "test_every_method_equals_the_physical_oracle",
    "test_every_merging_method_equals_the_literal_oracle": "test_every_merging_method_equals_the_physical_oracle",
    "test_every_video_method_equals_the_literal_oracle": "test_every_video_method_equals_the_physical_oracle",
    "test_every_convention_equals_the_oracle": "test_every_convention_equals_the_physical_oracle",
    "test_scoring_attention_is_the_eager_causal_attention_of_the_scoring_layer": (
        "test_scoring_attention_is_the_eager_attention_of_the_scoring_layer"
    ),
    "test_a_follow_up_turn_on_the_pruned_cache_equals_the_oracle": "test_a_follow_up_turn_equals_the_physical_oracle",
    "test_a_text_only_prompt_runs_unpruned": "test_a_text_only_prompt_runs_unpruned",
    "test_nothing_pruned_is_the_stock_model": "test_nothing_pruned_is_the_stock_model",
    # not restated: the physical oracle replays merges at one stage only (HoliTom merges at two); DyCoke's
    # decode-time pruning is refused here (test_a_decode_hook_is_refused_where_a_layer_it_reaches_is_linear)
    "test_every_video_method_inside_the_llm_equals_its_oracle": None,
}


def pytest_collection_modifyitems(items):
    """Skip, on the hybrid families, exactly the contract tests of `HYBRID_SKIPS`."""
    for item in items:
        spec = getattr(item, "callspec", None)
        if spec is None or spec.params.get("backbone") not in HYBRID or item.path.name != "test_contract.py":
            continue
        name = item.originalname
        if name not in HYBRID_SKIPS:
            continue
        if name == "test_nothing_pruned_is_the_stock_model" and "prune_layer" not in spec.params["cfg"]:
            continue  # only its keep-all case, whose prune layers [1, 3] are refused here
        instead = HYBRID_SKIPS[name]
        where = (
            f"test_qwen3_5.py::{instead} checks this" if instead else "the staged oracle gives linear layers 4-D masks"
        )
        item.add_marker(pytest.mark.skip(reason=f"hybrid decoder: {where}"))


def tiny_family(path, family: str) -> str:
    """A tiny checkpoint of `family` (a model_type; Qwen3.5 with the tests' hybrid layout) at `path`."""
    if family.startswith("qwen3_5"):
        return str(
            build_tiny_qwen3_vl(path, family="qwen3_5", moe=family.endswith("moe"), layer_types=QWEN3_5_TEST_LAYERS)
        )
    return str(build_tiny_qwen3_vl(path, family=family))


def stock_class(family: str):
    """The stock model class of a family (a model_type)."""
    if family.endswith("_moe"):
        return getattr(transformers, MOE_CLASSES[family.removesuffix("_moe")])
    return getattr(transformers, FAMILIES[family][0])


@pytest.fixture(scope="session")
def family_paths(tmp_path_factory, tiny_path):
    """model_type -> a tiny checkpoint of that family (built on first use)."""
    paths = {"qwen3_vl": tiny_path}

    def get(family):
        if family not in paths:
            paths[family] = tiny_family(tmp_path_factory.mktemp(f"tiny-{family}"), family)
        return paths[family]

    return get


@pytest.fixture(scope="session")
def family_cases(family_paths):
    """contract-test name -> its `BackboneCase` (built on first use) for the families other than Qwen3-VL: a
    padded image + video batch (Qwen2.5-VL's frame groups sit 2 positions apart in time, Qwen3.5's carry
    timestamps), a padded batch of two videos."""
    cases = {}

    def get(name):
        if name not in cases:
            family = CONTRACT_FAMILIES[name]
            path = family_paths(family)
            proc = load_processor(path)
            stock = {impl: stock_class(family).from_pretrained(path, attn_implementation=impl).eval() for impl in IMPLS}
            single = proc(images=demo_image(64), text=chat(proc), return_tensors="pt")
            text_only = proc(text=chat(proc, images=0), return_tensors="pt")
            ids = visual_ids(stock["eager"].config)
            video = video_batch(proc)
            cases[name] = BackboneCase(name, path, stock, single, image_video_batch(proc), text_only, ids, video=video)
        return cases[name]

    return get


@pytest.fixture(scope="session", params=list(CONTRACT_FAMILIES))
def backbone(request, tiny_path, processor, stock_models, single_inputs, batch_inputs, family_cases):
    """The contract test's view of this fork: Qwen3-VL on an image batch, the other families as `family_cases`;
    every family on a padded batch of two videos (4 and 5 frame groups; Qwen3-VL's with a timestamp before each
    group)."""
    if request.param != "qwen3-vl":
        return family_cases(request.param)
    text_only = processor(text=chat(processor, images=0), return_tensors="pt")
    ids = visual_ids(stock_models["eager"].config)
    video = video_batch(processor)
    return BackboneCase(
        request.param, tiny_path, stock_models, single_inputs, batch_inputs, text_only, ids, video=video
    )


@pytest.fixture(scope="session", params=HYBRID)
def hybrid(request, family_cases):
    """The Qwen3.5 families (dense and MoE) as contract cases, for test_qwen3_5.py."""
    return family_cases(request.param)
