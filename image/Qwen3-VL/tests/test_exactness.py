"""Qwen3-VL exactness: unpruned == stock transformers (images, videos, padded batches); pruned == the masking
oracle at prune layers before, inside and after the DeepStack layers, prefill and decode; generate() prunes
the visuals it pre-encodes; a hand-written decode loop needs no positions."""

import pytest
import torch
from qwen3vl_testlib import chat, oracle_forward, oracle_greedy, stage_drops, visual_ids, vtr_model

from visual_token_pruning import PruningStrategy, VTRConfig, register_strategy, wrap
from visual_token_pruning.tiny import demo_image

ATOL = 1e-5
STEPS = 4


def greedy(model, inputs, steps=STEPS):
    out = model.generate(
        **inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
        return_dict_in_generate=True, output_logits=True,
    )  # fmt: skip
    return out.sequences[:, inputs["input_ids"].shape[1] :], torch.stack(out.logits, 1)


def visual_mask(model, inputs):
    return torch.isin(inputs["input_ids"], torch.tensor(visual_ids(model.config)))


def assert_equals_oracle(model, stock, inputs):
    """Prefill logits of every kept row, greedy tokens and every decode step's logits equal the oracle's."""
    with torch.no_grad():
        logits = model(**inputs).logits
    record = model.vtr_last
    batch, prompt_len = inputs["input_ids"].shape
    valid = inputs["attention_mask"].bool()
    stages = stage_drops(record, batch, prompt_len, visual_mask(stock, inputs))
    expected = oracle_forward(stock, inputs, stages, prompt_len)
    for b in range(batch):
        rows = (record.kept_index[b] >= 0) & valid[b][record.kept_index[b].clamp_min(0)]
        torch.testing.assert_close(logits[b, rows], expected[b, record.kept_index[b, rows]], atol=ATOL, rtol=0)
    tokens, step_logits = greedy(model, inputs)
    stages = stage_drops(model.vtr_last, batch, prompt_len, visual_mask(stock, inputs))
    want_tokens, want_logits = oracle_greedy(stock, inputs, stages, STEPS)
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(step_logits, want_logits, atol=ATOL, rtol=0)
    return record


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_keep_all_equals_stock_on_an_image_and_video_prompt(tiny_path, stock_models, video_inputs, impl):
    model, stock = vtr_model(tiny_path, impl, keep_ratio=1.0, prune_layer=2), stock_models[impl]
    with torch.no_grad():
        torch.testing.assert_close(model(**video_inputs).logits, stock(**video_inputs).logits, atol=ATOL, rtol=0)
    assert model.vtr_last.stages[0].image_tokens_kept == [int(visual_mask(stock, video_inputs).sum())]
    assert torch.equal(greedy(model, video_inputs)[0], greedy(stock, video_inputs)[0])


def test_the_video_prompt_has_one_timestamp_and_group_per_frame_pair(processor, video_inputs):
    grid = video_inputs["video_grid_thw"][0].tolist()
    text = processor.tokenizer.decode(video_inputs["input_ids"][0])
    assert grid[0] == 2 and text.count(" seconds>") == grid[0]  # 4 sampled frames, temporal patch 2
    per_group = grid[1] * grid[2] // 4
    assert text.count("<|video_pad|>") == grid[0] * per_group
    assert video_inputs["mm_token_type_ids"][0].tolist().count(2) == grid[0] * per_group


# DeepStack adds features after decoder layers 0 and 1 of the tiny model: prune before them (K=0, pre-LLM),
# between them (K=1), right after (K=2) and later (K=3), on images + video and on a padded image batch.
CASES = [
    dict(strategy="random", prune_layer=0, keep_tokens=20),
    dict(strategy="fastv", prune_layer=1, keep_tokens=24),
    dict(strategy="priortr", prune_layer=2, keep_ratio=0.3, query_aggregation="question"),
    dict(strategy="fastv", prune_layer=[1, 3], keep_tokens=[40, 10], head_aggregation="max"),
]


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: f"{c['strategy']}-K{c['prune_layer']}")
def test_pruned_image_and_video_prompt_equals_the_oracle(tiny_path, stock_models, video_inputs, cfg):
    record = assert_equals_oracle(vtr_model(tiny_path, "sdpa", **cfg), stock_models["eager"], video_inputs)
    kept = record.stages[-1].kept_positions[0]
    types = video_inputs["mm_token_type_ids"][0, kept]
    assert set(types.tolist()) <= {1, 2} and len(kept) == record.stages[-1].image_tokens_kept[0]


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_pruned_padded_batch_equals_the_oracle(tiny_path, stock_models, batch_inputs, impl):
    model = vtr_model(tiny_path, impl, strategy="fastv", prune_layer=1, keep_tokens=12)
    record = assert_equals_oracle(model, stock_models["eager"], batch_inputs)
    assert record.stages[0].image_tokens_before == [64, 48]


def test_deepstack_reaches_only_the_kept_rows(tiny_path, stock_models, single_inputs):
    """Skipping DeepStack, or adding it to the wrong rows, moves the logits away from the oracle."""
    model = vtr_model(tiny_path, "eager", strategy="fastv", prune_layer=1, keep_tokens=16)
    adapter = model.vtr_adapter
    original = adapter.after_layer
    with torch.no_grad():
        reference = model(**single_inputs).logits
        adapter.after_layer = lambda i, tokens, prefill: tokens.hidden  # no DeepStack at all
        without = model(**single_inputs).logits
        adapter.after_layer = original
    assert (reference - without).abs().max() > 1e-3, "DeepStack changes this model's outputs"
    assert_equals_oracle(model, stock_models["eager"], single_inputs)


def test_several_images_share_one_budget(tiny_path, stock_models, processor):
    text = chat(processor, "Which picture has the sun?", images=2)
    inputs = processor(images=[demo_image(64), demo_image(48).rotate(90)], text=text, return_tensors="pt")
    model = vtr_model(tiny_path, "sdpa", strategy="priortr", prune_layer=2, keep_tokens=30)
    record = assert_equals_oracle(model, stock_models["eager"], inputs)
    assert record.stages[0].image_tokens_before == [64 + 36] and record.stages[0].image_tokens_kept == [30]


def test_generate_prunes_the_visuals_it_pre_encodes(tiny_path, single_inputs):
    """generate() hands forward pre-encoded visuals (mm_encoder_outputs) and no pixels; that prefill prunes."""
    model = vtr_model(tiny_path, "sdpa", strategy="fastv", prune_layer=2, keep_tokens=6)
    seen = []
    hook = model.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(dict(kwargs)), with_kwargs=True)
    try:
        model.generate(**single_inputs, max_new_tokens=2, do_sample=False)
    finally:
        hook.remove()
    prefill = seen[0]
    assert prefill.get("pixel_values") is None and prefill["mm_encoder_outputs"]["image"] is not None
    assert model.vtr_last.stages[0].image_tokens_kept == [6]
    assert seen[1].get("mm_encoder_outputs") is None, "decode steps carry no visuals"


@pytest.mark.parametrize("pruned", [True, False])
def test_a_hand_written_decode_loop_without_positions(tiny_path, batch_inputs, pruned):
    """Decode steps given only ids, the grown 2-D mask and the cache continue the ORIGINAL positions: tokens
    and logits equal generate()'s, which passes the positions itself (pruned, and unpruned, where the
    stock 5.23 model crashes on such a step)."""
    cfg = dict(strategy="fastv", prune_layer=2, keep_tokens=10) if pruned else dict(enabled=False)
    model = vtr_model(tiny_path, "sdpa", **cfg)
    want_tokens, want_logits = greedy(model, batch_inputs)
    with torch.no_grad():
        out = model(**batch_inputs, use_cache=True)
        mask, cache, tokens, logits = batch_inputs["attention_mask"], out.past_key_values, [], []
        for _ in range(STEPS):
            logits.append(out.logits[:, -1])
            tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
            mask = torch.cat([mask, torch.ones_like(tokens[-1])], 1)
            out = model(input_ids=tokens[-1], attention_mask=mask, past_key_values=cache, use_cache=True)
    assert torch.equal(torch.cat(tokens, 1), want_tokens)
    torch.testing.assert_close(torch.stack(logits, 1), want_logits, atol=ATOL, rtol=0)


def test_wrap_turns_a_loaded_stock_model_into_vtr(tiny_path, single_inputs):
    from transformers import Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_path).eval()
    wrapped = wrap(model, VTRConfig(keep_tokens=4, prune_layer=2))
    assert wrapped is model
    with torch.no_grad():
        wrapped(**single_inputs)
    assert wrapped.vtr_last.stages[0].image_tokens_kept == [4]


ROWS = []


@register_strategy("test_qwen_rows")
class RowCapture(PruningStrategy):
    """Records the anchor row and the question rows it is handed (PriorTR reads exactly these)."""

    def compute_scores(self, attention, image_token_range, config, **ctx):
        start, end = image_token_range
        anchor = ctx["anchor_index"]
        ROWS.append((anchor, attention[:, :, [anchor], :].clone(), attention[:, :, anchor + 1 :, :].clone()))
        return self._aggregate_attention(attention, image_token_range, config)


def test_anchor_and_question_rows_are_the_eager_causal_rows_under_sdpa(tiny_path, stock_models, single_inputs):
    """Regression for the reference implementation, whose scoring attention was not causal under sdpa: the
    anchor (`<|vision_end|>`) row and the question rows equal eager `output_attentions` of layer K-1."""
    ROWS.clear()
    model = vtr_model(tiny_path, "sdpa", strategy="test_qwen_rows", prune_layer=2, keep_tokens=8)
    with torch.no_grad():
        model(**single_inputs)
        eager = stock_models["eager"](**single_inputs, output_attentions=True).attentions[1]
    anchor, anchor_row, question_rows = ROWS[0]
    ids = single_inputs["input_ids"][0]
    assert int(ids[anchor]) == model.config.vision_end_token_id
    torch.testing.assert_close(anchor_row[0, :, 0], eager[0, :, anchor], atol=ATOL, rtol=0)
    torch.testing.assert_close(question_rows[0], eager[0, :, anchor + 1 :], atol=ATOL, rtol=0)
    assert torch.all(anchor_row[0, :, 0, anchor + 1 :] == 0), "the anchor sees no question token"


def test_a_padded_batch_of_an_image_prompt_and_a_video_prompt(tiny_path, stock_models, processor):
    """Left padding shifts a video prompt's M-RoPE rows; keep-all equals stock and pruning equals the oracle."""
    from visual_token_pruning.tiny import demo_video

    texts = [chat(processor, "Is it red?"), chat(processor, "What happens in the video?", images=0, videos=1)]
    inputs = processor(
        images=[demo_image(48)], videos=[demo_video(8, 32)], text=texts, return_tensors="pt", padding=True,
        video_metadata=[{"total_num_frames": 8, "fps": 4.0, "frames_indices": list(range(8))}],
    )  # fmt: skip
    assert not bool(inputs["attention_mask"].all())
    valid = inputs["attention_mask"].bool()
    keep_all = vtr_model(tiny_path, "sdpa", keep_ratio=1.0, prune_layer=1)
    with torch.no_grad():
        got, want = keep_all(**inputs).logits, stock_models["sdpa"](**inputs).logits
    torch.testing.assert_close(got[valid], want[valid], atol=ATOL, rtol=0)
    model = vtr_model(tiny_path, "sdpa", strategy="priortr", prune_layer=1, keep_tokens=10)
    record = assert_equals_oracle(model, stock_models["eager"], inputs)
    assert record.stages[0].image_tokens_kept == [10, 10]
