# Copied from image/LLaVA/llava/vtr/strategy/fastvid.py
# Shared vtr file: edit it in image/LLaVA/llava/vtr, then `make fix-copies` updates every fork.
"""FastVID (Shen et al., NeurIPS 2025): segment the video, keep each frame's salient tokens, merge the rest into
density anchors.

The rules of the official LLaVA-OneVision code (LunarShen/FastVID, `fastvid_llavaonevision`, `Qwen2Model.forward`),
on every backbone, per video, before the LLM, on the video tokens spliced into the prompt (their input embeddings),
T frames of n grid tokens each (on Qwen-VL a frame is a temporal group of 2 input frames). Its side signals come
from SigLIP's pooling head there, which Hugging Face towers lack: the global frame feature here is the mean of the
frame's tokens (as the official Qwen2.5-VL code has it), the saliency the backbone's `vision_importance`.

1. DySeg: a frame's global feature is the mean of its tokens; with s_i the cosine of frames i and i+1, the video is
   cut after the `fastvid_segments` - 1 (c - 1) frames of lowest s_i (ties: the earlier) and after every frame with
   s_i < `fastvid_tau`: contiguous segments, at least c (every frame its own when T <= c).
2. Budgets (Python floors): R = int(n x ratio) per frame; C = int(R x `fastvid_anchor_share`) anchor tokens,
   S = R - C salient ones. A segment of L frames gives its L x C anchors to ceil(L / p) anchor frames (p =
   `fastvid_anchor_stride`): its last frame and every p-th before it, (C x L) // ceil(L / p) each (the remainder
   is lost); its other frames get none.
3. Salient: every frame keeps its S tokens of highest `vision_importance` (ties: the earlier), as they are.
4. Density: over a frame's other n - S tokens (index order), Euclidean distances / sqrt(hidden) in float32;
   rho = exp(-mean squared distance to the 4 nearest, itself included) + 1e-6 U(0, 1) (drawn from `seed`);
   delta = the distance to the nearest denser token (the densest: the frame's largest distance); anchors = the
   frame's k highest delta x rho (ties: the earlier; at most the n - S there are).
5. Merge: a frame whose count is C (a one-frame segment, or a segment where the floor gives C) merges its own n - S
   tokens; a frame with more merges every non-salient token of its segment (other anchor frames' anchors included,
   so a token may join one anchor per anchor frame). Each pool token joins its most cosine-similar anchor (the
   first in score order on ties); an anchor with m members becomes w a + (1 - w) mean(members), w = max(1 / (m +
   1), `fastvid_beta`); the anchors are in the pool (an anchor usually joins itself).
6. The salient and merged tokens enter in their original order, at their original positions (gaps kept; M-RoPE:
   the unpruned ids gathered), as the official code sorts them by index. Tokens a frame holds off its grid are not
   scored: a newline closing a row stays when its row keeps a token (the LLaVA-Video code's rule), any other
   (Video-LLaVA's CLS row) stays.
"""

import math

import torch

from .registry import register_strategy
from .video import Arrangement, VideoReduction

NEIGHBOURS = 4  # the density's k-NN (the official constant)
NOISE = 1e-6  # the density's tie-breaking noise


def segment_sizes(frames: torch.Tensor, cuts: int, tau: float) -> list[int]:
    """DySeg: the lengths of the video's segments, in time order, for per-frame features `frames` [T, hidden]."""
    count = frames.shape[0]
    unit = torch.nn.functional.normalize(frames.float(), dim=-1)
    similarity = (unit[:-1] * unit[1:]).sum(-1)
    lowest = torch.sort(similarity, stable=True).indices[: max(0, cuts)]
    after = set(lowest.tolist()) | set((similarity < tau).nonzero().reshape(-1).tolist())
    bounds = [-1, *sorted(after), count - 1]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def anchor_counts(sizes: list[int], share: int, stride: int) -> list[int]:
    """Per frame, the anchors it holds: a segment of L frames gives (share x L) // ceil(L / stride) to its last
    frame and every stride-th frame before it, none to the others."""
    counts = []
    for length in sizes:
        each = share * length // math.ceil(length / stride)
        counts += [each if (length - 1 - j) % stride == 0 else 0 for j in range(length)]
    return counts


def density_scores(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """DPC-kNN score delta x rho of each token of each frame of `x` [frames, m, hidden] (see the module docstring);
    `noise` [frames, m] is added to the density."""
    distance = torch.cdist(x.float(), x.float()) / math.sqrt(x.shape[-1])
    nearest = distance.topk(min(NEIGHBOURS, x.shape[1]), dim=-1, largest=False).values
    density = torch.exp(-(nearest**2).mean(-1)) + noise
    denser = density[:, None, :] > density[:, :, None]  # [frame, i, j]: j is denser than i
    to_denser = distance.masked_fill(~denser, float("inf")).amin(-1)
    return torch.minimum(to_denser, distance.flatten(1).amax(-1, keepdim=True)) * density


def off_grid_kept(video, kept: torch.Tensor) -> torch.Tensor:
    """Flat indices of the frames' tokens off their grid that stay, given the `kept` grid tokens (flat): a newline
    closing a row when that row of its frame keeps a token, any other always."""
    frames, width = video.shape
    closes = video.newline_of().tolist()
    rows = video.grid[..., 0].reshape(-1).tolist()
    kept_rows = {(k // width, rows[k]) for k in kept.tolist()}
    off = [j for j in range(width) if video.grid[0, j, 0] < 0]
    stay = [t * width + j for t in range(frames) for j in off if closes[j] < 0 or (t, closes[j]) in kept_rows]
    return torch.tensor(stay, dtype=torch.long)


def merge_into(anchors: torch.Tensor, pool: torch.Tensor, unit: torch.Tensor, beta: float) -> torch.Tensor:
    """[anchors, count] weights: each anchor (flat index) with the pool tokens (flat indices) most cosine-similar
    to it (the first anchor on ties), w x anchor + (1 - w) x their mean, w = max(1 / (members + 1), beta). `unit`
    [count, hidden]: the video's tokens L2-normalised."""
    joins = (unit[pool] @ unit[anchors].T).argmax(1).cpu()
    members = torch.bincount(joins, minlength=anchors.numel()).float()
    w = (1 / (members + 1)).clamp(min=beta)
    weights = torch.zeros(anchors.numel(), unit.shape[0])
    weights.index_put_((joins, pool.cpu()), ((1 - w) / members.clamp(min=1))[joins], accumulate=True)
    weights[torch.arange(anchors.numel()), anchors.cpu()] += w
    return weights


def one_hot(tokens: torch.Tensor, count: int) -> torch.Tensor:
    """[m, count] weights of tokens `tokens` ([m] flat indices) kept as they are."""
    weights = torch.zeros(tokens.numel(), count)
    weights[torch.arange(tokens.numel()), tokens.cpu()] = 1.0
    return weights


@register_strategy("fastvid")
class FastVID(VideoReduction):
    positions = "original"
    mrope_positions = "original"
    needs_vision_attention = True
    requires = ("frames", "visual_grid", "vision_importance")

    def arrange(self, video, ratio, config, ctx) -> Arrangement:
        frames, width = video.shape
        device = video.features.device
        cells = (video.grid[0, :, 0] >= 0).nonzero().reshape(-1).to(device)
        features = video.features[:, cells]  # [T, n, hidden]
        cuts = min(config.fastvid_segments, frames) - 1
        sizes = segment_sizes(features.float().mean(1), cuts, config.fastvid_tau)
        retain = int(cells.numel() * ratio)
        share = int(retain * config.fastvid_anchor_share)
        counts = anchor_counts(sizes, share, config.fastvid_anchor_stride)

        importance = ctx["vision_importance"]().float().to(device)[video.visual.to(device)[:, cells]]
        order = torch.sort(importance, dim=1, descending=True, stable=True).indices
        rest = torch.sort(order[:, retain - share :], dim=1).values  # [T, n - S], index order
        noise = torch.rand(rest.shape, generator=torch.Generator().manual_seed(config.seed)) * NOISE
        picked = torch.gather(features, 1, rest[..., None].expand(-1, -1, features.shape[-1]))
        ranked = torch.sort(density_scores(picked, noise.to(device)), dim=1, descending=True, stable=True).indices

        along = torch.arange(frames, device=device)[:, None]
        salient = video.flat(along, cells[order[:, : retain - share]]).reshape(-1)
        rest = video.flat(along, cells[rest])  # flat indices
        count = frames * width
        unit = torch.nn.functional.normalize(video.features.reshape(count, -1).float(), dim=-1)
        blocks, representatives, start = [one_hot(salient, count)], [salient.cpu()], 0
        for length in sizes:
            for t in range(start, start + length):
                if counts[t] == 0:
                    continue
                anchors = rest[t, ranked[t, : counts[t]]]
                pool = rest[t] if counts[t] == share else rest[start : start + length].reshape(-1)
                blocks.append(merge_into(anchors, pool, unit, config.fastvid_beta))
                representatives.append(anchors.cpu())
            start += length
        extra = off_grid_kept(video, torch.cat(representatives))
        blocks.append(one_hot(extra, count))
        representatives = torch.cat([*representatives, extra])
        order = torch.argsort(representatives)
        arrangement = Arrangement(video)
        arrangement.merge(torch.cat(blocks)[order], representatives[order], representatives[order] // width)
        return arrangement
