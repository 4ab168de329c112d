"""Batched, resumable, optionally sharded extraction of frozen-encoder layer features into a feature cache.

`extract_features(task, data_dir, encoder, out_dir)` reads the dataset listing, checks the existing cache
(another encoder or dataset -> DaamkitError; complete splits are reused without loading the model), then
encodes the remaining rows batch by batch, preparing the next batch on a worker thread while the model
runs the current one, and commits every batch to disk so an interruption loses at most one batch.
Text splits are stored longest text first (the rows' `items.json` ids give the original order), which
keeps padding, and so wasted encoder compute, small.

Under `accelerate launch` or `torchrun` (WORLD_SIZE > 1) every process loads the encoder (on its own GPU
with `device` auto) and encodes every world-th batch of the missing rows into the one memory-mapped
cache. A lock file (`.extract.lock`) refuses a second, independent extraction into the same cache.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from daamkit.classify.datasets import DatasetSplit, TaskData, check_task, in_cache_order, load_task
from daamkit.classify.encoders import FrozenEncoder, Prepared
from daamkit.classify.feature_cache import FeatureCache, FeatureCacheWriter, identity_mismatch, read_manifest
from daamkit.infra.cpu_memory import reuse_freed_memory
from daamkit.infra.errors import DaamkitError
from daamkit.infra.file_lock import exclusive
from daamkit.infra.output_paths import output_folder
from daamkit.infra.progress import log, progress_bar

LOCK_FILE = ".extract.lock"


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
    processes = _Processes(device)
    with processes.lock(out_dir):  # before the encoder is loaded: a second extraction fails at once
        if not isinstance(encoder, FrozenEncoder):
            encoder = FrozenEncoder.from_pretrained(
                encoder, include_embeddings=include_embeddings, dtype=dtype, device=processes.device(device),
                device_map=device_map, trust_remote_code=trust_remote_code,
            )
        if encoder.device.type == "cpu" and not encoder.device_map:  # the encoder's temporaries, reused
            reuse_freed_memory()
        return _extract(task, data_dir, encoder, out_dir, batch_size, max_items, processes)


def _extract(task: str, data_dir, encoder: FrozenEncoder, out_dir: Path, batch_size: int, max_items,
             processes: "_Processes") -> dict[str, Any]:
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
                                                 batch_size, processes)
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


def _extract_split(encoder: FrozenEncoder, split: DatasetSplit, out_dir: Path, fields: dict[str, Any], batch_size: int,
                   processes: "_Processes") -> dict[str, Any]:
    start_time = time.perf_counter()
    if _reusable(out_dir, split):
        log(f"{split.name}: {len(split)} items already extracted in {out_dir}, reusing them")
        return {"num_items": len(split), "computed": 0, "reused": True, "seconds": 0.0}
    writer = FeatureCacheWriter(out_dir, fields, split.name, len(split), len(encoder.layers), encoder.hidden_size,
                                shard=(processes.rank, processes.world), barrier=processes.barrier)
    resumed_at = writer.completed
    if resumed_at:
        log(f"{split.name}: resuming with {resumed_at} of {len(split)} items already written")
    batches = writer.pending(batch_size)
    encoder.load()  # before the prefetch thread needs the model
    mine = sum(stop - start for start, stop in batches)
    with ThreadPoolExecutor(max_workers=1) as pool, progress_bar(f"extract {split.name}", total=mine) as bar:
        pending = pool.submit(_prepare, encoder, split, *batches[0]) if batches else None
        for k, (start, stop) in enumerate(batches):
            prepared = pending.result()
            if k + 1 < len(batches):
                pending = pool.submit(_prepare, encoder, split, *batches[k + 1])
            features = encoder.forward(prepared)
            writer.write(start, features.numpy(), split.labels[start:stop], split.items[start:stop])
            bar.advance(prepared.size)
    writer.finish()
    return {"num_items": len(split), "computed": len(split) - resumed_at, "reused": False,
            "seconds": round(time.perf_counter() - start_time, 3)}


def _prepare(encoder: FrozenEncoder, split: DatasetSplit, start: int, stop: int) -> Prepared:
    return encoder.prepare([split.load(i) for i in range(start, stop)])


class _Processes:
    """This process's place in an `accelerate launch` / `torchrun` job (rank 0 of 1 when run alone)."""

    def __init__(self, device: str):
        self.state = None
        self.rank, self.world = 0, 1
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch
            from accelerate import PartialState

            # joins the process group: gloo for CPU processes (Accelerate needs cpu=True to see them), nccl on GPUs
            self.state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available())
            self.rank, self.world = self.state.process_index, self.state.num_processes

    def device(self, choice: str) -> str:
        """`auto` in a multi-GPU job is this process's own GPU."""
        if self.state is not None and choice == "auto" and self.state.device.type == "cuda":
            return str(self.state.device)
        return choice

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    @contextmanager
    def lock(self, out_dir: Path):
        """The cache's lock, taken by rank 0 for the whole job; every process fails alike if it is held."""
        if self.world == 1:
            out_dir.mkdir(parents=True, exist_ok=True)
            with exclusive(out_dir / LOCK_FILE, f"feature cache {out_dir}"):
                yield
            return
        import torch.distributed as dist

        with ExitStack() as stack:
            refusal = [None]
            if self.rank == 0:
                out_dir.mkdir(parents=True, exist_ok=True)
                try:
                    stack.enter_context(exclusive(out_dir / LOCK_FILE, f"feature cache {out_dir}"))
                except DaamkitError as err:
                    refusal = [str(err)]
            dist.broadcast_object_list(refusal, src=0)
            if refusal[0] is not None:
                raise DaamkitError(refusal[0])
            yield
            self.barrier()  # rank 0 lets go only when every process is done


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
