"""Importance Factor (IF): which encoder layers and features the density gates keep, averaged over data.

IF = (DA - min DA) / (max DA - min DA), where DA is the mean gate map `[N_layers, d]` over a validation
pass. The mean is a running one, so memory does not grow with the number of batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor


class ImportanceAccumulator:
    """Running mean of gate maps `[B, N, d]` over every item seen (float64, on the gates' device)."""

    def __init__(self) -> None:
        self.count = 0
        self._mean: Optional[Tensor] = None

    def update(self, gate: Tensor) -> None:
        """Fold a batch of gates (`[B, ...]`; items along dim 0) into the running mean."""
        batch = gate.shape[0]
        if batch == 0:
            return
        batch_mean = gate.detach().to(torch.float64).mean(0)
        if self._mean is None:
            self._mean = batch_mean
        else:
            if batch_mean.shape != self._mean.shape:
                raise ValueError(f"gate shape {tuple(gate.shape[1:])} differs from earlier {tuple(self._mean.shape)}")
            self._mean += (batch_mean - self._mean) * (batch / (self.count + batch))
        self.count += batch

    @property
    def mean(self) -> Tensor:
        """The mean gate map DA; ValueError before any update."""
        if self._mean is None:
            raise ValueError("no gates accumulated yet")
        return self._mean.float()


def importance_factor(mean_gate: Tensor) -> Tensor:
    """Min-max normalised mean gate map (all zeros when the map is constant)."""
    low, high = mean_gate.min(), mean_gate.max()
    span = high - low
    if span <= 0:
        return torch.zeros_like(mean_gate)
    return (mean_gate - low) / span


def layer_shares(if_matrix: Tensor) -> Tensor:
    """Each layer's share of the total IF (sums to 1; uniform when the IF is all zero)."""
    per_layer = if_matrix.double().sum(-1)
    total = per_layer.sum()
    if total <= 0:
        return torch.full_like(per_layer, 1.0 / per_layer.numel()).float()
    return (per_layer / total).float()


def rank_layers(if_matrix: Tensor) -> list[int]:
    """Layer indices (rows of the IF matrix), most important first; ties keep layer order."""
    shares = layer_shares(if_matrix)
    return sorted(range(shares.numel()), key=lambda i: (-shares[i].item(), i))


def importance_figures(if_matrix: Tensor, layer_labels: Optional[Sequence[str]] = None):
    """(heatmap, bar chart) matplotlib figures: IF over layers x features, and each layer's share."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    matrix = if_matrix.detach().float().cpu().numpy()
    labels = list(layer_labels) if layer_labels is not None else [str(i) for i in range(matrix.shape[0])]
    if len(labels) != matrix.shape[0]:
        raise ValueError(f"{len(labels)} layer labels for {matrix.shape[0]} layers")

    heatmap, ax = plt.subplots(figsize=(10, max(3.0, 0.25 * matrix.shape[0] + 1.5)))
    image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("feature")
    ax.set_ylabel("layer")
    ax.set_title("Importance Factor")
    heatmap.colorbar(image, ax=ax, label="IF")
    heatmap.tight_layout()

    bars, ax = plt.subplots(figsize=(max(5.0, 0.35 * len(labels) + 2), 3.5))
    ax.bar(range(len(labels)), layer_shares(if_matrix).cpu().numpy())
    ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=90 if len(labels) > 20 else 0)
    ax.set_xlabel("layer")
    ax.set_ylabel("share of total IF")
    ax.set_title("Per-layer Importance Factor")
    bars.tight_layout()
    return heatmap, bars


def save_importance_figures(if_matrix: Tensor, out_dir: str | Path,
                            layer_labels: Optional[Sequence[str]] = None) -> dict[str, Path]:
    """Write `importance_heatmap.png` and `importance_layers.png` into `out_dir`; returns their paths."""
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"heatmap": out_dir / "importance_heatmap.png", "layer_share": out_dir / "importance_layers.png"}
    for figure, key in zip(importance_figures(if_matrix, layer_labels), ("heatmap", "layer_share")):
        figure.savefig(paths[key], dpi=120)
        plt.close(figure)
    return paths
