# Copied from image/LLaVA/tests/vtr_oracle.py
"""The masking oracle every fork's tests compare against: no pruning machinery at all.

The stock decoder layers run on the full sequence with a per-layer attention mask that hides the tokens
dropped at each stage from layer K on. Rows after the prompt (decode steps) see what the convention says:
`earlier_cache="keep"` the same as the prompt rows of that layer (a layer before K still sees every
token), `"trim"` no dropped token in any layer. `positions="compact"` renumbers, per layer, the tokens that
layer sees without gaps (decode rows continue that numbering); `"original"` keeps the prompt's. Eager
attention, explicit masks. Backbone-specific only in `embed(stock, inputs)`:
the merged input embeddings, or an `Embedded` that adds the RoPE positions (M-RoPE: [rows, batch, seq],
covering decode rows too) and a hook run after every decoder layer (DeepStack).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Embedded:
    """What `embed(stock, inputs)` may return instead of a bare embeddings tensor."""

    embeds: torch.Tensor  # [batch, seq, hidden]
    positions: torch.Tensor | None = None  # for the rotary embedding; None = the default positions
    after_layer: Callable | None = None  # (layer_idx, hidden [batch, seq, hidden]) -> hidden


def embedded(out) -> Embedded:
    return out if isinstance(out, Embedded) else Embedded(out)


def compact(position_ids: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """Literal renumbering of the rows in `seen` [batch, seq], one token at a time: 1-D positions
    [batch, seq] become first, first+1, ...; M-RoPE [rows, batch, seq]: a token whose lowest row lies more than
    one above the highest position seen before it moves down (with everything after it) to just after it."""
    out = position_ids.clone()
    multi = position_ids.ndim == 3
    for b in range(seen.shape[0]):
        shift, last, first = 0, None, True
        for j in range(seen.shape[1]):
            if not seen[b, j]:
                continue
            pos = position_ids[:, b, j] if multi else position_ids[b, j : j + 1]
            if first:
                first, nxt = False, int(pos.min())
            if not multi:
                out[b, j] = nxt
                nxt += 1
                continue
            if last is not None and int(pos.min()) - shift > last + 1:
                shift += int(pos.min()) - shift - last - 1
            out[:, b, j] = pos - shift
            last = max(last if last is not None else -(10**9), int(out[:, b, j].max()))
    return out


@torch.no_grad()
def oracle_forward(stock, inputs, prune_stages, prompt_len, embed, position_ids=None, conventions=None):
    """prune_stages: list of (K, dropped[batch, prompt_len] bool); conventions: `VTRConfig.conventions()`
    (default: original positions, earlier layers keep their cache). Returns logits [batch, seq, vocab]."""
    trim = conventions is not None and conventions.earlier_cache == "trim"
    renumber = conventions is not None and conventions.positions == "compact"
    emb = embedded(embed(stock, inputs))
    embeds = emb.embeds
    if emb.positions is not None:
        position_ids = emb.positions
    batch, seq, _ = embeds.shape
    valid = inputs.get("attention_mask", torch.ones(batch, seq)).bool()
    if position_ids is None:
        position_ids = torch.arange(seq).unsqueeze(0).expand(batch, -1)
    lm = stock.model.language_model
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    all_dropped = torch.zeros(batch, seq, dtype=torch.bool)
    for _, dropped in prune_stages:
        all_dropped[:, : dropped.shape[1]] |= dropped
    is_decode_row = (torch.arange(seq) >= prompt_len)[None, :, None]
    h = embeds
    for i, layer in enumerate(lm.layers):
        hidden_here = torch.zeros(batch, seq, dtype=torch.bool)
        for k, dropped in prune_stages:
            if i >= k:
                hidden_here[:, : dropped.shape[1]] |= dropped
        allowed = causal[None] & valid[:, None, :]
        allowed = allowed & ~hidden_here[:, None, :]
        if trim:
            allowed = allowed & ~(is_decode_row & all_dropped[:, None, :])
        mask = torch.zeros(batch, 1, seq, seq).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
        positions = compact(position_ids, valid & ~hidden_here) if renumber else position_ids
        cos, sin = lm.rotary_emb(embeds, positions)
        h = layer(h, attention_mask=mask, position_embeddings=(cos, sin))
        if emb.after_layer is not None:
            h = emb.after_layer(i, h)
    return stock.lm_head(lm.norm(h))


def stage_drops(record, batch, prompt_len, visual_mask):
    """(K, dropped[batch, prompt_len]) per stage, from what the model reports it kept."""
    stages = []
    alive = visual_mask.clone()
    for stage in record.stages:
        kept = torch.zeros(batch, prompt_len, dtype=torch.bool)
        for b, positions in enumerate(stage.kept_positions):
            kept[b, positions] = True
        dropped = alive & ~kept
        stages.append((stage.layer, dropped))
        alive = alive & kept
    return stages


@torch.no_grad()
def oracle_greedy(stock, inputs, prune_stages, steps, embed, conventions=None, prompt_len=None):
    """Greedy decode with `oracle_forward`, recomputing the whole sequence each step; positions as generate()
    makes them (cumulative sum of the attention mask, unless `embed` gives positions). `prompt_len`: where the
    pruned prompt ends (default: all of `inputs`); the rows after it (an earlier turn's answer and a follow-up
    question) are decode rows. Returns (tokens [batch, steps], logits [batch, steps, vocab])."""
    ids = inputs["input_ids"]
    mask = inputs["attention_mask"]
    prompt_len = ids.shape[1] if prompt_len is None else prompt_len
    out, step_logits = [], []
    for _ in range(steps):
        pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        step_inputs = dict(inputs, input_ids=ids, attention_mask=mask)
        logits = oracle_forward(stock, step_inputs, prune_stages, prompt_len, embed, pos, conventions)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
        step_logits.append(logits[:, -1])
        ids = torch.cat([ids, nxt], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    return torch.cat(out, 1), torch.stack(step_logits, 1)


@torch.no_grad()
def literal_forward(stock, inputs, rows, replace, embed, conventions, position_ids=None, new_ids=None, mixed=None):
    """The pruned prompt built literally, no masking: sample b's sequence is the prompt rows `rows[b]` (its
    original index per row, -1 = re-padding; e.g. `VTRRecord.kept_index`) at their prompt positions (renumbered
    without gaps under `positions="compact"`; the prompt's padding stays padding), the embedding of row j replaced by `replace[(b, j)]` where given
    (merged tokens), then `new_ids` [batch, n] (decoded tokens) continuing after each sample's largest position.
    Stock decoder layers, eager, explicit causal + padding mask; a per-layer `after_layer` hook (DeepStack) adds
    what it adds to each kept row's prompt row, and to a merged row j the mix `mixed[(b, j)] = (prompt rows,
    weights)` of what it adds to those rows. Returns logits [batch, len(rows) + n, vocab]."""
    emb = embedded(embed(stock, inputs))
    embeds = emb.embeds
    batch, seq, _ = embeds.shape
    positions = emb.positions if emb.positions is not None else position_ids
    if positions is None:
        positions = torch.arange(seq).unsqueeze(0).expand(batch, -1)
    multi = positions.ndim == 3  # M-RoPE [rows, batch, seq]
    index = rows.clamp_min(0)
    prompt_mask = inputs.get("attention_mask", torch.ones(batch, seq)).bool()
    valid = (rows >= 0) & prompt_mask.gather(1, index)
    h = torch.stack([embeds[b, index[b]] for b in range(batch)])
    for (b, j), value in replace.items():
        h[b, j] = value.to(h.dtype)
    pos = torch.stack([positions[:, b, index[b]] if multi else positions[b, index[b]] for b in range(batch)], -2)
    if conventions is not None and conventions.positions == "compact":
        pos = compact(pos, valid)
    if new_ids is not None and new_ids.shape[1]:
        n = new_ids.shape[1]
        top = (pos.amax(0) if multi else pos).masked_fill(~valid, -1).amax(-1)  # [batch]
        extra = top[:, None] + 1 + torch.arange(n)[None]
        h = torch.cat([h, stock.get_input_embeddings()(new_ids)], 1)
        pos = torch.cat([pos, extra.expand(pos.shape[0], -1, -1) if multi else extra], -1)
        valid = torch.cat([valid, torch.ones_like(new_ids, dtype=torch.bool)], 1)
    length = h.shape[1]
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None] & valid[:, None, :]
    mask = torch.zeros(batch, 1, length, length).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    lm = stock.model.language_model
    cos, sin = lm.rotary_emb(h, pos)
    for i, layer in enumerate(lm.layers):
        h = layer(h, attention_mask=mask, position_embeddings=(cos, sin))
        if emb.after_layer is not None:  # what the hook adds to each prompt row, on that row's kept copy
            added = emb.after_layer(i, torch.zeros_like(embeds))
            gathered = torch.stack([added[b, index[b]] for b in range(batch)]) * valid[:, : rows.shape[1], None]
            for (b, j), (source, weights) in (mixed or {}).items():
                gathered[b, j] = weights.to(added.dtype) @ added[b, source]
            h = h + torch.nn.functional.pad(gathered, (0, 0, 0, length - gathered.shape[1]))
    return stock.lm_head(lm.norm(h))


@torch.no_grad()
def literal_greedy(stock, inputs, rows, replace, steps, embed, conventions, mixed=None):
    """Greedy decode with `literal_forward`, recomputing the whole sequence each step, prompt positions as
    generate() makes them. Returns (tokens [batch, steps], logits [batch, steps, vocab])."""
    mask = inputs["attention_mask"]
    pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    new = inputs["input_ids"][:, :0]
    out = []
    for _ in range(steps):
        logits = literal_forward(stock, inputs, rows, replace, embed, conventions, pos, new, mixed)
        out.append(logits[:, -1])
        new = torch.cat([new, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return new, torch.stack(out, 1)
