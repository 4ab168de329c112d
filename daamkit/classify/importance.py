"""Importance Factor outputs of a DAAM run: which encoder layers (and features) the density gates keep.

The gates of each fold/run's best decoder are averaged over that split's dev items (the validation
pass; test items are never used), all splits pooled into one running mean, then min-max normalised.
Written to `RUN_DIR/importance/`: `if_matrix.npy` `[N_layers, d]`, `importance.json` (ranked encoder
layers, per-layer shares), the heatmap and per-layer bar chart PNGs, and the same figures in TensorBoard.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from daamkit.classify.decoders import DENSITY_DECODERS
from daamkit.classify.evaluation import load_split_decoder, predict
from daamkit.classify.experiment import RunContext, load_run, make_accelerator
from daamkit.common import (
    ImportanceAccumulator,
    importance_factor,
    importance_figures,
    layer_shares,
    rank_layers,
    save_importance_figures,
)
from daamkit.infra.checkpoint import atomic_write_json
from daamkit.infra.errors import DaamkitError

IMPORTANCE_DIR = "importance"


def write_importance(context: RunContext, accelerator) -> dict:
    """Compute the IF over every split's dev items and write the matrix, JSON, PNGs and TensorBoard figures."""
    decoder = context.run["decoder"]["decoder"]
    if decoder not in DENSITY_DECODERS:
        raise DaamkitError(
            f"run {context.run_dir} uses decoder {decoder}, which has no density gates; the Importance Factor "
            f"needs one of {', '.join(DENSITY_DECODERS)}"
        )
    gates = ImportanceAccumulator()
    for plan in context.plans:
        model = load_split_decoder(context.checkpoint_dir(plan.name), accelerator.device)
        predict(model, context.sources[plan.train_source], plan.dev, context.layer_positions,
                context.run["batch_size"], accelerator.device, accelerator.autocast, gates=gates)
    if_matrix = importance_factor(gates.mean)
    layer_numbers = context.run["layer_numbers"]
    labels = [str(number) for number in layer_numbers]
    out_dir = context.run_dir / IMPORTANCE_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / "if_matrix.npy", if_matrix.cpu().numpy())
    shares = layer_shares(if_matrix).tolist()
    summary = {
        "decoder": decoder,
        "layers": layer_numbers,
        "ranked_layers": [layer_numbers[i] for i in rank_layers(if_matrix)],
        "layer_share": {label: share for label, share in zip(labels, shares)},
        "items": gates.count,
        "splits": [plan.name for plan in context.plans],
    }
    atomic_write_json(out_dir / "importance.json", summary)
    figures = save_importance_figures(if_matrix, out_dir, labels)
    _log_figures(context.run_dir, if_matrix, labels)
    return {**summary, "figures": {key: str(path) for key, path in figures.items()}}


def _log_figures(run_dir: Path, if_matrix, labels: list[str]) -> None:
    """The heatmap and per-layer share chart in TensorBoard (`tensorboard/importance`)."""
    from torch.utils.tensorboard import SummaryWriter

    heatmap, bars = importance_figures(if_matrix, labels)
    with SummaryWriter(str(run_dir / "tensorboard" / IMPORTANCE_DIR)) as writer:
        writer.add_figure("importance/heatmap", heatmap)  # add_figure closes the figures
        writer.add_figure("importance/layer_share", bars)


def importance_run(run_dir: str | Path, features_dir: Optional[str | Path] = None, mixed_precision: str = "auto",
                   cpu: bool = False) -> dict:
    """Recompute the Importance Factor outputs of a finished DAAM run (`classify importance RUN_DIR`)."""
    context = load_run(run_dir, features_dir)
    return write_importance(context, make_accelerator(mixed_precision, cpu=cpu))
