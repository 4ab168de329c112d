"""Batched, resumable extraction of frozen-encoder layer features into a feature cache.

`extract_features(task, data_dir, encoder, out_dir)` reads the dataset listing, checks the existing cache
(another encoder or dataset -> DaamkitError; complete splits are reused without loading the model), then
encodes the remaining rows batch by batch, preparing the next batch on a worker thread while the model
runs the current one, and commits every batch to disk so an interruption loses at most one batch.
Text splits are stored longest text first (the rows' `items.json` ids give the original order), which
keeps padding, and so wasted encoder compute, small.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from daamkit.classify.datasets import DatasetSplit, TaskData, check_task, in_cache_order, load_task
from daamkit.classify.encoders import FrozenEncoder, Prepared
from daamkit.classify.feature_cache import FeatureCache, FeatureCacheWriter, identity_mismatch, read_manifest
from daamkit.infra.errors import DaamkitError
from daamkit.infra.output_paths import output_folder
from daamkit.infra.progress import log, progress_bar


def extract_features(
    task: str,
    data_dir: str | Path,
    encoder: str | FrozenEncoder,
    out_dir: str | Path,
    *,
    batch_size: int = 8,
    dtype: str = "float32",
    device: str = "auto",
    device_map: str | None = None,
    include_embeddings: bool = False,
    max_items: int | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Fill (or reuse) the feature cache `out_dir` for `task`; returns a summary of what was done.

    `encoder` is a model folder / HF-cache name, or an already built `FrozenEncoder` (then `dtype`,
    `device`, `device_map`, `include_embeddings` and `trust_remote_code` are the encoder's own). The
    summary: {"out", "task", "encoder", "layers", "hidden_size", "splits": {name: {"num_items",
    "computed", "reused", "seconds"}}}.
    """
    if batch_size < 1:
        raise DaamkitError(f"`batch_size` must be at least 1, got {batch_size}")
    check_task(task)
    out_dir = output_folder(out_dir)  # a file in the way is refused before the encoder is loaded
    if not isinstance(encoder, FrozenEncoder):
        encoder = FrozenEncoder.from_pretrained(
            encoder, include_embeddings=include_embeddings, dtype=dtype, device=device, device_map=device_map,
            trust_remote_code=trust_remote_code,
        )
    data = load_task(task, data_dir, sampling_rate=encoder.sampling_rate or 16000, max_items=max_items)
    if data.modality != encoder.modality:
        raise DaamkitError(f"task {task} is {data.modality} data but {encoder.name} is a {encoder.modality} encoder")
    fields = manifest_fields(data, encoder)
    existing = read_manifest(out_dir)
    if existing is not None:
        mismatch = identity_mismatch(existing, fields)
        if mismatch:
            raise DaamkitError(
                f"feature cache {out_dir} was built with other settings ({mismatch}); "
                "use another `out` folder or delete this one"
            )
    summary: dict[str, Any] = {"out": str(out_dir), "task": task, "encoder": encoder.name,
                               "layers": encoder.layers, "hidden_size": encoder.hidden_size, "splits": {}}
    for name, split in data.splits.items():
        summary["splits"][name] = _extract_split(encoder, in_cache_order(split, data.modality), out_dir, fields,
                                                 batch_size)
    return summary


def manifest_fields(data: TaskData, encoder: FrozenEncoder) -> dict[str, Any]:
    """The manifest entries that identify a cache built from `data` with `encoder`."""
    return {
        "task": data.task,
        "encoder": encoder.name,
        "encoder_config_hash": encoder.config_hash,
        "compute_dtype": encoder.dtype,
        "layers": encoder.layers,
        "hidden_size": encoder.hidden_size,
        "classes": data.classes,
        "fingerprint": data.fingerprint,
        "grouping": data.grouping,
    }


def _extract_split(
    encoder: FrozenEncoder, split: DatasetSplit, out_dir: Path, fields: dict[str, Any], batch_size: int
) -> dict[str, Any]:
    start_time = time.perf_counter()
    if _reusable(out_dir, split):
        log(f"{split.name}: {len(split)} items already extracted in {out_dir}, reusing them")
        return {"num_items": len(split), "computed": 0, "reused": True, "seconds": 0.0}
    writer = FeatureCacheWriter(out_dir, fields, split.name, len(split), len(encoder.layers), encoder.hidden_size)
    resumed_at = writer.completed
    if resumed_at:
        log(f"{split.name}: resuming after {resumed_at} of {len(split)} items")
    starts = list(range(resumed_at, len(split), batch_size))
    encoder.load()  # before the prefetch thread needs the model
    with ThreadPoolExecutor(max_workers=1) as pool, progress_bar(
        f"extract {split.name}", total=len(split), completed=resumed_at
    ) as bar:
        pending = pool.submit(_prepare, encoder, split, starts[0], batch_size) if starts else None
        for k, start in enumerate(starts):
            prepared = pending.result()
            if k + 1 < len(starts):
                pending = pool.submit(_prepare, encoder, split, starts[k + 1], batch_size)
            features = encoder.forward(prepared)
            stop = start + prepared.size
            writer.write(start, features.numpy(), split.labels[start:stop], split.items[start:stop])
            bar.advance(prepared.size)
    writer.finish()
    return {"num_items": len(split), "computed": len(split) - resumed_at, "reused": False,
            "seconds": round(time.perf_counter() - start_time, 3)}


def _prepare(encoder: FrozenEncoder, split: DatasetSplit, start: int, batch_size: int) -> Prepared:
    stop = min(start + batch_size, len(split))
    return encoder.prepare([split.load(i) for i in range(start, stop)])


def _reusable(out_dir: Path, split: DatasetSplit) -> bool:
    """Whether `out_dir` already holds this split complete (identity was checked by the caller)."""
    manifest = read_manifest(out_dir)
    if manifest is None or manifest["splits"].get(split.name, {}).get("num_items") != len(split):
        return False
    cache = FeatureCache(out_dir, manifest)
    if not cache.is_complete(split.name):
        return False
    cache.split(split.name)  # validates the files against the manifest
    return True
