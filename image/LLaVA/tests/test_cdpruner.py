"""CDPruner: the conditional-DPP greedy MAP against the official math restated here, edge cases, and the tiny LLaVA."""

import pytest
import torch

from llava.vtr import VTRConfig, get_strategy, load_model
from llava.vtr.strategy.cdpruner import greedy_map
from llava_testlib import llava_embed


def official_order(visual, text, picks, uniform=False):
    """Theia-4869/CDPruner `encode_images` restated for one crop (B = 1) and one pooled text row (M = 1), with the
    relevance left un-negated (`uniform`: every relevance 1 instead): the pick order of its fast greedy MAP."""
    features = visual[None]  # (B, N, D), in the features' dtype
    normalized = (features / features.norm(dim=-1, keepdim=True)).float()
    similarity = torch.matmul(normalized, normalized.transpose(1, 2))  # (B, N, N)
    image_embeds = features.float() / features.float().norm(dim=-1, keepdim=True)
    text_embeds = text.float().mean(0, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)  # (M, D)
    relevance = torch.matmul(image_embeds, text_embeds.t()).mean(dim=-1)  # (B, N)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    if uniform:
        relevance = torch.ones_like(relevance)
    kernel = relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)
    b, n = relevance.shape
    cis = torch.zeros(picks, b, n)
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    select = []
    for i in range(picks):
        j = torch.argmax(di2s, dim=-1)
        select.append(int(j))
        eis = (kernel[torch.arange(b), j] - torch.einsum("tb,tbn->bn", cis[:i, torch.arange(b), j], cis[:i])) / (
            torch.sqrt(di2s[torch.arange(b), j]).unsqueeze(-1)
        )
        cis[i] = eis
        di2s -= torch.square(eis)
        di2s[torch.arange(b), j] = -float("inf")
    return select, kernel[0].double(), relevance[0]


def naive_greedy_order(kernel, picks):
    """Greedy MAP the slow way: each pick maximises log det of the kernel restricted to the picks (float64)."""
    chosen = []
    for _ in range(picks):
        best, value = None, -float("inf")
        for k in range(kernel.shape[0]):
            if k in chosen:
                continue
            sign, logdet = torch.linalg.slogdet(kernel[chosen + [k]][:, chosen + [k]])
            if sign > 0 and logdet > value:
                best, value = k, float(logdet)
        chosen.append(best)
    return chosen


def strategy_scores(hidden, start, end, rows, budget=None, **cfg):
    cfg = cfg or dict(keep_tokens=budget)
    valid = torch.ones(hidden.shape[0], dtype=torch.bool)
    ctx = dict(stage=0, hidden_states=hidden[None], image_token_indices=rows, valid=valid, vtr_ctx={})
    return get_strategy("cdpruner")().compute_scores(None, (start, end), VTRConfig(strategy="cdpruner", **cfg), **ctx)


def pick_order(scores):
    """The strategy's pick order, which its scores encode (earlier = higher; unpicked tokens -inf)."""
    finite = torch.isfinite(scores).nonzero().reshape(-1)
    return finite[torch.sort(scores[finite], descending=True).indices].tolist()


@pytest.mark.parametrize("budget", [1, 7, 16])
def test_cdpruner_keeps_the_official_greedy_map(budget):
    torch.manual_seed(budget)
    prefix, visual, question = torch.randn(3, 16), torch.randn(40, 16), torch.randn(5, 16)
    hidden = torch.cat([prefix, visual, question])
    scores = strategy_scores(hidden, 3, 43, torch.arange(3, 43), budget)
    official, kernel, relevance = official_order(visual, question, budget)
    assert pick_order(scores) == official
    assert official == naive_greedy_order(kernel, budget), "the fast greedy is the greedy log-det MAP"
    assert official[0] == int(relevance.argmax()), "the first pick is the most relevant token (S_ii = 1)"


def test_cdpruner_reads_the_question_after_the_visuals_else_the_text_before():
    torch.manual_seed(5)
    prefix, visual, question = torch.randn(4, 8), torch.randn(20, 8), torch.randn(3, 8)
    with_question = strategy_scores(torch.cat([prefix, visual, question]), 4, 24, torch.arange(4, 24), 6)
    assert pick_order(with_question) == official_order(visual, question, 6)[0]
    alone = strategy_scores(torch.cat([prefix, visual]), 4, 24, torch.arange(4, 24), 6)
    assert pick_order(alone) == official_order(visual, prefix, 6)[0]
    assert pick_order(alone) != pick_order(with_question)


def test_cdpruner_spans_several_images_with_text_between():
    """Text inside the visual span (between images) is neither a candidate nor the question."""
    torch.manual_seed(6)
    hidden = torch.randn(30, 8)
    rows = torch.cat([torch.arange(2, 12), torch.arange(15, 25)])  # two images, text at 12..14
    scores = strategy_scores(hidden, 2, 25, rows, 9)
    assert torch.isinf(scores[10:13]).all()
    assert pick_order(scores) == (rows[official_order(hidden[rows], hidden[25:], 9)[0]] - 2).tolist()


def test_cdpruner_ties_go_to_the_first_index_and_uniform_relevance_is_pure_diversity():
    """Orthonormal tokens equally relevant to the question: every gain ties, so picks go in index order. A question
    orthogonal to every token (all relevances equal; the official min-max divides by 0) leaves the kernel S."""
    visual = torch.eye(6) * torch.tensor([1.0, 3.0, 2.0, 5.0, 4.0, 6.0])[:, None]
    question = torch.ones(1, 6)
    assert pick_order(strategy_scores(torch.cat([visual, question]), 0, 6, torch.arange(6), 4)) == [0, 1, 2, 3]
    torch.manual_seed(9)
    visual = torch.cat([torch.randn(12, 6), torch.zeros(12, 2)], 1)
    question = torch.tensor([[0.0] * 7 + [1.0]])
    got = pick_order(strategy_scores(torch.cat([visual, question]), 0, 12, torch.arange(12), 5))
    assert got == official_order(visual, question, 5, uniform=True)[0]


def test_cdpruner_fills_by_relevance_when_the_gain_runs_out():
    """Tokens 2 and 4 repeat 0's direction and 3 repeats 1's: after two picks every gain is exactly 0. The
    official code would divide by sqrt(0) and re-pick; here the rest follow relevance (powers of two: exact)."""
    r = torch.tensor([1.0, 2.0, 0.125, 0.25, 0.5])
    direction = torch.tensor([0, 1, 0, 1, 0])
    similarity = (direction[:, None] == direction[None, :]).float()
    kernel = r[:, None] * similarity * r[None, :]
    assert greedy_map(kernel, 5, r).tolist() == [1, 0, 4, 3, 2]
    assert greedy_map(kernel, 3, r).tolist() == [1, 0, 4]
    nan = torch.diag(torch.tensor([1.0, float("nan"), 0.5]))
    assert greedy_map(nan, 3, torch.tensor([0.1, 0.3, 0.2])).tolist() == [1, 2, 0]


def test_cdpruner_budgets():
    torch.manual_seed(7)
    hidden = torch.randn(14, 8)
    rows = torch.arange(1, 11)
    assert torch.isfinite(strategy_scores(hidden, 1, 11, rows, keep_ratio=0.25)).sum() == 3  # 2.5 rounds up
    assert torch.isfinite(strategy_scores(hidden, 1, 11, rows, keep_ratio=0.2)).sum() == 2
    assert torch.isfinite(strategy_scores(hidden, 1, 11, rows, 50)).all()  # a budget over the image keeps it all
    assert torch.isinf(strategy_scores(hidden, 1, 11, rows, 0)).all()
    with pytest.raises(ValueError, match="^cdpruner keeps a fixed number of tokens.*score_threshold$"):
        strategy_scores(hidden, 1, 11, rows, score_threshold=0.1)


def test_cdpruner_normalises_in_the_features_dtype():
    """The official similarity normalises in the model's dtype (fp16 there) before the float32 product."""
    torch.manual_seed(8)
    visual, question = torch.randn(30, 64).half(), torch.randn(4, 64).half()
    _, kernel, relevance = official_order(visual, question, 1)
    from llava.vtr.strategy.cdpruner import conditional_kernel

    got, got_relevance = conditional_kernel(visual, question)
    torch.testing.assert_close(got_relevance, relevance, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.double(), kernel, atol=1e-6, rtol=0)
    unit = torch.nn.functional.normalize(visual.float(), dim=-1)  # normalised in float32 instead
    assert (unit @ unit.T - (got / relevance[:, None] / relevance[None, :])).abs().max() > 1e-5


# ----------------------------------------------------------------------------------------- the tiny LLaVA


def reference_positions(stock, inputs, b, budget):
    """Prompt positions CDPruner keeps for sample b, from the stock model's merged input embeddings."""
    embeds = llava_embed(stock, inputs)[b]
    valid = inputs["attention_mask"][b].bool()
    visual = (inputs["input_ids"][b] == stock.config.image_token_id) & valid
    rows = visual.nonzero().reshape(-1)
    last = int(valid.nonzero().max())
    question = embeds[rows[-1] + 1 : last + 1]
    picks = official_order(embeds[rows], question, min(budget, rows.numel()))[0]
    return sorted(rows[picks].tolist())


def test_cdpruner_defaults_to_prune_layer_0_and_refuses_a_threshold(tiny_path):
    cfg = load_model(tiny_path, VTRConfig(strategy="cdpruner", keep_tokens=16)).vtr_config
    assert cfg.prune_layers == [0] and cfg.conventions().positions == "compact"
    assert cfg.keep_tokens == 16
    assert load_model(tiny_path, VTRConfig(strategy="cdpruner", prune_layer=2)).vtr_config.prune_layers == [2]
    with pytest.raises(ValueError, match="give keep_tokens or keep_ratio"):
        load_model(tiny_path, VTRConfig(strategy="cdpruner", score_threshold=0.5))


@pytest.mark.parametrize("backbone", ["llava-1.5", "llava-1.6"])
def test_cdpruner_keeps_on_the_model_what_the_official_math_picks(
    backbone, tiny_path, stock_models, single_inputs, batch_inputs, next_path, next_stock, square, two_shapes
):
    path, stock, single, batch = (
        (tiny_path, stock_models["eager"], single_inputs, batch_inputs)
        if backbone == "llava-1.5"
        else (next_path, next_stock["eager"], square, two_shapes)
    )
    budget = 13
    model = load_model(path, VTRConfig(strategy="cdpruner", keep_tokens=budget))
    with torch.no_grad():
        model(**single)
    (stage,) = model.vtr_last.stages
    assert stage.layer == 0 and stage.image_tokens_kept == [budget]
    assert stage.kept_positions[0].tolist() == reference_positions(stock, single, 0, budget)
    with torch.no_grad():
        model(**batch)
    together = [p.tolist() for p in model.vtr_last.stages[0].kept_positions]
    for b in range(2):
        assert together[b] == reference_positions(stock, batch, b, budget)
        pad = int((~batch["attention_mask"][b].bool()).sum())  # left padding shifts the positions
        alone = {k: v[b : b + 1] for k, v in batch.items()}
        alone = {k: (v[:, pad:] if k in ("input_ids", "attention_mask") else v) for k, v in alone.items()}
        with torch.no_grad():
            model(**alone)
        assert [p - pad for p in together[b]] == model.vtr_last.stages[0].kept_positions[0].tolist()
