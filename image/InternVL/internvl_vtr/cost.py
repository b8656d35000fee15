# Copied from image/LLaVA/llava/vtr/cost.py
# Shared vtr file: edit it in image/LLaVA/llava/vtr, then `make fix-copies` updates every fork.
"""Analytic prefill cost of a prune schedule (multiply-accumulates per decoder layer).

    C(n) = 2·n·d² + 2·n·d·d_kv      q/o and k/v projections (d_kv = kv_heads·head_dim; = d without GQA,
                                     which gives the familiar 4·n·d²)
         + 2·n²·d                   attention scores and the weighted sum of values
         + 3·n·d·m                  SwiGLU feed-forward (three d×m matrices)

Omitted: norms, RoPE, softmax, the LM head (one row in prefill with logits_to_keep=1), the vision tower
and projector (unchanged by pruning), and the scoring overhead itself. Causal masking is not credited:
kernels that skip the masked half would scale the n² term by ~1/2 for both sides.
"""

from __future__ import annotations


def layer_cost(n: int, d: int, m: int, d_kv: int | None = None) -> float:
    d_kv = d if d_kv is None else d_kv
    return 2 * n * d * d + 2 * n * d * d_kv + 2 * n * n * d + 3 * n * d * m


def tokens_per_layer(seq_len: int, num_layers: int, schedule: list[tuple[int, int]]) -> list[int]:
    """Sequence length seen by each layer; schedule = [(K, tokens removed at K), ...] with K ascending."""
    lengths, n, stages = [], seq_len, dict(schedule)
    for i in range(num_layers):
        n -= stages.get(i, 0)
        lengths.append(n)
    return lengths


def prefill_cost(lengths: list[int], d: int, m: int, d_kv: int | None = None) -> float:
    return sum(layer_cost(n, d, m, d_kv) for n in lengths)


def equivalent_tokens(lengths: list[int]) -> float:
    """Σ layers × tokens / total layers: the constant length with the same token-layer product."""
    return sum(lengths) / len(lengths)


def ideal_speedup(seq_len: int, lengths: list[int], d: int, m: int, d_kv: int | None = None) -> float:
    full = prefill_cost([seq_len] * len(lengths), d, m, d_kv)
    return full / prefill_cost(lengths, d, m, d_kv)


def text_config_dims(text_config) -> tuple[int, int, int]:
    """(d, m, d_kv) of a transformers text config."""
    d = text_config.hidden_size
    head_dim = getattr(text_config, "head_dim", None) or d // text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
    return d, text_config.intermediate_size, kv_heads * head_dim
