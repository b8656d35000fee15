# Copied from image/LLaVA/llava/vtr/cost.py
# Shared vtr file: edit it in image/LLaVA/llava/vtr, then `make fix-copies` updates every fork.
"""Analytic prefill cost of a prune schedule (multiply-accumulates per decoder layer over its n tokens).

Softmax attention (q = heads·head_dim, d_kv = kv_heads·head_dim):
    n·d·q·g + 2·n·d·d_kv + n·q·d    q (g = 2 where q_proj also emits an output gate: Qwen3.5, Qwen3-Next),
                                     k/v and o projections
  + 2·n²·q                          attention scores and the weighted sum of values
Linear attention (Gated DeltaNet: Kd = key heads·key dim, Vd = value heads·value dim, nv value heads):
    n·d·(2·Kd + Vd) + n·d·Vd + 2·n·d·nv + n·Vd·d    q/k/v, output gate z, β and decay, out projections
  + n·(2·Kd + Vd)·w                                the short causal convolution (kernel w)
  + n·nv·(C·(2.5·dk + 1.5·dv) + 3·dk·dv)           the chunked delta rule, chunks of C = 64 tokens: per chunk
                                                   and value head k_β·kᵀ and q·kᵀ (C²·dk each), the two unit-
                                                   triangular solves (C²·dv/2, C²·dk/2), attention·v (C²·dv),
                                                   and state reads and update (3·C·dk·dv); no n² term
MLP: 3·n·d·m (SwiGLU, three d×m matrices); a mixture-of-experts layer n·d·E (router) + 3·n·d·k·m_e (the k experts
a token is routed to) + 3·n·d·m_s + n·d (shared expert and its gate, where there is one).

With q = d and no gate the attention layer is the familiar 2·n·d² + 2·n·d·d_kv + 2·n²·d (4·n·d² without GQA).
`layer_costs(text_config)` reads these sizes per layer from a transformers text config (`layer_types`, MoE fields).

Omitted: norms (the gated norm too), RoPE, softmax, the decay and β maps, the padding of the last delta-rule chunk,
the LM head (one row in prefill with logits_to_keep=1), the vision tower and projector (unchanged by pruning), and
the scoring overhead itself. Causal masking (and a sliding window) is not credited: kernels that skip the masked half would scale the n²
term by ~1/2 for both sides.
"""

from __future__ import annotations

from dataclasses import dataclass

#: text model types whose q_proj emits each head's query and an output gate of the same width
GATED_QUERY_MODEL_TYPES = ("qwen3_5_text", "qwen3_5_moe_text", "qwen3_next")
#: tokens per chunk of the chunked delta rule (transformers' torch path and flash-linear-attention)
DELTA_RULE_CHUNK = 64


@dataclass(frozen=True)
class LayerCost:
    """One decoder layer's cost as a function of its length n: per_token·n + per_pair·n²."""

    per_token: float
    per_pair: float = 0.0

    def __call__(self, n: int) -> float:
        return self.per_token * n + self.per_pair * n * n

    def __add__(self, other: LayerCost) -> LayerCost:
        return LayerCost(self.per_token + other.per_token, self.per_pair + other.per_pair)


def attention_cost(d: int, q: int, d_kv: int, gated: bool = False) -> LayerCost:
    """Softmax attention with query width `q`, key/value width `d_kv` (`gated`: q_proj twice as wide)."""
    return LayerCost(d * q * (2 if gated else 1) + 2 * d * d_kv + q * d, 2 * q)


def linear_attention_cost(d: int, key_heads: int, key_dim: int, value_heads: int, value_dim: int, kernel: int):
    """Gated DeltaNet (Qwen3.5, Qwen3-Next): projections, short convolution, chunked delta rule; linear in n."""
    keys, values = key_heads * key_dim, value_heads * value_dim
    mixed = 2 * keys + values  # q, k and v, as the convolution sees them
    projections = d * mixed + d * values + 2 * d * value_heads + values * d
    core = value_heads * (DELTA_RULE_CHUNK * (2.5 * key_dim + 1.5 * value_dim) + 3 * key_dim * value_dim)
    return LayerCost(projections + mixed * kernel + core)


def mlp_cost(d: int, m: int) -> LayerCost:
    """SwiGLU feed-forward of width `m`."""
    return LayerCost(3 * d * m)


def moe_cost(d: int, experts: int, top_k: int, expert_width: int, shared_width: int = 0) -> LayerCost:
    """A mixture-of-experts MLP: the router, the `top_k` experts a token goes to, a gated shared expert if any."""
    shared = 3 * d * shared_width + d if shared_width else 0
    return LayerCost(d * experts + 3 * d * top_k * expert_width + shared)


def layer_cost(n: int, d: int, m: int, d_kv: int | None = None) -> float:
    """A Llama-style layer (q width d, no gate, dense MLP) over n tokens."""
    d_kv = d if d_kv is None else d_kv
    return (attention_cost(d, d, d_kv) + mlp_cost(d, m))(n)


def _is_sparse(text_config, layer_idx: int) -> bool:
    """Whether decoder layer `layer_idx` routes its MLP through experts (Qwen-MoE's `mlp_only_layers` and
    `decoder_sparse_step`; every layer where the config has experts and neither)."""
    if not getattr(text_config, "num_experts", 0) or layer_idx in (getattr(text_config, "mlp_only_layers", None) or ()):
        return False
    return (layer_idx + 1) % (getattr(text_config, "decoder_sparse_step", None) or 1) == 0


def _experts(text_config) -> tuple[int, int, int, int]:
    """(experts, top-k, expert width, shared expert width or 0) of a mixture-of-experts config."""
    c = text_config
    return (
        c.num_experts,
        c.num_experts_per_tok,
        c.moe_intermediate_size,
        getattr(c, "shared_expert_intermediate_size", 0) or 0,
    )


def _attention_widths(text_config) -> tuple[int, int]:
    """(q, d_kv): heads·head_dim and kv_heads·head_dim."""
    c = text_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return c.num_attention_heads * head_dim, kv_heads * head_dim


def layer_costs(text_config) -> list[LayerCost]:
    """Per decoder layer of a transformers text config, its cost function: attention or linear attention by
    `layer_types` (none: all attention), a gated query by model type, a dense or mixture-of-experts MLP."""
    c, d = text_config, text_config.hidden_size
    gated = getattr(c, "model_type", None) in GATED_QUERY_MODEL_TYPES
    attention = attention_cost(d, *_attention_widths(c), gated)
    kinds = getattr(c, "layer_types", None) or ["full_attention"] * c.num_hidden_layers
    costs = []
    for i, kind in enumerate(kinds[: c.num_hidden_layers]):
        if kind == "linear_attention":
            mixer = linear_attention_cost(
                d,
                c.linear_num_key_heads,
                c.linear_key_head_dim,
                c.linear_num_value_heads,
                c.linear_value_head_dim,
                c.linear_conv_kernel_dim,
            )
        else:
            mixer = attention
        mlp = moe_cost(d, *_experts(c)) if _is_sparse(c, i) else mlp_cost(d, c.intermediate_size)
        costs.append(mixer + mlp)
    return costs


def tokens_per_layer(seq_len: int, num_layers: int, schedule: list[tuple[int, int]]) -> list[int]:
    """Sequence length seen by each layer; schedule = [(K, tokens removed at K), ...] with K ascending."""
    lengths, n, stages = [], seq_len, dict(schedule)
    for i in range(num_layers):
        n -= stages.get(i, 0)
        lengths.append(n)
    return lengths


def prefill_cost(lengths: list[int], d: int, m: int, d_kv: int | None = None) -> float:
    return sum(layer_cost(n, d, m, d_kv) for n in lengths)


def prefill_cost_of(costs: list[LayerCost], lengths: list[int]) -> float:
    """The decoder's cost when layer i runs on lengths[i] tokens (`costs`: `layer_costs`)."""
    return sum(cost(n) for cost, n in zip(costs, lengths, strict=True))


def equivalent_tokens(lengths: list[int]) -> float:
    """Σ layers × tokens / total layers: the constant length with the same token-layer product."""
    return sum(lengths) / len(lengths)


def ideal_speedup(seq_len: int, lengths: list[int], d: int, m: int, d_kv: int | None = None) -> float:
    full = prefill_cost([seq_len] * len(lengths), d, m, d_kv)
    return full / prefill_cost(lengths, d, m, d_kv)


def ideal_speedup_of(costs: list[LayerCost], seq_len: int, lengths: list[int]) -> float:
    """Unpruned / pruned decoder cost, each layer by its own cost function (`layer_costs`)."""
    return prefill_cost_of(costs, [seq_len] * len(lengths)) / prefill_cost_of(costs, lengths)


def text_config_dims(text_config) -> tuple[int, int, int]:
    """(d, m, d_kv) of a transformers text config, for reporting: m is the MLP width a token of layer 0 passes
    through (intermediate_size; on a mixture of experts, its experts' and the shared expert's widths together)."""
    if _is_sparse(text_config, 0):
        _, top_k, width, shared = _experts(text_config)
        m = top_k * width + shared
    else:
        m = text_config.intermediate_size
    return text_config.hidden_size, m, _attention_widths(text_config)[1]
