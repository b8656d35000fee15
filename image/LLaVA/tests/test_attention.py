"""The attention handed to strategies: causal, equal to eager attention weights, computed lazily by row."""

import pytest
import torch

from llava.vtr import PruningStrategy, register_strategy
from llava.vtr.attention import ScoringAttention
from llava_testlib import chat, vtr_model

CAPTURED = {}


@register_strategy("test_capture")
class Capture(PruningStrategy):
    """Records the full attention it was given and the ctx, then scores like FastV."""

    def compute_scores(self, attention, image_token_range, config, **ctx):
        CAPTURED.setdefault("attention", []).append(attention.full())
        CAPTURED.setdefault("ctx", []).append(ctx)
        CAPTURED["lazy"] = attention
        start, end = image_token_range
        return attention[:, :, -1, start:end].mean(dim=(0, 1))


@pytest.fixture(autouse=True)
def _clear():
    CAPTURED.clear()


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_scoring_attention_equals_eager_attention_weights(tiny_path, stock_models, batch_inputs, impl, use_cache):
    prune_layer = 3
    model = vtr_model(tiny_path, impl, strategy="test_capture", prune_layer=prune_layer, keep_tokens=8)
    with torch.no_grad():
        model(**batch_inputs, use_cache=use_cache)
        eager = stock_models["eager"](**batch_inputs, output_attentions=True).attentions[prune_layer - 1]
    valid = batch_inputs["attention_mask"].bool()
    assert len(CAPTURED["attention"]) == 2  # one call per sample
    for b, got in enumerate(CAPTURED["attention"]):
        assert not isinstance(CAPTURED["lazy"], torch.Tensor)
        rows = valid[b]
        torch.testing.assert_close(got[0][:, rows][:, :, rows], eager[b][:, rows][:, :, rows], atol=1e-5, rtol=0)
        # causal: no query row attends to a later key; padding keys get nothing
        assert torch.all(got[0].triu(1) == 0)
        assert torch.all(got[0][:, :, ~rows] == 0)


def test_ctx_carries_layer_hidden_states_and_ranges(tiny_path, single_inputs):
    model = vtr_model(tiny_path, "sdpa", strategy="test_capture", prune_layer=[1, 3], keep_tokens=[16, 4])
    with torch.no_grad():
        model(**single_inputs)
    first, second = CAPTURED["ctx"]
    assert (first["layer_idx"], second["layer_idx"]) == (0, 2)
    assert (first["stage"], second["stage"]) == (0, 1)
    assert first["vtr_ctx"] is second["vtr_ctx"], "one vtr_ctx per sample, shared across its prune stages"
    assert first["hidden_states"].shape[1] == single_inputs["input_ids"].shape[1]
    assert second["hidden_states"].shape[1] == single_inputs["input_ids"].shape[1] - 64 + 16
    assert first["image_token_indices"].numel() == 64 and second["image_token_indices"].numel() == 16


def _counting(monkeypatch):
    calls = []
    original = ScoringAttention.rows

    def rows(self, r):
        calls.append(torch.as_tensor(r).numel())
        return original(self, r)

    monkeypatch.setattr(ScoringAttention, "rows", rows)
    return calls


@pytest.mark.parametrize(
    "strategy,aggregation,expected_rows",
    [("fastv", "last", [1]), ("priortr", "last", [1, 1]), ("fastv", "question", "question")],
)
def test_only_the_rows_a_strategy_reads_are_computed(
    tiny_path, processor, image, monkeypatch, strategy, aggregation, expected_rows
):
    calls = _counting(monkeypatch)
    inputs = processor(images=image, text=chat(processor), return_tensors="pt")
    model = vtr_model(tiny_path, "sdpa", strategy=strategy, prune_layer=2, keep_tokens=8, query_aggregation=aggregation)
    with torch.no_grad():
        model(**inputs)
    if expected_rows == "question":
        ids = inputs["input_ids"][0]
        last_image = (ids == model.config.image_token_id).nonzero().max().item()
        expected_rows = [ids.numel() - last_image - 1]
    assert calls == expected_rows
    assert max(calls) < inputs["input_ids"].shape[1] // 4  # never the seq x seq map


def test_random_never_computes_attention(tiny_path, single_inputs, monkeypatch):
    calls = _counting(monkeypatch)
    model = vtr_model(tiny_path, "sdpa", strategy="random", prune_layer=2, keep_tokens=8)
    with torch.no_grad():
        model(**single_inputs)
    assert calls == []


def test_lazy_indexing_matches_the_materialised_tensor():
    torch.manual_seed(0)
    batch, heads, kv_heads, seq, dim = 2, 4, 2, 9, 8
    q_all = torch.randn(batch, heads, seq, dim)
    keys = torch.randn(batch, kv_heads, seq, dim)
    valid = torch.ones(batch, seq, dtype=torch.bool)
    valid[1, :2] = False
    attn = ScoringAttention(lambda rows: q_all[:, :, rows], keys, valid, heads, 0.3)
    full = attn.full()
    assert full.shape == attn.shape == (batch, heads, seq, seq)
    rows = torch.tensor([3, 8])
    for index in [
        (slice(None), slice(None), -1, slice(None)),
        (slice(None), slice(None), rows, slice(2, 7)),
        (0, 1, 4),
        (Ellipsis, 5, slice(None)),
        (1, slice(None), torch.tensor([[2, 3], [4, 8]])),
        (slice(None), slice(None), slice(2, None, 3)),
    ]:
        torch.testing.assert_close(attn[index], full[index])
    # each row is a distribution over the visible (causal, non-padding) keys
    torch.testing.assert_close(full[0].sum(-1), torch.ones(heads, seq))
    assert torch.all(full[1, :, :, :2] == 0) and torch.all(full[1, :, 2:].sum(-1).sub(1).abs() < 1e-6)
    with pytest.raises(IndexError, match="None"):
        attn[None]


def test_anchor_row_does_not_depend_on_the_question(tiny_path, processor, image):
    """PriorTR's prior: the first row after the image sees only the prefix and the image."""
    anchor_rows = []
    for question in ["What is shown in the image?", "How many objects are there? Answer with one word."]:
        CAPTURED.clear()
        inputs = processor(images=image, text=chat(processor, question), return_tensors="pt")
        model = vtr_model(tiny_path, "sdpa", strategy="test_capture", prune_layer=2, keep_tokens=8)
        with torch.no_grad():
            model(**inputs)
        ids = inputs["input_ids"][0]
        anchor = (ids == model.config.image_token_id).nonzero().max().item() + 1
        anchor_rows.append(CAPTURED["lazy"][:, :, anchor, : anchor + 1])
    torch.testing.assert_close(anchor_rows[0], anchor_rows[1], atol=0, rtol=0)


@pytest.mark.parametrize("strategy,computations", [("fastv", 1), ("priortr", 1 + 3)])
def test_samples_of_a_batch_share_the_last_row_computation(
    tiny_path, processor, image, monkeypatch, strategy, computations
):
    """The last row of a left-padded batch is the same index for every sample: computed once for all."""
    calls = []
    original = ScoringAttention._compute_rows
    monkeypatch.setattr(
        ScoringAttention, "_compute_rows", lambda self, r: calls.append(self.shape[0]) or original(self, r)
    )
    texts = [chat(processor, "What is this?" + " And that?" * i) for i in range(3)]
    inputs = processor(images=[image] * 3, text=texts, return_tensors="pt", padding=True)
    model = vtr_model(tiny_path, "sdpa", strategy=strategy, prune_layer=2, keep_tokens=8)
    with torch.no_grad():
        model(**inputs)
    assert len(calls) == computations and calls[0] == 3  # the first, shared computation covers the batch
    assert all(b == 1 for b in calls[1:])  # PriorTR's anchors differ per sample: computed per sample
