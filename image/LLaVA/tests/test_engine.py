"""Engine behaviour that is not about one backbone: host syncs, padding sides, generate() guards, hooks."""

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache

from llava.vtr import PruningStrategy, register_strategy
from llava.vtr.engine import decode_state
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
    """The engine finds its decode mapping by the cache object (`decode_state`); if transformers ever replaced
    the cache object between steps, decode after pruning would silently use wrong positions."""
    model = vtr_model(tiny_path, "sdpa", strategy="fastv", prune_layer=2, keep_tokens=8)
    with torch.no_grad():
        out = model(**single_inputs)
    cache = out.past_key_values
    assert isinstance(cache, DynamicCache)
    state = decode_state(cache)
    assert state.original_len == single_inputs["input_ids"].shape[1]
    full = single_inputs["input_ids"].shape[1]
    # earlier_cache="keep" (FastV's): layers 0-1 hold every token, layers 2-3 the kept ones
    assert state.pruned_len == cache.get_seq_length() == full
    assert [cache.get_seq_length(i) for i in range(4)] == [full, full, full - 64 + 8, full - 64 + 8]
    with torch.no_grad():
        model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache)
    assert decode_state(cache) is state and cache.get_seq_length() == state.pruned_len + 1


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


@register_strategy("test_embedding_norm")
class EmbeddingNorm(PruningStrategy):
    """A pre-LLM method: scores from the merged input embeddings (the projected image features)."""

    needs_attention = False

    def compute_scores(self, attention, image_token_range, config, **ctx):
        SEEN.setdefault("pre_llm", []).append(ctx)
        start, end = image_token_range
        return ctx["hidden_states"][0, start:end].float().norm(dim=-1)


def test_pre_llm_stage_prunes_before_the_first_layer_and_equals_the_oracle(tiny_path, stock_models, single_inputs):
    from llava_testlib import oracle_greedy, stage_drops

    SEEN.clear()
    model = vtr_model(tiny_path, "sdpa", strategy="test_embedding_norm", prune_layer=[0, 2], keep_tokens=[12, 4])
    with torch.no_grad():
        model(**single_inputs)
        features = (
            stock_models["sdpa"]
            .model.get_image_features(pixel_values=single_inputs["pixel_values"], return_dict=True)
            .pooler_output[0]
        )
    first = SEEN["pre_llm"][0]
    assert first["layer_idx"] == -1
    ids = single_inputs["input_ids"][0]
    image_rows = (ids == model.config.image_token_id).nonzero().reshape(-1)
    torch.testing.assert_close(first["hidden_states"][0, image_rows], features.reshape(-1, features.shape[-1]))
    record = model.vtr_last
    expected = torch.topk(features.reshape(-1, features.shape[-1]).norm(dim=-1), 12).indices.sort().values
    assert torch.equal(record.stages[0].kept_positions[0], image_rows[expected])
    assert [s.layer for s in record.stages] == [0, 2] and record.stages[0].seq_len_before == ids.numel()
    prompt_len = ids.numel()
    stages = stage_drops(record, 1, prompt_len, (ids == model.config.image_token_id)[None])
    out = model.generate(
        **single_inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True
    )
    tokens, logits = oracle_greedy(stock_models["eager"], single_inputs, stages, 4)
    assert torch.equal(out.sequences[:, prompt_len:], tokens)
    torch.testing.assert_close(torch.stack(out.logits, 1), logits, atol=1e-5, rtol=0)


def test_pre_llm_stage_is_refused_for_attention_methods():
    from llava.vtr import VTRConfig, VTRConfigError

    with pytest.raises(VTRConfigError, match="only for strategies that read no attention"):
        VTRConfig(strategy="fastv", prune_layer=0)
    assert VTRConfig(strategy="random", prune_layer=[0, 3]).prune_layers == [0, 3]


@register_strategy("test_prior")
class Prior(PruningStrategy):
    """Runs the prior forward on the question-free prefix and keeps it next to the full attention."""

    def compute_scores(self, attention, image_token_range, config, **ctx):
        anchor = ctx["anchor_index"]
        prior = ctx["prior_attention"](anchor + 1)
        SEEN.setdefault("prior", []).append((prior[:, :, -1, :], attention[:, :, anchor, : anchor + 1], prior.shape))
        return self._aggregate_attention(attention, image_token_range, config)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_prior_forward_row_equals_the_causal_anchor_row_at_every_stage(tiny_path, processor, image, impl):
    """Under causal attention the question-free prefix run alone gives the anchor row of the full run."""
    SEEN.clear()
    inputs = processor(images=image, text=chat(processor, "Is there a cat? Answer in one word."), return_tensors="pt")
    model = vtr_model(tiny_path, impl, strategy="test_prior", prune_layer=[1, 3], keep_tokens=[20, 6])
    with torch.no_grad():
        model(**inputs)
    (prior1, full1, shape1), (prior2, full2, shape2) = SEEN["prior"]
    ids = inputs["input_ids"][0]
    anchor = int((ids == model.config.image_token_id).nonzero().max()) + 1
    assert shape1[-1] == anchor + 1 and shape2[-1] == anchor + 1 - (64 - 20)  # stage-1 drops applied
    torch.testing.assert_close(prior1, full1, atol=1e-5, rtol=0)
    torch.testing.assert_close(prior2, full2, atol=1e-5, rtol=0)


def test_prior_forward_rows_line_up_with_a_re_padded_sample(tiny_path, batch_inputs):
    """Stage 1 keeps different counts per sample (threshold), so stage 2 sees a left re-padded sample."""
    SEEN.clear()
    model = vtr_model(tiny_path, "sdpa", strategy="test_prior", prune_layer=[1, 3], score_threshold=[0.0105, 0.0])
    with torch.no_grad():
        model(**batch_inputs)
    kept = model.vtr_last.stages[0].image_tokens_kept
    assert kept[0] != kept[1], kept
    for prior, full, shape in SEEN["prior"]:
        assert shape[-1] == full.shape[-1]
        torch.testing.assert_close(prior, full, atol=1e-5, rtol=0)


def test_a_copied_or_emptied_pruned_cache_is_never_decoded_silently(tiny_path, single_inputs):
    """A copy.deepcopy of a pruned cache has no decode state: decoding on it is refused (FastV: layers of
    different lengths; a pre-LLM drop: a mask longer than the cache). An emptied one (reset()) takes a new
    image prompt."""
    import copy

    for cfg in (dict(strategy="fastv", prune_layer=2), dict(strategy="random", prune_layer=0)):
        model = vtr_model(tiny_path, "sdpa", keep_tokens=8, **cfg)
        with torch.no_grad():
            out = model(**single_inputs)
        step = dict(
            input_ids=out.logits[:, -1:].argmax(-1),
            attention_mask=torch.ones(1, single_inputs["input_ids"].shape[1] + 1, dtype=torch.long),
        )
        with pytest.raises(ValueError, match="lost its decode state"), torch.no_grad():
            model(**step, past_key_values=copy.deepcopy(out.past_key_values))
        cache = out.past_key_values
        cache.reset()
        assert decode_state(cache) is None
        with torch.no_grad():
            model(**single_inputs, past_key_values=cache)
        assert decode_state(cache) is not None and model.vtr_last.stages[0].image_tokens_kept == [8]


def test_generate_encodes_without_gradients_and_leaves_given_outputs_alone(tiny_path, single_inputs, monkeypatch):
    model = vtr_model(tiny_path, "sdpa", strategy="fastv", prune_layer=2, keep_tokens=8)
    adapter, seen = model.vtr_adapter, []
    encode = type(adapter).encode_inputs

    def recording(self, args):
        seen.append(torch.is_grad_enabled())
        return encode(self, args)

    monkeypatch.setattr(type(adapter), "encode_inputs", recording)
    model.generate(**single_inputs, max_new_tokens=1)
    assert seen and not any(seen), "the visuals are encoded under no_grad, as generate() runs"
    with torch.no_grad():
        encoded = adapter.encode_inputs(single_inputs)
    features = encoded["image"].pooler_output
    rest = {k: v for k, v in single_inputs.items() if k != "pixel_values"}
    model.generate(**rest, mm_encoder_outputs=encoded, max_new_tokens=1, num_beams=2)
    assert encoded["image"].pooler_output is features, "generate() expanded the caller's outputs for the beams"
