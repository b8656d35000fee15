"""The analytic cost model against hand-computed numbers."""

import pytest

from llava.vtr.cost import equivalent_tokens, ideal_speedup, layer_cost, prefill_cost, tokens_per_layer


def test_layer_cost_terms_without_and_with_gqa():
    n, d, m = 10, 4, 6
    # 4·n·d² + 2·n²·d + 3·n·d·m = 640 + 800 + 720
    assert layer_cost(n, d, m) == 2160
    # GQA with d_kv = 2: k/v projections shrink from 2·n·d·d to 2·n·d·2
    assert layer_cost(n, d, m, d_kv=2) == 2160 - 2 * n * d * (d - 2)


def test_schedule_lengths_equivalent_tokens_and_ideal_speedup():
    lengths = tokens_per_layer(100, 6, [(2, 60), (4, 20)])
    assert lengths == [100, 100, 40, 40, 20, 20]
    assert equivalent_tokens(lengths) == pytest.approx(320 / 6)
    d, m = 8, 16
    full = 6 * layer_cost(100, d, m)
    pruned = 2 * layer_cost(100, d, m) + 2 * layer_cost(40, d, m) + 2 * layer_cost(20, d, m)
    assert prefill_cost(lengths, d, m) == pruned
    assert ideal_speedup(100, lengths, d, m) == pytest.approx(full / pruned)
