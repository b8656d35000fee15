"""The physical-truncation oracle for hybrid decoders (Qwen3.5), where the masking oracle cannot reach.

A recurrent (linear-attention) layer has no mask that can drop a token: a masked row still passes through its state.
So this oracle builds the shortened sequence literally. Each sample runs alone, on its real rows (no padding),
through the stock decoder layers one at a time with a stock `DynamicCache`: layers before the first prune layer on
the whole prompt, the layers from each stage's K on the rows that stage leaves (`Cut`: kept rows in order, merged
rows where the engine put them), at their prompt positions (renumbered without gaps where a stage renumbers).
Full-attention layers get an explicit causal mask; recurrent layers get none (an unpadded sample needs none).
Decoding then feeds each token through every layer on that cache: continuing the prompt's numbering, or under
"compact" each layer its own. Nothing of the engine is used; no DeepStack (Qwen3.5 has none).
"""

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from vtr_oracle import compact, embedded

from visual_token_pruning import get_strategy


@dataclass
class Cut:
    """One prune stage of one sample: from decoder layer `layer` on, the sequence is `rows`."""

    layer: int
    rows: list[int]  # each row's prompt index, in order (a merged row: its representative's)
    # row -> a merged token: its value [hidden], or (prompt indices of the dropped rows it mixes, weights)
    merged: dict = field(default_factory=dict)
    compact: bool = False  # the rows' positions (as the stage before left them) renumbered without gaps


def cuts_of(model, inputs, b: int, visual: torch.Tensor, merges=()) -> list[Cut]:
    """Sample `b`'s stages from what `model` (a VTR model after a pruned forward) recorded: a stage keeps the rows
    that are not visual or whose prompt index it lists in `kept_positions`; the last stage's rows are read from
    `kept_index` (the engine's order), which must agree. `visual`: [batch, prompt] bool. `merges`: the recorded
    `merge_tokens` calls, (sample, dropped rows, the method's output), of a run with one stage (its dropped rows are
    then prompt indices)."""
    record, config = model.vtr_last, model.vtr_config
    assert not merges or len(record.stages) == 1, "merged tokens are replayed for one-stage runs"
    strategy = get_strategy(config.strategy)()
    rows = inputs["attention_mask"][b].bool().nonzero().reshape(-1).tolist()
    cuts = []
    for s, stage in enumerate(record.stages):
        kept = set(stage.kept_positions[b].tolist())
        filtered = [r for r in rows if not visual[b, r] or r in kept]
        rows, merged = filtered, {}
        if s == len(record.stages) - 1:
            final = record.kept_index[b]
            rows = final[(final >= 0) & inputs["attention_mask"][b].bool()[final.clamp_min(0)]].tolist()
            assert rows == filtered or any(stage.merged), "the engine keeps the kept rows in prompt order"
        for sample, dropped, (values, which, *rest) in merges:
            mix = rest[1] if len(rest) > 1 else None
            mix = mix.to_dense() if mix is not None and mix.is_sparse else mix
            for i, representative in enumerate(dropped[which].tolist() if sample == b else []):
                merged[rows.index(representative)] = values[i] if mix is None else (dropped.tolist(), mix[i])
        renumbered = strategy.stage_positions(s, model.vtr_conventions().positions, config) == "compact"
        cuts.append(Cut(stage.layer, rows, merged, renumbered))
    return cuts


class PhysicalRun:
    """Sample `b` of `inputs` physically pruned by `cuts` on the stock model `stock` (eager), and its decode.

    `logits` [rows, vocab] and `rows` (prompt indices) of the prompt's last layer, `cache` (a stock DynamicCache:
    each layer holds what it ran on), `feed(ids)` for decode steps and follow-up turns, `greedy(steps)`.
    `compact`: decode steps continue each layer's own numbering (the engine's, once any stage renumbered)."""

    @torch.no_grad()
    def __init__(self, stock, inputs, b: int, cuts: list[Cut], embed, compact_decode: bool = False):
        self.stock, self.lm = stock, stock.model.language_model
        emb = embedded(embed(stock, inputs))
        real = inputs["attention_mask"][b].bool().nonzero().reshape(-1)
        hidden, rows, positions = emb.embeds[b : b + 1, real], real.tolist(), emb.positions[:, b : b + 1, real]
        self.prompt_next = int(positions.max()) + 1
        self.cache = DynamicCache(config=self.lm.config)
        self.next_positions = []  # per layer: one past the largest position of the rows it ran on
        at = {cut.layer: cut for cut in cuts}
        for i, layer in enumerate(self.lm.layers):
            if i in at:
                hidden, rows, positions = restage(at[i], hidden, rows, positions)
            self.next_positions.append(int(positions.max()) + 1)
            hidden = self._layer(i, layer, hidden, positions)
        self.logits, self.rows = stock.lm_head(self.lm.norm(hidden))[0], rows
        self.compact, self.decoded = compact_decode, 0

    def _layer(self, i: int, layer, hidden, positions):
        """Stock decoder layer `i` on `hidden` [1, n, d] after what its cache holds: causal over both (full
        attention), or nothing to mask (linear attention)."""
        mask = None
        if self.lm.config.layer_types[i] == "full_attention":
            n, past = hidden.shape[1], self.cache.get_seq_length(i)
            allowed = torch.arange(past + n)[None] <= torch.arange(n)[:, None] + past
            mask = torch.zeros(1, 1, n, past + n).masked_fill(~allowed, torch.finfo(torch.float32).min)
        cos, sin = self.lm.rotary_emb(hidden, positions)
        return layer(
            hidden, attention_mask=mask, position_embeddings=(cos, sin), past_key_values=self.cache, use_cache=True
        )

    @torch.no_grad()
    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits [q, vocab] of `ids` [q] fed after everything so far (one decode step, or a follow-up turn)."""
        hidden = self.stock.get_input_embeddings()(ids[None])
        steps = torch.arange(ids.numel()) + self.decoded
        for i, layer in enumerate(self.lm.layers):
            start = self.next_positions[i] if self.compact else self.prompt_next
            hidden = self._layer(i, layer, hidden, (start + steps).view(1, 1, -1).expand(3, 1, -1))
        self.decoded += ids.numel()
        return self.stock.lm_head(self.lm.norm(hidden))[0]

    def greedy(self, steps: int, last: torch.Tensor | None = None):
        """(tokens [steps], logits [steps, vocab]) of greedy decoding from `last` (default: the prompt's last
        row's logits); the cache then holds every token but the last."""
        last = self.logits[-1] if last is None else last
        tokens, logits = [], []
        for step in range(steps):
            tokens.append(last.argmax(-1))
            logits.append(last)
            if step < steps - 1:
                last = self.feed(tokens[-1].view(1))[-1]
        return torch.stack(tokens), torch.stack(logits)


def restage(cut: Cut, hidden, rows: list[int], positions):
    """The sequence as `cut` leaves it: each row the row before it with the same prompt index, merged rows made as
    the cut says (a mix of the dropped rows' states at this layer), positions renumbered under `compact`."""
    index = [rows.index(r) for r in cut.rows]
    new, positions = hidden[:, index].clone(), positions[..., index]
    for row, merged in cut.merged.items():
        if isinstance(merged, torch.Tensor):
            new[0, row] = merged.to(new.dtype)
        else:
            dropped, weights = merged
            new[0, row] = weights.to(new.dtype) @ hidden[0, [rows.index(r) for r in dropped]]
    if cut.compact:
        positions = compact(positions, torch.ones(1, positions.shape[-1], dtype=torch.bool))
    return new, list(cut.rows), positions


def assert_cache_matches(cache, b: int, want: DynamicCache, atol: float) -> None:
    """Sample `b` of the engine's (padded) `cache` holds what the oracle's `want` holds, layer by layer: a
    full-attention layer's last rows (its padding first) its keys and values, a linear-attention layer its
    convolution and recurrent states."""
    assert len(cache.layers) == len(want.layers)
    for i, (got, expected) in enumerate(zip(cache.layers, want.layers)):
        if hasattr(expected, "keys"):
            n = expected.keys.shape[2]
            for name in ("keys", "values"):
                torch.testing.assert_close(
                    getattr(got, name)[b, :, -n:], getattr(expected, name)[0], atol=atol, rtol=0, msg=f"layer {i}"
                )
        else:
            for name in ("conv_states", "recurrent_states"):
                torch.testing.assert_close(
                    getattr(got, name)[0][b], getattr(expected, name)[0][0], atol=atol, rtol=0, msg=f"layer {i}"
                )
