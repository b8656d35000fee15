# Copied from image/LLaVA/llava/vtr/attention.py
# Shared vtr file: edit it in image/LLaVA/llava/vtr, then `make fix-copies` updates every fork.
"""Causal attention of one decoder layer for scoring, computed from its own Q/K, row by row on demand.

Every layer runs on whatever kernel the model was loaded with (eager, sdpa, flash_attention_2); none of
them hands back usable attention probabilities. So the framework recomputes them for the scoring layer
only: queries from the layer's own `q_proj` on its normalised input, keys as that layer attended to them
(post-RoPE, taken from the KV cache when there is one), an explicit causal + padding mask, softmax in
float32. Only the query rows a strategy indexes are computed: memory grows with rows read, not seq².
"""

from __future__ import annotations

import torch


class ScoringAttention:
    """A lazy `[batch, heads, seq, seq]` attention-probability tensor.

    Supports the indexing strategies use (`a[:, :, -1, :]`, `a[:, :, rows, s:e]`, `a[0, h, i]`, ...): the
    query-row index (dim 2) decides which rows are computed, the rest is applied to those rows.
    `full()` materialises everything (seq² memory; for methods that really need key-key attention).
    """

    def __init__(self, query_fn, keys: torch.Tensor, key_valid: torch.Tensor, num_heads: int, scaling: float):
        # query_fn(rows: LongTensor) -> [batch, heads, len(rows), head_dim], RoPE applied. It may carry
        # `query_fn.for_sample(b)`, the same function computing sample b only (used by `sample`).
        self._query_fn = query_fn
        self._keys = keys  # [batch, kv_heads, seq, head_dim], RoPE applied
        self._key_valid = key_valid  # [batch, seq] bool (False = padding)
        self._num_heads = num_heads
        self._scaling = scaling
        batch, _, seq, _ = keys.shape
        self.shape = torch.Size((batch, num_heads, seq, seq))
        self.dtype = torch.float32
        self.device = keys.device
        self.ndim = 4

    @property
    def keys(self) -> torch.Tensor:
        """`[batch, kv_heads, seq, head_dim]`: the scoring layer's keys as it attended to them (RoPE applied),
        for methods that read key states rather than attention (DART's pivots)."""
        return self._keys

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return 4

    def sample(self, b: int, length: int | None = None) -> ScoringAttention:
        """The same lazy attention for batch element `b` alone (batch size 1), over its first `length`
        positions (default: all). Only that sample's query rows are ever computed."""
        length = self.shape[-1] if length is None else length
        query_fn = self._query_fn
        for_sample = getattr(query_fn, "for_sample", None)
        view = ScoringAttention(
            for_sample(b) if for_sample is not None else (lambda rows: query_fn(rows)[b : b + 1]),
            self._keys[b : b + 1, :, :length],
            self._key_valid[b : b + 1, :length],
            self._num_heads,
            self._scaling,
        )
        if length == self.shape[-1]:  # same keys as the batch: may share rows computed for all samples
            view._batch, view._batch_index = self, b
        return view

    def _shared(self, key: tuple[int, ...]) -> torch.Tensor | None:
        """Rows `key` of this per-sample view, taken from one computation for the whole batch: the first rows
        any sample asks for (the last row, in a left-padded batch the same for every sample) are computed
        for all samples at once; rows first asked later are computed by the sample that asks."""
        batch = getattr(self, "_batch", None)
        if batch is None:
            return None
        cache = batch.__dict__.setdefault("_shared_rows", {})
        if key not in cache:
            if cache:
                return None
            cache[key] = batch._compute_rows(torch.tensor(key, dtype=torch.long, device=self.device))
        return cache[key][self._batch_index : self._batch_index + 1]

    def rows(self, rows) -> torch.Tensor:
        """Probabilities for query rows `rows` (row indices: a LongTensor, or Python ints, which per-sample
        views of one batch can share): `[batch, heads, len(rows), seq]`."""
        if isinstance(rows, (list, tuple, range)):
            key = tuple(int(r) % self.shape[-1] for r in rows)
            shared = self._shared(key)
            if shared is not None:
                return shared
            rows = torch.tensor(key, dtype=torch.long, device=self.device)
        return self._compute_rows(rows)

    def _compute_rows(self, rows) -> torch.Tensor:
        seq = self.shape[-1]
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.device).reshape(-1) % seq
        q = self._query_fn(rows).float()  # [b, h, r, d]
        k = self._keys.float()
        groups = self._num_heads // k.shape[1]
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
        logits = torch.matmul(q, k.transpose(-1, -2)) * self._scaling  # [b, h, r, seq]
        keys_idx = torch.arange(seq, device=self.device)
        allowed = (keys_idx[None, :] <= rows[:, None])[None, None]  # causal, in current-sequence order
        allowed = allowed & self._key_valid[:, None, None, :]
        logits = logits.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        # A padded query row has no visible key: report zeros, not NaN.
        return torch.nan_to_num(probs, nan=0.0)

    def full(self) -> torch.Tensor:
        return self.rows(torch.arange(self.shape[-1], device=self.device))

    def __getitem__(self, index) -> torch.Tensor:
        index = _expand_index(index)
        row_index = index[2]
        if isinstance(row_index, int):
            block = self.rows([row_index])
            rest = (index[0], index[1], 0, index[3])
        elif isinstance(row_index, slice):
            block = self.rows(range(self.shape[2])[row_index])
            rest = (index[0], index[1], slice(None), index[3])
        elif isinstance(row_index, (list, tuple, range)) and all(isinstance(r, int) for r in row_index):
            block = self.rows(row_index)
            rest = (index[0], index[1], slice(None), index[3])
        else:
            rows = torch.as_tensor(row_index, device=self.device)
            if rows.dtype == torch.bool:
                rows = rows.nonzero().reshape(-1)
            block = self.rows(rows.reshape(-1))
            rest = (index[0], index[1], torch.arange(rows.numel(), device=self.device).reshape(rows.shape), index[3])
        return block[rest]

    def __repr__(self) -> str:
        return f"ScoringAttention(shape={tuple(self.shape)}, lazy)"


def _expand_index(index) -> tuple:
    """Normalise an index into exactly four per-dimension entries (no None / newaxis)."""
    if not isinstance(index, tuple):
        index = (index,)
    if any(i is None for i in index):
        raise IndexError("ScoringAttention does not support None/newaxis in an index; index first, then unsqueeze")
    ellipses = [pos for pos, i in enumerate(index) if i is Ellipsis]
    if ellipses:
        pos = ellipses[0]
        fill = 4 - (len(index) - 1)
        index = index[:pos] + (slice(None),) * fill + index[pos + 1 :]
    if len(index) > 4:
        raise IndexError(f"too many indices for a 4-D attention tensor: {len(index)}")
    return tuple(index) + (slice(None),) * (4 - len(index))


def scoring_attention(layer, layer_input, cos, sin, key_valid, cache, layer_idx, rope_fn) -> ScoringAttention:
    """Lazy causal attention probabilities of decoder `layer` (Llama-style `self_attn` with q/k projections,
    optional per-head q/k norms) for its input `layer_input` [batch, seq, hidden].

    rope_fn: `apply_rotary_pos_emb(q, k, cos, sin)` of the decoder's family (a partial rotary one rotates
    the dimensions its tables cover). Keys come from the KV cache when there is one (exactly what the kernel
    attended to, post-RoPE), else from `k_proj`. Where `q_proj` also emits an output gate per head (Qwen3.5,
    Qwen3-Next: each head's block is the query, then the gate), the query is the first `head_dim` of each block.
    """
    attn = layer.self_attn
    normed = layer.input_layernorm(layer_input)
    batch, seq, _ = normed.shape
    head_dim = attn.head_dim
    num_heads = attn.config.num_attention_heads
    width = attn.q_proj.out_features // num_heads  # head_dim, or 2 x head_dim with the gate
    q_norm = getattr(attn, "q_norm", None)  # Qwen3-style per-head norms
    k_norm = getattr(attn, "k_norm", None)

    def queries(rows: torch.Tensor, picked: slice) -> torch.Tensor:
        x, c, s = normed[picked, rows], cos[picked, rows], sin[picked, rows]
        q = attn.q_proj(x).view(x.shape[0], rows.numel(), num_heads, width)[..., :head_dim]
        if q_norm is not None:
            q = q_norm(q)
        q = q.transpose(1, 2)
        return rope_fn(q, q, c, s)[0]

    def query_fn(rows: torch.Tensor) -> torch.Tensor:
        return queries(rows, slice(None))

    query_fn.for_sample = lambda b: lambda rows: queries(rows, slice(b, b + 1))

    if cache is not None:
        keys = cache.layers[layer_idx].keys
    else:
        k = attn.k_proj(normed).view(batch, seq, -1, head_dim)
        if k_norm is not None:
            k = k_norm(k)
        k = k.transpose(1, 2)
        keys = rope_fn(k, k, cos, sin)[1]
    return ScoringAttention(query_fn, keys, key_valid, num_heads=num_heads, scaling=attn.scaling)
