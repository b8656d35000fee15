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
