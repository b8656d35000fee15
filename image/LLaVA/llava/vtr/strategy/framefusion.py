# Shared vtr file: edit it in image/LLaVA/llava/vtr, then `make fix-copies` updates every fork.
"""FrameFusion (Fu et al., ICCV 2025): inside the LLM, merge each video token into the same place of the frame
before while they are alike, then prune the rest by the attention of the last token.

As the official code (thu-nics/FrameFusion, `framefusion/main.py`), during the prefill only, on the video tokens
(the `frames` fact: tokens of one place of a video, frame after frame, form a chain; images and tokens of no
frame are left as they are), one prune stage per decoder layer from 0 (`prune_layer` left unset):

1. Merging, at the first stages. A chain's tokens still there are compared in frame order: s_j = cos(h_j-1, h_j)
   on the stage's hidden states (the full vector, in their dtype, sum(a b) / (|a| |b|) without eps); the first
   token of a chain gets -2. With n the video tokens still there and u the schedule's sparsity bound (below),
   the tokens with s_j >= `framefusion_threshold` (0.6) are similar, a share r of n:
   - r < u: all of them merge and r joins the schedule; the cascade stops after this stage if r <
     `framefusion_min_similar` (0.1), else the next stage merges again on its own hidden states;
   - r >= u: only the int(u x n) largest s_j (ties: the earlier in chain order) merge, and FrameFusion ends:
     no pruning follows.
   Similar tokens in a row of a chain merge into the token just before them (their earliest frame's, which
   stays): their uniform mean, that token counted once whatever it holds already, at its slot and position
   (`merge_tokens` drops it and inserts the mean right there, with it as representative). A run never takes a
   chain's first token: its -2 is below any threshold, and the top-k takes int(u x n) <= the similar ones.
2. Pruning, once, at the stage after the cascade stops: the video tokens are ranked by the attention of the
   last token in layer K-1 (`scoring_layer="previous"`: the layer whose attention the official code has just run;
   under "own", layer K's own on its input), heads averaged, and the round(n x (1 - rho)) best are kept (Python's
   round, half to even; ties: the earlier), rho the schedule's sparsity.
3. Later stages keep everything; decoding is untouched.

The schedule (the official `_compute_pruning_ratio`, with its 28 layers hard-coded whatever the depth): with the
merging shares s_0..s_k-1 so far, P = prod(1 - s_i), T = sum_i prod_(j<=i) (1 - s_j) and R = 28 c - T, the
sparsity is 1 - R / ((28 - k) P), or 0 when that fraction is above 1; R < 0 is an error, as there. c is
`framefusion_cost` (0.3: the video tokens' mean share over the layers), or the share an explicit keep_ratio /
keep_tokens gives (keep_tokens / the sample's video tokens), as for every video method.

Where the official code runs between a layer's attention and its MLP, the engine reduces at layer boundaries:
merges after the first run on layer K-1's output (after its MLP) and that MLP runs on every token; see the
fidelity table in docs/methods.md. Positions: the original ones, gaps kept (M-RoPE: the prompt's ids);
every layer caches the tokens it ran on.
"""

import torch

from .base import MarkedSelection
from .registry import register_strategy
from .video import left_whole, retention, sparse

BUDGET_LAYERS = 28  # the layers the official schedule counts, hard-coded there for every model
IGNORE = -2.0  # the similarity of a chain's first token (the official IGNORE_TOKEN)
MERGING, PRUNING, DONE = "merging", "pruning", "done"


def sparsity_bound(sparsities: list[float], cost: float, layers: int = BUDGET_LAYERS) -> float:
    """The share of the video tokens still there that the next reduction may remove, after merging calls of
    shares `sparsities`, for a mean share `cost` of the video tokens over `layers` layers (see the module
    docstring)."""
    kept, spent = 1.0, 0.0
    for share in sparsities:
        kept *= 1 - share
        spent += kept
    left = layers * cost - spent
    if left < 0 or len(sparsities) >= layers:
        raise ValueError(
            f"framefusion: the cost {cost} is too small for {len(sparsities)} merging layers "
            f"({spent:.3f} of {layers} x {cost} spent); raise framefusion_cost"
        )
    share = left / ((layers - len(sparsities)) * kept)
    return 0.0 if share > 1 else 1 - share


def frame_places(frames: torch.Tensor) -> torch.Tensor:
    """[n] long: each token's index within its frame in prompt order (its place), -1 for a token of no frame;
    `frames` [n, 2] is the (video, frame) fact in prompt order."""
    video, frame = frames[:, 0], frames[:, 1]
    key = torch.where(video >= 0, video * (int(frame.max()) + 1) + frame, -1)
    order = torch.sort(key, stable=True).indices
    ranked = key[order]
    index = torch.arange(key.numel(), device=key.device)
    first = torch.ones_like(ranked, dtype=torch.bool)
    first[1:] = ranked[1:] != ranked[:-1]
    start = torch.where(first, index, 0).cummax(0).values
    place = torch.empty_like(key)
    place[order] = index - start
    return torch.where(video >= 0, place, -1)


def chain_similarity(hidden: torch.Tensor, chain: torch.Tensor) -> torch.Tensor:
    """[n] cosine of each token with the one before it in the chain order, in `hidden`'s dtype; IGNORE for the
    first token of a chain. hidden [n, d] and chain [n] are in chain order."""
    a, b = hidden[:-1], hidden[1:]
    similarity = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    similarity = similarity.masked_fill(chain[:-1] != chain[1:], IGNORE)
    return torch.cat([torch.full((1,), IGNORE, dtype=hidden.dtype, device=hidden.device), similarity])


def merge_targets(marked: torch.Tensor) -> torch.Tensor:
    """[n] long: for each marked position of the chain order, the position its run of marked positions merges
    into (the one just before the run); -1 elsewhere. Position 0 (a chain's first token) is never marked."""
    index = torch.arange(marked.numel(), device=marked.device)
    starts = marked.clone()
    starts[1:] &= ~marked[:-1]
    start = torch.where(starts, index, -1).cummax(0).values
    return torch.where(marked, start - 1, -1)


@register_strategy("framefusion")
class FrameFusion(MarkedSelection):
    supports_token_merge = True
    token_merge_default = True
    merge_is_method = True
    requires = ("frames",)
    scoring_layer = "previous"
    positions = "original"
    earlier_cache = "keep"

    @classmethod
    def stage_needs_attention(cls, stage: int, config) -> bool:
        return config.prune_layers[stage] > 0  # any stage inside the LLM may be the one that prunes

    @classmethod
    def schedule_defaults(cls, config, num_layers: int) -> dict:
        updates = {}
        if config.prune_layer_defaulted:  # a stage at every layer the cascade may reach
            updates["prune_layer"] = list(range(num_layers))
        stages = len(updates.get("prune_layer", config.prune_layers))
        ratio = config.keep_ratio
        if stages > 1 and config.keep_tokens is None and isinstance(ratio, (int, float)):
            updates["keep_ratio"] = [ratio] * stages  # read once, as the cost: one value per stage, nothing compounds
        if config.budget_defaulted:
            updates["keep_tokens"] = None  # stays defaulted: the budget is framefusion_cost
        return updates

    def cost(self, config, video_tokens: int) -> float:
        """The schedule's mean share c: `framefusion_cost`, or the share an explicit budget gives."""
        return config.framefusion_cost if config.budget_defaulted else retention(self, config, 0, video_tokens)

    def compute_scores(self, attention, image_token_range, config, **ctx):
        if not config.conventions().token_merge:
            raise ValueError(
                "framefusion merges tokens into their earlier frames: it cannot run with token_merge=False"
            )
        start, end = image_token_range
        rows = ctx["image_token_indices"]
        state = ctx["vtr_ctx"].get(self.name) or self._start(config, ctx)
        ctx["vtr_ctx"][self.name] = state
        scores = torch.full((end - start,), -float("inf"), device=rows.device)
        scores[rows - start] = 0.0
        if state["phase"] == DONE:
            return scores
        where = torch.searchsorted(state["identity"], ctx["original_index"][rows])
        video = state["video"][where] >= 0
        rows, where = rows[video], where[video]
        if state["phase"] == MERGING:
            dropped = self._merge(rows, where, state, config, ctx)
        else:
            dropped = self._prune(rows, attention, image_token_range, state)
        scores[dropped - start] = -float("inf")
        return scores

    def _start(self, config, ctx) -> dict:
        """The sample's state at its first stage (no token is gone yet): each visual token's video, frame and
        place by its prompt position, the schedule's cost and the merging shares so far."""
        frames = ctx["frames"]().to(ctx["image_token_indices"].device)
        videos = int((frames[:, 0] >= 0).sum())
        if not videos:
            left_whole(self.name)
            return {"phase": DONE}
        return {
            "phase": MERGING,
            "identity": ctx["original_index"][ctx["image_token_indices"]],
            "video": frames[:, 0],
            "place": frame_places(frames),
            "cost": self.cost(config, videos),
            "sparsity": [],
        }

    def _merge(self, rows, where, state, config, ctx) -> torch.Tensor:
        """One merging call on the video tokens at `rows`: the rows it drops; the merged tokens wait in
        state["plan"] for `merge_tokens`."""
        place = state["place"][where]
        chain = state["video"][where] * (int(place.max()) + 1) + place
        order = torch.sort(chain, stable=True).indices  # by video and place, frames in prompt order
        rows, chain = rows[order], chain[order]
        similarity = chain_similarity(ctx["hidden_states"][0, rows], chain)
        n = rows.numel()
        marked = similarity >= config.framefusion_threshold
        share = int(marked.sum()) / n
        bound = sparsity_bound(state["sparsity"], state["cost"])
        if share < bound:
            state["sparsity"].append(share)
            if share < config.framefusion_min_similar:
                state["phase"] = PRUNING
        else:  # the budget is met by merging alone
            top = torch.sort(similarity, descending=True, stable=True).indices[: int(bound * n)]
            marked = torch.zeros_like(marked)
            marked[top] = True
            state["phase"] = DONE
        target = merge_targets(marked)[marked]
        targets = torch.unique(target)
        state["plan"] = (rows[targets], rows[marked], torch.searchsorted(targets, target))
        return torch.cat([rows[marked], rows[targets]])

    def _prune(self, rows, attention, image_token_range, state) -> torch.Tensor:
        """The importance pruning on the video tokens at `rows`: the rows it drops."""
        last = attention.shape[-1] - 1
        received = attention[:, :, [last], :][0, :, 0].float().mean(0)[rows]  # heads averaged
        keep = round(rows.numel() * (1 - sparsity_bound(state["sparsity"], state["cost"])))
        order = torch.sort(received, descending=True, stable=True).indices
        state["phase"] = DONE
        return rows[order[keep:]]

    def merge_tokens(self, dropped_hidden, dropped_scores, config, **ctx):
        state = ctx["vtr_ctx"].get(self.name) or {}
        targets, members, group = state.pop("plan", (None, None, None))
        if targets is None or not targets.numel():
            return None
        dropped = ctx["dropped_index"]
        column, member_column = torch.searchsorted(dropped, targets), torch.searchsorted(dropped, members)
        size = torch.bincount(group, minlength=targets.numel()) + 1  # the target and its members
        outputs = torch.cat([torch.arange(targets.numel(), device=group.device), group])
        weights = (1.0 / size.float())[outputs]  # each target's uniform mean of itself and its members
        mix = sparse(
            torch.stack([outputs, torch.cat([column, member_column])]), weights, (targets.numel(), dropped.numel())
        )
        merged = torch.sparse.mm(mix.to(dropped_hidden.device), dropped_hidden.float()).to(dropped_hidden.dtype)
        return merged, column, targets, mix.coalesce()
