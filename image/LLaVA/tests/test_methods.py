"""The method zoo: every method on every backbone of this fork equals the oracle; each method's math by hand."""

import itertools
import logging
import math

import pytest
import torch

from llava.vtr import VTRConfig, available_strategies, get_strategy, load_model
from llava.vtr.cost import equivalent_tokens, tokens_per_layer
from llava.vtr.engine import decode_state
from llava.vtr.strategy.clse import evolution_factor, high_pass_score
from llava.vtr.strategy.divprune import max_min_order
from llava.vtr.strategy.sparsevlm import choose_raters

METHODS = sorted(m for m in available_strategies() if not m.startswith(("test_", "contract_")))
STEPS = 3


def test_the_zoo_is_registered():
    assert {"fastv", "priortr", "random", "priortr_2f", "pdrop", "sparsevlm", "vispruner", "divprune", "clse"} <= set(
        METHODS
    )


def _cfg(method):
    first = 0 if not get_strategy(method).needs_attention else 1  # pre-LLM methods start before layer 0
    return dict(strategy=method, prune_layer=[first, 3], keep_tokens=[14, 5])


@pytest.mark.parametrize("prune_layer,keep", [(2, 9), ([1, 3], [20, 6])])
def test_priortr_2f_ranks_like_single_forward_priortr(tiny_path, single_inputs, prune_layer, keep):
    """With causal attention the cut prompt's last row is the full prompt's anchor row: same Q, same picks."""
    kept = {}
    for method in ("priortr", "priortr_2f"):
        model = load_model(tiny_path, VTRConfig(strategy=method, prune_layer=prune_layer, keep_tokens=keep))
        with torch.no_grad():
            model(**single_inputs)
        kept[method] = [s.kept_positions[0].tolist() for s in model.vtr_last.stages]
    assert kept["priortr"] == kept["priortr_2f"]


# ----------------------------------------------------------------------------------------- PDrop


def test_pdrop_defaults_for_a_32_layer_model_and_explicit_values_win():
    from llava.vtr.strategy.pdrop import PyramidDrop

    assert PyramidDrop.schedule_defaults(VTRConfig(strategy="pdrop"), 32) == dict(
        prune_layer=[8, 16, 24], keep_tokens=None, keep_ratio=[0.5, 0.25, 0.125]
    )
    assert PyramidDrop.schedule_defaults(VTRConfig(strategy="pdrop", prune_layer=[2, 4], keep_tokens=9), 32) == {}


@pytest.mark.parametrize("backbone", ["llava-1.5", "llava-1.6"])
def test_method_defaults_reach_the_model_whatever_the_backbone_budget(backbone, tiny_path, next_path):
    path = tiny_path if backbone == "llava-1.5" else next_path  # 192 vs 320 default budgets
    model = load_model(path, VTRConfig(strategy="pdrop"))  # 4 layers: stages at 1, 2, 3
    assert model.vtr_config.prune_layers == [1, 2, 3] and model.vtr_config.keep_ratio == [0.5, 0.25, 0.125]
    clse = load_model(path, VTRConfig(strategy="clse")).vtr_config
    assert (
        isinstance(clse.keep_tokens, list) and len(clse.keep_tokens) == len(clse.prune_layers) >= 2
    )  # 4 layers: [1, 3]
    one_stage = load_model(path, VTRConfig(strategy="pdrop", keep_ratio=[0.5])).vtr_config
    assert one_stage.prune_layers == [3] and one_stage.keep_ratio == [0.5], "per-stage budgets fix the stages"


def test_pdrop_scores_with_the_last_instruction_token_whatever_the_query_rows():
    att = torch.zeros(1, 2, 8, 8)
    att[0, :, 7, 2:6] = torch.tensor([0.1, 0.4, 0.2, 0.3])
    att[0, :, 6, 2:6] = torch.tensor([0.9, 0.0, 0.0, 0.0])  # another question row, ignored
    scores = get_strategy("pdrop")().compute_scores(att, (2, 6), VTRConfig(query_aggregation="question"))
    torch.testing.assert_close(scores, torch.tensor([0.1, 0.4, 0.2, 0.3]))


def test_pdrop_counts_int_of_the_original_visual_tokens_at_every_stage():
    """PyramidDrop keeps int(n0 * r_s) of the ORIGINAL count n0 (r = its ratio list, or lambda^(s+1))."""
    method = get_strategy("pdrop")()
    original = torch.tensor([577, 576, 10])
    listed = VTRConfig(strategy="pdrop", prune_layer=[8, 16, 24], keep_ratio=[0.5, 0.25, 0.125])
    scalar = VTRConfig(strategy="pdrop", prune_layer=[8, 16, 24], keep_ratio=0.3)
    current = original
    for stage, (want_list, want_scalar) in enumerate([([288, 288, 5], [173, 172, 3]),
                                                       ([144, 144, 2], [51, 51, 0]),
                                                       ([72, 72, 1], [15, 15, 0])]):  # fmt: skip
        got = method.ratio_keep_count(listed, stage, current, original)
        assert got.tolist() == want_list
        assert method.ratio_keep_count(scalar, stage, original, original).tolist() == want_scalar
        current = got
    # the framework's default for other methods: round half up of the share of what is still there
    assert get_strategy("fastv")().ratio_keep_count(scalar, 1, torch.tensor([5]), original[:1]).tolist() == [2]


def test_pdrop_prunes_with_the_counts_of_the_original_tokens(tiny_path, single_inputs):
    model = load_model(tiny_path, VTRConfig(strategy="pdrop", prune_layer=[1, 2, 3], keep_ratio=[0.3, 0.2, 0.1]))
    with torch.no_grad():
        model(**single_inputs)
    assert [s.image_tokens_kept for s in model.vtr_last.stages] == [[19], [12], [6]]  # int(64 * r)
    assert model.vtr_config.conventions()[:3] == ("own", "compact", "keep")


# Schedules for LLaVA-1.5 (576 visual tokens, 32 layers) documented in docs/methods.md: prune layers and
# PyramidDrop ratio lists (shares of the original count) whose average visual tokens per layer are 192 / 128 / 64.
PDROP_SCHEDULES = {
    192: ([8, 16, 24], [0.25, 0.0625, 0.015625], 192),
    128: ([5, 11, 17], [0.25, 0.0625, 0.015625], 128),
    64: ([2, 6, 10], [0.25, 0.0625, 0.015625], 64),
}


@pytest.mark.parametrize("average", sorted(PDROP_SCHEDULES))
def test_documented_pdrop_schedules_hit_their_average_token_counts(average):
    layers, ratios, _ = PDROP_SCHEDULES[average]
    kept, schedule = 576, []
    for layer, ratio in zip(layers, ratios):
        new = int(576 * ratio)
        schedule.append((layer, kept - new))
        kept = new
    visual = tokens_per_layer(576, 32, schedule)
    assert abs(equivalent_tokens(visual) - average) <= 0.02 * average, equivalent_tokens(visual)


def test_a_scalar_ratio_compounds_over_stages_and_says_so(caplog):
    with caplog.at_level(logging.WARNING):
        cfg = VTRConfig(prune_layer=[2, 4, 6], keep_ratio=0.5)
    assert "about 0.125 of them reach the last stage" in caplog.text
    select = get_strategy("fastv")().select_tokens
    left = 576
    for stage in range(3):  # each stage keeps half of what is still there
        left = select(torch.rand(left), left, cfg, stage=stage).numel()
    assert left == 72


# ----------------------------------------------------------------------------------------- DivPrune


def test_divprune_picks_in_greedy_max_min_order():
    torch.manual_seed(0)
    x = torch.randn(12, 5)
    order = max_min_order(x).tolist()
    # independent greedy on the cosine distance matrix
    unit = [v / v.norm() for v in x]
    dist = [[1 - float(a @ b) for b in unit] for a in unit]
    first = max(range(12), key=lambda i: min(dist[i][j] for j in range(12) if j != i))
    picked = [first]
    while len(picked) < 12:
        rest = [i for i in range(12) if i not in picked]
        picked.append(max(rest, key=lambda i: min(dist[i][j] for j in picked)))
    assert order == picked
    assert max_min_order(x, picks=4).tolist() == picked[:4]


def test_divprune_keeps_one_of_each_duplicate_first():
    base = torch.eye(4)
    x = torch.cat([base, base + 1e-4])  # every vector twice
    scores = get_strategy("divprune")().compute_scores(
        None, (0, 8), VTRConfig(keep_tokens=4), hidden_states=x[None], image_token_indices=torch.arange(8), stage=0
    )
    kept = torch.topk(scores, 4).indices % 4
    assert sorted(kept.tolist()) == [0, 1, 2, 3]


# ----------------------------------------------------------------------------------------- VisPruner


def _vispruner_reference(importance, features, budget, ratio):
    """VisPruner's selection restated literally, in float64 Python lists: (important, diverse) index sets."""
    n = len(importance)
    order = sorted(range(n), key=lambda i: -importance[i])  # descending; ties by index
    t_imp = int(budget * ratio)
    t_div = budget - t_imp
    important, queue = order[:t_imp], order[t_imp:]
    x = [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in features.double().tolist()]
    while True:
        r = min(8, len(queue) - t_div)
        if r <= 0:
            break
        a, b = queue[0::2], queue[1::2]
        best = [max(sum(p * q for p, q in zip(x[i], x[j])) for j in b) for i in a]
        ranked = sorted(range(len(a)), key=lambda k: -best[k])
        queue = [a[k] for k in ranked[r:]] + b
    return set(important), set(queue)


def _vispruner_scores(importance, features, budget, ratio):
    n = len(importance)
    ctx = dict(
        stage=0,
        hidden_states=torch.zeros(1, n, 3),  # not what the diverse step reads when vision features exist
        image_token_indices=torch.arange(n),
        original_index=torch.arange(n),
        vision_importance=lambda: torch.tensor(importance),
        vision_features=lambda: features,
        vtr_ctx={},
    )
    cfg = VTRConfig(strategy="vispruner", keep_tokens=budget, important_ratio=ratio)
    return get_strategy("vispruner")().compute_scores(None, (0, n), cfg, **ctx)


@pytest.mark.parametrize("budget,ratio", [(64, 0.5), (32, 0.75), (20, 0.5)])
def test_vispruner_keeps_the_official_important_and_diverse_sets(budget, ratio):
    torch.manual_seed(budget)
    n = 144
    importance = torch.rand(n).tolist()
    features = torch.randn(n, 16)
    scores = _vispruner_scores(importance, features, budget, ratio)
    important, diverse = _vispruner_reference(importance, features, budget, ratio)
    assert set((scores == 2).nonzero().reshape(-1).tolist()) == important
    assert set((scores == 1).nonzero().reshape(-1).tolist()) == diverse
    assert len(important) == int(budget * ratio) and len(important | diverse) == budget


def test_vispruner_diverse_step_is_not_positional():
    """Same attention, other features: the diverse set must change (a positional rule would not)."""
    torch.manual_seed(0)
    importance = torch.rand(144).tolist()
    first = _vispruner_scores(importance, torch.randn(144, 16), 64, 0.5)
    second = _vispruner_scores(importance, torch.randn(144, 16), 64, 0.5)
    assert torch.equal(first == 2, second == 2), "importance alone picks the important set"
    assert not torch.equal(first == 1, second == 1)


def test_vispruner_removes_one_of_a_duplicate_pair_and_needs_a_count():
    torch.manual_seed(1)
    features = torch.randn(40, 6)
    features[31] = features[30] * 1.0001
    importance = [1.0 - i / 100 for i in range(40)]  # 30 and 31 are unimportant, next to each other in the queue
    scores = _vispruner_scores(importance, features, 38, 0.5)
    assert (scores[30:32] == 1).sum() == 1
    with pytest.raises(ValueError, match="keep_tokens or keep_ratio"):
        get_strategy("vispruner")().compute_scores(
            None, (0, 3), VTRConfig(score_threshold=0.1), stage=0, image_token_indices=torch.arange(3), vtr_ctx={}
        )


def test_pre_llm_methods_default_to_prune_layer_0_with_compact_positions(tiny_path):
    for method in ("vispruner", "divprune"):
        cfg = load_model(tiny_path, VTRConfig(strategy=method, keep_tokens=16)).vtr_config
        assert cfg.prune_layers == [0] and cfg.conventions().positions == "compact"
        assert load_model(tiny_path, VTRConfig(strategy=method, prune_layer=2)).vtr_config.prune_layers == [2]


def test_vispruner_reads_the_features_before_the_projector(tiny_path, single_inputs):
    """vision_features is the tower's select-layer output (CLS dropped), not the projected tokens."""
    from transformers import LlavaForConditionalGeneration

    stock = LlavaForConditionalGeneration.from_pretrained(tiny_path).eval()
    seen = {}
    original = get_strategy("vispruner").compute_scores

    def spy(self, attention, image_token_range, config, **ctx):
        seen["features"] = ctx["vision_features"]()
        return original(self, attention, image_token_range, config, **ctx)

    get_strategy("vispruner").compute_scores = spy
    try:
        model = load_model(tiny_path, VTRConfig(strategy="vispruner", keep_tokens=16))
        with torch.no_grad():
            model(**single_inputs)
    finally:
        get_strategy("vispruner").compute_scores = original
    with torch.no_grad():
        tower = stock.model.vision_tower(single_inputs["pixel_values"], output_hidden_states=True)
    expected = tower.hidden_states[stock.config.vision_feature_layer][0, 1:]
    torch.testing.assert_close(seen["features"], expected)


def test_vision_importance_is_the_cls_attention_of_the_feature_layer(tiny_path, single_inputs):
    """The adapter recomputes one vision layer's CLS attention; compare with the tower's own eager weights."""
    from transformers import LlavaForConditionalGeneration

    model = load_model(tiny_path, VTRConfig(strategy="vispruner", prune_layer=0, keep_tokens=8))
    seen = {}
    original = get_strategy("vispruner").compute_scores

    def spy(self, attention, image_token_range, config, **ctx):
        seen["importance"] = ctx["vision_importance"]()
        return original(self, attention, image_token_range, config, **ctx)

    get_strategy("vispruner").compute_scores = spy
    try:
        with torch.no_grad():
            model(**single_inputs)
    finally:
        get_strategy("vispruner").compute_scores = original
    stock = LlavaForConditionalGeneration.from_pretrained(tiny_path, attn_implementation="eager").eval()
    with torch.no_grad():
        out = stock.model.vision_tower(single_inputs["pixel_values"], output_attentions=True)
    layer = stock.config.vision_config.num_hidden_layers + stock.config.vision_feature_layer  # -2 -> L-2
    expected = out.attentions[layer][0, :, 0, 1:].mean(0)
    torch.testing.assert_close(seen["importance"], expected, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------- SparseVLM


def test_sparsevlm_raters_are_the_text_tokens_above_the_mean_relevance():
    torch.manual_seed(2)
    visual, text = torch.randn(5, 4), torch.randn(6, 4)
    relevance = [
        sum(math.exp(float(v @ text[j])) / sum(math.exp(float(v @ t)) for t in text) for v in visual) / 5
        for j in range(6)
    ]
    mean = sum(relevance) / 6
    assert choose_raters(visual, text).tolist() == [j for j in range(6) if relevance[j] > mean]


def test_sparsevlm_scores_are_the_raters_attention():
    seq = 10
    att = torch.rand(1, 2, seq, seq)
    embeddings = torch.zeros(1, seq, 4)
    embeddings[0, 2:5] = torch.tensor([1.0, 0, 0, 0])  # visual tokens point along x
    embeddings[0, 6] = torch.tensor([5.0, 0, 0, 0])  # the one question token about the image
    ctx = dict(
        vtr_ctx={},
        original_index=torch.arange(seq),
        image_token_indices=torch.arange(2, 5),
        snapshots={-1: (embeddings, torch.arange(seq))},
    )
    scores = get_strategy("sparsevlm")().compute_scores(att, (2, 5), VTRConfig(), **ctx)
    assert ctx["vtr_ctx"]["sparsevlm_raters"].tolist() == [6]
    torch.testing.assert_close(scores, att[0, :, 6, 2:5].mean(0))


# ----------------------------------------------------------------------------------------- CLSE


def _centred_high_pass(field, cutoff):
    """CLSE's high-pass score restated with explicit DFT matrices and a centred (fftshift-ed) spectrum:
    D = distance of each shifted bin to (h//2, w//2), sigma = cutoff * min(h//2, w//2), magnitude of the
    inverse, mean over channels. float64."""
    h, w, _ = field.shape
    wy = torch.exp(-2j * math.pi * torch.outer(torch.arange(h), torch.arange(h)).double() / h)
    wx = torch.exp(-2j * math.pi * torch.outer(torch.arange(w), torch.arange(w)).double() / w)
    spectrum = torch.einsum("uy,yxc,vx->uvc", wy, field.to(torch.complex128), wx)
    shifted = torch.roll(spectrum, shifts=(h // 2, w // 2), dims=(0, 1))  # zero frequency at (h//2, w//2)
    d2 = (torch.arange(h)[:, None] - h // 2).double() ** 2 + (torch.arange(w)[None, :] - w // 2).double() ** 2
    sigma = cutoff * min(h // 2, w // 2)
    filtered = shifted * (1 - torch.exp(-d2 / (2 * sigma**2)))[..., None]
    back = torch.roll(filtered, shifts=(-(h // 2), -(w // 2)), dims=(0, 1))
    out = torch.einsum("uy,yxc,vx->uvc", wy.conj(), back, wx.conj()) / (h * w)
    return out.abs().mean(-1)


@pytest.mark.parametrize("h,w", [(4, 6), (5, 7), (24, 24)])
def test_clse_high_pass_score_matches_a_centred_explicit_dft(h, w):
    torch.manual_seed(3)
    grid = torch.tensor([(0, r, c) for r in range(h) for c in range(w)])
    hidden = torch.randn(h * w, 3)
    got = high_pass_score(hidden, grid, cutoff=0.1 if h == 24 else 0.6)
    expected = _centred_high_pass(hidden.reshape(h, w, 3).double(), 0.1 if h == 24 else 0.6).reshape(-1)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-4)
    flat = high_pass_score(torch.ones(h * w, 3), grid, cutoff=0.3)
    assert flat.abs().max() < 1e-5, "a uniform field has no high frequencies"
    off_grid = high_pass_score(torch.randn(3, 3), torch.tensor([[0, 0, 0], [0, 0, 1], [-1, -1, -1]]), 0.3)
    assert torch.isnan(off_grid[2]) and not torch.isnan(off_grid[:2]).any()


def test_clse_evolution_factor_follows_the_official_formula():
    now = torch.tensor([1.0, 2.0, 3.0, 9.0, float("nan")])
    ref = torch.tensor([1.5, 1.0, 3.5, 1.0, float("nan")])
    s, r = now[:4].double(), ref[:4].double()
    evo = ((s - r).abs() / (r.mean() + r + 1e-6)).clamp(max=1)  # 9 vs 1: clamped at 1
    assert evo[3] == 1
    z = (evo - evo.mean()) / (evo.std() + 1e-6)
    want = torch.cat([torch.sigmoid(z / 0.1).float(), torch.tensor([0.5])])
    torch.testing.assert_close(evolution_factor(now, ref, 0.1), want)


@pytest.mark.parametrize("layers,schedule", [(32, [1, 11, 21]), (28, [1, 10, 19]), (36, [1, 12, 24])])
def test_clse_default_schedules_and_presets(layers, schedule):
    from llava.vtr.strategy.clse import CLSE

    published = {192: [330, 210, 62], 128: [220, 140, 41], 64: [110, 70, 20]}
    for budget, preset in published.items():
        updates = CLSE.schedule_defaults(VTRConfig(strategy="clse", keep_tokens=budget), layers)
        assert updates == dict(prune_layer=schedule, keep_tokens=preset)
    # other budgets: int(b x [1.72, 1.09, 0.32]), the official factors
    assert CLSE.schedule_defaults(VTRConfig(strategy="clse", keep_tokens=200), layers)["keep_tokens"] == [344, 218, 64]
    assert CLSE.schedule_defaults(VTRConfig(strategy="clse", prune_layer=[2, 4], keep_tokens=64), layers) == {}
    assert get_strategy("clse").earlier_cache == "trim"
    assert (VTRConfig().clse_cutoff, VTRConfig().clse_temperature, VTRConfig().clse_reference_layer) == (0.1, 0.1, 0)


def test_clse_reference_is_the_input_of_the_reference_layer(tiny_path, single_inputs):
    """clse_reference_layer=r compares with the hidden states ENTERING layer r (0 = the input embeddings)."""
    got = {}
    original = get_strategy("clse").compute_scores

    def spy(self, attention, image_token_range, config, **ctx):
        got[config.clse_reference_layer] = ctx["snapshots"]
        return original(self, attention, image_token_range, config, **ctx)

    get_strategy("clse").compute_scores = spy
    try:
        for ref in (0, 1):
            model = load_model(
                tiny_path, VTRConfig(strategy="clse", prune_layer=3, keep_tokens=9, clse_reference_layer=ref)
            )
            with torch.no_grad():
                model(**single_inputs)
        with pytest.raises(ValueError, match="must come before the first prune layer"):
            load_model(tiny_path, VTRConfig(strategy="clse", prune_layer=2, keep_tokens=9, clse_reference_layer=2))(
                **single_inputs
            )
    finally:
        get_strategy("clse").compute_scores = original
    assert set(got[1]) == {-1, 0} and set(got[0]) == {-1}, "layer 1's input is layer 0's output"
    stock = load_model(tiny_path, VTRConfig(enabled=False))
    with torch.no_grad():
        states = stock(**single_inputs, output_hidden_states=True).hidden_states
    torch.testing.assert_close(got[1][0][0], states[1])  # hidden_states[1]: what enters layer 1


def test_clse_scores_are_factor_times_attention_at_the_first_stage_only(tiny_path, single_inputs):
    captured = {}
    original = get_strategy("clse").compute_scores

    def spy(self, attention, image_token_range, config, **ctx):
        out = original(self, attention, image_token_range, config, **ctx)
        captured.setdefault("runs", []).append((out, self._aggregate_attention(attention, image_token_range, config)))
        return out

    get_strategy("clse").compute_scores = spy
    try:
        model = load_model(tiny_path, VTRConfig(strategy="clse", prune_layer=[1, 3], keep_tokens=[20, 6]))
        with torch.no_grad():
            model(**single_inputs)
    finally:
        get_strategy("clse").compute_scores = original
    (first, attn1), (second, attn2) = captured["runs"]
    factor = first / attn1
    assert ((factor >= 0) & (factor <= 1)).all() and factor.std() > 0.01  # a real, varying sigmoid factor
    torch.testing.assert_close(second, attn2)
    assert not itertools.starmap(torch.equal, [(first, attn1)]).__next__()


# ----------------------------------------------------------------------------------------- token merging


@pytest.fixture
def mean_merger():
    """A test method that recycles every dropped token into one merged token: their mean, at the first
    dropped token's position. Simple enough for the oracle below to recompute on its own."""
    from llava.vtr import PruningStrategy, register_strategy

    @register_strategy("test_mean_merge")
    class MeanMerge(PruningStrategy):
        supports_token_merge = True

        def compute_scores(self, attention, image_token_range, config, **ctx):
            return self._aggregate_attention(attention, image_token_range, config)

        def merge_tokens(self, dropped_hidden, dropped_scores, config, **ctx):
            return dropped_hidden.float().mean(0, keepdim=True).to(dropped_hidden.dtype), torch.tensor([0])

    return "test_mean_merge"


@torch.no_grad()
def oracle_with_merged_token(stock, inputs, k, kept, steps, trim=True):
    """No pruning machinery: the full prompt plus one extra row M placed right after the last kept image
    token, at the first dropped token's RoPE position. Layers < k: nobody sees M. At layer k, M's state
    becomes the mean of the dropped tokens' states, and from layer k on the dropped tokens are hidden from
    everyone while M is seen like any token. Decode rows never see a dropped token, and see M from layer k
    on only. Greedy decode by recomputing everything; returns (tokens, step logits)."""
    model, lm = stock.model, stock.model.language_model
    ids = inputs["input_ids"][0]
    image = (ids == stock.config.image_token_id).nonzero().reshape(-1)
    dropped = image[~torch.isin(image, kept)]
    slot = int(kept.max()) + 1  # M's row in the extended sequence
    embeds = model.get_input_embeddings()(ids)[None]
    feats = model.get_image_features(
        pixel_values=inputs["pixel_values"], vision_feature_layer=-2, vision_feature_select_strategy="default"
    ).pooler_output
    embeds = embeds.masked_scatter((ids == stock.config.image_token_id)[None, :, None], torch.cat(feats))
    prompt_len = ids.numel()
    generated, step_logits = [], []
    for _ in range(steps + 1):
        seq = embeds.shape[1] + 1
        order = torch.cat([torch.arange(slot), torch.tensor([-1]), torch.arange(slot, seq - 1)])  # -1 = M
        positions = torch.where(order >= 0, order, dropped[0])[None]
        h = torch.cat([embeds[:, :slot], torch.zeros_like(embeds[:, :1]), embeds[:, slot:]], 1)
        cos, sin = lm.rotary_emb(h, positions)
        is_m = order == -1
        is_dropped = torch.isin(order, dropped)
        is_decode = order >= prompt_len
        causal = torch.ones(seq, seq, dtype=torch.bool).tril()
        for i, layer in enumerate(lm.layers):
            if i == k:
                h[0, is_m] = h[0, is_dropped].mean(0, keepdim=True)
            hidden_cols = (is_m if i < k else is_dropped)[None, :]
            if trim:  # the layers before k hold no dropped token for decode rows either
                hidden_cols = hidden_cols | (is_decode[:, None] & is_dropped[None, :])
            allowed = causal & ~hidden_cols
            mask = torch.zeros(1, 1, seq, seq).masked_fill(~allowed[None, None], torch.finfo(torch.float32).min)
            h = layer(h, attention_mask=mask, position_embeddings=(cos, sin))
        logits = stock.lm_head(lm.norm(h))[0]
        step_logits.append(logits[-1])
        nxt = logits[-1].argmax()
        generated.append(nxt)
        embeds = torch.cat([embeds, model.get_input_embeddings()(nxt)[None, None]], 1)
    return logits, order, torch.stack(generated[:steps]), torch.stack(step_logits[:steps])


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("cache", ["trim", "keep"])
def test_merged_tokens_are_never_attended_before_they_exist(
    tiny_path, stock_models, single_inputs, mean_merger, impl, cache
):
    model = load_model(
        tiny_path,
        VTRConfig(strategy=mean_merger, prune_layer=2, keep_tokens=6, token_merge=True, earlier_cache=cache),
        attn_implementation=impl,
    )
    with torch.no_grad():
        logits = model(**single_inputs).logits[0]
    stage = model.vtr_last.stages[0]
    assert stage.image_tokens_kept == [6] and stage.merged == [1]
    steps = 4
    expected, order, tokens, step_logits = oracle_with_merged_token(
        stock_models["eager"], single_inputs, 2, stage.kept_positions[0], steps, trim=cache == "trim"
    )
    # the model's rows are the oracle's prompt rows minus the dropped ones (M right after the last kept token)
    ids = single_inputs["input_ids"][0]
    image = (ids == model.config.image_token_id).nonzero().reshape(-1)
    dropped = image[~torch.isin(image, stage.kept_positions[0])]
    keep = (order < ids.numel()) & ~torch.isin(order, dropped)
    torch.testing.assert_close(logits, expected[keep], atol=1e-5, rtol=0)
    out = model.generate(**single_inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                         return_dict_in_generate=True, output_logits=True)  # fmt: skip
    assert torch.equal(out.sequences[0, single_inputs["input_ids"].shape[1] :], tokens)
    torch.testing.assert_close(torch.stack(out.logits, 1)[0], step_logits, atol=1e-5, rtol=0)


def test_without_the_decode_mask_a_merged_token_would_draw_attention(tiny_path, single_inputs, mean_merger):
    """The bug of filling the missing keys/values: if the layers before K could see M, decode would differ."""
    cfg = VTRConfig(strategy=mean_merger, prune_layer=2, keep_tokens=6, token_merge=True, earlier_cache="trim")
    model = load_model(tiny_path, cfg)
    with torch.no_grad():
        out = model(**single_inputs)
        cache = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
        right = model(input_ids=nxt, past_key_values=cache).logits
        cache.crop(-1)
        decode_state(cache).prefix_born = None  # forget that M did not exist before layer 2
        wrong = model(input_ids=nxt, past_key_values=cache).logits
    assert (right - wrong).abs().max() > 1e-4


def test_sparsevlm_recycles_the_best_dropped_tokens_into_density_peak_clusters():
    from llava.vtr.strategy.sparsevlm import density_peak_clusters

    torch.manual_seed(4)
    blobs = [torch.randn(6, 3) * 0.3 + torch.tensor(c) for c in ([0.0, 0, 0], [5.0, 0, 0], [0.0, 5, 0])]
    x = torch.cat(blobs)
    centres, assignment = density_peak_clusters(x, 3)
    groups = [set((assignment == c).nonzero().reshape(-1).tolist()) for c in range(3)]
    assert sorted(map(sorted, groups)) == [list(range(0, 6)), list(range(6, 12)), list(range(12, 18))]
    scores = torch.tensor([0.0] * 6 + [1.0] * 6 + [2.0] * 6)  # blobs 1 and 2 are the best-scored 2/3
    cfg = VTRConfig(strategy="sparsevlm", token_merge=True, merge_ratio=0.62, merge_clusters=2)  # int(.62*18)+1 = 12
    merged, representative = get_strategy("sparsevlm")().merge_tokens(x, scores, cfg)
    assert merged.shape == (2, 3) and set(representative.tolist()) <= set(range(6, 18))
    centres, assignment = density_peak_clusters(x[6:], 2)  # the 12 best-scored, in score order (ties: first)
    assert representative.tolist() == (centres + 6).tolist()
    means = torch.stack([x[6:][assignment == c].mean(0) for c in range(2)])
    torch.testing.assert_close(merged, means, atol=1e-6, rtol=0)  # each cluster's plain mean


def test_token_merge_is_refused_for_methods_that_do_not_recycle():
    from llava.vtr import VTRConfigError

    with pytest.raises(VTRConfigError, match="does not recycle dropped tokens"):
        VTRConfig(strategy="fastv", token_merge=True)


@pytest.mark.parametrize("backbone", ["llava-1.5", "llava-1.6"])
def test_sparsevlm_recycling_runs_on_padded_batches_and_multi_stage(
    backbone, tiny_path, batch_inputs, next_path, two_shapes
):
    path, inputs = (tiny_path, batch_inputs) if backbone == "llava-1.5" else (next_path, two_shapes)
    cfg = VTRConfig(strategy="sparsevlm", prune_layer=[1, 3], keep_tokens=[12, 4], token_merge=True, merge_ratio=0.5)
    model = load_model(path, cfg)
    out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    first, second = model.vtr_last.stages
    assert first.image_tokens_kept == [12, 12] and all(m > 0 for m in first.merged)
    assert second.image_tokens_before == [12 + m for m in first.merged], "merged tokens are candidates again"
    assert all(set(s.tolist()) <= set(f.tolist()) for s, f in zip(second.kept_positions, first.kept_positions))
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


@pytest.mark.parametrize(
    "backbone,method", [("llava-1.5", "vispruner"), ("llava-1.6", "clse"), ("llava-1.6", "vispruner")]
)
def test_methods_reading_image_facts_work_with_beam_search(
    backbone, method, tiny_path, batch_inputs, next_path, two_shapes
):
    """generate() repeats each sample per beam; every copy reads its own sample's image facts, so at every
    stage it keeps what that sample keeps in a plain forward (two different images: a copy reading the other
    sample's facts, or a row of the repeated batch, would keep other tokens)."""
    path, inputs = (tiny_path, batch_inputs) if backbone == "llava-1.5" else (next_path, two_shapes)
    first = 0 if method == "vispruner" else 1
    model = load_model(path, VTRConfig(strategy=method, prune_layer=[first, 3], keep_tokens=[12, 4]))
    with torch.no_grad():
        model(**inputs)
    single = [[p.tolist() for p in stage.kept_positions] for stage in model.vtr_last.stages]
    assert all(stage[0] != stage[1] for stage in single), "the two samples keep different tokens"
    out = model.generate(**inputs, max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    beams = [[p.tolist() for p in stage.kept_positions] for stage in model.vtr_last.stages]
    assert out.shape[0] == 4 and beams == [[s[0], s[0], s[1], s[1]] for s in single]


def test_recycling_under_a_kernel_without_4d_masks_is_refused(tiny_path, single_inputs):
    cfg = VTRConfig(strategy="sparsevlm", prune_layer=2, keep_tokens=6, token_merge=True, earlier_cache="trim")
    model = load_model(tiny_path, cfg)
    model.model.language_model.config._attn_implementation = "flash_attention_2"  # as if loaded so
    with pytest.raises(ValueError, match="token_merge needs per-layer decode masks"):
        with torch.no_grad():
            model(**single_inputs)


# ----------------------------------------------------------------------------------------- SparseVLM, official


def _dpc_reference(x, clusters):
    """SparseVLM's DPC-kNN restated in float64: distances / sqrt(width), k = clusters nearest (self included),
    density exp(-mean d^2), delta to a denser row (else the largest distance), centres = top delta x density."""
    x = x.double()
    n, width = x.shape
    d = torch.cdist(x, x) / math.sqrt(width)
    density = torch.exp(-(d.sort(dim=1).values[:, :clusters] ** 2).mean(1))
    delta = torch.stack(
        [d[i][density > density[i]].min() if (density > density[i]).any() else d.max() for i in range(n)]
    )
    centres = sorted(range(n), key=lambda i: -(delta[i] * density[i]).item())[:clusters]
    return centres, density


def test_sparsevlm_density_does_not_underflow_at_width_4096():
    """Raw distances of 4096-wide states make exp(-mean d^2) exactly 0 for every token (arbitrary centres);
    SparseVLM divides distances by sqrt(width)."""
    from llava.vtr.strategy.sparsevlm import density_peak_clusters

    torch.manual_seed(5)
    x = torch.randn(40, 4096)
    raw = torch.cdist(x, x)
    assert torch.exp(-(raw.sort(dim=1).values[:, :5] ** 2).mean(1)).max() == 0, "the failure this guards against"
    centres, assignment = density_peak_clusters(x, 5)
    want, density = _dpc_reference(x, 5)
    assert (density > 0).all() and centres.tolist() == want
    assert assignment[centres].tolist() == list(range(5))


def test_sparsevlm_recycles_int_0_3_n_plus_1_into_int_m_over_10_plus_1_clusters():
    torch.manual_seed(6)
    dropped, scores = torch.randn(50, 8), torch.rand(50)
    merged, representative = get_strategy("sparsevlm")().merge_tokens(dropped, scores, VTRConfig(strategy="sparsevlm"))
    recycled = int(0.3 * 50) + 1  # 16 tokens, the best-scored
    assert merged.shape == (int(recycled / 10) + 1, 8)  # 2 clusters
    best = scores.argsort(descending=True)[:recycled]
    assert set(representative.tolist()) <= set(best.tolist())
    want, _ = _dpc_reference(dropped[best], 2)
    assert representative.tolist() == best[want].tolist()


def test_sparsevlm_official_schedule_and_budgets():
    from llava.vtr.strategy.sparsevlm import SparseVLM

    published = {192: [300, 200, 110], 128: [303, 110, 36], 96: [238, 48, 26], 64: [66, 30, 17]}
    for budget, counts in published.items():
        assert SparseVLM.schedule_defaults(VTRConfig(strategy="sparsevlm", keep_tokens=budget), 32) == dict(
            prune_layer=[3, 7, 16], keep_tokens=counts
        )
    cfg = VTRConfig(strategy="sparsevlm")
    assert cfg.conventions() == ("previous", "compact", "keep", True), "recycling on, as the official default"
    assert VTRConfig(strategy="sparsevlm", convention="common").conventions() == ("previous", "original", "keep", False)


def test_sparsevlm_merged_tokens_can_be_dropped_at_a_later_stage(tiny_path, single_inputs):
    model = load_model(tiny_path, VTRConfig(strategy="sparsevlm", prune_layer=[1, 3], keep_tokens=[30, 2]))
    with torch.no_grad():
        model(**single_inputs)
    first, second = model.vtr_last.stages
    merged = first.merged[0]
    assert merged == int((int(0.3 * 34) + 1) / 10) + 1  # 34 dropped -> 11 recycled -> 2 clusters
    assert second.image_tokens_before == [30 + merged] and second.image_tokens_kept == [2]
    assert second.seq_len_after == first.seq_len_after - (30 + merged - 2) + second.merged[0]


def test_pdrop_at_k_ranks_like_fastv_at_k_plus_1(tiny_path, single_inputs):
    """PyramidDrop scores with the attention layer K is about to compute; FastV at K+1 reads that same layer."""
    kept = {}
    for method, k in (("pdrop", 2), ("fastv", 3)):
        model = load_model(tiny_path, VTRConfig(strategy=method, prune_layer=k, keep_tokens=9))
        with torch.no_grad():
            model(**single_inputs)
        kept[method] = model.vtr_last.stages[0].kept_positions[0].tolist()
    assert kept["pdrop"] == kept["fastv"]
    common = load_model(tiny_path, VTRConfig(strategy="pdrop", prune_layer=2, keep_tokens=9, convention="common"))
    with torch.no_grad():
        common(**single_inputs)
    assert common.vtr_last.stages[0].kept_positions[0].tolist() != kept["pdrop"], "layer 1's attention differs"
