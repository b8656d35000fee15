# Copied from image/LLaVA/llava/vtr/strategy/clse.py
# Shared vtr file: edit it in image/LLaVA/llava/vtr, then `make fix-copies` updates every fork.
"""CLSE: visual tokens whose fine spatial detail changes between two layers, times attention.

As the official code (zjubinchen/CLSE, LLaVA1.5 `tools.py`, `clse_model.py`), at the first stage:
- a high-pass score per layer, on each visual token grid (`ctx["visual_grid"]()`: one per image, tile or
  frame): every channel is a 2-D image, FFT, Gaussian high-pass G = 1 - exp(-D^2 / (2 sigma^2)) with D the
  frequency's distance to the zero frequency in index units and sigma = clse_cutoff (0.1) x min(h//2, w//2),
  inverse FFT, magnitude, mean over channels: s_ref for the hidden states entering
  `clse_reference_layer` (0: the input embeddings) and s for those entering the prune layer;
- evolution evo = |s - s_ref| / (mean(s_ref) + s_ref + 1e-6), clamped at 1, z-scored over the sample's
  visual tokens (unbiased std + 1e-6), factor = sigmoid(z / clse_temperature) (0.1); tokens off any grid
  get z = 0;
- score = factor x the attention of the last row in layer K-1 (heads averaged). Later stages: attention.
After each drop the KV cache of every earlier layer keeps only the kept tokens (`earlier_cache="trim"`);
kept tokens keep their original positions.

Defaults for what the user leaves unset: three stages by depth (32 layers: [1, 11, 21]; 28 (Qwen2-VL):
[1, 10, 19]; other depths in proportion); with that schedule a scalar keep_tokens of 192 / 128 / 64 becomes
the per-stage presets [330, 210, 62] / [220, 140, 41] / [110, 70, 20], and another scalar b becomes
int(b x [1.72, 1.09, 0.32]) (the official factors; its code passes the unrounded floats on).
"""

import torch

from .base import PruningStrategy
from .registry import register_strategy

SCHEDULES = {32: [1, 11, 21], 28: [1, 10, 19]}
PRESETS = {192: [330, 210, 62], 128: [220, 140, 41], 64: [110, 70, 20]}
SCALE = (1.72, 1.09, 0.32)


def high_pass_score(hidden: torch.Tensor, grid: torch.Tensor, cutoff: float) -> torch.Tensor:
    """[n] mean-over-channels magnitude of the Gaussian high-passed `hidden` [n, d] laid out on `grid`
    [n, 3] (group, row, col); rows with group -1 get NaN."""
    out = torch.full((hidden.shape[0],), float("nan"), device=hidden.device)
    for group in grid[:, 0].unique().tolist():
        if group < 0:
            continue
        members = (grid[:, 0] == group).nonzero().reshape(-1)
        r, c = grid[members, 1], grid[members, 2]
        h, w = int(r.max()) + 1, int(c.max()) + 1
        field = torch.zeros(h, w, hidden.shape[1], device=hidden.device)
        field[r, c] = hidden[members].float()
        fy = torch.fft.fftfreq(h, device=hidden.device)[:, None] * h  # signed frequency index
        fx = torch.fft.fftfreq(w, device=hidden.device)[None, :] * w
        sigma = max(cutoff * min(h // 2, w // 2), 1e-6)
        gain = 1 - torch.exp(-(fy**2 + fx**2) / (2 * sigma**2))
        spectrum = torch.fft.fft2(field, dim=(0, 1)) * gain[..., None]
        out[members] = torch.fft.ifft2(spectrum, dim=(0, 1)).abs()[r, c].mean(dim=-1)
    return out


def evolution_factor(score: torch.Tensor, reference: torch.Tensor, temperature: float) -> torch.Tensor:
    """sigmoid(z / T) of the clamped relative change of the high-pass score; NaN (off-grid) -> z = 0."""
    on = ~torch.isnan(score)
    z = torch.zeros_like(score)
    if int(on.sum()) > 1:
        s, ref = score[on], reference[on]
        evo = ((s - ref).abs() / (ref.mean() + ref + 1e-6)).clamp(max=1.0)
        z[on] = (evo - evo.mean()) / (evo.std() + 1e-6)
    return torch.sigmoid(z / temperature)


@register_strategy("clse")
class CLSE(PruningStrategy):
    earlier_cache = "trim"

    def snapshot_layers(self, config):
        ref = config.clse_reference_layer
        return (ref - 1,) if ref >= 1 else ()  # the output of layer r-1 is what enters layer r

    def compute_scores(self, attention, image_token_range, config, **ctx):
        attended = self._aggregate_attention(attention, image_token_range, config)
        if ctx["stage"] > 0:
            return attended
        start, end = image_token_range
        rows = ctx["image_token_indices"]
        ref = config.clse_reference_layer
        key = ref - 1 if ref >= 1 else -1
        if key not in ctx["snapshots"] or ref > ctx["layer_idx"]:
            raise ValueError(
                f"clse_reference_layer={ref} must come before the first prune layer (scoring layer {ctx['layer_idx']})"
            )
        reference, reference_index = ctx["snapshots"][key]
        where = torch.searchsorted(reference_index, ctx["original_index"][rows])
        grid = ctx["visual_grid"]().to(rows.device)
        now = high_pass_score(ctx["hidden_states"][0, rows], grid, config.clse_cutoff)
        then = high_pass_score(reference[0, where], grid, config.clse_cutoff)
        factor = torch.ones(end - start, device=rows.device)
        factor[rows - start] = evolution_factor(now, then, config.clse_temperature)
        return factor * attended

    @classmethod
    def schedule_defaults(cls, config, num_layers: int) -> dict:
        if not config.prune_layer_defaulted or any(
            isinstance(v, list) for v in (config.keep_tokens, config.score_threshold, config.keep_ratio)
        ):
            return {}  # the user chose the stages (or gave per-stage budgets for one stage)
        layers = SCHEDULES.get(num_layers) or sorted({max(1, round(num_layers * q / 32)) for q in (1, 11, 21)})
        layers = [k for k in layers if k < num_layers] or [1]
        updates = {"prune_layer": layers}
        if isinstance(config.keep_tokens, int):
            preset = PRESETS.get(config.keep_tokens) or [max(0, int(config.keep_tokens * s)) for s in SCALE]
            updates["keep_tokens"] = preset[: len(layers)]
        return updates
