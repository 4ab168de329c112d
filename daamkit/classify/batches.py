"""Mini-batches straight from the memory-mapped feature cache, fast enough that loading is never the bottleneck.

Each batch's item indices are sorted before the read, so the memmap is read front to back in row-sized
chunks (one `(L, d)` float16 row per item); only the selected layers are converted to float32 on the fly.
A background thread reads the next batch while the model computes on the current one (numpy's copy and
the page faults release the GIL), and on CUDA the batch is put in pinned memory for an async copy.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Optional, Sequence

import numpy as np
import torch


class FeatureBatches:
    """Iterable of `(features float32 [B, N, d], labels int64 [B], indices int64 [B])` over a subset of items.

    `features` is the `(items, L, d)` cache array (usually an `np.memmap`); `layers` are positions along
    its L axis (None = all). With a `seed`, every pass shuffles the order with `rng` (different each
    epoch; a resumed run restores its state); without one, items come in index order.
    `shard=(rank, world)` keeps every world-th batch row for data-parallel training (all ranks see the
    same number of batches).
    """

    def __init__(
        self,
        features: np.ndarray,
        labels: np.ndarray,
        indices: Sequence[int],
        batch_size: int,
        layers: Optional[Sequence[int]] = None,
        seed: Optional[int] = None,
        pin_memory: bool = False,
        shard: tuple[int, int] = (0, 1),
    ):
        self.features, self.labels = features, np.asarray(labels)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.batch_size = batch_size
        self.layers = None if layers is None or list(layers) == list(range(features.shape[1])) else np.asarray(layers)
        self.pin_memory = pin_memory
        self.rank, self.world = shard
        self.rng = None if seed is None else np.random.default_rng(seed)

    def __len__(self) -> int:
        per_rank = len(self.indices) // self.world if self.world > 1 else len(self.indices)
        return -(-per_rank // self.batch_size)

    def _order(self) -> np.ndarray:
        order = self.indices if self.rng is None else self.rng.permutation(self.indices)
        if self.world > 1:
            usable = (len(order) // self.world) * self.world
            order = order[self.rank : usable : self.world]
        return order

    def _read(self, batch: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch = np.sort(batch)
        rows = self.features[batch]
        if self.layers is not None:
            rows = rows[:, self.layers]
        features = torch.from_numpy(np.ascontiguousarray(rows)).float()
        labels = torch.from_numpy(self.labels[batch].astype(np.int64))
        if self.pin_memory:
            features, labels = features.pin_memory(), labels.pin_memory()
        return features, labels, torch.from_numpy(batch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        order = self._order()
        starts = range(0, len(order), self.batch_size)
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = None
            for start in starts:
                future = pool.submit(self._read, order[start : start + self.batch_size])
                if pending is not None:
                    yield pending.result()
                pending = future
            if pending is not None:
                yield pending.result()
