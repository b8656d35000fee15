"""Qwen3-VL specifics: the MoE variant, clear errors (the facts for strategies, for every Qwen-VL family: test_qwen_families.py)."""

import pytest
import torch
from qwen3vl_testlib import oracle_forward, stage_drops, visual_ids, vtr_model

import visual_token_pruning
from visual_token_pruning import VTRConfig, load_model, wrap

ATOL = 1e-5


def test_moe_keep_all_is_stock_and_pruned_is_the_oracle(moe_path, moe_stock, batch_inputs):
    model = load_model(moe_path, VTRConfig(enabled=False), attn_implementation="eager")
    assert type(model).__name__ == "VTRQwen3VLMoeForConditionalGeneration"
    valid = batch_inputs["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch_inputs).logits[valid], moe_stock(**batch_inputs).logits[valid])
        model.set_vtr_config(VTRConfig(strategy="fastv", prune_layer=1, keep_tokens=10))
        logits = model(**batch_inputs).logits
    record = model.vtr_last
    prompt_len = batch_inputs["input_ids"].shape[1]
    visual = torch.isin(batch_inputs["input_ids"], torch.tensor(visual_ids(model.config)))
    expected = oracle_forward(moe_stock, batch_inputs, stage_drops(record, 2, prompt_len, visual), prompt_len)
    for b in range(2):
        rows = (record.kept_index[b] >= 0) & valid[b][record.kept_index[b].clamp_min(0)]
        torch.testing.assert_close(logits[b, rows], expected[b, record.kept_index[b, rows]], atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="output_router_logits"):
        model(**batch_inputs, output_router_logits=True)
    assert "Qwen3-VL-MoE" in visual_token_pruning.BACKBONES


# ------------------------------------------------------------------ clear errors


def test_hand_built_inputs_without_mm_token_type_ids_are_refused(tiny_path, single_inputs):
    model = vtr_model(tiny_path, strategy="fastv", prune_layer=2, keep_tokens=4)
    inputs = {k: v for k, v in single_inputs.items() if k != "mm_token_type_ids"}
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        model(**inputs)


def test_pixels_without_their_grid_are_refused(tiny_path, single_inputs):
    model = vtr_model(tiny_path, strategy="fastv", prune_layer=2, keep_tokens=4)
    inputs = {k: v for k, v in single_inputs.items() if k != "image_grid_thw"}
    with pytest.raises(ValueError, match="image_grid_thw"):
        model(**inputs)


def test_position_ids_of_the_wrong_shape_are_refused(tiny_path, single_inputs):
    model = vtr_model(tiny_path, strategy="fastv", prune_layer=2, keep_tokens=4)
    length = single_inputs["input_ids"].shape[1]
    with pytest.raises(ValueError, match="position_ids"):
        model(**single_inputs, position_ids=torch.zeros(2, 1, length - 1, dtype=torch.long))


def test_other_checkpoints_and_models_are_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=32
    )
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'llama' checkpoint"):
        load_model(str(tmp_path))
    with pytest.raises(TypeError, match="Qwen2_5_VLForConditionalGeneration.*Qwen3VLForConditionalGeneration"):
        wrap(LlamaForCausalLM(config))


def test_a_budget_past_the_model_is_refused(tiny_path):
    from visual_token_pruning import VTRConfigError

    with pytest.raises(VTRConfigError, match="prune_layer"):
        load_model(tiny_path, VTRConfig(strategy="fastv", prune_layer=9, keep_tokens=4))
