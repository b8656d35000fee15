"""Exactness on InternVL: unpruned == stock transformers; pruned == an oracle that only masks.

The shared contract (test_contract.py) covers every method on a padded multi-tile batch under both kernels;
this file adds what is InternVL's own: videos (frames whose tokens are not contiguous), the InternVL2.5
Llama decoder, single-sample prefill + decode against the oracle, and weights loading under the subclass.
"""

import pytest
import torch
from internvl_testlib import chat, greedy, oracle_forward, oracle_greedy, stage_drops, vtr_model
from transformers import InternVLForConditionalGeneration

from internvl_vtr import VTRConfig, wrap
from internvl_vtr.tiny import build_tiny_internvl, demo_image

ATOL = 1e-5
STEPS = 4


def _visual(model, inputs):
    return inputs["input_ids"] == model.config.image_token_id


def assert_matches_oracle(model, stock, inputs, stages, steps=STEPS):
    tokens, logits = greedy(model, inputs, steps)
    want_tokens, want_logits = oracle_greedy(stock, inputs, stages, steps)
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(logits, want_logits, atol=ATOL, rtol=0)


def test_hub_layout_checkpoints_load_under_the_subclass(tiny_path, stock_models):
    """Checkpoints keep the hub key layout (`language_model.model.*`, `vision_tower.*`, ...; save_pretrained
    writes it too) that transformers renames for the stock class; the subclass must get the same renaming,
    else its weights silently stay random."""
    from safetensors import safe_open

    with safe_open(f"{tiny_path}/model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert (
        "language_model.model.layers.0.self_attn.q_proj.weight" in keys and "vision_tower.embeddings.cls_token" in keys
    )
    got = vtr_model(tiny_path, enabled=False).state_dict()
    stock = stock_models["sdpa"].state_dict()
    assert set(got) == set(stock)
    for key in stock:
        assert torch.equal(got[key], stock[key]), key


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_keep_all_equals_stock_on_videos(tiny_path, stock_models, video_inputs, impl):
    model, stock = (
        vtr_model(tiny_path, impl, strategy="priortr", prune_layer=[1, 3], keep_ratio=1.0),
        stock_models[impl],
    )
    valid = video_inputs["attention_mask"].bool()
    assert (~valid).any(), "the fixture pads one sample"
    with torch.no_grad():
        torch.testing.assert_close(
            model(**video_inputs).logits[valid], stock(**video_inputs).logits[valid], atol=ATOL, rtol=0
        )
    assert model.vtr_last.stages[0].image_tokens_before == [48, 48]  # 3 frames x one 16-token tile
    unmarked = {key: value for key, value in video_inputs.items() if key != "frame_index"}  # stock generate refuses it
    assert torch.equal(greedy(model, video_inputs, STEPS)[0], greedy(stock, unmarked, STEPS)[0])


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize(
    "cfg",
    [
        dict(strategy="fastv", prune_layer=2, keep_tokens=8),
        dict(strategy="priortr", prune_layer=1, keep_ratio=0.25, query_aggregation="question"),
        dict(strategy="random", prune_layer=3, keep_tokens=5),
        dict(strategy="fastv", prune_layer=[1, 2, 3], keep_tokens=[32, 16, 4], head_aggregation="max"),
    ],
)
def test_pruned_prefill_and_decode_equal_the_oracle(tiny_path, stock_models, single_inputs, impl, cfg):
    model = vtr_model(tiny_path, impl, **cfg)
    with torch.no_grad():
        logits = model(**single_inputs).logits
    record = model.vtr_last
    prompt_len = single_inputs["input_ids"].shape[1]
    stages = stage_drops(record, 1, prompt_len, _visual(model, single_inputs))
    assert len(stages) == len(VTRConfig(**cfg).prune_layers)
    assert record.stages[0].image_tokens_before == [80]  # 2 x 2 tiles + thumbnail, 16 tokens each
    kept = record.kept_index[0]
    assert logits.shape[1] == kept.numel() < prompt_len
    torch.testing.assert_close(
        logits[0], oracle_forward(stock_models["eager"], single_inputs, stages, prompt_len)[0, kept], atol=ATOL, rtol=0
    )
    assert_matches_oracle(model, stock_models["eager"], single_inputs, stages)


@pytest.mark.parametrize(
    "cfg",
    [
        dict(strategy="priortr", keep_tokens=10, prune_layer=2),
        dict(strategy="fastv", keep_tokens=[30, 7], prune_layer=[1, 3]),
    ],
)
def test_videos_share_one_budget_across_frames_and_equal_the_oracle(tiny_path, stock_models, video_inputs, cfg):
    model = vtr_model(tiny_path, "sdpa", **cfg)
    with torch.no_grad():
        model(**video_inputs)
    record = model.vtr_last
    budget = VTRConfig(**cfg).keep_tokens
    last = budget[-1] if isinstance(budget, list) else budget
    assert record.stages[-1].image_tokens_kept == [last, last]  # one budget over all frames of a sample
    prompt_len = video_inputs["input_ids"].shape[1]
    visual = _visual(model, video_inputs)
    text = (~visual[0]).nonzero().reshape(-1)
    gaps = [int(p) for p in text if visual[0, :p].any() and visual[0, p:].any()]
    assert gaps, "frames are separated by text (</img>, newline, FrameN: <img>): not one contiguous span"
    kept = record.kept_index[0]
    assert set(gaps) <= set(kept.tolist()), "the text between frames is never dropped"
    stages = stage_drops(record, 2, prompt_len, visual)
    assert_matches_oracle(model, stock_models["eager"], video_inputs, stages)


def test_internvl25_llama_decoder_keep_all_and_pruned_equal_stock_and_oracle(tmp_path, processor, single_inputs):
    path = str(build_tiny_internvl(tmp_path / "internvl25", text_model="llama", seed=1))
    stock = InternVLForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
    assert type(stock.model.language_model).__name__ == "LlamaModel"
    model = vtr_model(path, "sdpa", enabled=False)
    with torch.no_grad():
        torch.testing.assert_close(model(**single_inputs).logits, stock(**single_inputs).logits, atol=ATOL, rtol=0)
    model.set_vtr_config(VTRConfig(strategy="priortr", keep_tokens=[24, 6], prune_layer=[1, 3]))
    with torch.no_grad():
        model(**single_inputs)
    prompt_len = single_inputs["input_ids"].shape[1]
    stages = stage_drops(model.vtr_last, 1, prompt_len, _visual(model, single_inputs))
    assert_matches_oracle(model, stock, single_inputs, stages)


def test_several_images_share_one_global_budget(tiny_path, stock_models, processor, image):
    inputs = processor(images=[image, demo_image(64, 32)], text=chat(processor, images=2), return_tensors="pt")
    model = vtr_model(tiny_path, "sdpa", prune_layer=2, keep_tokens=12)
    with torch.no_grad():
        model(**inputs)
    record = model.vtr_last
    assert record.stages[0].image_tokens_before == [128] and record.stages[0].image_tokens_kept == [12]
    stages = stage_drops(record, 1, inputs["input_ids"].shape[1], _visual(model, inputs))
    assert_matches_oracle(model, stock_models["eager"], inputs, stages)


def test_wrap_turns_a_loaded_stock_model_into_vtr(tiny_path, single_inputs):
    model = InternVLForConditionalGeneration.from_pretrained(tiny_path).eval()
    wrapped = wrap(model, VTRConfig(keep_tokens=4, prune_layer=2))
    assert wrapped is model
    with torch.no_grad():
        wrapped(**single_inputs)
    assert wrapped.vtr_last.stages[0].image_tokens_kept == [4]


def test_default_budget_is_the_backbones(tiny_path):
    assert vtr_model(tiny_path).vtr_config.keep_tokens == 192
    assert vtr_model(tiny_path, keep_tokens=40).vtr_config.keep_tokens == 40
