# Shared vtr file: edit it in image/LLaVA/llava/vtr, then `make fix-copies` updates every fork.
"""dycoke: DyCoke (CVPR'25), token temporal merging before the LLM and dynamic KV-cache pruning while decoding,
as its official code does (github KD-TAO/DyCoke at dd74634).

TTM (`arrange`, before the LLM, on each video's frames as the LLM gets them): the frames go in windows of four
starting at frame 0. With T tokens a frame and the budget's ratio r, a pruned frame keeps int(r x T) tokens: those
least similar (per-position cosine, token j of one frame against token j of the other) to its reference frame,
in ascending order of similarity (the order the LLM then sees them in, renumbered: `positions="compact"`). In a
window [f0, f1, f2, f3]: f0 stays whole, f1 is pruned against f0, f2 against f0, f3 against f2 (the whole f2).
The official code's edges are kept: the last window of the video leaves its f2 whole (the second pass stops one
window early), and an odd frame count drops the last frame entirely. Where the official code raises (fewer than
five frames) the same rule runs without its second pass, and a single frame stays whole. The official k = 0.7
(share of a frame removed) is the budget keep_ratio = 0.3, the default here. Nothing is averaged: the similar
tokens are dropped.

Decode (`decode_layer` / `decode_keep`, the engine's `DecodeHook`): at every decode step of one token, layers
[0, L) attend to the whole cache (L = dycoke_layer, 3); the current token's attention in layer L-1, mean over
heads, over the cached visual rows is v; when cos(v, the previous step's v) < dycoke_gate (0.9; the first step of a
prompt always prunes) layers from L on see only the int(n x (1 - dycoke_decode_prune)) visual rows of largest v (n
visual rows in the sample's cache, 0.8 pruned) and every other row, else the whole cache. Nothing leaves the cache:
a row hidden at one step may be seen at the next.
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
        frames, per_frame = video.shape
        keep = int(ratio * per_frame)
        unit = F.normalize(video.features.float(), dim=-1)
        out = Arrangement(video)
        for frame, reference in enumerate(reference_frames(frames)):
            if reference == -1:
                continue
            tokens = torch.arange(per_frame)
            if reference is not None:
                similarity = (unit[frame] * unit[reference]).sum(-1)
                tokens = torch.sort(similarity.cpu(), stable=True).indices[:keep]
            out.keep(video.flat(frame, tokens))
        return out

    def decode_layer(self, config) -> int:
        return config.dycoke_layer

    def decode_keep(self, attention, visual, state, config, query_len: int) -> torch.Tensor | None:
        if query_len != 1:  # the official pruning runs at one-token decode steps only
            return None
        v = attention[:, :, -1, :].mean(dim=1).masked_fill(~visual, 0.0)  # [batch, kv_len]
        previous = state.get("attention")
        state["attention"] = v
        if previous is None:
            prune = torch.ones(v.shape[0], dtype=torch.bool, device=v.device)
        else:  # the previous step's cache was shorter by this step's tokens (never visual)
            previous = F.pad(previous, (0, v.shape[1] - previous.shape[1]))
            prune = F.cosine_similarity(v, previous, dim=1) < config.dycoke_gate
        count = torch.floor(visual.sum(1).double() * (1 - config.dycoke_decode_prune)).long()
        top = select_batch(v, visual, StageBudget(None, None, 1.0), limit=count)
        return torch.where(prune[:, None], top, visual)
