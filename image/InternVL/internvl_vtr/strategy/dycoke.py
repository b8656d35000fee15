# Copied from image/LLaVA/llava/vtr/strategy/dycoke.py
# Shared vtr file: edit it in image/LLaVA/llava/vtr, then `make fix-copies` updates every fork.
"""dycoke: DyCoke (CVPR'25), token temporal merging before the LLM and dynamic KV-cache pruning while decoding,
as its official code does (github KD-TAO/DyCoke at dd74634).

TTM (`ttm`, before the LLM, on each video's frames as the LLM gets them): the frames go in windows of four
starting at frame 0. With T tokens a frame and the budget's ratio r, a pruned frame keeps int((1 - k) x T) tokens,
k = 1 - r being the official dycoke_k (the share removed), so that r gives the official count for k = 1 - r to the
float (int(r x T) can differ: r = 0.2, T = 25 gives 5, the official k = 0.8 gives 4). It keeps those least similar
to its reference frame (per-position cosine, token j of one frame against token j of the other), most dissimilar
first: the official `torch.topk(similarity, keep, largest=False)`, sorted, whose order is the one the LLM then sees
them in, renumbered (`positions="compact"`); ties go as that call breaks them on the features' device (identical
frames do not keep their earliest positions). The similarity is computed as the official code does, in the
features' own dtype: its pair pass takes `cosine_similarity` of the `normalize`d frames, its second pass of the raw
ones. In a window [f0, f1, f2, f3]: f0 stays whole, f1 is pruned against f0 (pair pass), f2 against f0 (second
pass), f3 against f2 (pair pass, the whole f2). The official code's edges are kept: the last window of the video
leaves its f2 whole (the second pass stops one window early), and an odd frame count drops the last frame entirely.
Where the official code raises (fewer than five frames) the same rule runs without its second pass, and a single
frame stays whole. The official k = 0.7 is the budget keep_ratio = 0.3, the default here. Nothing is averaged: the
similar tokens are dropped. The official code runs TTM in OneVision's one-newline layout only; here it runs on any
family's frames (LLaVA-Video's grid layout included, its row newlines being tokens of the frame).

Decode (`decode_layer` / `decode_candidates` / `decode_keep`, the engine's `DecodeHook`): at every decode step of
one token, layers [0, L) attend to the whole cache (L = dycoke_layer, 3); the current token's attention in layer
L-1, mean over heads, over the candidate rows is v. The candidates are the official [start, start + len(TTM) - 1):
each video's TTM output tokens but the last one (an official off-by-one, on which the count and the gate depend);
never the newline after a video, an image or text. When cos(v, the previous step's v) < dycoke_gate (0.9; the
first step of a prompt always prunes) layers from L on see only the int(n x (1 - dycoke_decode_prune)) candidates
of largest v (n candidates in the sample's cache, 0.8 pruned) and every other row, else the whole cache. Nothing
leaves the cache: a row hidden at one step may be seen at the next. The attention is read in float32 (the official
code's is in the model's fp16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import StageBudget
from .base import select_batch
from .registry import register_strategy
from .video import Arrangement, Video, VideoReduction

#: the official k = 0.7 (share of a pruned frame's tokens removed) as a keep ratio
OFFICIAL_KEEP_RATIO = 0.3
#: a sample's vtr_ctx entry: per video, the original rows of its decode candidates
DECODE_CANDIDATES = "dycoke_decode_candidates"


def reference_frames(frames: int) -> list[int | None]:
    """Per frame, the frame it is pruned against (None: kept whole, -1: dropped), by the official windows of
    four (see the module docstring)."""
    if frames == 1:
        return [None]
    reference: list[int | None] = [None] * frames
    for i in range(0, frames - 1, 2):  # pairs: the odd frame against the one before it
        reference[i + 1] = i
    for i in range(0, frames - 4, 4):  # the second pass, which stops one window early (official bound)
        reference[i + 2] = i
    if frames % 2:
        reference[-1] = -1  # the pairs never reach it: the official output leaves it out
    return reference


def ttm_similarity(reference: torch.Tensor, frame: torch.Tensor, distance: int) -> torch.Tensor:
    """[tokens]: the cosine of each token of `frame` to the same position of `reference` ([tokens, hidden] each),
    as the official code computes it, in the features' dtype: its pair pass (`distance` 1) normalises both frames
    and takes `cosine_similarity` of the unit vectors, its second pass (2) takes it of the raw features."""
    if distance == 1:
        reference, frame = F.normalize(reference, p=2, dim=1), F.normalize(frame, p=2, dim=1)
    return F.cosine_similarity(reference, frame, dim=1)


def ttm(features: torch.Tensor, ratio: float) -> torch.Tensor:
    """The flat indices (frame-major) of the tokens TTM keeps of a video's `features` [frames, tokens, hidden], in
    the order the LLM gets them (see the module docstring)."""
    frames, per_frame = features.shape[:2]
    k = 1 - ratio  # the official dycoke_k
    keep = int((1 - k) * per_frame)
    out = []
    for frame, reference in enumerate(reference_frames(frames)):
        if reference == -1:
            continue
        tokens = torch.arange(per_frame, device=features.device)
        if reference is not None:
            similarity = ttm_similarity(features[reference], features[frame], frame - reference)
            tokens = torch.topk(similarity, keep, largest=False).indices
        out.append(frame * per_frame + tokens)
    return torch.cat(out)


@register_strategy("dycoke")
class DyCoke(VideoReduction):
    positions = "compact"  # TTM's output is spliced into the prompt; no official Qwen-VL port: compact there too

    @classmethod
    def schedule_defaults(cls, config, num_layers: int) -> dict:
        updates = super().schedule_defaults(config, num_layers)
        if config.budget_defaulted:
            updates.update(keep_tokens=None, keep_ratio=OFFICIAL_KEEP_RATIO)
        return updates

    def arrange(self, video: Video, ratio: float, config, ctx) -> Arrangement:
        """TTM's output, its rows' identities recorded in the sample's `vtr_ctx` for `decode_candidates`: the
        video's output tokens but the last (the official decode region)."""
        tokens = ttm(video.features, ratio)
        rows = ctx["original_index"][video.rows.reshape(-1)[tokens]]
        ctx["vtr_ctx"].setdefault(DECODE_CANDIDATES, []).append(rows[:-1])
        out = Arrangement(video)
        out.keep(tokens)
        return out

    def decode_layer(self, config) -> int | None:
        """L, or None when the decode-time pruning is off (dycoke_decode_prune=0: its TTM alone, on any decoder)."""
        return config.dycoke_layer if config.dycoke_decode_prune > 0 else None

    def decode_candidates(self, visual, original_index, sample_ctx) -> torch.Tensor:
        """[batch, len] bool: the final rows whose identity `arrange` recorded."""
        candidates = torch.zeros_like(visual)
        for b, ctx in enumerate(sample_ctx):
            for rows in ctx.get(DECODE_CANDIDATES, []):
                candidates[b] |= torch.isin(original_index[b], rows.to(original_index.device))
        return candidates

    def decode_keep(self, attention, candidates, state, config, query_len: int) -> torch.Tensor | None:
        if query_len != 1:  # the official pruning runs at one-token decode steps only
            return None
        v = attention[:, :, -1, :].mean(dim=1).masked_fill(~candidates, 0.0)  # [batch, kv_len]
        previous = state.get("attention")
        state["attention"] = v
        if previous is None:
            prune = torch.ones(v.shape[0], dtype=torch.bool, device=v.device)
        else:  # the previous step's cache was shorter by this step's tokens (never candidates)
            previous = F.pad(previous, (0, v.shape[1] - previous.shape[1]))
            prune = F.cosine_similarity(v, previous, dim=1) < config.dycoke_gate
        count = torch.floor(candidates.sum(1).double() * (1 - config.dycoke_decode_prune)).long()
        top = select_batch(v, candidates, StageBudget(None, None, 1.0), limit=count)
        return torch.where(prune[:, None], top, candidates)
