"""Qwen3-VL specifics: strategy facts (grids, vision importance), the MoE variant, clear errors."""

import pytest
import torch
from qwen3vl_testlib import oracle_forward, stage_drops, visual_ids, vtr_model

import visual_token_pruning
from visual_token_pruning import PruningStrategy, VTRConfig, load_model, register_strategy, wrap

ATOL = 1e-5
FACTS = []


@register_strategy("test_qwen_facts")
class FactCapture(PruningStrategy):
    needs_attention = False

    def compute_scores(self, attention, image_token_range, config, **ctx):
        FACTS.append((ctx["patch_grid"], ctx["visual_grid"](), ctx["vision_importance"]()))
        start, end = image_token_range
        return torch.zeros(end - start)


def test_visual_grid_has_one_group_per_image_and_frame_group(tiny_path, video_inputs):
    FACTS.clear()
    model = vtr_model(tiny_path, "sdpa", strategy="test_qwen_facts", prune_layer=1, keep_tokens=4)
    with torch.no_grad():
        model(**video_inputs)
    patch_grid, grid, _ = FACTS[0]
    expected = []
    image_t, image_h, image_w = video_inputs["image_grid_thw"][0].tolist()
    video_t, video_h, video_w = video_inputs["video_grid_thw"][0].tolist()
    groups = [(image_h // 2, image_w // 2)] * image_t + [(video_h // 2, video_w // 2)] * video_t
    for g, (rows, cols) in enumerate(groups):
        expected += [(g, r, c) for r in range(rows) for c in range(cols)]
    assert grid.tolist() == [list(e) for e in expected]
    assert patch_grid == (image_h // 2, image_w // 2)


def test_vision_importance_is_the_last_vision_blocks_received_attention(tiny_path, video_inputs, monkeypatch):
    """Equals the eager attention weights that the stock vision tower itself computes in its last block
    (mean over heads and query patches of each image / frame group, then over each 2 x 2 merge)."""
    from transformers.models.qwen3_vl import modeling_qwen3_vl

    FACTS.clear()
    model = vtr_model(tiny_path, "eager", strategy="test_qwen_facts", prune_layer=1, keep_tokens=4)
    last = model.model.visual.blocks[-1].attn
    recorded, stock_fn = [], modeling_qwen3_vl.eager_attention_forward

    def recording(module, *args, **kwargs):
        out, weights = stock_fn(module, *args, **kwargs)
        if module is last:
            recorded.append(weights[0].float().mean(dim=(0, 1)))  # [keys] of one image / frame group
        return out, weights

    monkeypatch.setattr(modeling_qwen3_vl, "eager_attention_forward", recording)
    with torch.no_grad():
        model(**video_inputs)
    expected = torch.cat(recorded).reshape(-1, 4).mean(-1)
    importance = FACTS[0][2]
    assert importance.shape == (
        int(torch.isin(video_inputs["input_ids"], torch.tensor(visual_ids(model.config))).sum()),
    )
    torch.testing.assert_close(importance, expected, atol=1e-6, rtol=0)


def test_every_method_runs_on_a_video_prompt_with_generate(tiny_path, video_inputs):
    from visual_token_pruning import available_strategies, get_strategy

    for method in sorted(m for m in available_strategies() if not m.startswith(("test_", "contract_"))):
        first = 0 if not get_strategy(method).needs_attention else 2
        model = vtr_model(tiny_path, "sdpa", strategy=method, prune_layer=first, keep_tokens=9)
        model.generate(**video_inputs, max_new_tokens=2, do_sample=False)
        assert model.vtr_last.stages[0].image_tokens_kept == [9], method


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


def test_beam_search_repeats_each_samples_facts(tiny_path, batch_inputs):
    """generate(num_beams=2) repeats each sample; vision importance (VisPruner) follows, so every copy keeps
    what the sample keeps in a plain forward."""
    model = vtr_model(tiny_path, "sdpa", strategy="vispruner", prune_layer=2, keep_tokens=8)
    with torch.no_grad():
        model(**batch_inputs)
    single = [p.tolist() for p in model.vtr_last.stages[0].kept_positions]
    model.generate(**batch_inputs, max_new_tokens=2, num_beams=2, do_sample=False)
    beams = [p.tolist() for p in model.vtr_last.stages[0].kept_positions]
    assert beams == [single[0], single[0], single[1], single[1]]
