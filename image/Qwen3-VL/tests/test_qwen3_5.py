"""Qwen3.5 (dense and MoE): a hybrid decoder, Gated DeltaNet (linear attention) and gated full attention layers.

The tiny checkpoints' layout is `QWEN3_5_TEST_LAYERS`, L L F L F L L (L: linear, F: full attention). Masking cannot
drop a token from a recurrent layer, so the pruned prefill and its decode are checked against the physical-truncation
oracle (physical_oracle.py: each sample alone, the stock layers fed only the kept rows from each prune layer on):
prompt logits, greedy decode, and every cache entry (keys and values of full-attention layers, convolution and
recurrent states of linear ones), on a left-padded image + video batch. The contract tests that cannot hold as
written on this decoder (conftest.HYBRID_SKIPS) are restated here, but for the video methods' parts inside the LLM;
the others run on it in test_contract.py.
"""

import logging
from types import SimpleNamespace

import pytest
import torch
import transformers
from physical_oracle import PhysicalRun, assert_cache_matches, cuts_of
from qwen3vl_testlib import image_video_batch
from transformers.cache_utils import DynamicLayer

from visual_token_pruning import (
    PruningStrategy,
    VTRConfig,
    available_strategies,
    get_strategy,
    load_model,
    load_processor,
    register_strategy,
)
from visual_token_pruning.engine import check_layer_kinds, scoring_layers, snap_schedule
from visual_token_pruning.tiny import QWEN3_5_TEST_LAYERS as LAYOUT

ATOL = 1e-5
STEPS = 3
LINEAR, FULL = "linear_attention", "full_attention"
#: Qwen3.5's own layout (full attention in every 4th layer), 32 layers
STOCK_LAYOUT = [FULL if (i + 1) % 4 == 0 else LINEAR for i in range(32)]

ALL_METHODS = sorted(m for m in available_strategies() if not m.startswith(("test_", "contract_")))
VIDEO = [m for m in ALL_METHODS if "frames" in get_strategy(m).requires]
METHODS = [m for m in ALL_METHODS if m not in VIDEO]
MERGING = [m for m in METHODS if get_strategy(m).merge_is_method]
#: the video methods' parts inside the LLM turned off, as the contract's video test does (DyCoke's decode-time
#: pruning is refused on this decoder: test_a_decode_hook_is_refused_where_a_layer_it_reaches_is_linear)
PRE_LLM_ONLY = {"holitom": dict(holitom_inner_ratio=0.0, holitom_tau=1.0), "framefusion": dict(prune_layer=0)}


def vtr(case, impl="sdpa", **cfg):
    return load_model(case.path, VTRConfig(**cfg), attn_implementation=impl)


def greedy(model, inputs, steps=STEPS, **kwargs):
    return model.generate(
        **inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, return_dict_in_generate=True,
        output_logits=True, **kwargs,
    )  # fmt: skip


def schedule(method: str) -> list[int]:
    """Two stages on the test layout, as the contract's [first, 3] on a full-attention decoder: before the LLM and
    at 3 for methods that read no attention; at the full-attention layers 2 and 4 for scoring_layer="own"; at 3 and
    6 for "previous", scored from layer 2 (K-1) and from layer 4 (the nearest full-attention layer before 6)."""
    strategy = get_strategy(method)
    if not strategy.needs_attention:
        return [0, 3]
    return [2, 4] if strategy.scoring_layer == "own" else [3, 6]


def record_merges(monkeypatch, method: str) -> list:
    """The `merge_tokens` calls of `method` from now on: (sample, dropped rows, the method's output)."""
    calls = []
    merge = get_strategy(method).merge_tokens

    def recording(self, dropped_hidden, dropped_scores, config, **ctx):
        out = merge(self, dropped_hidden, dropped_scores, config, **ctx)
        if out is not None:
            calls.append((ctx["vtr_ctx"]["batch_index"], ctx["dropped_index"], out))
        return out

    monkeypatch.setattr(get_strategy(method), "merge_tokens", recording)
    return calls


#: (case name, id of the inputs) -> (the inputs, the stock model's merged embeddings and positions of them): the
#: oracle's embedding step runs the vision tower once per batch, not once per sample and check
EMBEDDED = {}


def physical_runs(case, model, inputs, merges=()) -> list[PhysicalRun]:
    """Per sample, the physical oracle of what `model`'s last pruned forward kept."""
    key = (case.name, id(inputs))
    if key not in EMBEDDED:
        with torch.no_grad():
            EMBEDDED[key] = (inputs, case.embed(case.stock["eager"], inputs))
    embedded = EMBEDDED[key][1]
    visual = torch.isin(inputs["input_ids"], torch.tensor(case.visual_token_id))
    runs = []
    for b in range(inputs["input_ids"].shape[0]):
        cuts = cuts_of(model, inputs, b, visual, merges)
        run = PhysicalRun(case.stock["eager"], inputs, b, cuts, lambda *_: embedded, any(c.compact for c in cuts))
        runs.append(run)
    return runs


def check_physical(case, model, inputs, kept=None, merges=None) -> list[tuple[int, int]]:
    """`model`'s pruned prefill and greedy decode on the padded batch `inputs` equal the physical oracle, sample by
    sample: prompt logits at the rows it kept (which must be the oracle's, in order), every cache entry after the
    prefill and after the decode, tokens and per-step logits (generate()'s own prefill must keep what the forward
    kept, so the oracle decodes on from the same runs). `kept`: the visual tokens each stage keeps per sample.
    `merges`: the list `record_merges` fills. Returns per sample (visual tokens kept, merged tokens) of the last stage."""
    with torch.no_grad():
        out = model(**inputs)
    record = model.vtr_last
    if kept is not None:
        assert [s.image_tokens_kept for s in record.stages] == [list(k) for k in kept]
    valid = inputs["attention_mask"].bool()
    runs = physical_runs(case, model, inputs, list(merges or ()))
    for b, run in enumerate(runs):
        index = record.kept_index[b]
        rows = (index >= 0) & valid[b][index.clamp_min(0)]
        assert index[rows].tolist() == run.rows
        torch.testing.assert_close(out.logits[b, rows], run.logits, atol=ATOL, rtol=0)
        assert_cache_matches(out.past_key_values, b, run.cache, ATOL)
    stage = record.stages[-1]
    counts = list(zip(stage.image_tokens_kept, stage.merged or [0] * len(stage.image_tokens_kept)))
    generated = greedy(model, inputs)
    assert torch.equal(model.vtr_last.kept_index, record.kept_index), "generate()'s prefill keeps the same rows"
    tokens, logits = generated.sequences[:, inputs["input_ids"].shape[1] :], torch.stack(generated.logits, 1)
    for b, run in enumerate(runs):
        want_tokens, want_logits = run.greedy(STEPS)
        assert torch.equal(tokens[b], want_tokens)
        torch.testing.assert_close(logits[b], want_logits, atol=ATOL, rtol=0)
        assert_cache_matches(generated.past_key_values, b, run.cache, ATOL)
    return counts


@pytest.fixture(scope="session")
def dense(family_cases):
    return family_cases("qwen3.5")


# ----------------------------------------------------------------------------------------------- the layer kinds


def test_the_scoring_layer_is_the_nearest_full_attention_layer_after_the_previous_stage():
    def layers(layout=LAYOUT, **cfg):
        return scoring_layers(VTRConfig(**cfg), layout, mrope=True)

    assert layers(prune_layer=[3, 6]) == [2, 4]  # K-1, then the nearest full layer before 6
    assert layers(prune_layer=4) == [2] and layers(prune_layer=5) == [4]
    assert layers(strategy="pdrop", prune_layer=[2, 4]) == [2, 4]  # its own attention
    assert layers(strategy="random", prune_layer=[1, 2]) == [0, 1]  # no attention: K-1, any K
    assert layers(strategy="vispruner", prune_layer=0) == [-1]
    assert layers(prune_layer=[3, 6], layout=[FULL] * 7) == [2, 5]  # without linear layers: K-1 as ever
    assert layers(prune_layer=[8, 20], layout=STOCK_LAYOUT) == [7, 19]


@pytest.mark.parametrize(
    "cfg,message",
    [
        (dict(prune_layer=2), "at layer 2 .* but layers 0-1 are linear .*prune that stage at layer 3 or later"),
        (dict(prune_layer=[3, 4]), "previous prune layer 3, but layer 3 is linear .*at layer 5 or later"),
        (dict(prune_layer=[3, 6], scoring_layer="own"), "own attention .* layer 3 is linear .*attention layers 2, 4"),
        (dict(prune_layer=[5, 6]), "at layer 6 .* no prune layer of this decoder works for that stage"),
        (dict(strategy="dart", prune_layer=1), "'dart' scores its stage at layer 1"),
    ],
)
def test_a_prune_layer_whose_scoring_layer_is_linear_is_refused_naming_those_that_work(cfg, message):
    with pytest.raises(ValueError, match=message):
        check_layer_kinds(VTRConfig(**cfg), LAYOUT, mrope=True)


def test_trimming_a_linear_layers_cache_is_refused():
    with pytest.raises(ValueError, match=r"earlier_cache='trim' \(the official convention of 'clse'\).*layers 0-1, 3"):
        check_layer_kinds(VTRConfig(strategy="clse", prune_layer=[3, 5]), LAYOUT, mrope=True)
    with pytest.raises(ValueError, match=r"earlier_cache='trim' trims .* set earlier_cache='keep'"):
        check_layer_kinds(VTRConfig(prune_layer=3, earlier_cache="trim"), LAYOUT, mrope=True)
    check_layer_kinds(VTRConfig(strategy="clse", prune_layer=[3, 5], earlier_cache="keep"), LAYOUT, mrope=True)
    check_layer_kinds(VTRConfig(prune_layer=0, strategy="random", earlier_cache="trim"), LAYOUT, mrope=True)


def test_a_decode_hook_is_refused_where_a_layer_it_reaches_is_linear():
    with pytest.raises(ValueError, match="'dycoke' hides cached visual rows from decoder layers >= 3 .* layers 3, 5-6"):
        check_layer_kinds(VTRConfig(strategy="dycoke"), LAYOUT, mrope=True)
    # layers L-1 on all full attention: masks can hide the rows there
    check_layer_kinds(VTRConfig(strategy="dycoke", dycoke_layer=2), [LINEAR, FULL, FULL, FULL], mrope=True)


def test_a_default_schedule_moves_up_to_the_nearest_layers_that_work():
    def snapped(**cfg):
        return snap_schedule(VTRConfig(**cfg), STOCK_LAYOUT, mrope=True)

    assert snapped() == [4]  # FastV's 3: layers 0-2 are linear
    assert snapped(strategy="pdrop", prune_layer=[8, 16, 24]) == [11, 19, 27]  # its own attention: full layers
    assert snapped(strategy="sparsevlm", prune_layer=[3, 7, 16]) == [4, 8, 16]
    assert snapped(strategy="clse", prune_layer=[1, 11, 21]) == [4, 11, 21]
    assert snapped(strategy="random", prune_layer=[1, 2]) == [1, 2]  # no attention read: anywhere
    assert snap_schedule(VTRConfig(strategy="pdrop", prune_layer=[1, 3, 5]), LAYOUT, mrope=True) is None


def test_the_model_moves_a_default_schedule_and_refuses_an_explicit_one(dense, caplog):
    with caplog.at_level(logging.WARNING):
        model = vtr(dense, strategy="dart")  # DART's default prune layer 2
    assert model.vtr_config.prune_layer == 3 and model.vtr_config.prune_layer_defaulted
    assert "'dart''s default prune_layer 2 moved to 3" in caplog.text
    with pytest.raises(ValueError, match="prune that stage at layer 3 or later"):
        vtr(dense, strategy="dart", prune_layer=2)
    with pytest.raises(ValueError, match="'pdrop''s default schedule does not fit this hybrid decoder"):
        vtr(dense, strategy="pdrop")
    with pytest.raises(ValueError, match="set earlier_cache='keep'"):
        vtr(dense, strategy="clse", prune_layer=[3, 5])
    model = vtr(dense)
    model.vtr_config = VTRConfig(prune_layer=2, keep_tokens=8)  # past set_vtr_config: refused at the forward
    with pytest.raises(ValueError, match="prune that stage at layer 3 or later"), torch.no_grad():
        model(**dense.batch)


# ----------------------------------------------------------------------------------------------- nothing pruned


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("cfg", [dict(keep_ratio=1.0, prune_layer=[3, 5]), dict(enabled=False), dict(strategy="none")])
def test_nothing_pruned_is_the_stock_model(hybrid, impl, cfg):
    """Logits, greedy tokens and every cache entry (the same padded layout) of the stock model."""
    model, stock = vtr(hybrid, impl, **cfg), hybrid.stock[impl]
    for inputs in (hybrid.single, hybrid.batch):
        valid = inputs["attention_mask"].bool()
        with torch.no_grad():
            got, want = model(**inputs), stock(**inputs)
        torch.testing.assert_close(got.logits[valid], want.logits[valid], atol=ATOL, rtol=0)
        for b in range(valid.shape[0]):
            assert_cache_matches(got.past_key_values, b, one_sample(want.past_key_values, b), ATOL)
        assert torch.equal(greedy(model, inputs).sequences, greedy(stock, inputs).sequences)
        if model.vtr_config.enabled:
            visual = torch.isin(inputs["input_ids"], torch.tensor(hybrid.visual_token_id)) & valid
            assert model.vtr_last.stages[0].image_tokens_kept == visual.sum(1).tolist()


def one_sample(cache, b):
    """Sample `b` of a batched cache, every row of it (its padding too), laid out as the oracle's (batch 1)."""

    def layer(entry):
        if type(entry) is DynamicLayer:
            return SimpleNamespace(keys=entry.keys[b : b + 1], values=entry.values[b : b + 1])
        states = {name: {0: getattr(entry, name)[0][b : b + 1]} for name in ("conv_states", "recurrent_states")}
        return SimpleNamespace(**states)

    return SimpleNamespace(layers=[layer(entry) for entry in cache.layers])


# ----------------------------------------------------------------------------------------------- the physical oracle


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize(
    "cfg,kept",
    [
        (dict(strategy="fastv", prune_layer=4, keep_tokens=8), [(8, 8)]),  # scored from layer 2, K-1 is linear
        (dict(strategy="vispruner", prune_layer=0, keep_tokens=8), [(8, 8)]),  # before the LLM, compact positions
        (dict(strategy="fastv", prune_layer=[3, 6], keep_tokens=[14, 5]), [(14, 14), (5, 5)]),  # two stages
        # at and below the first full-attention layer (2), whose rows the model-level decode mask covers
        (dict(strategy="random", prune_layer=[1, 2], keep_tokens=[14, 5]), [(14, 14), (5, 5)]),
    ],
    ids=["fastv-4", "vispruner-0", "fastv-3-6", "random-1-2"],
)
def test_fastv_a_pre_llm_method_and_two_stages_equal_the_physical_oracle(hybrid, impl, cfg, kept):
    check_physical(hybrid, vtr(hybrid, impl, **cfg), hybrid.batch, kept)


@pytest.mark.parametrize("method", [m for m in METHODS if m not in MERGING])
def test_every_method_equals_the_physical_oracle(dense, method):
    """Each method under its official conventions (CLSE's trim refused here: its cache kept) at `schedule`."""
    strategy = get_strategy(method)
    fixes = dict(token_merge=False) if strategy.supports_token_merge else {}
    if strategy.earlier_cache == "trim":
        fixes["earlier_cache"] = "keep"
    model = vtr(dense, strategy=method, prune_layer=schedule(method), keep_tokens=[14, 5], **fixes)
    kept = [(12, 12), (4, 4)] if method == "dart" else [(14, 14), (5, 5)]  # DART's image pivots on top of its picks
    check_physical(dense, model, dense.batch, kept)


@pytest.mark.parametrize("positions", ["official", "original", "compact"])
@pytest.mark.parametrize("method", MERGING)
def test_every_merging_method_equals_the_physical_oracle(dense, method, positions, monkeypatch):
    chosen = {} if positions == "official" else dict(positions=positions)
    merges = record_merges(monkeypatch, method)
    model = vtr(dense, strategy=method, keep_tokens=14, **chosen)
    for kept, merged in check_physical(dense, model, dense.batch, merges=merges):
        assert merged > 0 and 0 < kept + merged <= 14


def test_recycled_tokens_inside_the_llm_equal_the_physical_oracle(dense, monkeypatch):
    """SparseVLM's merged tokens inserted at layer 3 run through the layers after it, linear ones included."""
    merges = record_merges(monkeypatch, "sparsevlm")
    model = vtr(dense, strategy="sparsevlm", prune_layer=3, keep_tokens=14, token_merge=True)
    for kept, merged in check_physical(dense, model, dense.batch, merges=merges):
        assert kept == 14 and merged > 0


@pytest.mark.parametrize("positions", ["official", "original", "compact"])
@pytest.mark.parametrize("method", VIDEO)
def test_every_video_method_equals_the_physical_oracle(dense, method, positions, monkeypatch):
    if method == "dycoke":
        with pytest.raises(ValueError, match="decode-time pruning cannot run here"):
            vtr(dense, strategy=method)
        return
    chosen = {} if positions == "official" else dict(positions=positions)
    only = PRE_LLM_ONLY.get(method, {})
    merges = record_merges(monkeypatch, method)
    before = check_physical(dense, vtr(dense, strategy=method, keep_ratio=1.0, **only), dense.video, merges=merges)
    merges.clear()
    model = vtr(dense, strategy=method, keep_ratio=0.5, **only, **chosen)
    counts = check_physical(dense, model, dense.video, merges=merges)
    for whole, (kept, merged) in zip(before, counts):
        assert 0 < kept + merged < sum(whole)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("scoring", ["previous", "own"])
@pytest.mark.parametrize("positions", ["original", "compact"])
def test_every_convention_equals_the_physical_oracle(dense, impl, scoring, positions):
    """Scoring layer x positions of kept tokens (the earlier layers' cache is kept: trim is refused here)."""
    layers = [3, 6] if scoring == "previous" else [2, 4]
    model = vtr(dense, impl, prune_layer=layers, keep_tokens=[14, 5], scoring_layer=scoring, positions=positions)
    assert tuple(model.vtr_conventions())[:3] == (scoring, positions, "keep")
    check_physical(dense, model, dense.batch, [(14, 14), (5, 5)])


@pytest.mark.parametrize("positions", ["original", "compact"])
def test_a_follow_up_turn_equals_the_physical_oracle(dense, positions):
    """generate(history + a question, past_key_values=the pruned cache) feeds only the new tokens: linear layers
    continue their states, full ones attend their own rows, as the oracle fed the same tokens."""
    model = vtr(dense, prune_layer=[3, 6], keep_tokens=[14, 5], positions=positions)
    inputs = dense.batch
    first = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    runs = physical_runs(dense, model, inputs)
    prompt_len = inputs["input_ids"].shape[1]
    question = dense.text_only["input_ids"][:, -5:].expand(2, -1)
    history = torch.cat([first.sequences, question], 1)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(history[:, prompt_len:])], 1)
    out = greedy(model, dict(input_ids=history, attention_mask=mask), past_key_values=first.past_key_values)
    tokens, logits = out.sequences[:, history.shape[1] :], torch.stack(out.logits, 1)
    for b, run in enumerate(runs):
        answer, _ = run.greedy(2)
        assert torch.equal(first.sequences[b, prompt_len:], answer)
        last = run.feed(torch.cat([answer[-1:], question[b]]))[-1]
        want_tokens, want_logits = run.greedy(STEPS, last)
        assert torch.equal(tokens[b], want_tokens)
        torch.testing.assert_close(logits[b], want_logits, atol=ATOL, rtol=0)
        assert_cache_matches(out.past_key_values, b, run.cache, ATOL)


# ----------------------------------------------------------------------------------------------- the rest of the contract


CAPTURED = []


@register_strategy("test_qwen3_5_capture")
class Capture(PruningStrategy):
    def compute_scores(self, attention, image_token_range, config, **ctx):
        CAPTURED.append((ctx["layer_idx"], attention.full()[0], ctx["hidden_states"][0]))
        return self._aggregate_attention(attention, image_token_range, config)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize(
    "scoring,prune_layer,layer", [("previous", 4, 2), ("previous", 6, 4), ("own", 2, 2), ("own", 4, 4)]
)
def test_scoring_attention_is_the_eager_attention_of_the_scoring_layer(hybrid, impl, scoring, prune_layer, layer):
    """The recomputed attention (gated query, partial M-RoPE) is the stock eager attention of the scoring layer, whose
    output the stock model lists among its full-attention layers only; the method's `hidden_states` are the input
    of prune layer K (the output of layer K-1), wherever the scoring layer lies."""
    CAPTURED.clear()
    model = vtr(
        hybrid, impl, strategy="test_qwen3_5_capture", prune_layer=prune_layer, keep_tokens=8, scoring_layer=scoring
    )
    inputs = hybrid.batch
    with torch.no_grad():
        model(**inputs)
        stock = hybrid.stock["eager"](**inputs, output_attentions=True, output_hidden_states=True)
    eager, entering = stock.attentions[LAYOUT[:layer].count(FULL)], stock.hidden_states[prune_layer]
    assert model.vtr_last.stages[0].scoring_layer == layer
    valid = inputs["attention_mask"].bool()
    assert [k for k, _, _ in CAPTURED] == [layer, layer]
    for b, (_, got, hidden) in enumerate(CAPTURED):
        rows = valid[b]
        torch.testing.assert_close(got[:, rows][:, :, rows], eager[b][:, rows][:, :, rows], atol=ATOL, rtol=0)
        torch.testing.assert_close(hidden[rows[: hidden.shape[0]]], entering[b][rows], atol=ATOL, rtol=0)


def test_a_right_padded_batch_is_exact_in_its_prefill_only(dense):
    """Right padding: the prompt logits equal the physical oracle's, sample by sample; the padding steps after a short
    prompt then run through its linear layers' recurrence, in the stock model as here, so their states are not the
    prompt's own (a right-padded batch serves a prefill, never a decode)."""
    processor = load_processor(dense.path)
    processor.tokenizer.padding_side = "right"
    inputs = image_video_batch(processor)
    valid = inputs["attention_mask"].bool()
    assert not valid[:, -1].all(), "one sample is right-padded"
    model = vtr(dense, prune_layer=4, keep_tokens=8)
    with torch.no_grad():
        out, stock = model(**inputs), dense.stock["sdpa"](**inputs)
    index = model.vtr_last.kept_index
    for b, run in enumerate(physical_runs(dense, model, inputs)):
        rows = (index[b] >= 0) & valid[b][index[b].clamp_min(0)]
        assert index[b][rows].tolist() == run.rows
        torch.testing.assert_close(out.logits[b, rows], run.logits, atol=ATOL, rtol=0)
    short = int(valid.sum(1).argmin())
    alone = PhysicalRun(dense.stock["eager"], inputs, short, [], dense.embed).cache  # the stock layers on its rows
    got = stock.past_key_values.layers[0].recurrent_states[0][short]
    assert not torch.allclose(got, alone.layers[0].recurrent_states[0][0], atol=1e-3)


def test_a_text_only_prompt_runs_unpruned(dense):
    model = vtr(dense, keep_tokens=2, prune_layer=3)
    with torch.no_grad():
        got, want = model(**dense.text_only).logits, dense.stock["sdpa"](**dense.text_only).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert model.vtr_last is None


def test_the_processor_is_qwen3_vls_built_without_torchvision(dense):
    """Qwen3.5 checkpoints name Qwen3VLProcessor: `load_processor` builds it as for Qwen3-VL (timestamped frames)."""
    processor = load_processor(dense.path)
    assert isinstance(processor, transformers.Qwen3VLProcessor)
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert processor.tokenizer.decode(dense.video["input_ids"][0]).count(" seconds>") == 4  # one per frame group


def test_the_tiny_layout_is_the_one_these_tests_assume(dense):
    assert vtr(dense).config.text_config.layer_types == LAYOUT
    assert vtr(dense).vtr_adapter.reference_layer == 2  # the first full-attention layer
