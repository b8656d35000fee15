"""The contract every backbone of every fork meets, driven by the fork's `backbone` fixture (conftest.py).

Copied into every fork (scripts/check_copies.py). The
fixture gives, per model family: a tiny checkpoint path, stock models by attn_implementation, a single
prompt, a left-padded batch, a text-only prompt, the visual token id(s) and the oracle's embedding step
(which may return a `vtr_oracle.Embedded`: embeddings plus M-RoPE positions and a per-layer hook).
"""

import pytest
import torch
from vtr_oracle import (  # noqa: E402
    Stage,
    oracle_forward,
    oracle_greedy,
    stage_drops,
    staged_literal_forward,
    staged_literal_greedy,
)

from llava.vtr import (  # noqa: E402
    PruningStrategy,
    VTRConfig,
    available_strategies,
    get_strategy,
    load_model,
    load_processor,
    register_strategy,  # noqa: E402
    wrap,
)

ATOL = 1e-5
STEPS = 3


def vtr(backbone, impl="sdpa", **cfg):
    return load_model(backbone.path, VTRConfig(**cfg), attn_implementation=impl)


def greedy(model, inputs, steps=STEPS):
    out = model.generate(
        **inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
        return_dict_in_generate=True, output_logits=True,
    )  # fmt: skip
    return out.sequences[:, inputs["input_ids"].shape[1] :], torch.stack(out.logits, 1)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("cfg", [dict(keep_ratio=1.0, prune_layer=[1, 3]), dict(enabled=False), dict(strategy="none")])
def test_nothing_pruned_is_the_stock_model(backbone, impl, cfg):
    model, stock = vtr(backbone, impl, **cfg), backbone.stock[impl]
    for inputs in (backbone.single, backbone.batch):
        valid = inputs["attention_mask"].bool()
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs).logits[valid], stock(**inputs).logits[valid], atol=ATOL, rtol=0)
        assert torch.equal(greedy(model, inputs)[0], greedy(stock, inputs)[0])
        if model.vtr_config.enabled and model.vtr_config.strategy != "none":  # generate() reports what it kept
            visual = torch.isin(inputs["input_ids"], torch.tensor(backbone.visual_token_id).reshape(-1)) & valid
            assert model.vtr_last.stages[0].image_tokens_kept == visual.sum(1).tolist()


def test_no_config_means_nothing_pruned_through_every_entry(backbone):
    """load_model(path), wrap(stock) and from_pretrained on the VTR class agree: without a VTRConfig nothing
    is pruned, and the logits are the stock model's."""
    stock = backbone.stock["sdpa"]
    loaded = load_model(backbone.path, attn_implementation="sdpa")
    wrapped = wrap(type(stock).from_pretrained(backbone.path, attn_implementation="sdpa").eval())
    direct = type(loaded).from_pretrained(backbone.path, attn_implementation="sdpa").eval()
    with torch.no_grad():
        want = stock(**backbone.single).logits
        for model in (loaded, wrapped, direct):
            assert model.vtr_config.enabled is False
            torch.testing.assert_close(model(**backbone.single).logits, want, atol=0, rtol=0)
            assert model.vtr_last is None


def test_a_missing_or_empty_checkpoint_folder_is_named(tmp_path):
    """Not transformers' "Repo id must be in the form ..." but the folder and what is wrong with it."""
    missing, empty = tmp_path / "no-such-model", tmp_path / "empty"
    empty.mkdir()
    for load in (load_model, load_processor):
        for path, why in (
            (missing, "does not exist"),
            (empty, "holds no "),
            ("./runs/x/y", "does not exist"),
        ):
            with pytest.raises(FileNotFoundError, match=why) as err:
                load(str(path))
            assert str(path) in str(err.value)


def test_a_text_only_prompt_runs_unpruned(backbone):
    model = vtr(backbone, keep_tokens=2, prune_layer=2)
    with torch.no_grad():
        got, want = model(**backbone.text_only).logits, backbone.stock["sdpa"](**backbone.text_only).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert model.vtr_last is None


def test_pre_encoded_visuals_prune_as_their_pixels_and_both_together_are_refused(backbone):
    """`mm_encoder_outputs` from the adapter's own `encode_inputs` (what generate() hands the prefill) give the
    pixels' kept set and logits; pixels and pre-encoded outputs of one modality together are an error."""
    model = vtr(backbone, strategy="vispruner", keep_tokens=8)  # reads the vision tower's states
    adapter, inputs = model.vtr_adapter, backbone.batch
    with torch.no_grad():
        want = model(**inputs).logits
        kept = [p.tolist() for p in model.vtr_last.stages[0].kept_positions]
        encoded = adapter.encode_inputs(inputs)
        pre_encoded = {k: v for k, v in inputs.items() if k not in adapter.pixel_inputs}
        got = model(**pre_encoded, mm_encoder_outputs=encoded).logits
    assert [p.tolist() for p in model.vtr_last.stages[0].kept_positions] == kept
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    with pytest.raises(ValueError, match="not both"):
        model(**inputs, mm_encoder_outputs=encoded)


ALL_METHODS = sorted(m for m in available_strategies() if not m.startswith(("test_", "contract_")))
#: video methods (they need the `frames` fact): run on the backbone's video batch, against the literal oracle
VIDEO = [m for m in ALL_METHODS if "frames" in get_strategy(m).requires]
METHODS = [m for m in ALL_METHODS if m not in VIDEO]
#: methods whose merged tokens are the method itself (VisionZip, pool): checked against the literal oracle
MERGING = [m for m in METHODS if get_strategy(m).merge_is_method]
#: fields that turn a video method's parts inside the LLM off, so its pre-LLM arrangement meets the literal oracle
#: (HoliTom: tau 1 leaves no token static, so the budget decides; the tiny videos' frames are alike everywhere)
PRE_LLM_ONLY = {
    "holitom": dict(holitom_inner_ratio=0.0, holitom_tau=1.0),
    "dycoke": dict(dycoke_decode_prune=0.0),
    "framefusion": dict(prune_layer=0),
}
#: fields that make those parts act on the tiny videos, for the staged literal oracle: HoliTom's inner merge at layer
#: 1 (tau 0.99: both static clusters and dynamic tokens reach it), FrameFusion's stage at every layer (cost 0.1: the
#: first merges what is alike, a later one prunes by attention), DyCoke's decode pruning from layer 2 (gate 1: every
#: step prunes)
INSIDE_THE_LLM = {
    "holitom": dict(keep_ratio=0.5, holitom_tau=0.99, holitom_layer=1),
    "framefusion": dict(framefusion_cost=0.1),
    "dycoke": dict(dycoke_layer=2, dycoke_gate=1.0),
}


def refused_if_unsupported(backbone, method) -> bool:
    """True (after checking the refusal) when the backbone's adapter lacks a fact the method `requires`: loading
    it then fails with "not supported", naming what is missing."""
    model = vtr(backbone)
    missing = get_strategy(method).missing_facts(model.vtr_adapter)
    if missing:
        with pytest.raises(ValueError, match=f"{method!r} is not supported on .*{missing[0]}"):
            model.set_vtr_config(VTRConfig(strategy=method))
    return bool(missing)


def test_a_method_needing_a_fact_the_family_lacks_is_refused_naming_it(backbone):
    @register_strategy("contract_needs")
    class Needs(PruningStrategy):
        needs_attention = False
        requires = ("visual_grid", "no_such_fact")

        def compute_scores(self, attention, image_token_range, config, **ctx):
            return torch.zeros(image_token_range[1] - image_token_range[0])

    with pytest.raises(ValueError, match="'contract_needs' is not supported on .*: it needs no_such_fact,"):
        vtr(backbone, strategy="contract_needs", prune_layer=0)
    Needs.requires = ("visual_grid",)
    assert vtr(backbone, strategy="contract_needs", prune_layer=0).vtr_config.strategy == "contract_needs"


def test_every_fact_an_adapter_declares_is_given_to_strategies(backbone):
    """`BackboneAdapter.facts` (what `requires` is checked against) names exactly what the compute_scores ctx
    holds, and each per-token fact has one row per visual token of the sample."""
    seen = {}

    @register_strategy("contract_facts")
    class Facts(PruningStrategy):
        needs_attention = False

        def compute_scores(self, attention, image_token_range, config, **ctx):
            seen.setdefault(ctx["batch_index"], ctx)
            return torch.zeros(image_token_range[1] - image_token_range[0])

    model = vtr(backbone, strategy="contract_facts", prune_layer=0, keep_ratio=1.0)
    with torch.no_grad():
        model(**backbone.batch)
    facts = model.vtr_adapter.facts
    for ctx in seen.values():
        assert all(fact in ctx for fact in facts), [f for f in facts if f not in ctx]
        count = ctx["image_token_indices"].numel()
        for name in ("visual_grid", "vision_importance", "vision_features", "vision_cls", "frames"):
            if name in facts:
                assert ctx[name]().shape[0] == count, name
        if "vision_layer" in facts:
            layer = ctx["vision_layer"]()
            assert layer["received"].shape == (count,) and layer["keys"].shape[0] == count
        if "project" in facts and "vision_features" in facts:
            assert ctx["project"](ctx["vision_features"]()[:2]).shape == (2, ctx["hidden_states"].shape[-1])


def check_against_oracle(backbone, model, kept=((14, 14), (5, 5))):
    """The pruned prefill and greedy decode of `model` on the padded batch equal the oracle run with the same
    drops under the model's conventions."""
    inputs, stock = backbone.batch, backbone.stock["eager"]
    conventions = model.vtr_conventions()
    with torch.no_grad():
        logits = model(**inputs).logits
    record = model.vtr_last
    kept = [list(k) for k in kept]
    assert [s.image_tokens_kept for s in record.stages] == kept
    prompt_len = inputs["input_ids"].shape[1]
    visual = torch.isin(inputs["input_ids"], torch.tensor(backbone.visual_token_id).reshape(-1))  # id or ids
    drops = stage_drops(record, 2, prompt_len, visual)
    expected = oracle_forward(stock, inputs, drops, prompt_len, backbone.embed, conventions=conventions)
    for b in range(2):
        rows = (record.kept_index[b] >= 0) & inputs["attention_mask"][b].bool()[record.kept_index[b].clamp_min(0)]
        torch.testing.assert_close(logits[b, rows], expected[b, record.kept_index[b, rows]], atol=ATOL, rtol=0)
    tokens, step_logits = greedy(model, inputs)
    assert [s.image_tokens_kept for s in model.vtr_last.stages] == kept, "generate prunes too"
    stages = stage_drops(model.vtr_last, 2, prompt_len, visual)
    want_tokens, want_logits = oracle_greedy(stock, inputs, stages, STEPS, backbone.embed, conventions)
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(step_logits, want_logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", [m for m in METHODS if m not in MERGING])
def test_every_method_keeps_its_budget_and_equals_the_oracle(backbone, method):
    """Each method under its own (official) conventions; recycling has its own oracle test."""
    if refused_if_unsupported(backbone, method):
        return
    strategy = get_strategy(method)
    first = 0 if not strategy.needs_attention or strategy.scoring_layer == "own" else 1  # K=0: before layer 0
    merge = dict(token_merge=False) if strategy.supports_token_merge else {}
    model = vtr(backbone, strategy=method, prune_layer=[first, 3], keep_tokens=[14, 5], **merge)
    # DART keeps its 4 image pivots on top of 8 pivots x budget // 8 picks, as the official code does
    kept = ((12, 12), (4, 4)) if method == "dart" else ((14, 14), (5, 5))
    check_against_oracle(backbone, model, kept)


@pytest.mark.parametrize("positions", ["official", "original", "compact"])
@pytest.mark.parametrize("method", MERGING)
def test_every_merging_method_equals_the_literal_oracle(backbone, method, positions, monkeypatch):
    """A method whose merged tokens replace the visual ones before the LLM: the pruned prefill and greedy
    decode on the padded batch equal the stock layers run on the literal shortened prompt (kept tokens and the
    method's merged ones, in the engine's order, at their positions), whatever the positions convention."""
    if refused_if_unsupported(backbone, method):
        return
    chosen = {} if positions == "official" else dict(positions=positions)
    counts = check_literal(backbone, backbone.batch, method, monkeypatch, keep_tokens=14, **chosen)
    for kept, merged in counts:
        assert (
            merged > 0 and 0 < kept + merged <= 14
        )  # the budget (pool's cells may not fill it exactly on small tiles)


@pytest.mark.parametrize("positions", ["official", "original", "compact"])
@pytest.mark.parametrize("method", VIDEO)
def test_every_video_method_equals_the_literal_oracle(backbone, method, positions, monkeypatch):
    """A video method on a padded batch of videos: its arrangement (kept tokens, merged ones, tokens it reorders)
    equals the stock layers run on the literal shortened prompt, prefill and greedy decode, whatever the positions
    convention; it keeps about its share of the video tokens."""
    if refused_if_unsupported(backbone, method):
        return
    assert backbone.video is not None, "a family with the frames fact gives a video batch"
    chosen = {} if positions == "official" else dict(positions=positions)
    only = PRE_LLM_ONLY.get(method, {})
    before = check_literal(backbone, backbone.video, method, monkeypatch, keep_ratio=1.0, **only)
    counts = check_literal(backbone, backbone.video, method, monkeypatch, keep_ratio=0.5, **only, **chosen)
    for whole, (kept, merged) in zip(before, counts):
        assert 0 < kept + merged < sum(whole)


def check_literal(backbone, inputs, method, monkeypatch, **cfg) -> list[tuple[int, int]]:
    """`method` on `inputs`, one stage before the LLM: `check_staged`. Returns per sample (visual tokens kept, merged
    tokens inserted)."""
    model = check_staged(backbone, inputs, method, monkeypatch, **cfg)
    (stage,) = model.vtr_last.stages
    assert stage.layer == 0
    return list(zip(stage.image_tokens_kept, stage.merged or [0] * len(stage.image_tokens_kept)))


def check_staged(backbone, inputs, method, monkeypatch, **cfg):
    """`method` on `inputs`: the pruned prefill and greedy decode equal the staged literal oracle (each stage's kept
    rows and merged tokens in the engine's order, at their positions; DeepStack extras mixed as the method mixes;
    a decode hook's hidden rows masked per step, and chosen as `check_decode_hides` says). Returns the model
    (`vtr_last`: the greedy run's)."""
    seen = record_stages(monkeypatch, method)
    model = vtr(backbone, strategy=method, **cfg)
    stock = backbone.stock["eager"]
    with torch.no_grad():
        logits = model(**inputs).logits
    stages = replayed_stages(model, seen)
    expected = staged_literal_forward(stock, inputs, stages, backbone.embed)
    rows = stages[-1].rows
    real = (rows >= 0) & inputs["attention_mask"].bool().gather(1, rows.clamp_min(0))
    torch.testing.assert_close(logits[real], expected[real], atol=ATOL, rtol=0)
    tokens, step_logits = greedy(model, inputs)
    record, stages = model.vtr_last, replayed_stages(model, seen)
    hides = (record.decode[0].layer, [step.hidden for step in record.decode]) if record.decode else None
    attention = {}
    layer = stock.model.language_model.layers[hides[0] - 1 if hides else 0].self_attn
    handle = layer.register_forward_hook(lambda module, args, out: attention.update(weights=out[1]))
    try:
        want_tokens, want_logits = staged_literal_greedy(stock, inputs, stages, STEPS, backbone.embed, hides)
    finally:
        handle.remove()
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(step_logits, want_logits, atol=ATOL, rtol=0)
    if hides is not None:
        check_decode_hides(record, seen["offered"], attention["weights"])
    return model


def record_stages(monkeypatch, method) -> dict:
    """Note, through `method`'s strategy contract, what each prune stage of its runs started from and merged, and
    what a decode hook was offered: {"rows": {(stage, sample): the prompt index of each row entering the stage},
    "merges": {stage: [(sample, dropped rows, merge_tokens's output)]}, "offered": [per decode step, the candidate
    rows given to decode_keep]}."""
    seen = {"rows": {}, "merges": {}, "offered": []}
    cls = get_strategy(method)
    score, merge, keep = cls.compute_scores, cls.merge_tokens, getattr(cls, "decode_keep", None)

    def scoring(self, attention, image_token_range, config, **ctx):
        seen["rows"][(ctx["stage"], ctx["batch_index"])] = ctx["original_index"]
        return score(self, attention, image_token_range, config, **ctx)

    def merging(self, dropped_hidden, dropped_scores, config, **ctx):
        out = merge(self, dropped_hidden, dropped_scores, config, **ctx)
        if out is not None:
            seen["merges"].setdefault(ctx["stage"], []).append(
                (ctx["vtr_ctx"]["batch_index"], ctx["dropped_index"], out)
            )
        return out

    def keeping(self, attention, candidates, state, config, query_len):
        seen["offered"].append(candidates)
        return keep(self, attention, candidates, state, config, query_len)

    monkeypatch.setattr(cls, "compute_scores", scoring)
    monkeypatch.setattr(cls, "merge_tokens", merging)
    if keep is not None:
        monkeypatch.setattr(cls, "decode_keep", keeping)
    return seen


def replayed_stages(model, seen) -> list[Stage]:
    """The stages of `model`'s last pruned prefill for the staged oracle: each stage's rows (those the next stage
    started from; the last stage's: `kept_index`), its merged tokens (a mix of the rows before it where the method
    gives one, else the value), its positions (`stage_positions`). Empties `seen`."""
    record, config = model.vtr_last, model.vtr_config
    strategy, batch = get_strategy(config.strategy)(), record.kept_index.shape[0]
    entering = []  # per stage: [batch, len] the prompt index of each row entering it
    for s in range(len(record.stages)):
        assert all((s, b) in seen["rows"] for b in range(batch)), f"stage {s} scored every sample"
        entering.append(torch.stack([seen["rows"][(s, b)] for b in range(batch)]))
    stages = []
    for s, stage in enumerate(record.stages):
        rows = entering[s + 1] if s + 1 < len(record.stages) else record.kept_index
        merged = {}
        for b, dropped, (values, which, *rest) in seen["merges"].get(s, []):
            mix = rest[1].to_dense() if len(rest) > 1 else None  # (a video method's mix is sparse)
            for i, original in enumerate(entering[s][b, dropped[which]].tolist()):
                (j,) = (rows[b] == original).nonzero().reshape(-1).tolist()
                merged[(b, j)] = values[i] if mix is None else (dropped, mix[i])
        positions = strategy.stage_positions(s, model.vtr_conventions().positions, config)
        stages.append(Stage(stage.layer, rows, positions, merged))
    seen["rows"].clear()
    seen["merges"].clear()
    return stages


@pytest.mark.parametrize("method", sorted(INSIDE_THE_LLM))
def test_every_video_method_inside_the_llm_equals_its_oracle(backbone, method, monkeypatch):
    """A video method's parts inside the LLM on a padded batch of videos (HoliTom's inner merge, FrameFusion's
    merges and pruning at its stages, DyCoke's decode-time pruning): the prefill and greedy decode equal the stock
    layers re-run on the sequence as each stage left it, each layer decoding on the rows it ran on, with the rows each
    decode step hid masked from its layers (`check_staged`)."""
    if refused_if_unsupported(backbone, method):
        return
    record = check_staged(backbone, backbone.video, method, monkeypatch, **INSIDE_THE_LLM[method]).vtr_last
    if record.decode:  # every sample's first step hid rows
        assert len(record.decode) == STEPS - 1 and bool(record.decode[0].hidden.any(1).all())
    else:  # a stage inside the LLM shortened the sequence
        assert any(s.layer > 0 and s.seq_len_after < s.seq_len_before for s in record.stages)


def check_decode_hides(record, offered, weights):
    """Each decode step hid only rows it was offered (`decode_keep`'s candidates), the ones its token attends to least
    in the layer before the hook's (`weights` [batch, heads, len, len]: that layer's eager attention)."""
    length = record.kept_index.shape[1]
    assert len(offered) == len(record.decode)
    for t, (step, candidates) in enumerate(zip(record.decode, offered)):
        candidates = candidates[:, :length]
        assert not bool((step.hidden & ~candidates).any()), "only candidate rows are hidden"
        received = weights[:, :, length + t, :length].mean(1)
        for b, hide in enumerate(step.hidden):
            visible = candidates[b] & ~hide
            if hide.any() and visible.any():
                assert received[b, hide].max() <= received[b, visible].min() + 1e-6, f"step {t}, sample {b}"


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("scoring", ["previous", "own"])
@pytest.mark.parametrize(
    "positions,cache", [("original", "keep"), ("compact", "keep"), ("original", "trim"), ("compact", "trim")]
)
def test_every_convention_equals_the_oracle(backbone, impl, scoring, positions, cache):
    """Scoring layer x positions of kept tokens x the earlier layers' cache, prefill and greedy decode."""
    cfg = dict(strategy="fastv", prune_layer=[1, 3], keep_tokens=[14, 5])
    model = vtr(backbone, impl, scoring_layer=scoring, positions=positions, earlier_cache=cache, **cfg)
    assert tuple(model.vtr_conventions())[:3] == (scoring, positions, cache)
    check_against_oracle(backbone, model)


CAPTURED = []


@register_strategy("contract_capture")
class Capture(PruningStrategy):
    def compute_scores(self, attention, image_token_range, config, **ctx):
        CAPTURED.append(attention.full()[0])
        return self._aggregate_attention(attention, image_token_range, config)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("scoring,layer", [("previous", 1), ("own", 2)])
def test_scoring_attention_is_the_eager_causal_attention_of_the_scoring_layer(backbone, impl, scoring, layer):
    """prune_layer=2: layer 1's attention (FastV's convention), or layer 2's own (PyramidDrop's)."""
    CAPTURED.clear()
    model = vtr(backbone, impl, strategy="contract_capture", prune_layer=2, keep_tokens=8, scoring_layer=scoring)
    inputs = backbone.batch
    with torch.no_grad():
        model(**inputs)
        eager = backbone.stock["eager"](**inputs, output_attentions=True).attentions[layer]
    valid = inputs["attention_mask"].bool()
    assert len(CAPTURED) == 2
    for b, got in enumerate(CAPTURED):
        rows = valid[b]
        torch.testing.assert_close(got[:, rows][:, :, rows], eager[b][:, rows][:, :, rows], atol=ATOL, rtol=0)
        assert torch.all(got.triu(1) == 0), "causal"


@pytest.mark.parametrize("positions,cache", [("original", "keep"), ("compact", "trim")])
def test_a_follow_up_turn_on_the_pruned_cache_equals_the_oracle(backbone, positions, cache):
    """generate(history + a new question, past_key_values=the pruned cache) feeds only the new tokens and
    equals the oracle run of the whole conversation with the first turn's drops (no re-encoding)."""
    model = vtr(backbone, strategy="fastv", prune_layer=[1, 3], keep_tokens=[14, 5], positions=positions,
                earlier_cache=cache)  # fmt: skip
    inputs, stock = backbone.batch, backbone.stock["eager"]
    first = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    prompt_len = inputs["input_ids"].shape[1]
    visual = torch.isin(inputs["input_ids"], torch.tensor(backbone.visual_token_id).reshape(-1))
    stages = stage_drops(model.vtr_last, 2, prompt_len, visual)
    question = backbone.text_only["input_ids"][:, -5:].expand(2, -1)
    history = torch.cat([first.sequences, question], 1)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(history[:, prompt_len:])], 1)
    fed = []
    handle = model.register_forward_pre_hook(lambda m, a, k: fed.append(k["input_ids"].shape[1]), with_kwargs=True)
    try:
        out = model.generate(
            input_ids=history, attention_mask=mask, past_key_values=first.past_key_values, max_new_tokens=STEPS,
            min_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True, output_logits=True,
        )  # fmt: skip
    finally:
        handle.remove()
    assert fed[0] == 1 + question.shape[1], "the last answer token and the question, nothing the cache holds"
    turn2 = dict(inputs, input_ids=history, attention_mask=mask)
    conventions = model.vtr_conventions()
    want, want_logits = oracle_greedy(stock, turn2, stages, STEPS, backbone.embed, conventions, prompt_len)
    assert torch.equal(out.sequences[:, history.shape[1] :], want)
    torch.testing.assert_close(torch.stack(out.logits, 1), want_logits, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="text only"):  # a new image cannot join a pruned cache
        model(**inputs, past_key_values=out.past_key_values)
