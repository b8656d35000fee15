"""Engine behaviour that is not about one backbone: host syncs, padding sides, generate() guards, hooks."""

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache

from llava.vtr import PruningStrategy, register_strategy
from llava.vtr.tiny import demo_image
from llava_testlib import chat, vtr_model

# Ops that make the host wait for the device. The profiler sees every scalar read (`item()`, `bool(t)`,
# `int(t)` all end in aten::_local_scalar_dense) and data-dependent shapes (aten::nonzero, which boolean
# indexing uses too); whole-tensor copies to the host (`tolist()`, `.cpu()`, `.numpy()`) show no aten op
# on a CPU tensor, so they are counted at the torch-function level.
SYNC_ATEN = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::equal"}
SYNC_PY = {"tolist", "numpy", "cpu"}


class _CountSyncs(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNC_PY:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def count_syncs(model, inputs) -> int:
    mode = _CountSyncs()
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof, mode:
        model(**inputs)
    aten = sum(1 for e in prof.events() if e.name in SYNC_ATEN)
    return aten + len(mode.calls)


def _batch(processor, size, padded):
    questions = [chat(processor, "What is this?" + (" And that?" * i if padded else "")) for i in range(size)]
    images = [demo_image(64).rotate(90 * i) for i in range(size)]
    return processor(images=images, text=questions, return_tensors="pt", padding=True)


@pytest.mark.parametrize(
    "cfg,padded",
    [
        (dict(strategy="fastv", prune_layer=2, keep_tokens=8), False),
        (dict(strategy="fastv", prune_layer=2, keep_tokens=8), True),
        (dict(strategy="priortr", prune_layer=[1, 3], keep_tokens=[16, 4], query_aggregation="question"), False),
        (dict(strategy="priortr", prune_layer=[1, 3], keep_tokens=[16, 4], query_aggregation="question"), True),
        # samples keep different counts (re-padding), at batch 2 and at batch 4
        (dict(strategy="fastv", prune_layer=2, score_threshold=0.012), True),
    ],
)
def test_host_syncs_do_not_grow_with_batch_size(tiny_path, stock_models, processor, cfg, padded):
    from transformers import LlavaForConditionalGeneration

    model = vtr_model(tiny_path, "sdpa", **cfg)
    stock = stock_models["sdpa"]
    assert isinstance(stock, LlavaForConditionalGeneration)
    small, large = (2, 4) if padded else (1, 4)
    counts = {}
    for size in (small, large):
        inputs = _batch(processor, size, padded)
        assert bool((inputs["attention_mask"] == 0).any()) == padded
        counts[size] = (count_syncs(model, inputs), count_syncs(stock, inputs))
    assert counts[small] == counts[large], counts
    pruned, unpruned = counts[large]
    stages = len(model.vtr_config.prune_layers)
    # one per forward (before any layer), one per prune stage (kept counts); transformers' mask builder adds two
    # more per rebuilt mask when the batch is padded
    assert pruned - unpruned <= 1 + stages * (3 if padded else 1), counts


def test_right_padded_batch_scores_each_sample_from_its_last_real_token(tiny_path, processor):
    processor.tokenizer.padding_side = "right"
    try:
        batch = _batch(processor, 2, padded=True)
    finally:
        processor.tokenizer.padding_side = "left"
    assert batch["attention_mask"][0, -1] == 0, "the first sample must be right-padded"
    model = vtr_model(tiny_path, "sdpa", strategy="fastv", prune_layer=2, keep_tokens=10)
    with torch.no_grad():
        batched = model(**batch).logits
        record = model.vtr_last
        for b in range(2):
            length = int(batch["attention_mask"][b].sum())
            alone = {k: v[b : b + 1, :length] if k != "pixel_values" else v[b : b + 1] for k, v in batch.items()}
            single = model(**alone).logits
            kept = model.vtr_last.stages[0].kept_positions[0]
            assert torch.equal(record.stages[0].kept_positions[b], kept), f"sample {b} picked other tokens"
            rows = record.kept_index[b] < length
            rows &= record.kept_index[b] >= 0
            torch.testing.assert_close(batched[b, rows], single[0], atol=1e-4, rtol=0)


def test_generate_without_cache_is_refused_with_a_clear_error(tiny_path, single_inputs):
    model = vtr_model(tiny_path, "sdpa", strategy="fastv", prune_layer=2, keep_tokens=8)
    with pytest.raises(ValueError, match="use_cache=False"):
        model.generate(**single_inputs, max_new_tokens=3, use_cache=False)
    model.generation_config.use_cache = False
    with pytest.raises(ValueError, match="use_cache=True"):
        model.generate(**single_inputs, max_new_tokens=3)
    model.generation_config.use_cache = True
    # the unpruned model and text-only prompts may still decode without a cache
    model.set_vtr_config(model.vtr_config.__class__(enabled=False))
    assert model.generate(**single_inputs, max_new_tokens=2, use_cache=False).shape[1] == (
        single_inputs["input_ids"].shape[1] + 2
    )


def test_decode_state_survives_on_the_cache(tiny_path, single_inputs):
    """The engine keeps its decode mapping as an attribute of the DynamicCache; if transformers ever made
    caches reject or drop attributes, decode after pruning would silently use wrong positions."""
    model = vtr_model(tiny_path, "sdpa", strategy="fastv", prune_layer=2, keep_tokens=8)
    with torch.no_grad():
        out = model(**single_inputs)
    cache = out.past_key_values
    assert isinstance(cache, DynamicCache)
    state = cache._vtr_state
    assert state.original_len == single_inputs["input_ids"].shape[1]
    assert state.pruned_len == cache.get_seq_length() == single_inputs["input_ids"].shape[1] - 64 + 8
    with torch.no_grad():
        model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache)
    assert cache._vtr_state is state and cache.get_seq_length() == state.pruned_len + 1


SEEN = {}


@register_strategy("test_snapshots")
class Snapshots(PruningStrategy):
    """Reads the output of layer 0 at its second stage, and the anchor the adapter names."""

    def snapshot_layers(self, config):
        return (0,)

    def compute_scores(self, attention, image_token_range, config, **ctx):
        SEEN.setdefault("ctx", []).append(ctx)
        return self._aggregate_attention(attention, image_token_range, config)


def test_snapshot_layers_reach_later_stages(tiny_path, stock_models, single_inputs):
    SEEN.clear()
    model = vtr_model(tiny_path, "eager", strategy="test_snapshots", prune_layer=[1, 3], keep_tokens=[16, 4])
    with torch.no_grad():
        model(**single_inputs)
        layer0 = stock_models["eager"](**single_inputs, output_hidden_states=True).hidden_states[1]
    first, second = SEEN["ctx"]
    for ctx in (first, second):  # taken once, over the full sequence, and handed to every later stage
        hidden, index = ctx["snapshots"][0]
        assert hidden.shape[1] == index.numel() == single_inputs["input_ids"].shape[1]
        torch.testing.assert_close(hidden[0], layer0[0, index], atol=1e-5, rtol=0)
    ids = single_inputs["input_ids"][0]
    last_image = int((ids == model.config.image_token_id).nonzero().max())
    assert first["anchor_index"] == last_image + 1
    assert first["patch_grid"] == (8, 8)
