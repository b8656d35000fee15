"""The analytic cost model against hand-computed numbers: Llama-style layers, a hybrid decoder (Gated DeltaNet and\ngated full attention), mixtures of experts."""

import pytest
from transformers import LlamaConfig, Qwen3_5MoeTextConfig, Qwen3_5TextConfig, Qwen3VLMoeTextConfig

from llava.vtr.cost import (
    equivalent_tokens,
    ideal_speedup,
    ideal_speedup_of,
    layer_cost,
    layer_costs,
    prefill_cost,
    prefill_cost_of,
    text_config_dims,
    tokens_per_layer,
)


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


def test_layer_costs_of_a_llama_config_are_the_layer_cost():
    config = LlamaConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1)
    config.num_hidden_layers = 3
    costs = layer_costs(config)
    assert [c(10) for c in costs] == [layer_cost(10, 8, 16, d_kv=4)] * 3
    lengths = tokens_per_layer(100, 3, [(1, 60)])
    assert ideal_speedup_of(costs, 100, lengths) == pytest.approx(ideal_speedup(100, lengths, 8, 16, 4))
    assert text_config_dims(config) == (8, 16, 4)


HYBRID = dict(
    hidden_size=8,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=4,
    layer_types=["linear_attention", "full_attention"],
    num_hidden_layers=2,
    linear_num_key_heads=1,
    linear_key_head_dim=2,
    linear_num_value_heads=2,
    linear_value_head_dim=3,
    linear_conv_kernel_dim=4,
)


def test_a_hybrid_decoder_costs_linear_attention_layers_linearly_and_its_gated_query_twice():
    """Qwen3.5: d = 8; full attention q = 2 x 4, d_kv = 4, q_proj twice as wide (the gate); Gated DeltaNet with one
    key head of 2, two value heads of 3, kernel 4; SwiGLU m = 6."""
    linear, full = layer_costs(Qwen3_5TextConfig(intermediate_size=6, **HYBRID))
    mlp = 3 * 8 * 6
    # q and gate 8·8·2 + k/v 2·8·4 + o 8·8 per token; scores and values 2·8 per token pair
    assert (full.per_token, full.per_pair) == (128 + 64 + 64 + mlp, 16)
    # Kd = 2, Vd = 6, q/k/v 10 wide: projections 8·10 + 8·6 (z) + 2·8·2 (β, decay) + 6·8 (out) = 208, convolution
    # 10·4 = 40, delta rule 2 heads · (64·(2.5·2 + 1.5·3) + 3·2·3) = 1252; no n² term
    assert (linear.per_token, linear.per_pair) == (208 + 40 + 1252 + mlp, 0)
    assert linear(10) == 10 * linear.per_token and full(10) == 10 * full.per_token + 100 * 16
    lengths = [100, 40]
    assert prefill_cost_of([linear, full], lengths) == linear(100) + full(40)


def test_mixture_of_experts_layers_cost_their_router_routed_and_shared_experts():
    """Qwen3.5-MoE has no intermediate_size: every layer routes a token to 2 of 4 experts of width 3 and a gated
    shared expert of width 5. Qwen3-VL-MoE keeps dense layers (mlp_only_layers, decoder_sparse_step)."""
    config = Qwen3_5MoeTextConfig(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=3, shared_expert_intermediate_size=5, **HYBRID
    )
    assert not hasattr(config, "intermediate_size")
    moe = 8 * 4 + 3 * 8 * 2 * 3 + 3 * 8 * 5 + 8  # router, two experts, shared expert and its gate
    linear, full = layer_costs(config)
    assert full.per_token == 128 + 64 + 64 + moe and linear.per_token == 208 + 40 + 1252 + moe
    assert text_config_dims(config) == (8, 2 * 3 + 5, 4)
    vl = Qwen3VLMoeTextConfig(
        hidden_size=8, num_attention_heads=2, num_key_value_heads=2, head_dim=4, num_hidden_layers=4,
        intermediate_size=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=3,
        mlp_only_layers=[0], decoder_sparse_step=2,
    )  # fmt: skip
    attention = 8 * 8 + 2 * 8 * 8 + 8 * 8  # no gate
    dense, sparse = attention + 3 * 8 * 16, attention + 8 * 4 + 3 * 8 * 2 * 3
    assert [c.per_token for c in layer_costs(vl)] == [dense, sparse, dense, sparse]
