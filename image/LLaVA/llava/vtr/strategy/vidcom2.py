# Shared vtr file: edit it in image/LLaVA/llava/vtr, then `make fix-copies` updates every fork.
"""VidCom2 (Liu et al., EMNLP 2025): per-frame budgets by frame uniqueness, then each frame's least redundant tokens.

As the official code (xuyang-liu16/VidCom2, `token_compressor/vidcom2/vidcom2.py`), per video, before the LLM, on
the video tokens spliced into the prompt (their input embeddings, in their dtype: the official code casts
nothing), T frames of N tokens each (on Qwen-VL a frame is a temporal group of 2 input frames):

1. channels: the int(D x 0.5) with the lowest population variance over the video's T x N tokens;
2. each token L2-normalised over them (x); the video centre g and each frame's centre f_t are plain means;
3. K(d2) = sum over a in 1/8, 1/4, 1/2, 1, 2 of exp(-d2 / 2a); s_v = K(|x - g|^2), s_f = K(|x - f_t|^2);
4. frame uniqueness u_t = -mean_i s_v; p = softmax((u - max u) / 0.01);
   scale_t = min(1, ratio x (1 + p_t - mean p)); k_t = max(1, round(scale_t x N)), half to even;
5. frame t keeps its k_t tokens of smallest s_v + s_f, in their original order: the official call
   `torch.topk(s_v + s_f, k_t, largest=False, sorted=False)` on the frame, its indices sorted; a tie at the k_t-th
   score (likely in fp16/bf16, or with repeated tokens) goes as that call breaks it on the features' device.

The kept count is the sum of the k_t, not forced to ratio x T x N. Nothing is merged. Tokens a frame holds off its
grid are not scored and always kept: those closing a row or the frame (LLaVA-Video's row newlines) move after the
frame's kept tokens, as the official LLaVA-Video mapping puts them; those opening it (Video-LLaVA's CLS) stay first.
Positions: the LLaVA code splices the kept tokens in (`positions="compact"`); the Qwen-VL code slices the
unpruned M-RoPE ids (`mrope_positions="original"`).
"""

import torch

from .registry import register_strategy
from .video import Arrangement, VideoReduction

CHANNEL_SHARE = 0.5
BANDWIDTHS = (0.125, 0.25, 0.5, 1.0, 2.0)
TEMPERATURE = 0.01


def _similarity(x: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """The multi-scale Gaussian similarity of each token of `x` [..., k] to `centre`."""
    distance = ((x - centre) ** 2).sum(-1)
    return sum(torch.exp(-distance / (2 * a)) for a in BANDWIDTHS)


def frame_picks(features: torch.Tensor, ratio: float) -> list[torch.Tensor]:
    """Per frame of `features` [frames, tokens, hidden]: the ascending indices of the tokens VidCom2 keeps."""
    frames, per_frame, hidden = features.shape
    flat = features.reshape(frames * per_frame, hidden)
    channels = torch.topk(flat.var(0, unbiased=False), int(hidden * CHANNEL_SHARE), largest=False).indices
    x = torch.nn.functional.normalize(flat[:, channels].reshape(frames, per_frame, -1), dim=-1)
    to_video = _similarity(x, x.mean((0, 1), keepdim=True))
    to_frame = _similarity(x, x.mean(1, keepdim=True))
    uniqueness = -to_video.mean(-1)
    p = torch.softmax((uniqueness - uniqueness.max()) / TEMPERATURE, dim=0)
    counts = (ratio * (1 + p - p.mean())).clamp(max=1.0) * per_frame
    counts = counts.round().long().clamp(min=1).tolist()
    redundancy = to_video + to_frame
    return [
        torch.topk(redundancy[t], k, largest=False, sorted=False).indices.sort().values for t, k in enumerate(counts)
    ]


@register_strategy("vidcom2")
class VidCom2(VideoReduction):
    positions = "compact"
    mrope_positions = "original"

    def arrange(self, video, ratio, config, ctx) -> Arrangement:
        on_grid = video.grid[0, :, 0] >= 0
        closing = video.newline_of() >= 0  # off the grid, after a row: moved after the frame's kept tokens
        tokens, after = on_grid.nonzero().reshape(-1), closing.nonzero().reshape(-1)
        opening = (~on_grid & ~closing).nonzero().reshape(-1)
        arrangement = Arrangement(video)
        for t, picks in enumerate(frame_picks(video.features[:, tokens], ratio)):
            arrangement.keep(video.flat(t, torch.cat([opening, tokens[picks], after])))
        return arrangement
