# Copied from image/LLaVA/llava/vtr/strategy/evs.py
# Shared vtr file: edit it in image/LLaVA/llava/vtr, then `make fix-copies` updates every fork.
"""EVS (Efficient Video Sampling, as vLLM ships it): drop the video tokens that changed least since the frame before.

As vLLM's `video_prune/evs.py` (`compute_retained_tokens_count`, `compute_retention_mask`), per video, before the
LLM, on the video tokens spliced into the prompt (their input embeddings; on Qwen-VL a "frame" is a temporal
group of 2 input frames). A token's change is 1 - cosine (PyTorch's, eps 1e-8, in the embeddings' dtype) to the
token at the same place of the frame before (the original frame, not what was kept of it); frame 0's tokens get
255, above any change, so it is always kept whole. One budget per video: with q = 1 - ratio (vLLM's
`--video-pruning-rate`) it keeps K = max(tokens per frame, int(T x tokens per frame x (1 - q))) tokens, truncated
in float64 as vLLM does, so ratio 0.1 of 20 x 50 tokens keeps 99. The K largest changes are kept (a stable
descending sort: ties to the earlier frame, then the earlier token), in their original order; later frames
compete for the budget globally, so one may keep every token or none. Nothing is merged.

Positions: vLLM's Qwen-VL ports keep the kept tokens' original M-RoPE ids (`mrope_positions="original"`).
There is no official port to the LLaVA-style families; there the kept tokens are spliced in with contiguous
positions (`positions="compact"`), as pre-LLM methods are on those backbones. Tokens a frame holds off its grid
(LLaVA-Video's row newlines, Video-LLaVA's per-frame CLS) are scored like the others: the newlines, the same
vector in every frame, change least and go first after frame 0's.
"""

import torch

from .registry import register_strategy
from .video import Arrangement, VideoReduction

FIRST_FRAME = 255.0  # vLLM's change of frame 0's tokens: above any 1 - cosine, so frame 0 ranks first


def retained_count(frames: int, per_frame: int, ratio: float) -> int:
    """vLLM's K for a video of `frames` x `per_frame` tokens kept at `ratio` (its pruning rate q = 1 - ratio)."""
    rate = 1.0 - ratio
    return max(per_frame, int(frames * per_frame * (1.0 - rate)))


def retention_mask(features: torch.Tensor, ratio: float) -> torch.Tensor:
    """[frames x tokens] bool (frame-major) of the tokens EVS keeps of `features` [frames, tokens, hidden]."""
    frames, per_frame = features.shape[:2]
    change = 1 - torch.nn.functional.cosine_similarity(features[1:], features[:-1], dim=-1)
    first = torch.full((1, per_frame), FIRST_FRAME, dtype=change.dtype, device=change.device)
    order = torch.argsort(torch.cat([first, change]).reshape(-1), descending=True, stable=True)
    keep = torch.zeros(frames * per_frame, dtype=torch.bool, device=features.device)
    keep[order[: retained_count(frames, per_frame, ratio)]] = True
    return keep


@register_strategy("evs")
class EVS(VideoReduction):
    positions = "compact"
    mrope_positions = "original"

    def arrange(self, video, ratio, config, ctx) -> Arrangement:
        arrangement = Arrangement(video)
        arrangement.keep(retention_mask(video.features, ratio).nonzero().reshape(-1))
        return arrangement
