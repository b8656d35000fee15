# Copied from image/LLaVA/llava/vtr/strategy/holitom.py
# Shared vtr file: edit it in image/LLaVA/llava/vtr, then `make fix-copies` updates every fork.
"""HoliTom (Shao et al., NeurIPS 2025): holistic token merging of videos, before the LLM and inside it.

As the official code (cokeshao/HoliTom @ e9b2972, `holitom/llava_arch.py`, `holitom/modeling_qwen2.py`).

Before the LLM (stage 0, prune layer 0), per video of T frames of N grid tokens, X their input embeddings (the
projected, pooled features) and A their `vision_importance()` (the attention each patch receives in the tower
layer the projector reads, pooled like the features):
- S[t, p] = cos(X[t, p], X[t+1, p]); a window of frames [s, e] is static at p when S[t, p] > holitom_tau for every
  s <= t < e; it saves (e - s) x (its static places) tokens;
- segmentation: the windows covering the frames that save most, by dynamic programming over the frames (window
  lengths tried shortest first; a longer one wins only by saving strictly more);
- the ratio r (the video's budget) becomes r' = min(r T N / (T N - saved), 1), so that about r T N tokens remain;
- a window's static places: their mean over its frames, n_s tokens clustered by DPC-kNN into round(n_s r')
  (Python's round; none if 0) with k = min(holitom_neighbours, clusters), centres in place order, each the
  blend holitom_beta x centre + (1 - beta) x mean of the others nearest it (the centre alone if none);
- every frame's other places (all N of a window of one frame): its ceil(n_d r') of highest A, in place order;
- order: OneVision's `one_token` layout: per window the static tokens, then each frame's; LLaVA-Video's `grid`
  layout: per frame its tokens in place order (the window's static tokens in its first frame) with a newline
  after each row that kept a token; the reduced video is spliced into the prompt (`positions="compact"`).
Inside the LLM (stage 1, prune layer K = `holitom_layer`, default 18 of 28 layers), once, in the prefill:
- the visual tokens (OneVision's newline included) ranked by the attention the last prompt token pays them in
  layer K-1 (heads averaged); the round(Lv (1 - holitom_inner_ratio)) best stay;
- every other one, in sequence order, is averaged into the kept one most similar to it (cosine of the states
  entering layer K, computed once): target = (target + token) / 2, so the later ones weigh more;
- layers before K keep every token in their cache; the kept tokens keep their positions (the merge leaves gaps,
  `stage_positions`), decode continues the pre-LLM numbering.

Deterministic where the official code is not: ties of top-k and of the densities go to the earlier token (the
official code adds U[0, 1) x 1e-6 of torch.rand to the densities), ties of the similarity to the better-attended
kept token.
"""

from __future__ import annotations

import math

import torch

from .registry import register_strategy
from .video import Arrangement, Video, VideoReduction

OFFICIAL_LAYER = (18, 28)  # the inner merge's layer in the official scripts, of the 7B decoder's layers


def inner_layer(config, num_layers: int) -> int:
    """The decoder layer of the inner merge: `holitom_layer`, else the official 18 of 28 at the same depth."""
    if config.holitom_layer is not None:
        return config.holitom_layer
    return min(num_layers - 1, max(1, round(num_layers * OFFICIAL_LAYER[0] / OFFICIAL_LAYER[1])))


def static_windows(similar: torch.Tensor) -> tuple[list[tuple[int, int]], float]:
    """The official segmentation of T frames from `similar` [T-1, N] bool (place p alike in frames t and t+1):
    (windows [(first, last)] covering the frames in order, tokens saved)."""
    frames = similar.shape[0] + 1
    saved = [[0.0] * frames for _ in range(frames)]  # saved[s][e]: (e - s) x places static over [s, e]
    for s in range(frames - 1):
        static = torch.cumprod(similar[s:].long(), dim=0).sum(1).tolist()
        for length, count in enumerate(static, start=1):
            saved[s][s + length] = float(length * count)
    best, start = [0.0] * frames, [0] * frames
    for i in range(frames):
        best[i], start[i] = (best[i - 1] if i else 0.0), i
        for first in range(i - 1, -1, -1):  # windows [first, i], shortest first
            value = (best[first - 1] if first else 0.0) + saved[first][i]
            if value > best[i]:
                best[i], start[i] = value, first
    windows, i = [], frames - 1
    while i >= 0:
        windows.append((start[i], i))
        i = start[i] - 1
    return windows[::-1], best[-1]


def density_peaks(x: torch.Tensor, count: int, neighbours: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HoliTom's DPC-kNN on x [n, d]: (centres [count] ascending, cluster [n]: the centre (index into centres)
    each row joins, its nearest by distance; a centre its own). Distances are Euclidean / sqrt(d); density =
    exp(-mean squared distance to the `neighbours` nearest rows, itself included); of equal densities the earlier
    row counts as the denser."""
    n, width = x.shape
    distance = torch.cdist(x.float(), x.float()) / math.sqrt(width)
    density = torch.exp(-(distance.topk(neighbours, dim=1, largest=False).values ** 2).mean(1))
    index = torch.arange(n, device=x.device)
    denser = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (index[None, :] < index[:, None])
    )  # [i, j]: j is denser than i
    to_denser = distance.masked_fill(~denser, float("inf")).amin(1).clamp_max(distance.max())
    score = to_denser * density
    centres = torch.sort(torch.sort(score, descending=True, stable=True).indices[:count]).values
    cluster = distance[:, centres].argmin(1)
    cluster[centres] = torch.arange(count, device=x.device)
    return centres, cluster


def top_in_order(values: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` largest `values` (ties: the earlier), ascending."""
    return torch.sort(torch.sort(values, descending=True, stable=True).indices[:count]).values


@register_strategy("holitom")
class HoliTom(VideoReduction):
    needs_vision_attention = True
    requires = ("frames", "visual_grid", "vision_importance")
    positions = "compact"
    earlier_cache = "keep"

    @classmethod
    def schedule_defaults(cls, config, num_layers: int) -> dict:
        inner = config.holitom_inner_ratio > 0
        layers = [0, inner_layer(config, num_layers)] if inner else [0]
        given = layers if config.prune_layer_defaulted else config.prune_layers
        if given[0] != 0 or len(given) != len(layers) or (inner and config.holitom_layer not in (None, given[-1])):
            raise ValueError(
                "holitom reduces before the LLM (prune layer 0)"
                + (" and merges inside it at a second prune layer (holitom_layer)" if inner else "")
                + f": with holitom_inner_ratio={config.holitom_inner_ratio} and holitom_layer={config.holitom_layer}"
                f" give prune_layer={layers if inner else 0} or leave it unset; got {config.prune_layer}"
            )
        updates = {"prune_layer": given} if config.prune_layer_defaulted else {}
        share = 1 - config.holitom_inner_ratio  # what the inner merge keeps
        ratio = config.keep_ratio
        lists = [b for b in (config.keep_tokens, config.score_threshold, ratio) if isinstance(b, list)]
        if lists and (lists != [ratio] or len(ratio) != len(given) or ratio[1:] != [share][: len(ratio) - 1]):
            raise ValueError(
                "holitom takes one budget, the video's (keep_ratio or keep_tokens); its inner merge keeps "
                "1 - holitom_inner_ratio of the visual tokens"
            )
        if inner and not lists and ratio is not None and config.keep_tokens is None:
            updates["keep_ratio"] = [ratio, share]  # what each stage keeps, as the record says
        return updates

    # ------------------------------------------------------------------ stage 0: before the LLM

    def compute_scores(self, attention, image_token_range, config, **ctx):
        if ctx["stage"] == 1:
            return self.inner_scores(attention, image_token_range, config, ctx)
        return super().compute_scores(attention, image_token_range, config, **ctx)

    @classmethod
    def stage_needs_attention(cls, stage: int, config) -> bool:
        return stage > 0  # the inner merge reads layer K-1's attention; the pre-LLM stage none

    def stage_positions(self, stage: int, positions: str, config) -> str:
        """Officially the pre-LLM splice renumbers and the inner merge keeps the kept tokens' positions (gaps)."""
        official = config.positions is None and config.convention == "official"
        return "original" if stage > 0 and official else positions

    def arrange(self, video: Video, ratio: float, config, ctx) -> Arrangement:
        on = (video.grid[0, :, 0] >= 0).nonzero().reshape(-1).cpu()  # a frame's grid tokens, in raster order
        features = video.features[:, on.to(video.features.device)].float()  # [T, N, hidden]
        visual = video.visual[:, on.to(video.visual.device)]
        importance = ctx["vision_importance"]().to(visual.device)[visual].float().cpu()  # [T, N]
        frames, places = features.shape[:2]
        alike = torch.nn.functional.cosine_similarity(features[:-1], features[1:], dim=-1)
        similar = (alike > config.holitom_tau).cpu()  # [T-1, N]
        windows, saved = static_windows(similar)
        ratio = min(ratio / ((frames * places - saved) / (frames * places)), 1)
        newlines = self.row_newlines(video, on)
        width = int(video.grid[0, on.to(video.grid.device), 1].max()) + 1
        # tokens off the grid that close no row (Video-LLaVA's CLS row of each frame): kept, first in their frame
        opening = ((video.grid[0, :, 0] < 0) & (video.newline_of() < 0)).nonzero().reshape(-1).tolist()
        out = Arrangement(video)
        for first, last in windows:
            static = similar[first:last].all(0) if last > first else torch.zeros(places, dtype=torch.bool)
            merged = self.static_tokens(video, on, features, first, last, static, ratio, config)
            for t in range(first, last + 1):
                if opening:
                    out.keep([video.flat(t, j) for j in opening], t)
                dynamic = (~static).nonzero().reshape(-1)
                kept = dynamic[top_in_order(importance[t, dynamic], math.ceil(dynamic.numel() * ratio))]
                tokens = [(int(p), video.flat(t, int(on[p])), None) for p in kept]
                if newlines is None:  # OneVision: the window's static tokens, then each frame's
                    if t == first and merged:
                        out.merge(torch.stack([w for _, _, w in merged]), [r for _, r, _ in merged], first)
                    out.keep([flat for _, flat, _ in tokens], t)
                else:  # LLaVA-Video: by place in the frame, a newline closing every row that kept a token
                    self.grid_frame(out, video, t, tokens + (merged if t == first else []), newlines, width)
        return out

    @staticmethod
    def static_tokens(video, on, features, first, last, static, ratio, config) -> list:
        """[(place, representative, weights)] of the window's static tokens in place order: a centre's blend of
        its mean over the window and its cluster's (mix weights over the video's flat tokens)."""
        places = static.nonzero().reshape(-1)
        count = round(places.numel() * ratio)
        if count == 0:
            return []
        means = features[first : last + 1, places.to(features.device)].mean(0)
        centres, cluster = density_peaks(means, count, min(config.holitom_neighbours, count))
        centres, cluster = centres.cpu(), cluster.cpu()
        frames = torch.arange(first, last + 1)
        span = last - first + 1

        def spread(place_weights: torch.Tensor) -> torch.Tensor:  # a mean over the window's frames, per place
            weights = torch.zeros(video.rows.numel())
            for p, w in zip(places.tolist(), place_weights.tolist()):
                if w:
                    weights[video.flat(frames, int(on[p]))] += w / span
            return weights

        out = []
        for c, centre in enumerate(centres.tolist()):
            members = (cluster == c) & (torch.arange(places.numel()) != centre)
            place_weights = torch.zeros(places.numel())
            if members.any():
                place_weights[members] = (1 - config.holitom_beta) / int(members.sum())
                place_weights[centre] = config.holitom_beta
            else:
                place_weights[centre] = 1.0
            out.append((int(places[centre]), video.flat(first, int(on[places[centre]])), spread(place_weights)))
        return out

    @staticmethod
    def row_newlines(video: Video, on: torch.Tensor) -> dict | None:
        """{grid row: the layout index of the newline closing it} in LLaVA-Video's `grid` layout; None for a layout
        without newlines in its frames (OneVision's `one_token`). Other layouts have no official order."""
        closes = video.newline_of()
        where = (closes >= 0).nonzero().reshape(-1)
        if where.numel() == 0:
            return None
        rows = sorted(set(video.grid[0, on.to(video.grid.device), 0].tolist()))
        if sorted(closes[where].tolist()) != rows:
            raise ValueError(
                "holitom orders a video's tokens as the official code does in OneVision's one_token layout and "
                "LLaVA-Video's grid layout only (a newline after the whole video, or after each row of each frame)"
            )
        return {int(closes[j]): int(j) for j in where}

    @staticmethod
    def grid_frame(out: Arrangement, video: Video, frame: int, tokens: list, newlines: dict, width: int) -> None:
        """Frame `frame`'s output in the grid layout: `tokens` [(place, flat, weights or None)] in place order
        (rows of `width` places), each row's followed by its newline."""
        tokens = sorted(tokens, key=lambda item: item[0])
        kept = []  # a run of tokens kept as they are, handed over at once
        for i, (place, flat, weights) in enumerate(tokens):
            if weights is None:
                kept.append(flat)
            else:
                if kept:
                    out.keep(kept, frame)
                    kept = []
                out.merge(weights[None], [flat], frame)
            row = place // width
            if i + 1 == len(tokens) or tokens[i + 1][0] // width != row:
                kept.append(video.flat(frame, newlines[row]))
        if kept:
            out.keep(kept, frame)

    # ------------------------------------------------------------------ stage 1: the merge inside the LLM

    def inner_scores(self, attention, image_token_range, config, ctx) -> torch.Tensor:
        """The kept visual tokens that take no merge score 0, every other one -inf; what merges where is noted
        for `merge_tokens`."""
        if attention is None:
            raise ValueError("holitom's inner merge needs the attention of the layer before its prune layer")
        start, end = image_token_range
        rows = ctx["image_token_indices"]
        if not ctx["vtr_ctx"].get(self.name):  # no video in the prompt: left whole, inside the LLM too
            ctx["vtr_ctx"]["holitom_inner"] = None
            return torch.zeros(end - start, device=rows.device)
        last = attention.shape[-1] - 1
        received = attention[:, :, last, start:end].float().mean(1).reshape(-1)[rows - start]
        count = round(rows.numel() * (1 - config.holitom_inner_ratio))
        ranked = torch.sort(received, descending=True, stable=True).indices
        top, rest = ranked[:count], torch.sort(ranked[count:]).values
        targets = torch.empty_like(rest)
        if count and rest.numel():
            hidden = ctx["hidden_states"][0].float()
            similarity = (
                torch.nn.functional.normalize(hidden[rows[rest]], dim=-1)
                @ torch.nn.functional.normalize(hidden[rows[top]], dim=-1).T
            )
            targets = top[similarity.argmax(1)]  # ties: the better-attended kept token
        ctx["vtr_ctx"]["holitom_inner"] = (rows[targets], rows[rest]) if count else None
        scores = torch.full((end - start,), -float("inf"), device=rows.device)
        scores[rows[top[~torch.isin(top, targets)]] - start] = 0.0
        return scores

    def merge_tokens(self, dropped_hidden, dropped_scores, config, **ctx):
        if ctx["stage"] == 0:
            return super().merge_tokens(dropped_hidden, dropped_scores, config, **ctx)
        plan = ctx["vtr_ctx"].get("holitom_inner")
        if plan is None or plan[0].numel() == 0:
            return None
        targets, rest = plan
        dropped = ctx["dropped_index"]
        column = torch.full((int(dropped.max()) + 1,), -1, dtype=torch.long, device=dropped.device)
        column[dropped] = torch.arange(dropped.numel(), device=dropped.device)
        receivers = torch.unique(targets)  # ascending rows
        mix = torch.zeros(receivers.numel(), dropped.numel(), device=dropped_hidden.device)
        for i, target in enumerate(receivers.tolist()):
            mine = rest[targets == target]  # ascending: (target + token) / 2 in this order
            halves = 0.5 ** torch.arange(mine.numel(), 0, -1, device=mix.device, dtype=mix.dtype)
            mix[i, column[mine]] = halves
            mix[i, column[target]] = 0.5 ** mine.numel()
        merged = (mix @ dropped_hidden.float()).to(dropped_hidden.dtype)
        return merged, column[receivers], receivers, mix
