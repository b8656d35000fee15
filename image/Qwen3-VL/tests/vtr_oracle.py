# Copied from image/LLaVA/tests/vtr_oracle.py
"""The masking oracle every fork's tests compare against: no pruning machinery at all.

The stock decoder layers run on the full sequence with a per-layer attention mask that hides the tokens
dropped at each stage from layer K on. Rows after the prompt (decode steps) see what the convention says:
`earlier_cache="keep"` the same as the prompt rows of that layer (a layer before K still sees every
token), `"trim"` no dropped token in any layer. `positions="compact"` renumbers, per layer, the tokens that
layer sees without gaps (decode rows continue that numbering); `"original"` keeps the prompt's.

Methods that merge tokens or reorder them meet the staged literal oracle instead (`staged_literal_forward`): the
stock layers re-run on the sequence as each stage left it (`Stage`: the rows kept, the merged tokens made from
the rows before it), each layer caching the rows it ran on; a decode-time pruning (DyCoke) hides rows per step
and layer. Eager attention, explicit masks. Backbone-specific only in `embed(stock, inputs)`:
the merged input embeddings, or an `Embedded` that adds the RoPE positions (M-RoPE: [rows, batch, seq],
covering decode rows too) and a hook run after every decoder layer (DeepStack).
"""

from collections.abc import Callable
from dataclasses import dataclass, field

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


@dataclass
class Stage:
    """One prune stage as the staged oracle replays it: from decoder layer `layer` on, the sequence is `rows`."""

    layer: int
    rows: torch.Tensor  # [batch, len]: each row's prompt index (-1: re-padding; a merged row: its representative's)
    positions: str = "original"  # "compact": the rows' positions (as the stage before left them) renumbered
    # (b, row) -> a merged token: (dropped [n]: rows of the sequence before the stage, weights [n]), its mix of
    # their states and of what the after-layer hook adds to them; or its value [hidden] (the hook then adds to it
    # what it adds to its representative)
    merged: dict = field(default_factory=dict)


def restage(stage: Stage, h, rows, positions, sources, prompt_valid):
    """The prompt part of the sequence as `stage` leaves it: each row the row before it with the same prompt index
    (a merged row: its representative's), merged rows made as the stage says, positions renumbered under
    "compact". h [batch, len, hidden], rows [batch, len], positions [batch, len] or M-RoPE [3, batch, len],
    sources [batch, len, prompt len]: each row's weights over the prompt rows (for the after-layer hook)."""
    new = stage.rows
    match = (new[:, :, None] == rows[:, None, :]) & (new >= 0)[:, :, None]
    assert torch.equal(match.sum(-1), (new >= 0).long()), "each row after a stage is one row before it"
    index = match.long().argmax(-1)  # re-padding rows: row 0, masked
    moved_h, moved_sources = (t.gather(1, index[..., None].expand(-1, -1, t.shape[-1])) for t in (h, sources))
    positions = positions.gather(-1, index.expand(positions.shape[0], -1, -1) if positions.ndim == 3 else index)
    for (b, j), merged in stage.merged.items():
        if isinstance(merged, torch.Tensor):
            moved_h[b, j] = merged.to(h.dtype)
        else:
            dropped, weights = merged
            moved_h[b, j] = weights.to(h.dtype) @ h[b, dropped]
            moved_sources[b, j] = weights.to(sources.dtype) @ sources[b, dropped]
    valid = (new >= 0) & prompt_valid.gather(1, new.clamp_min(0))
    if stage.positions == "compact":
        positions = compact(positions, valid)
    return moved_h, new, positions, moved_sources, valid


@torch.no_grad()
def staged_literal_forward(stock, inputs, stages, embed, position_ids=None, new_ids=None, hides=None):
    """The stock decoder layers re-run literally on the sequence as it is at each layer (dropped rows are gone, not
    masked): the prompt, then from each `Stage`'s layer on its rows (`restage`: kept ones by prompt index, merged ones
    made from the rows before the stage, positions renumbered where the stage says), the prompt's padding staying
    padding; then `new_ids` [batch, n] (decoded tokens), which each layer runs after the rows it ran on (its cache:
    `earlier_cache="keep"`) at positions continuing after their largest. `hides` = (L, [[batch, final len] bool per decode row]): decode row t does
    not see those rows in layers >= L (DyCoke's decode pruning). Positions as `embed` gives them (M-RoPE), else
    `position_ids` (default 0..seq-1); the after-layer hook (DeepStack) adds to each row what it adds to that
    row's prompt row, to a merged row the mix of its sources'. Eager, explicit causal + padding masks. Returns
    logits [batch, final len + n, vocab]."""
    emb = embedded(embed(stock, inputs))
    h = emb.embeds
    batch, seq, _ = h.shape
    positions = emb.positions if emb.positions is not None else position_ids
    if positions is None:
        positions = torch.arange(seq).unsqueeze(0).expand(batch, -1)
    multi = positions.ndim == 3  # M-RoPE [rows, batch, seq]
    prompt_valid = inputs.get("attention_mask", torch.ones(batch, seq)).bool()
    new_ids = inputs["input_ids"][:, :0] if new_ids is None else new_ids
    n = new_ids.shape[1]
    tail = stock.get_input_embeddings()(new_ids)
    rows, valid = torch.arange(seq).expand(batch, -1), prompt_valid
    sources = torch.eye(seq).expand(batch, -1, -1)
    at = {stage.layer: stage for stage in stages}
    lm = stock.model.language_model
    for i, layer in enumerate(lm.layers):
        if i in at:
            h, rows, positions, sources, valid = restage(at[i], h, rows, positions, sources, prompt_valid)
        length = h.shape[1]
        top = (positions.amax(0) if multi else positions).masked_fill(~valid, -1).amax(-1)  # [batch]
        after = top[:, None] + 1 + torch.arange(n)[None]
        pos = torch.cat([positions, after.expand(positions.shape[0], -1, -1) if multi else after], -1)
        seen = torch.cat([valid, torch.ones_like(new_ids, dtype=torch.bool)], 1)
        allowed = torch.ones(length + n, length + n, dtype=torch.bool).tril()[None] & seen[:, None, :]
        if hides is not None and i >= hides[0] and n:
            allowed[:, length:, :length] &= ~torch.stack(hides[1][:n], 1)
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]
        x = torch.cat([h, tail], 1)
        x = layer(x, attention_mask=mask, position_embeddings=lm.rotary_emb(x, pos))
        if emb.after_layer is not None:  # what the hook adds to each prompt row, on the rows made of it
            added = emb.after_layer(i, torch.zeros_like(emb.embeds))
            x = x + torch.nn.functional.pad((sources * valid[..., None]).to(added.dtype) @ added, (0, 0, 0, n))
        h, tail = x[:, :length], x[:, length:]
    return stock.lm_head(lm.norm(torch.cat([h, tail], 1)))


@torch.no_grad()
def staged_literal_greedy(stock, inputs, stages, steps, embed, hides=None):
    """Greedy decode with `staged_literal_forward`, recomputing the whole sequence each step, prompt positions as
    generate() makes them; decode row t hides `hides[1][t]` from layers >= `hides[0]`. Returns (tokens
    [batch, steps], logits [batch, steps, vocab])."""
    mask = inputs["attention_mask"]
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    once = embedded(embed(stock, inputs))
    new = inputs["input_ids"][:, :0]
    out = []
    for _ in range(steps):
        logits = staged_literal_forward(stock, inputs, stages, lambda *_: once, positions, new, hides)
        out.append(logits[:, -1])
        new = torch.cat([new, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return new, torch.stack(out, 1)
