# Copied from image/LLaVA/llava/vtr/strategy/fastvid.py
# Shared vtr file: edit it in image/LLaVA/llava/vtr, then `make fix-copies` updates every fork.
"""FastVID (Shen et al., NeurIPS 2025): segment the video, keep each frame's salient tokens, merge the rest into
density anchors.

Per video, before the LLM, on the video tokens spliced into the prompt (their input embeddings), T frames of n grid
tokens each (on Qwen-VL a frame is a temporal group of 2 input frames). The official code (LunarShen/FastVID) is
three trees with different rules; a video follows the tree of the backbone it runs on (`official_tree`):
LLaVA-Video's (`fastvid_llavavideo`) when its frames close every row with a newline (LLaVA-Video's `grid`
layout), Qwen2.5-VL's (`fastvid_qwen25vl`) on an M-RoPE backbone, LLaVA-OneVision's (`fastvid_llavaonevision`)
elsewhere (OneVision, Video-LLaVA, InternVL). Their side signals come from SigLIP's pooling head (LLaVA) or the
last ViT block (Qwen2.5-VL), which Hugging Face towers do not give: the global frame feature here is the mean of
the frame's tokens (as the official Qwen2.5-VL code has it), the saliency the backbone's `vision_importance`.

1. DySeg: with s_i the cosine of the global features of frames i and i + 1, the video is cut after the
   `fastvid_segments` - 1 (c - 1) frames of lowest s_i (ties: the earlier) and after every frame with s_i <
   `fastvid_tau` (0.9 in the LLaVA scripts; the Qwen2.5-VL script uses 0.84): contiguous segments, at least c
   (every frame its own when T <= c).
2. Budgets (Python floors; R = int(n x ratio) per frame, d = `fastvid_anchor_share`, p = `fastvid_anchor_stride`):
   - OneVision: per frame C = int(R x d) anchors, S = R - C salient. A segment of L frames gives its L x C anchors
     to ceil(L / p) anchor frames, its last frame and every p-th before it, (C x L) // ceil(L / p) each (the
     remainder is lost); its other frames get none.
   - LLaVA-Video: per segment, A = int(R x L x d) anchors and R x L - A salient. One frame takes both; else the
     salient tokens are spread over the L frames and the anchors over ceil(L / p) slots, evenly with the
     remainder to the first (frames; slots), slot q on frame L - 1 - q x p.
   - Qwen2.5-VL: A = max(int(R x L x d), 1). A segment of several frames is cut again where consecutive frames
     are less than `SAME_SCENE` (0.95) similar; its V sub-runs share its budget as LLaVA-Video's L frames do,
     each sub-run's share going to its last frame (its other frames get nothing and only feed the merge),
     anchors capped at n // 2 a frame and salient tokens at n minus its anchors (the excess is lost).
3. Salient: every frame keeps its tokens of highest `vision_importance` (ties: the earlier), as they are.
4. Density: over a frame's other tokens (index order), Euclidean distances / sqrt(hidden) in float32;
   rho = exp(-mean squared distance to the 4 nearest, itself included) + 1e-6 U(0, 1) (drawn from `seed`);
   delta = the distance to the nearest denser token (the densest: the frame's largest distance); anchors = the
   frame's k highest delta x rho (ties: the earlier; at most the tokens it has): in score order on OneVision,
   index order on the others.
5. Merge: each pool token joins its most cosine-similar anchor (the first on ties); an anchor with m members
   becomes w a + (1 - w) mean(members), w = max(1 / (m + 1), `fastvid_beta`). The pools, per anchor frame:
   - OneVision: a frame whose count is C (a one-frame segment, or a segment where the floor gives C) merges its own
     non-salient tokens; one with more every non-salient token of its segment. The anchors are in the pool (an
     anchor usually joins itself), so a token may join one anchor per anchor frame.
   - LLaVA-Video, Qwen2.5-VL: every non-salient token of the segment but the frame's own anchors (an anchor left
     alone stays as it is; other anchor frames' anchors are in the pool).
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
SAME_SCENE = 0.95  # Qwen2.5-VL tree: consecutive frames at least this similar form a sub-run (`fastvid_DySeg_ignore`)


def official_tree(video, ctx) -> str:
    """The official tree whose rules `video` follows: "llava_video" when a newline closes every row of its frames
    (LLaVA-Video's `grid` layout), "qwen2_5_vl" on an M-RoPE backbone (`position_ids` [seq, 3]), else
    "onevision"."""
    rows = video.grid[0, :, 0]
    if rows.max() >= 0 and bool(torch.isin(rows[rows >= 0], video.newline_of()).all()):
        return "llava_video"
    return "qwen2_5_vl" if ctx["position_ids"].ndim == 2 else "onevision"


def lengths_between(cuts, count: int) -> list[int]:
    """The lengths of the runs of `count` frames cut after each frame in `cuts`, in time order."""
    bounds = [-1, *sorted(cuts), count - 1]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def segment_sizes(similarity: torch.Tensor, cuts: int, tau: float) -> list[int]:
    """DySeg: the lengths of the video's segments, in time order, given the `similarity` [T - 1] of its adjacent
    frames."""
    lowest = torch.sort(similarity, stable=True).indices[: max(0, cuts)]
    after = set(lowest.tolist()) | set((similarity < tau).nonzero().reshape(-1).tolist())
    return lengths_between(after, similarity.numel() + 1)


def spread(total: int, parts: int) -> list[int]:
    """`total` split into `parts` as evenly as it goes, the remainder one each to the first."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def split_segment(salient: int, anchors: int, slots: int, stride: int) -> tuple[list[int], list[int]]:
    """A segment's salient and anchor budgets over its `slots` (frames or sub-runs) as the LLaVA-Video and
    Qwen2.5-VL trees split them: salient spread over the slots, anchors over ceil(slots / stride) of them, the
    last slot and every stride-th before it (the remainder to the last)."""
    placed = [0] * slots
    for q, count in enumerate(spread(anchors, math.ceil(slots / stride))):
        placed[slots - 1 - q * stride] = count
    return spread(salient, slots), placed


def onevision_budgets(sizes, retain: int, d: float, stride: int, n: int, similarity):
    """Per frame (salient, anchors) counts of the OneVision tree (see the module docstring)."""
    share = int(retain * d)
    anchors = []
    for length in sizes:
        each = share * length // math.ceil(length / stride)
        anchors += [each if (length - 1 - j) % stride == 0 else 0 for j in range(length)]
    return [retain - share] * len(anchors), anchors


def llava_video_budgets(sizes, retain: int, d: float, stride: int, n: int, similarity):
    """Per frame (salient, anchors) counts of the LLaVA-Video tree (see the module docstring)."""
    salient, anchors = [], []
    for length in sizes:
        share = int(retain * length * d)
        more = split_segment(retain * length - share, share, length, stride)
        salient, anchors = salient + more[0], anchors + more[1]
    return salient, anchors


def qwen2_5_vl_budgets(sizes, retain: int, d: float, stride: int, n: int, similarity):
    """Per frame (salient, anchors) counts of the Qwen2.5-VL tree (see the module docstring)."""
    salient, anchors, start = [], [], 0
    for length in sizes:
        share = max(int(retain * length * d), 1)
        if length == 1:
            salient, anchors = salient + [max(retain - share, 0)], anchors + [share]
        else:
            inside = similarity[start : start + length - 1]
            runs = lengths_between((inside < SAME_SCENE).nonzero().reshape(-1).tolist(), length)
            for run, s, a in zip(runs, *split_segment(retain * length - share, share, len(runs), stride)):
                a = min(a, n // 2)
                salient += [0] * (run - 1) + [max(min(s, n - a), 0)]
                anchors += [0] * (run - 1) + [a]
        start += length
    return salient, anchors


BUDGETS = {"onevision": onevision_budgets, "llava_video": llava_video_budgets, "qwen2_5_vl": qwen2_5_vl_budgets}


def density_scores(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """DPC-kNN score delta x rho of each token of `x` [m, hidden] (see the module docstring); `noise` [m] is added
    to the density."""
    distance = torch.cdist(x.float(), x.float()) / math.sqrt(x.shape[-1])
    nearest = distance.topk(min(NEIGHBOURS, x.shape[0]), dim=-1, largest=False).values
    density = torch.exp(-(nearest**2).mean(-1)) + noise
    denser = density[None, :] > density[:, None]  # [i, j]: j is denser than i
    to_denser = distance.masked_fill(~denser, float("inf")).amin(-1)
    return torch.minimum(to_denser, distance.max()) * density


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
        tree = official_tree(video, ctx) if config.fastvid_tree == "auto" else config.fastvid_tree
        frames, width = video.shape
        device = video.features.device
        cells = (video.grid[0, :, 0] >= 0).nonzero().reshape(-1).to(device)
        features = video.features[:, cells]  # [T, n, hidden]
        means = torch.nn.functional.normalize(features.float().mean(1), dim=-1)
        similarity = (means[:-1] * means[1:]).sum(-1)
        sizes = segment_sizes(similarity, min(config.fastvid_segments, frames) - 1, config.fastvid_tau)
        n, stride = cells.numel(), config.fastvid_anchor_stride
        retain = int(n * ratio)
        salient, anchors = BUDGETS[tree](sizes, retain, config.fastvid_anchor_share, stride, n, similarity.cpu())

        importance = ctx["vision_importance"]().float().to(device)[video.visual.to(device)[:, cells]]
        order = torch.sort(importance, dim=1, descending=True, stable=True).indices
        noise = torch.rand((frames, n), generator=torch.Generator().manual_seed(config.seed)) * NOISE
        chosen = [video.flat(t, cells[order[t, : salient[t]]]) for t in range(frames)]
        rest = [video.flat(t, cells[torch.sort(order[t, salient[t] :]).values]) for t in range(frames)]
        count = frames * width
        states = video.features.reshape(count, -1)
        normed = torch.nn.functional.normalize(states.float(), dim=-1)
        kept = torch.cat(chosen).cpu()
        blocks, representatives, start = [one_hot(kept, count)], [kept], 0
        for length in sizes:
            segment = range(start, start + length)
            for t in (t for t in segment if anchors[t] and rest[t].numel()):
                scores = density_scores(states[rest[t]], noise[t, : rest[t].numel()].to(device))
                mine = rest[t][torch.sort(scores, descending=True, stable=True).indices[: anchors[t]]]
                pool = torch.cat([rest[u] for u in segment])
                if tree != "onevision":
                    mine = torch.sort(mine).values
                    pool = pool[~torch.isin(pool, mine)]
                elif anchors[t] == retain - salient[t]:  # a OneVision frame whose count is C (= R - S): its own tokens
                    pool = rest[t]
                blocks.append(merge_into(mine, pool, normed, config.fastvid_beta))
                representatives.append(mine.cpu())
            start += length
        extra = off_grid_kept(video, torch.cat(representatives))
        blocks.append(one_hot(extra, count))
        representatives = torch.cat([*representatives, extra])
        order = torch.argsort(representatives)
        arrangement = Arrangement(video)
        arrangement.merge(torch.cat(blocks)[order], representatives[order], representatives[order] // width)
        return arrangement
