# Copied from image/LLaVA/llava/vtr/strategy/clse.py
# Shared vtr file: edit it in image/LLaVA/llava/vtr, then `make fix-copies` updates every fork.
"""CLSE: visual tokens whose hidden states change in fine spatial detail between two layers, times attention.

At the first stage, for every visual token on a patch grid (`ctx["visual_grid"]()`: one grid per image,
tile or frame, from the adapter), the change of its hidden state between the reference layer
(`clse_reference_layer`; default the input embeddings) and the scoring layer is high-pass filtered over the
grid: 2-D FFT per channel, a Gaussian high-pass G = 1 - exp(-D^2 / (2 (cutoff x D_max)^2)) on the
frequency radius D, inverse FFT, magnitude averaged over channels. That evolution e is normalised (e / max e),
z-scored over the sample's visual tokens and squashed, factor = sigmoid(z / clse_temperature); tokens off any
grid (LLaVA-1.6's row newlines) get z = 0. Score = factor x the last row's attention (query/head
aggregation as configured). Later stages score by attention alone.

Defaults for what the user leaves unset: three stages by depth (32 layers: [1, 11, 21]; 28: [1, 10, 19];
36: [1, 13, 24]; other depths in the same proportions); with that schedule a scalar keep_tokens of 192 /
128 / 64 becomes the per-stage presets [330, 210, 62] / [220, 140, 41] / [110, 70, 20] (the LLaVA-1.5
setting), and another scalar b becomes round(b x [1.71875, 1.09375, 0.32]).
"""

import torch

from .base import PruningStrategy
from .registry import register_strategy

SCHEDULES = {32: [1, 11, 21], 28: [1, 10, 19], 36: [1, 13, 24]}
PRESETS = {192: [330, 210, 62], 128: [220, 140, 41], 64: [110, 70, 20]}
SCALE = (1.71875, 1.09375, 0.32)


def high_frequency_change(change: torch.Tensor, grid: torch.Tensor, cutoff: float) -> torch.Tensor:
    """[n] mean-over-channels magnitude of the Gaussian high-passed `change` [n, d] laid out on `grid`
    [n, 3] (group, row, col); rows with group -1 get NaN."""
    out = torch.full((change.shape[0],), float("nan"), device=change.device)
    for group in grid[:, 0].unique().tolist():
        if group < 0:
            continue
        members = (grid[:, 0] == group).nonzero().reshape(-1)
        r, c = grid[members, 1], grid[members, 2]
        h, w = int(r.max()) + 1, int(c.max()) + 1
        field = torch.zeros(h, w, change.shape[1], device=change.device)
        field[r, c] = change[members].float()
        fy = torch.fft.fftfreq(h, device=change.device)[:, None]
        fx = torch.fft.fftfreq(w, device=change.device)[None, :]
        radius2 = fy**2 + fx**2
        d0 = cutoff * radius2.max().sqrt().clamp_min(1e-6)
        gain = 1 - torch.exp(-radius2 / (2 * d0**2))
        spectrum = torch.fft.fft2(field, dim=(0, 1)) * gain[..., None]
        filtered = torch.fft.ifft2(spectrum, dim=(0, 1)).real
        out[members] = filtered[r, c].abs().mean(dim=-1)
    return out


def evolution_factor(energy: torch.Tensor, temperature: float) -> torch.Tensor:
    """sigmoid(z / T) of the max-normalised, z-scored energy; NaN (off-grid) -> z = 0."""
    on = ~torch.isnan(energy)
    z = torch.zeros_like(energy)
    if int(on.sum()) > 1:
        e = energy[on] / energy[on].max().clamp_min(1e-12)
        z[on] = (e - e.mean()) / e.std().clamp_min(1e-12)
    return torch.sigmoid(z / temperature)


@register_strategy("clse")
class CLSE(PruningStrategy):
    def snapshot_layers(self, config):
        ref = config.clse_reference_layer
        return (ref,) if ref is not None and ref >= 0 else ()

    def compute_scores(self, attention, image_token_range, config, **ctx):
        attended = self._aggregate_attention(attention, image_token_range, config)
        if ctx["stage"] > 0:
            return attended
        start, end = image_token_range
        rows = ctx["image_token_indices"]
        ref = config.clse_reference_layer
        ref = -1 if ref is None else ref
        if ref not in ctx["snapshots"]:
            raise ValueError(f"clse_reference_layer={ref} must come before the first scoring layer {ctx['layer_idx']}")
        reference, reference_index = ctx["snapshots"][ref]
        where = torch.searchsorted(reference_index, ctx["original_index"][rows])
        change = ctx["hidden_states"][0, rows].float() - reference[0, where].float()
        energy = high_frequency_change(change, ctx["visual_grid"]().to(rows.device), config.clse_cutoff)
        factor = torch.ones(end - start, device=rows.device)
        factor[rows - start] = evolution_factor(energy, config.clse_temperature)
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
            preset = PRESETS.get(config.keep_tokens) or [max(0, round(config.keep_tokens * s)) for s in SCALE]
            updates["keep_tokens"] = preset[: len(layers)]
        return updates
