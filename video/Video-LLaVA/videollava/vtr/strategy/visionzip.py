# Copied from image/LLaVA/llava/vtr/strategy/visionzip.py
# Shared vtr file: edit it in image/LLaVA/llava/vtr, then `make fix-copies` updates every fork.
"""VisionZip (Yang et al., CVPR 2025): dominant tokens by the vision encoder's CLS attention, the rest merged into
a few contextual tokens, before the projector.

As the official code (dvlab-research/VisionZip, `clip_encoder.py`), in the vision layer whose output the
projector reads (`ctx["vision_layer"]()`), per view (an image, a tile, a frame), with a share T of the budget
(split over the views in proportion to their sizes) of which C = round(T x 10/64) are contextual
(`contextual_tokens` overrides; the official 54 + 10 for 64 tokens, 108 + 20, 162 + 30) and D = T - C dominant:
- dominant: the CLS token and the D - 1 patches its query attends to most (mean over heads; ties: the
  earlier patch), in patch order; the CLS token is fed to the LLM too, projected like the patches;
- contextual: the other patches in patch order form a list of M; targets are its entries 0, s, 2s, ... (the
  first C, s = max(1, M // C)); every other entry joins the target whose key (the layer's keys, mean over heads,
  L2-normalised) is most similar (ties: the first target); a contextual token is its target's features PLUS the
  mean features of the patches that joined it (the target alone when none did), on the layer's output before the
  projector, then projected.
Each view enters the LLM as [CLS, dominant patches, contextual tokens] (the official order; LLaVA-1.6's tiles,
whose rows the stock layout stitches together, interleave: a tile's CLS goes right before its first kept patch,
its contextual tokens after its last row), the image shortened before the first decoder layer (`prune_layer=0`, contiguous positions); `token_merge=False` spends the whole
share on dominant patches (no CLS, no contextual tokens: an ablation). Tokens off every grid (LLaVA-1.6's row
newlines) are dropped. Needs a token count: keep_tokens or keep_ratio.

Towers whose projector merges patches (Qwen-VL, InternVL) follow the official Qwen2.5-VL port: no CLS token
enters, the importance is the CLS attention where the tower has one and else the attention each token receives
(`vision_layer()["received"]`), C = max(1, T // 14) (the port's 5% of a 70% budget), the merging runs on the
projected tokens (keys pooled over the merged patches), each contextual token takes its target's place, and on
M-RoPE backbones the kept tokens keep their original positions (`mrope_positions`).
"""

import torch

from .base import MarkedSelection
from .grouping import view_shares
from .registry import register_strategy

CONTEXTUAL_SHARE = 10 / 64  # the official split: 10 contextual of 64 tokens


def contextual_count(share: int, config, spliced: bool = True) -> int:
    """How many of a view's `share` tokens are contextual: 10/64 (rounded) before a per-patch projector, the
    official LLaVA split; 1/14 (at least one) after a merging one, the Qwen port's 5% of a 70% budget."""
    if config.contextual_tokens is not None:
        return min(share, config.contextual_tokens)
    if not spliced:
        return min(share, max(1, share // 14))
    return min(share, int(share * CONTEXTUAL_SHARE + 0.5))


def merge_contextual(features: torch.Tensor, keys: torch.Tensor, count: int):
    """VisionZip's contextual tokens of the remaining patches (`features` [m, width], `keys` [m, dim], in patch
    order): (contextual [c, width], target [c] indices into the remaining patches, weights [c, m] with
    contextual = weights @ features). c = min(count, m)."""
    m = features.shape[0]
    if count <= 0 or m == 0:
        return features[:0], torch.empty(0, dtype=torch.long, device=features.device), features.new_zeros(0, m).float()
    step = max(1, m // count)
    targets = torch.arange(0, m, step, device=features.device)[:count]
    others = torch.ones(m, dtype=torch.bool, device=features.device)
    others[targets] = False
    k = keys.float() / keys.float().norm(dim=-1, keepdim=True)
    assigned = (k[others] @ k[targets].T).argmax(dim=1)  # first maximum on ties
    counts = torch.bincount(assigned, minlength=targets.numel()).clamp_min(1)
    weights = torch.zeros(targets.numel(), m, device=features.device)
    weights[torch.arange(targets.numel(), device=features.device), targets] = 1.0  # the target itself
    weights[assigned, others.nonzero().reshape(-1)] = 1.0 / counts[assigned].float()  # plus its members' mean
    return (weights @ features.float()).to(features.dtype), targets, weights


@register_strategy("visionzip")
class VisionZip(MarkedSelection):
    needs_attention = False
    needs_vision_attention = True
    supports_token_merge = True
    token_merge_default = True
    merge_is_method = True
    positions = "compact"
    mrope_positions = "original"  # the Qwen2.5-VL port gathers the kept tokens' M-RoPE ids
    requires = ("vision_layer", "visual_grid")

    @classmethod
    def schedule_defaults(cls, config, num_layers: int) -> dict:
        if not config.prune_layer_defaulted and config.prune_layers != [0]:
            raise ValueError(
                f"visionzip works in the vision tower, before the LLM: prune_layer must be 0 (or unset); got "
                f"prune_layer={config.prune_layer}"
            )
        return {"prune_layer": 0} if config.prune_layer_defaulted else {}

    @staticmethod
    def spliced(ctx) -> bool:
        """True on towers whose projector maps each patch on its own (LLaVA, Video-LLaVA): VisionZip then works
        before the projector, with the CLS token; False where the projector merges patches (the Qwen port)."""
        return all(name in ctx for name in ("project", "vision_features", "vision_cls"))

    def compute_scores(self, attention, image_token_range, config, **ctx):
        if ctx["layer_idx"] != -1 or ctx["stage"] != 0:
            raise ValueError("visionzip works in the vision tower: it runs before the LLM only (prune_layer=0)")
        rows = ctx["image_token_indices"]
        budget = self._token_count(config, 0, rows.numel())
        spliced = self.spliced(ctx)
        merge = config.conventions().token_merge  # False: the whole share on dominant patches (an ablation)
        layer = ctx["vision_layer"]()
        importance = (layer["cls"] if layer["cls"] is not None else layer["received"]).float().to(rows.device)
        groups = ctx["visual_grid"]()[:, 0].to(rows.device)
        plan, dominant = [], torch.zeros(rows.numel(), dtype=torch.bool, device=rows.device)
        shares = view_shares(groups, budget)
        for group in sorted(shares):  # ascending = prompt order of the views
            members = (groups == group).nonzero().reshape(-1)
            share = shares[group]
            if share == 0:
                continue
            contextual = contextual_count(share, config, spliced) if merge else 0
            with_cls = spliced and merge and share - contextual > 0
            patches = share - contextual - with_cls  # the CLS token counts as dominant
            order = torch.sort(importance[members], descending=True, stable=True).indices
            dominant[members[order[:patches]]] = True
            plan.append((members, with_cls, contextual))
        ctx["vtr_ctx"]["visionzip"] = (rows, dominant, plan, spliced)
        return self.marked(dominant, importance, image_token_range, rows)

    def merge_tokens(self, dropped_hidden, dropped_scores, config, **ctx):
        state = ctx["vtr_ctx"]
        rows, dominant, plan, spliced = state["visionzip"]
        dropped = ctx["dropped_index"]  # current rows, ascending
        keys = state["vision_layer"]()["keys"].to(rows.device)
        if spliced:  # the tower's features before the projector
            features, cls_features = state["vision_features"]().to(rows.device), state["vision_cls"]().to(rows.device)
        merged, which, after, mixes = [], [], [], []
        for members, with_cls, contextual in plan:
            rest = members[~dominant[members]]  # the remaining patches of the view, in patch order
            if rest.numel() == 0 or contextual == 0 and not with_cls:
                continue
            slot = torch.searchsorted(dropped, rows[rest])  # their places among the dropped tokens
            values = features[rest] if spliced else dropped_hidden[slot]
            tokens, targets, weights = merge_contextual(values, keys[rest], contextual)
            free = torch.ones(rest.numel(), dtype=torch.bool, device=rest.device)
            free[targets] = False
            if with_cls and bool(free.any()):  # right before the view's first dominant patch (or its first patch)
                kept = members[dominant[members]]
                first = rows[kept].min() if kept.numel() else rows[members].min()
                merged.append(cls_features[members[:1]])
                which.append(slot[free.nonzero()[0]])  # a dropped patch no contextual token stands for
                after.append((first - 1).reshape(1))
            merged.append(tokens)
            which.append(slot[targets])
            # spliced: after the view's dominant patches; the Qwen port: in its target's place
            after.append(rows[members].max().expand(targets.numel()) if spliced else rows[rest[targets]])
            if not spliced:  # the merged tokens' weights over the dropped ones (DeepStack features mix alike)
                mix = torch.zeros(targets.numel(), dropped.numel(), device=weights.device)
                mix[:, slot] = weights
                mixes.append(mix)
        if not merged:
            return None
        merged = torch.cat(merged)
        if spliced:
            return state["project"](merged).to(dropped_hidden.dtype), torch.cat(which), torch.cat(after)
        return merged.to(dropped_hidden.dtype), torch.cat(which), torch.cat(after), torch.cat(mixes)
