"""Exactness: unpruned == stock transformers; pruned == an oracle that only masks, with no pruning machinery."""

import pytest
import torch

from llava.vtr import VTRConfig, wrap
from llava_testlib import chat, oracle_forward, oracle_greedy, stage_drops, vtr_model

ATOL = 1e-5
STEPS = 6


def _generate(model, inputs, steps=STEPS):
    out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    return out[:, inputs["input_ids"].shape[1] :]


def _generate_logits(model, inputs, steps=STEPS):
    out = model.generate(
        **inputs,
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
    )
    return out.sequences[:, inputs["input_ids"].shape[1] :], torch.stack(out.logits, 1)


def assert_matches_oracle(model, stock, inputs, stages):
    """Greedy tokens and every decode step's logits equal the oracle's."""
    tokens, logits = _generate_logits(model, inputs)
    expected_tokens, expected_logits = oracle_greedy(stock, inputs, stages, STEPS)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, atol=ATOL, rtol=0)
    return tokens


def test_keep_all_equals_stock_on_a_padded_batch(tiny_path, stock_models, batch_inputs):
    stock = stock_models["sdpa"]
    model = vtr_model(tiny_path, "sdpa", prune_layer=[1, 3], keep_ratio=1.0, strategy="priortr")
    valid = batch_inputs["attention_mask"].bool()
    with torch.no_grad():
        expected = stock(**batch_inputs).logits
        got = model(**batch_inputs).logits
    torch.testing.assert_close(got[valid], expected[valid], atol=ATOL, rtol=0)
    assert torch.equal(_generate(model, batch_inputs), _generate(stock, batch_inputs))


def test_wrap_turns_a_loaded_stock_model_into_vtr(tiny_path, single_inputs):
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tiny_path).eval()
    wrapped = wrap(model, VTRConfig(keep_tokens=4, prune_layer=2))
    assert wrapped is model
    with torch.no_grad():
        wrapped(**single_inputs)
    assert wrapped.vtr_last.stages[0].image_tokens_kept == [4]


def _image_mask(model, inputs):
    return inputs["input_ids"] == model.config.image_token_id


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
    stages = stage_drops(record, 1, prompt_len, _image_mask(model, single_inputs))
    assert len(stages) == len(VTRConfig(**cfg).prune_layers)
    expected = oracle_forward(stock_models["eager"], single_inputs, stages, prompt_len)
    kept = record.kept_index[0]
    assert logits.shape[1] == kept.numel() < prompt_len
    torch.testing.assert_close(logits[0], expected[0, kept], atol=ATOL, rtol=0)

    assert_matches_oracle(model, stock_models["eager"], single_inputs, stages)


def test_batch_with_different_padding_equals_oracle_and_single_runs(tiny_path, stock_models, batch_inputs, processor):
    cfg = dict(strategy="fastv", prune_layer=2, keep_tokens=10)
    model = vtr_model(tiny_path, "sdpa", **cfg)
    mask = batch_inputs["attention_mask"]
    assert (mask == 0).any(), "the fixture must pad one sample"
    with torch.no_grad():
        model(**batch_inputs)
    record = model.vtr_last
    assert record.stages[0].image_tokens_kept == [10, 10]
    prompt_len = batch_inputs["input_ids"].shape[1]
    stages = stage_drops(record, 2, prompt_len, _image_mask(model, batch_inputs))
    generated = assert_matches_oracle(model, stock_models["eager"], batch_inputs, stages)

    # Each sample alone (no padding) keeps the same image tokens, shifted by its padding.
    for b in range(2):
        pad = int((mask[b] == 0).sum())
        one = {k: v[b : b + 1, pad:] if k != "pixel_values" else v[b : b + 1] for k, v in batch_inputs.items()}
        alone = _generate(model, one)
        assert torch.equal(model.vtr_last.stages[0].kept_positions[0] + pad, record.stages[0].kept_positions[b])
        assert torch.equal(alone[0], generated[b])


def test_batch_mixing_image_and_text_only_prompts(tiny_path, stock_models, processor, image):
    texts = [chat(processor), "USER: Answer with one word: yes or no? ASSISTANT:"]
    inputs = processor(images=[image], text=texts, return_tensors="pt", padding=True)
    model = vtr_model(tiny_path, "eager", strategy="fastv", prune_layer=2, keep_tokens=3)
    with torch.no_grad():
        model(**inputs)
    record = model.vtr_last
    assert record.stages[0].image_tokens_before == [64, 0]
    assert record.stages[0].image_tokens_kept == [3, 0]
    prompt_len = inputs["input_ids"].shape[1]
    stages = stage_drops(record, 2, prompt_len, _image_mask(model, inputs))
    assert_matches_oracle(model, stock_models["eager"], inputs, stages)


def test_keep_tokens_zero_drops_every_image_token(tiny_path, stock_models, single_inputs):
    model = vtr_model(tiny_path, "sdpa", prune_layer=2, keep_tokens=0)
    with torch.no_grad():
        logits = model(**single_inputs).logits
    prompt_len = single_inputs["input_ids"].shape[1]
    assert logits.shape[1] == prompt_len - 64
    assert model.vtr_last.stages[0].image_tokens_kept == [0]
    stages = stage_drops(model.vtr_last, 1, prompt_len, _image_mask(model, single_inputs))
    assert_matches_oracle(model, stock_models["eager"], single_inputs, stages)


def test_budget_larger_than_the_image_keeps_everything(tiny_path, stock_models, single_inputs):
    model = vtr_model(tiny_path, "sdpa", prune_layer=2, keep_tokens=10_000)
    with torch.no_grad():
        got = model(**single_inputs).logits
        expected = stock_models["sdpa"](**single_inputs).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert model.vtr_last.stages[0].image_tokens_kept == [64]


def test_multiple_images_share_one_global_budget(tiny_path, stock_models, processor, image):
    inputs = processor(images=[image, image.rotate(90)], text=chat(processor, images=2), return_tensors="pt")
    model = vtr_model(tiny_path, "sdpa", prune_layer=2, keep_tokens=12)
    with torch.no_grad():
        model(**inputs)
    record = model.vtr_last
    is_image = _image_mask(model, inputs)[0]
    assert record.stages[0].image_tokens_before == [128]
    assert record.stages[0].image_tokens_kept == [12]  # global: 12 across both images, not 12 each
    kept = record.kept_index[0]
    text_positions = (~is_image).nonzero().reshape(-1)
    assert set(text_positions.tolist()) <= set(kept.tolist()), "text between and around images is never dropped"
    assert kept.numel() == text_positions.numel() + 12
    prompt_len = inputs["input_ids"].shape[1]
    stages = stage_drops(record, 1, prompt_len, is_image[None])
    assert_matches_oracle(model, stock_models["eager"], inputs, stages)


def test_multi_stage_prunes_kept_tokens_only_and_records_each_stage(tiny_path, single_inputs):
    model = vtr_model(tiny_path, "sdpa", strategy="fastv", prune_layer=[1, 3], keep_tokens=[20, 5])
    with torch.no_grad():
        model(**single_inputs)
    first, second = model.vtr_last.stages
    assert (first.layer, second.layer) == (1, 3)
    assert first.image_tokens_before == [64] and first.image_tokens_kept == [20]
    assert second.image_tokens_before == [20] and second.image_tokens_kept == [5]
    assert set(second.kept_positions[0].tolist()) <= set(first.kept_positions[0].tolist())
    assert second.seq_len_after == first.seq_len_before - 64 + 5


def test_no_cache_forward_matches_cached_forward(tiny_path, single_inputs):
    model = vtr_model(tiny_path, "sdpa", strategy="priortr", prune_layer=2, keep_tokens=7)
    with torch.no_grad():
        with_cache = model(**single_inputs, use_cache=True).logits
        kept_cached = model.vtr_last.stages[0].kept_positions[0]
        no_cache = model(**single_inputs, use_cache=False).logits
    assert torch.equal(model.vtr_last.stages[0].kept_positions[0], kept_cached)
    torch.testing.assert_close(no_cache, with_cache, atol=ATOL, rtol=0)


def test_loss_with_labels_is_computed_on_the_pruned_sequence(tiny_path, single_inputs):
    model = vtr_model(tiny_path, "sdpa", prune_layer=2, keep_tokens=8)
    labels = single_inputs["input_ids"].masked_fill(single_inputs["input_ids"] == model.config.image_token_id, -100)
    with torch.no_grad():
        out = model(**single_inputs, labels=labels)
    assert torch.isfinite(out.loss)
    # Equal to cross-entropy of each kept row against the token that followed it in the prompt.
    kept = model.vtr_last.kept_index[0]
    targets = torch.nn.functional.pad(labels[0, 1:], (0, 1), value=-100)[kept]
    expected = torch.nn.functional.cross_entropy(out.logits[0], targets, ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_manual_decode_loop_without_positions_matches_generate(tiny_path, single_inputs):
    """Calling forward step by step with only the cache (no mask, no positions) continues the logical positions."""
    model = vtr_model(tiny_path, "sdpa", strategy="fastv", prune_layer=2, keep_tokens=6)
    expected = _generate(model, single_inputs)
    with torch.no_grad():
        out = model(**single_inputs)
        cache, tokens = out.past_key_values, []
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(STEPS):
            tokens.append(nxt)
            nxt = model(input_ids=nxt, past_key_values=cache).logits[:, -1].argmax(-1, keepdim=True)
    last = model.vtr_adapter.num_layers - 1  # layers before K keep every token (earlier_cache="keep")
    assert cache.get_seq_length(last) == model.vtr_last.kept_index.shape[1] + STEPS
    assert torch.equal(torch.cat(tokens, 1), expected)


@pytest.mark.parametrize(
    "budget",
    [
        dict(strategy="priortr", keep_tokens=[20, 5]),
        dict(strategy="fastv", score_threshold=[0.01, 0.013]),  # stage 1 keeps 64 vs 1: re-padded for stage 2
    ],
)
def test_multi_stage_on_a_padded_batch_equals_the_oracle(tiny_path, stock_models, batch_inputs, budget):
    """Later stages find each sample's visual span in the shortened, re-padded sequence."""
    model = vtr_model(tiny_path, "sdpa", prune_layer=[1, 3], **budget)
    with torch.no_grad():
        model(**batch_inputs)
    record = model.vtr_last
    assert len(record.stages) == 2
    if "score_threshold" in budget:
        assert record.stages[0].image_tokens_kept[0] != record.stages[0].image_tokens_kept[1]
    prompt_len = batch_inputs["input_ids"].shape[1]
    stages = stage_drops(record, 2, prompt_len, _image_mask(model, batch_inputs))
    assert_matches_oracle(model, stock_models["eager"], batch_inputs, stages)


def test_multi_stage_next_to_a_text_only_prompt_equals_the_oracle(tiny_path, stock_models, processor, image):
    """The text-only prompt keeps every row, so the image prompt is left re-padded before its second stage."""
    texts = [chat(processor), "USER: Answer with one word: yes or no? ASSISTANT:"]
    inputs = processor(images=[image], text=texts, return_tensors="pt", padding=True)
    model = vtr_model(tiny_path, "eager", strategy="fastv", prune_layer=[1, 3], keep_tokens=[20, 5])
    with torch.no_grad():
        model(**inputs)
    record = model.vtr_last
    assert [s.image_tokens_kept for s in record.stages] == [[20, 0], [5, 0]]
    assert record.stages[0].seq_len_after == inputs["input_ids"].shape[1], "the text-only prompt keeps its rows"
    prompt_len = inputs["input_ids"].shape[1]
    stages = stage_drops(record, 2, prompt_len, _image_mask(model, inputs))
    assert_matches_oracle(model, stock_models["eager"], inputs, stages)
    # the same choices as the image prompt alone, at both stages
    with torch.no_grad():
        model(**processor(images=[image], text=texts[:1], return_tensors="pt"))
    for alone, batched in zip(model.vtr_last.stages, record.stages):
        assert torch.equal(alone.kept_positions[0], batched.kept_positions[0])
