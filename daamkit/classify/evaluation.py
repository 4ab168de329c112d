"""Scoring decoders on cached features: logits, chunk- and utterance-level accuracy, and re-scoring a saved run."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from daamkit.classify.batches import FeatureBatches
from daamkit.classify.decoders import DATDecoder, DecoderConfig, build_decoder
from daamkit.classify.experiment import RunContext, load_run, make_accelerator, summarize
from daamkit.classify.feature_cache import FeatureSplit
from daamkit.common import ImportanceAccumulator
from daamkit.infra.checkpoint import load_config, load_state_dict_strict, load_weights
from daamkit.infra.errors import DaamkitError


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    split: FeatureSplit,
    indices: Sequence[int],
    layers: Optional[Sequence[int]],
    batch_size: int,
    device: torch.device,
    autocast=nullcontext,
    gates: Optional[ImportanceAccumulator] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(logits float32 [n, classes], item indices [n]) for `indices` of `split`, in eval mode.

    With `gates`, every density gate map is folded into the accumulator (Importance Factor).
    """
    was_training = model.training
    model.eval()
    all_logits, all_indices = [], []
    try:
        for features, _, batch_indices in FeatureBatches(split.features, split.labels, indices, batch_size, layers,
                                                        pin_memory=device.type == "cuda"):
            with autocast():
                logits, gate = model(features.to(device, non_blocking=True), return_gate=True)
            if gates is not None and gate is not None:
                gates.update(gate.float())
            all_logits.append(logits.float().cpu().numpy())
            all_indices.append(batch_indices.numpy())
    finally:
        model.train(was_training)
    return np.concatenate(all_logits), np.concatenate(all_indices)


def accuracy(logits: np.ndarray, indices: np.ndarray, split: FeatureSplit) -> float:
    """Fraction of items whose arg-max logit is their label."""
    return float((logits.argmax(1) == split.labels[indices]).mean())


def utterance_accuracy(logits: np.ndarray, indices: np.ndarray, split: FeatureSplit) -> float:
    """Accuracy per utterance: the mean of its chunks' logits against the utterance label."""
    utterances = np.asarray([split.items[i]["utterance"] for i in indices], dtype=object)
    names, first, inverse = np.unique(utterances, return_index=True, return_inverse=True)
    sums = np.zeros((len(names), logits.shape[1]), dtype=np.float64)
    np.add.at(sums, inverse, logits)
    counts = np.bincount(inverse, minlength=len(names))[:, None]
    return float(((sums / counts).argmax(1) == split.labels[indices[first]]).mean())


def has_utterances(split: FeatureSplit) -> bool:
    """Whether items are chunks of utterances (IEMOCAP), so utterance-level accuracy is reported."""
    return any(item.get("utterance") is not None for item in split.items)


def load_split_decoder(checkpoint_dir: Path, device: torch.device) -> DATDecoder:
    """The best decoder of one fold/run, on `device`, in eval mode."""
    config = load_config(checkpoint_dir)
    model = build_decoder(DecoderConfig(**config["decoder"]))
    load_state_dict_strict(model, load_weights(checkpoint_dir), str(checkpoint_dir))
    return model.to(device).eval()


def accuracy_block(entries: list[dict], key: str = "accuracy") -> dict:
    """`{"mean", "std", "per_split"}` as written to metrics.json."""
    return {**summarize([entry[key] for entry in entries]), "per_split": entries}


def evaluate_run(run_dir: str | Path, features_dir: Optional[str | Path] = None, batch_size: Optional[int] = None,
                 mixed_precision: str = "auto", cpu: bool = False) -> dict:
    """Re-score every fold/run's best checkpoint on its test items; same `accuracy` shape as metrics.json."""
    context = load_run(run_dir, features_dir)
    accelerator = make_accelerator(mixed_precision, cpu=cpu)
    return score_run(context, accelerator.device, accelerator.autocast, batch_size or context.run["batch_size"])


def score_run(context: RunContext, device: torch.device, autocast, batch_size: int) -> dict:
    """Test accuracy of every split's saved best model (and utterance accuracy when items are chunks)."""
    chunk_entries, utterance_entries = [], []
    for plan in context.plans:
        checkpoint = context.checkpoint_dir(plan.name)
        if not checkpoint.is_dir():
            raise DaamkitError(f"run {context.run_dir} has no checkpoint for split {plan.name} ({checkpoint})")
        model = load_split_decoder(checkpoint, device)
        saved = load_config(checkpoint)
        test = context.sources[plan.test_source]
        logits, indices = predict(model, test, plan.test, context.layer_positions, batch_size, device, autocast)
        base = {"name": plan.name, "dev_accuracy": saved["dev_accuracy"], "best_epoch": saved["best_epoch"]}
        chunk_entries.append({**base, "accuracy": accuracy(logits, indices, test)})
        if has_utterances(test):
            utterance_entries.append({**base, "accuracy": utterance_accuracy(logits, indices, test)})
    result = {"accuracy": accuracy_block(chunk_entries)}
    if utterance_entries:
        result["utterance_accuracy"] = accuracy_block(utterance_entries)
    return result
