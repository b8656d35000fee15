# Shared vtr file: edit it in image/LLaVA/llava/vtr, then `make fix-copies` updates every fork.
"""The shared part of the video methods (FastVID, HoliTom, VidCom2, DyCoke, EVS, FrameFusion): a sample's videos as
frames x tokens, the budget as a retention ratio, and the arrangement a method returns.

A video method runs on families that give the `frames` fact (`requires`); the matrix shows it "video only". It
reduces the tokens of video frames only: images, and tokens of no frame (OneVision's one newline after a video),
are kept as they are, and a prompt without a video is left whole (with a warning). Its budget is the share of the
video tokens it keeps: `keep_ratio` as given, `keep_tokens` as keep_tokens / video tokens; the method rounds per
frame or segment as its official code does, so the count kept is the official one for that ratio, not exactly
keep_tokens. A score threshold is refused.

A method describes its output per video as an `Arrangement`: the tokens that enter the LLM in their order, each a
mix of the video's tokens (a token kept as it is: weight 1 on itself), with a representative (whose position and
identity the output token takes) and the frame whose place it takes. `VideoReduction` turns that into the engine's
terms: output tokens that are the tokens themselves in prompt order stay kept; every other one (a merged token, or a
token moved out of prompt order, as DyCoke and HoliTom order them) is inserted through `merge_tokens` right where it
goes, so the LLM sees the official order, and `positions` (compact: renumbered; original: the representative's)
gives the official positions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .base import MarkedSelection

logger = logging.getLogger(__name__)
_WARNED: set[str] = set()  # methods that said once that a prompt without a video is left whole


@dataclass
class Video:
    """One video of a sample, at a prune stage: its frames' tokens in layout order (frame-major)."""

    rows: torch.Tensor  # [frames, tokens] long: each token's row in the current sequence
    visual: torch.Tensor  # [frames, tokens] long: its index among the sample's visual tokens (per-token facts' rows)
    features: torch.Tensor  # [frames, tokens, hidden]: its states at the stage (before the LLM: input embeddings)
    grid: torch.Tensor  # [frames, tokens, 2] long: (row, col) in its frame; (-1, -1) for a newline or CLS row

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.rows.shape)

    def flat(self, frame, token):
        """The flat index (frame-major) of `token` of `frame`, as an `Arrangement` takes it."""
        return frame * self.rows.shape[1] + token

    def newline_of(self) -> torch.Tensor:
        """[tokens] long: for each token of a frame's layout, the grid row a newline token closes (the row of the
        token before it), -1 for a token on the grid or a newline opening the frame (row order as in layout)."""
        row = self.grid[0, :, 0]
        closes = torch.full_like(row, -1)
        last = -1
        for j, r in enumerate(row.tolist()):
            if r >= 0:
                last = r
            else:
                closes[j] = last
        return closes


def retention(method, config, stage: int, video_tokens: int) -> float:
    """The share of a sample's `video_tokens` that `method` keeps at `stage` (see the module docstring):
    keep_ratio as given, keep_tokens / video tokens; a score threshold is refused."""
    budget = config.stage_budget(stage)
    if budget.keep_tokens is not None:
        return min(1.0, budget.keep_tokens / video_tokens) if video_tokens else 1.0
    if budget.score_threshold is not None:
        raise method.count_error()
    return budget.keep_ratio


def left_whole(name: str) -> None:
    """Say once per method that a prompt without a video is left whole by it."""
    if name not in _WARNED:
        _WARNED.add(name)
        logger.warning("%s reduces video tokens only: a prompt without a video is left whole", name)


def sample_videos(ctx) -> list[Video]:
    """The videos of the sample at this stage (`frames()`, `visual_grid()`, `hidden_states`), in prompt order."""
    frames = ctx["frames"]().to(ctx["image_token_indices"].device)
    grid = ctx["visual_grid"]().to(frames.device)
    rows = ctx["image_token_indices"]
    hidden = ctx["hidden_states"][0]
    videos = []
    for v in torch.unique(frames[:, 0]).tolist():
        if v < 0:
            continue
        mine = (frames[:, 0] == v).nonzero().reshape(-1)
        count = int(frames[mine, 1].max()) + 1
        per_frame = mine.numel() // count
        order = mine[torch.sort(frames[mine, 1], stable=True).indices]
        if per_frame * count != mine.numel() or not torch.equal(
            frames[order, 1], torch.arange(count, device=frames.device).repeat_interleave(per_frame)
        ):
            raise ValueError(f"video {v}: its frames do not all hold the same number of tokens ({mine.numel()} tokens)")
        visual = order.reshape(count, per_frame)
        on = grid[visual, 0] >= 0
        yx = torch.where(on[..., None], grid[visual, 1:], -1)
        videos.append(Video(rows[visual], visual, hidden[rows[visual]], yx))
    return videos


def sparse(indices: torch.Tensor, values: torch.Tensor, size: tuple) -> torch.Tensor:
    """A sparse COO [size] tensor of `values` at `indices` [2, nnz] (built from valid indices: no invariant check)."""
    return torch.sparse_coo_tensor(indices, values, size, check_invariants=False)


class Arrangement:
    """The tokens one video hands the LLM, in order (see the module docstring). Indices are flat, frame-major
    (`Video.flat`). The mix is kept sparse: a 32-frame video's outputs over its tokens would be 6,272 x 6,272."""

    def __init__(self, video: Video):
        self.video = video
        self.count = video.rows.numel()
        self.outputs = 0
        self.entries: list[torch.Tensor] = []  # [2, nnz] long blocks: (output, source token)
        self.weights: list[torch.Tensor] = []  # [nnz] float32
        self.representative: list[torch.Tensor] = []  # [m] long
        self.frame: list[torch.Tensor] = []  # [m] long

    def keep(self, tokens: torch.Tensor, frame: int | torch.Tensor | None = None) -> None:
        """Tokens `tokens` ([m] flat indices) as they are, in this order; in the place of `frame` (default: their own)."""
        tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1).cpu()
        outputs = torch.arange(tokens.numel())
        frame = tokens // self.video.rows.shape[1] if frame is None else frame
        self._add(outputs, tokens, torch.ones(tokens.numel()), tokens, frame)

    def merge(self, weights: torch.Tensor, representative: torch.Tensor, frame: int | torch.Tensor) -> None:
        """Tokens made of the video's: `weights` [m, count] dense or sparse (each output = weights @ the tokens'
        states), each taking `representative`'s ([m] flat) position and identity, in the place of `frame` (an int
        or [m])."""
        representative = torch.as_tensor(representative, dtype=torch.long).reshape(-1).cpu()
        weights = weights.cpu().float()
        weights = weights.coalesce() if weights.is_sparse else weights.reshape(-1, self.count).to_sparse()
        if weights.shape[0] != representative.numel() or weights.shape[1] != self.count:
            raise ValueError(
                f"{tuple(weights.shape)} merge weights for {representative.numel()} representatives over a video of "
                f"{self.count} tokens"
            )
        (outputs, sources), values = weights.indices(), weights.values()
        self._add(outputs, sources, values, representative, frame)

    def _add(self, outputs, sources, values, representative, frame) -> None:
        frame = torch.as_tensor(frame, dtype=torch.long).reshape(-1).cpu().expand(representative.numel())
        self.entries.append(torch.stack([outputs + self.outputs, sources]))
        self.weights.append(values.float())
        self.representative.append(representative)
        self.frame.append(frame.clone())
        self.outputs += representative.numel()

    def tensors(self):
        """(mix: sparse [m, count] coalesced, representative [m], frame [m]) of the outputs so far, in order."""
        if not self.entries:
            empty = torch.zeros(0, dtype=torch.long)
            return sparse(torch.zeros(2, 0, dtype=torch.long), torch.zeros(0), (0, self.count)), empty, empty
        mix = sparse(torch.cat(self.entries, 1), torch.cat(self.weights), (self.outputs, self.count))
        return mix.coalesce(), torch.cat(self.representative), torch.cat(self.frame)


class VideoReduction(MarkedSelection):
    """A video method that reduces every video of a sample before the LLM (prune_layer=0, one stage): subclasses
    write `arrange(video, ratio, config, ctx) -> Arrangement`."""

    needs_attention = False
    supports_token_merge = True
    token_merge_default = True
    merge_is_method = True
    requires = ("frames", "visual_grid")
    positions = "compact"

    @classmethod
    def schedule_defaults(cls, config, num_layers: int) -> dict:
        if len(config.prune_layers) > 1:
            raise ValueError(f"{cls.name} runs at one prune stage; got prune_layer={config.prune_layer}")
        return {"prune_layer": 0} if config.prune_layer_defaulted else {}

    def arrange(self, video: Video, ratio: float, config, ctx) -> Arrangement:
        raise NotImplementedError

    def compute_scores(self, attention, image_token_range, config, **ctx):
        if not config.conventions().token_merge:
            raise ValueError(
                f"{self.name} hands the LLM its own arrangement of the video: it cannot run with token_merge=False"
            )
        start, end = image_token_range
        rows = ctx["image_token_indices"]
        scores = torch.full((end - start,), -float("inf"), device=rows.device)
        scores[rows - start] = 0.0  # images and tokens of no frame: kept
        videos = sample_videos(ctx)
        if not videos:
            left_whole(self.name)
            ctx["vtr_ctx"][self.name] = []
            return scores
        ratio = retention(self, config, ctx["stage"], sum(v.rows.numel() for v in videos))
        plans = []
        for video in videos:
            mix, representative, frame = self.arrange(video, ratio, config, ctx).tensors()
            kept = _kept_as_is(video, mix, representative, frame)
            scores[video.rows.reshape(-1) - start] = -float("inf")
            scores[video.rows.reshape(-1)[representative[kept]].to(rows.device) - start] = 1.0
            inserted = torch.full((kept.numel(),), -1, dtype=torch.long)  # each inserted output's new number
            inserted[~kept] = torch.arange(int((~kept).sum()))
            (outputs, sources), weights = mix.indices(), mix.values()
            mine = inserted[outputs] >= 0
            entries = (inserted[outputs[mine]], sources[mine], weights[mine])
            plans.append((video, entries, representative[~kept], _anchors(video, representative, frame, kept)))
        ctx["vtr_ctx"][self.name] = plans
        return scores

    def merge_tokens(self, dropped_hidden, dropped_scores, config, **ctx):
        dropped = ctx["dropped_index"]
        plans = ctx["vtr_ctx"].get(self.name, [])
        if not any(len(plan[2]) for plan in plans):
            return None
        length = max(int(dropped.max()), *(int(plan[0].rows.max()) for plan in plans)) + 1
        column = torch.full((length,), -1, dtype=torch.long)  # current row -> its place among the dropped ones
        column[dropped.cpu()] = torch.arange(dropped.numel())
        indices, values, which, after, offset = [], [], [], [], 0
        for video, (outputs, sources, weights), representative, anchors in plans:
            place = column[video.rows.reshape(-1).cpu()]
            if bool((place[sources] < 0).any()) or bool((place[representative] < 0).any()):
                raise ValueError(f"{self.name}: a merged token mixes or represents a token the LLM also gets as it is")
            indices.append(torch.stack([outputs + offset, place[sources]]))
            values.append(weights)
            which.append(place[representative])
            after.append(anchors)
            offset += representative.numel()
        mix = sparse(torch.cat(indices, 1), torch.cat(values), (offset, dropped.numel())).coalesce()
        mix = mix.to(dropped_hidden.device)
        merged = torch.sparse.mm(mix, dropped_hidden.float()).to(dropped_hidden.dtype)
        return merged, torch.cat(which), torch.cat(after).to(dropped.device), mix


def _kept_as_is(video: Video, mix, representative, frame) -> torch.Tensor:
    """[m] bool: the output tokens that are a token of the video itself, in its own frame's place, in prompt order
    after the previous such token, and mixed into no other output token: those stay kept rows. `mix`: sparse
    [m, count], coalesced."""
    m = representative.numel()
    (outputs, sources), weights = mix.indices(), mix.values()
    nonzero = weights != 0
    terms = torch.bincount(outputs[nonzero], minlength=m)
    at_self = nonzero & (sources == representative[outputs])
    self_weight = torch.zeros(m).index_add_(0, outputs[at_self], weights[at_self])
    used = torch.bincount(sources[nonzero], minlength=mix.shape[1])
    candidate = (terms == 1) & (self_weight == 1.0) & (used[representative] == 1)
    candidate &= representative // video.rows.shape[1] == frame
    kept = torch.zeros(m, dtype=torch.bool)
    last = -1
    for i in candidate.nonzero().reshape(-1).tolist():
        token = int(representative[i])
        if token > last:
            kept[i] = True
            last = token
    return kept


def _anchors(video: Video, representative, frame, kept) -> torch.Tensor:
    """[merged] long: the current-sequence row each inserted output token goes right after: the kept output token
    before it in its frame's place, else the row before that frame's first token."""
    if bool((frame[1:] < frame[:-1]).any()):
        raise ValueError("an arrangement must list its output tokens frame by frame, in time order")
    rows = video.rows.cpu()
    anchors, anchor, current = [], None, None
    for i in range(representative.numel()):
        f = int(frame[i])
        if f != current:
            current, anchor = f, int(rows[f, 0]) - 1
        if kept[i]:
            anchor = int(rows.reshape(-1)[representative[i]])
        else:
            anchors.append(anchor)
    return torch.tensor(anchors, dtype=torch.long)
