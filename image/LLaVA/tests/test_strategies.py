"""Strategy math on hand-built attention tensors, and Top-K selection rules."""

import pytest
import torch

from llava.vtr import VTRConfig, available_strategies, get_strategy
from llava.vtr.strategy.priortr import v_information


def attention_with(rows: dict, seq=8, heads=2):
    """A [1, heads, seq, seq] tensor whose given rows are set (same for every head unless a list per head)."""
    att = torch.zeros(1, heads, seq, seq)
    for r, values in rows.items():
        att[0, :, r, : len(values)] = torch.tensor(values, dtype=torch.float32)
    return att


def test_builtin_strategies_are_registered():
    assert {"fastv", "priortr", "random"} <= set(available_strategies())


def test_fastv_scores_are_the_attention_the_last_row_pays_to_the_image():
    # image = positions 2..5, last row = 7
    att = attention_with({7: [0.1, 0.1, 0.05, 0.4, 0.1, 0.2, 0.0, 0.05]})
    scores = get_strategy("fastv")().compute_scores(att, (2, 6), VTRConfig())
    torch.testing.assert_close(scores, torch.tensor([0.05, 0.4, 0.1, 0.2]))


def test_question_aggregation_averages_rows_after_the_image_and_max_takes_the_top_head():
    att = attention_with({6: [0, 0, 0.2, 0.0, 0.4, 0.0], 7: [0, 0, 0.0, 0.6, 0.2, 0.0]})
    att[0, 1] *= 2  # head 1 twice as strong
    cfg = VTRConfig(query_aggregation="question", head_aggregation="max")
    scores = get_strategy("fastv")().compute_scores(att, (2, 6), cfg)
    torch.testing.assert_close(scores, torch.tensor([0.2, 0.6, 0.6, 0.0]))
    mean_last = get_strategy("fastv")().compute_scores(att, (2, 6), VTRConfig(head_aggregation="mean"))
    torch.testing.assert_close(mean_last, torch.tensor([0.0, 0.9, 0.3, 0.0]))


def test_priortr_ranks_a_token_high_when_p_greatly_exceeds_q_even_if_p_is_not_the_largest():
    # image 1..4; anchor row 5 (prior), last row 7 (task). Token 1 has the largest P but a larger prior Q.
    p = [0.0, 0.50, 0.30, 0.10, 0.10]
    q = [0.0, 0.70, 0.05, 0.15, 0.10]
    att = attention_with({5: q, 7: p})
    scores = get_strategy("priortr")().compute_scores(att, (1, 5), VTRConfig(strategy="priortr"))
    assert scores.dtype == torch.float32
    assert scores.argmax().item() == 1  # token 2 (P=.3, Q=.05) beats token 1 (P=.5, Q=.7)
    pn = torch.tensor(p[1:]) / sum(p[1:])
    qn = torch.tensor(q[1:]) / sum(q[1:])
    torch.testing.assert_close(scores, pn * (torch.log(pn + 1e-6) - torch.log(qn + 1e-6)))
    fastv = get_strategy("fastv")().compute_scores(att, (1, 5), VTRConfig())
    assert fastv.argmax().item() == 0


def test_v_information_is_finite_in_float32_for_half_inputs_and_zero_rows():
    p = torch.tensor([0.0, 1e-4, 0.9999], dtype=torch.float16)
    q = torch.tensor([0.0, 0.0, 0.0], dtype=torch.float16)
    s = v_information(p, q, 1e-6)
    assert s.dtype == torch.float32 and torch.isfinite(s).all()
    assert torch.isfinite(v_information(torch.tensor([float("nan"), 1.0]), torch.tensor([1.0, 1.0]), 1e-6)).all()


def test_random_is_seeded_and_needs_no_attention():
    cls = get_strategy("random")
    assert cls.needs_attention is False
    a = cls().compute_scores(None, (3, 13), VTRConfig(strategy="random", seed=1), layer_idx=2)
    b = cls().compute_scores(None, (3, 13), VTRConfig(strategy="random", seed=1), layer_idx=2)
    c = cls().compute_scores(None, (3, 13), VTRConfig(strategy="random", seed=2), layer_idx=2)
    assert a.shape == (10,) and torch.equal(a, b) and not torch.equal(a, c)


def select(scores, **cfg):
    return get_strategy("fastv")().select_tokens(torch.tensor(scores), len(scores), VTRConfig(**cfg)).tolist()


def test_select_keeps_original_order_and_breaks_ties_by_position():
    assert select([0.1, 0.9, 0.5, 0.9, 0.2], keep_tokens=3) == [1, 2, 3]
    assert select([0.5, 0.5, 0.5, 0.5], keep_tokens=2) == [0, 1]


def test_select_budget_priority_and_rounding():
    scores = [0.1, 0.9, 0.5, 0.7, 0.2, 0.3]
    assert select(scores, keep_tokens=2, keep_ratio=0.9) == [1, 3]  # keep_tokens wins
    assert select(scores, score_threshold=0.5, keep_ratio=0.1) == [1, 3]  # threshold beats ratio; strictly above
    assert select(scores, keep_ratio=0.5) == [1, 2, 3]
    assert select(scores, keep_ratio=0.25) == [1, 3]  # 1.5 rounds half up to 2
    assert select(scores, keep_tokens=0) == []
    assert select(scores, keep_tokens=100) == [0, 1, 2, 3, 4, 5]
    assert select(scores, keep_ratio=1.0) == [0, 1, 2, 3, 4, 5]


def test_threshold_keeps_strictly_above_and_at_least_the_best_token():
    """The reference implementation's rule: `score > threshold`, and the top token when none passes."""
    assert select([0.2, 0.5, 0.5], score_threshold=0.5) == [1]  # none strictly above: the first best
    assert select([0.2, 0.7, 0.5], score_threshold=0.5) == [1]
    assert select([0.6, 0.7, 0.5], score_threshold=0.5) == [0, 1]
    assert select([float("nan"), 0.1], score_threshold=0.9) == [1]


def test_keep_ratio_rounds_half_up_unlike_the_reference_floor():
    # 0.2222 x 576 = 127.99: we keep 128, the reference (floor) keeps 127
    scores = torch.arange(576, dtype=torch.float32)
    kept = get_strategy("fastv")().select_tokens(scores, 576, VTRConfig(keep_ratio=0.2222))
    assert kept.numel() == 128 == round(0.2222 * 576)


def test_question_rows_are_averaged_per_head_before_the_max_over_heads():
    """Order matters for head_aggregation=max: the reference averages each head's rows, then takes the max."""
    att = torch.zeros(1, 2, 8, 8)
    # token at position 2: head 0 sees it from row 6 only (0.8), head 1 from both rows (0.5, 0.5)
    att[0, 0, 6, 2], att[0, 0, 7, 2] = 0.8, 0.0
    att[0, 1, 6, 2], att[0, 1, 7, 2] = 0.5, 0.5
    cfg = VTRConfig(query_aggregation="question", head_aggregation="max")
    scores = get_strategy("fastv")().compute_scores(att, (2, 6), cfg)
    # per head row-mean: head0 0.4, head1 0.5 -> max 0.5 (max per row first would give mean(0.8, 0.5) = 0.65)
    torch.testing.assert_close(scores[0], torch.tensor(0.5))


def test_select_ranks_nan_last():
    assert select([float("nan"), 0.2, 0.1], keep_tokens=2) == [1, 2]
    # below every number, -inf and the lowest float included
    assert select([float("nan"), float("-inf")], keep_tokens=1) == [1]
    assert select([float("nan"), float("-inf"), torch.finfo(torch.float32).min, 0.0], keep_tokens=2) == [2, 3]
    assert select([float("nan"), float("-inf"), float("nan")], keep_tokens=2) == [0, 1]


def test_per_stage_budgets_are_used_in_turn():
    cfg = VTRConfig(prune_layer=[2, 5], keep_tokens=[3, 1])
    strat = get_strategy("fastv")()
    scores = torch.tensor([0.4, 0.1, 0.3, 0.2])
    assert strat.select_tokens(scores, 4, cfg, stage=0).tolist() == [0, 2, 3]
    assert strat.select_tokens(scores, 4, cfg, stage=1).tolist() == [0]
    with pytest.raises(ValueError, match="3 scores for 4 tokens"):
        strat.select_tokens(scores[:3], 4, cfg)
