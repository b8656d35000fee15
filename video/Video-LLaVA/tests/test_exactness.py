"""Exactness on prompts the contract test does not cover: a video and an image in one prompt (one global
budget), the processor's legacy `pixel_values_images`, wrap(), and checkpoints in the original key layout."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import VideoLlavaForConditionalGeneration
from videollava_testlib import oracle_forward, oracle_greedy, stage_drops, visual_mask, vtr_model

from videollava.vtr import VTRConfig, load_model, wrap

ATOL = 1e-5
STEPS = 4


def _generate(model, inputs, steps=STEPS):
    out = model.generate(
        **inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
        return_dict_in_generate=True, output_logits=True,
    )  # fmt: skip
    return out.sequences[:, inputs["input_ids"].shape[1] :], torch.stack(out.logits, 1)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_keep_all_equals_stock_on_a_padded_batch_mixing_a_video_and_an_image(
    tiny_path, stock_models, mixed_batch, impl
):
    model, stock = (
        vtr_model(tiny_path, impl, strategy="priortr", prune_layer=[1, 3], keep_ratio=[1.0, 1.0]),
        stock_models[impl],
    )
    valid = mixed_batch["attention_mask"].bool()
    assert not valid.all(), "the fixture must pad one sample"
    with torch.no_grad():
        got, want = model(**mixed_batch).logits, stock(**mixed_batch).logits
    torch.testing.assert_close(got[valid], want[valid], atol=ATOL, rtol=0)
    assert model.vtr_last.stages[0].image_tokens_before == [136 + 16, 136]  # the engine did run
    assert torch.equal(_generate(model, mixed_batch)[0], _generate(stock, mixed_batch)[0])


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize(
    "cfg",
    [
        dict(strategy="fastv", prune_layer=2, keep_tokens=40),
        dict(strategy="priortr", prune_layer=1, keep_ratio=0.25, query_aggregation="question"),
        dict(strategy="vispruner", prune_layer=[1, 3], keep_tokens=[60, 12], head_aggregation="max"),
    ],
)
def test_one_global_budget_over_video_and_image_equals_the_oracle(tiny_path, stock_models, mixed_batch, impl, cfg):
    model, stock = vtr_model(tiny_path, impl, **cfg), stock_models["eager"]
    inputs, prompt_len = mixed_batch, mixed_batch["input_ids"].shape[1]
    with torch.no_grad():
        logits = model(**inputs).logits
    record = model.vtr_last
    budget = [VTRConfig(**cfg).stage_budget(s) for s in range(len(record.stages))]
    for stage, want in zip(record.stages, budget):
        n = want.keep_tokens if want.keep_tokens is not None else None
        if n is not None:
            assert stage.image_tokens_kept == [n, n]
    first = record.stages[0].image_tokens_before
    assert first == [152, 136]
    stages = stage_drops(record, 2, prompt_len, visual_mask(stock, inputs))
    conventions = model.vtr_config.conventions()  # vispruner: compact positions
    expected = oracle_forward(stock, inputs, stages, prompt_len, conventions=conventions)
    for b in range(2):
        rows = (record.kept_index[b] >= 0) & inputs["attention_mask"][b].bool()[record.kept_index[b].clamp_min(0)]
        torch.testing.assert_close(logits[b, rows], expected[b, record.kept_index[b, rows]], atol=ATOL, rtol=0)
    tokens, step_logits = _generate(model, inputs)
    stages = stage_drops(model.vtr_last, 2, prompt_len, visual_mask(stock, inputs))
    want_tokens, want_logits = oracle_greedy(stock, inputs, stages, STEPS, conventions)
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(step_logits, want_logits, atol=ATOL, rtol=0)


def test_the_budget_is_shared_by_the_video_and_the_image_of_one_prompt(tiny_path, stock_models, mixed_batch):
    """Sample 0 holds a video then an image: its kept tokens come from both and add up to the budget."""
    model = vtr_model(tiny_path, "sdpa", strategy="random", prune_layer=2, keep_tokens=100, seed=3)
    with torch.no_grad():
        model(**mixed_batch)
    ids = mixed_batch["input_ids"][0]
    kept = model.vtr_last.stages[0].kept_positions[0]
    from_video = int((ids[kept] == stock_models["eager"].config.video_token_id).sum())
    from_image = int((ids[kept] == stock_models["eager"].config.image_token_id).sum())
    assert from_video + from_image == 100 and from_video > 0 and from_image > 0


def test_legacy_pixel_values_images_is_the_same_input(tiny_path, image_single):
    model = vtr_model(tiny_path, "sdpa", strategy="fastv", prune_layer=2, keep_tokens=6)
    legacy = {**image_single}
    legacy["pixel_values_images"] = legacy.pop("pixel_values")
    with torch.no_grad():
        want = model(**image_single).logits
        positions = model.vtr_last.stages[0].kept_positions[0]
        got = model(**legacy).logits
    assert torch.equal(model.vtr_last.stages[0].kept_positions[0], positions)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    with pytest.raises(ValueError, match="pixel_values_images"):
        model(**legacy, pixel_values=image_single["pixel_values"])


def test_wrap_turns_a_loaded_stock_model_into_vtr(tiny_path, video_single):
    model = VideoLlavaForConditionalGeneration.from_pretrained(tiny_path).eval()
    wrapped = wrap(model, VTRConfig(keep_tokens=20, prune_layer=2))
    assert wrapped is model
    with torch.no_grad():
        wrapped(**video_single)
    assert wrapped.vtr_last.stages[0].image_tokens_kept == [20]
    with pytest.raises(TypeError, match="VideoLlavaForConditionalGeneration"):
        wrap(torch.nn.Linear(2, 2))


def test_default_budget_is_the_backbones_and_an_explicit_one_wins(tiny_path):
    assert vtr_model(tiny_path).vtr_config.keep_tokens == 514
    assert vtr_model(tiny_path, keep_tokens=192).vtr_config.keep_tokens == 192


def test_a_checkpoint_in_the_original_key_layout_loads_with_its_lm_head(tiny_path, video_single):
    """Video-LLaVA checkpoints (LanguageBind/Video-LLaVA-7B-hf, and save_pretrained of the stock class) store
    `language_model.lm_head`, `language_model.model.*`, `image_tower.*`: the stock key mapping, registered under
    the subclass name, must rename them (without it lm_head and the towers stay random)."""
    stored = load_file(f"{tiny_path}/model.safetensors")
    assert "language_model.lm_head.weight" in stored and "lm_head.weight" not in stored
    model = load_model(tiny_path, VTRConfig(enabled=False))
    torch.testing.assert_close(model.lm_head.weight, stored["language_model.lm_head.weight"], atol=0, rtol=0)
    tower = stored["video_tower.embeddings.patch_embedding.weight"]
    torch.testing.assert_close(model.model.video_tower.embeddings.patch_embedding.weight, tower)
    reference = VideoLlavaForConditionalGeneration.from_pretrained(tiny_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**video_single).logits, reference(**video_single).logits, atol=0, rtol=0)


def test_other_checkpoints_are_refused_with_the_fork_to_use(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        tmp_path
    )
    with pytest.raises(ValueError, match="'llama' checkpoint"):
        load_model(str(tmp_path))
