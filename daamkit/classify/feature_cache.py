"""The on-disk feature cache of frozen-encoder hidden states: written once, resumable, memory-mapped to read.

Format (version 1) of a cache folder `FEATURES_DIR`:

    manifest.json          {"version": 1, "task": str, "encoder": str, "encoder_config_hash": str,
                            "compute_dtype": str, "layers": [int, ...], "num_layers": L, "hidden_size": d,
                            "dtype": "float16", "classes": [str, ...], "fingerprint": str,
                            "grouping": null | "session",
                            "splits": {"<split>": {"num_items": N, "complete": bool}, ...}}
    <split>/features.npy   float16 (N, L, d), `numpy.lib.format.open_memmap`; `np.load(..., mmap_mode="r")`
    <split>/labels.npy     int64 (N,), indices into `classes`
    <split>/items.json     [{"id": str, "group": str | null, "utterance": str | null}, ...] (N entries)
    <split>/items.<rank>.partial.jsonl  while extracting: one {"row": i, "id", ...} line per committed row,
                           per writing process (sharded extraction runs several)

`layers` are indices into the encoder's `hidden_states` tuple (0 = embedding output), so `layers[i]` is
the encoder layer stored in `features[:, i]`. Row order is the extractor's choice (text splits run
longest text first); `items[i]` and `labels[i]` always describe row i. IEMOCAP has one split "all"
with `grouping: "session"` and items grouped "Session1".."Session5"; other tasks have "train", "test".

After each batch the arrays are flushed and then the batch's item lines appended, so a row counts as
written once its line is there, and an interrupted extraction resumes with the rows that are missing
(with any number of processes). `items.json` is produced when a split completes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from numpy.lib.format import open_memmap

from daamkit.infra.checkpoint import atomic_write_json, read_json
from daamkit.infra.errors import DaamkitError

FORMAT_VERSION = 1
STORAGE_DTYPE = "float16"
MANIFEST_FILE = "manifest.json"
FEATURES_FILE = "features.npy"
LABELS_FILE = "labels.npy"
ITEMS_FILE = "items.json"
PARTIAL_ITEMS_SUFFIX = ".partial.jsonl"  # items.<rank>.partial.jsonl: committed rows of one writing process

# Manifest fields that identify what a cache holds; a writer refuses to add to a cache that differs in any.
IDENTITY_FIELDS = (
    "task",
    "encoder",
    "encoder_config_hash",
    "compute_dtype",
    "layers",
    "hidden_size",
    "classes",
    "fingerprint",
    "grouping",
)
_FLOAT16_MAX = float(np.finfo(np.float16).max)


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    """The manifest of a cache folder, None when the folder holds no cache yet."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        return None
    manifest = read_json(path)
    if manifest.get("version") != FORMAT_VERSION:
        raise DaamkitError(f"{path} has format version {manifest.get('version')!r}; expected {FORMAT_VERSION}")
    return manifest


def identity_mismatch(manifest: dict[str, Any], fields: dict[str, Any]) -> str | None:
    """A sentence naming the first identity field where `fields` disagrees with `manifest`, or None."""
    for key in IDENTITY_FIELDS:
        if key in fields and manifest.get(key) != fields[key]:
            return f"{key} is {_short(manifest.get(key))} in the cache but {_short(fields[key])} now"
    return None


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass
class FeatureSplit:
    """One split of a cache: memory-mapped features (N, L, d) float16, labels (N,) int64, item dicts."""

    name: str
    features: np.ndarray
    labels: np.ndarray
    items: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def groups(self) -> list[str | None]:
        """The group (IEMOCAP session) of every item, in row order."""
        return [item["group"] for item in self.items]


class FeatureCache:
    """Read access to a complete cache folder; open with `FeatureCache.open(directory)`."""

    def __init__(self, directory: Path, manifest: dict[str, Any]):
        self.directory = directory
        self.manifest = manifest

    @classmethod
    def open(cls, directory: str | Path) -> "FeatureCache":
        directory = Path(directory)
        manifest = read_manifest(directory)
        if manifest is None:
            raise DaamkitError(
                f"{directory} is not a feature cache ({MANIFEST_FILE} is missing); "
                "create it with `daamkit classify extract --out DIR`"
            )
        return cls(directory, manifest)

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def layers(self) -> list[int]:
        return list(self.manifest["layers"])

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    def split(self, name: str) -> FeatureSplit:
        """Open one complete split (features memory-mapped, read-only)."""
        info = self.manifest["splits"].get(name)
        if info is None:
            raise DaamkitError(f"feature cache {self.directory} has no split {name!r} (it has {self.splits})")
        if not info.get("complete"):
            raise DaamkitError(
                f"split {name!r} of {self.directory} is incomplete; rerun `daamkit classify extract` "
                "with the same options to finish it"
            )
        folder = self.directory / name
        for filename in (FEATURES_FILE, LABELS_FILE, ITEMS_FILE):
            if not (folder / filename).is_file():
                raise DaamkitError(f"feature cache split {folder} is missing {filename}")
        try:
            features = np.load(folder / FEATURES_FILE, mmap_mode="r")
            labels = np.load(folder / LABELS_FILE)
            items = json.loads((folder / ITEMS_FILE).read_text())
        except (ValueError, OSError, EOFError) as err:  # a truncated .npy, broken JSON (a ValueError)
            raise DaamkitError(f"feature cache split {folder} is damaged or truncated ({type(err).__name__}: {err}); "
                               "delete the split folder and rerun `daamkit classify extract`") from err
        expected = (info["num_items"], len(self.manifest["layers"]), self.manifest["hidden_size"])
        if features.shape != expected or labels.shape != (expected[0],) or len(items) != expected[0]:
            raise DaamkitError(
                f"feature cache split {folder} is inconsistent: features {features.shape}, labels "
                f"{labels.shape}, {len(items)} items; the manifest says {expected}"
            )
        return FeatureSplit(name, features, labels, items)

    def is_complete(self, name: str) -> bool:
        """Whether split `name` exists and finished extracting."""
        return bool(self.manifest["splits"].get(name, {}).get("complete"))


class FeatureCacheWriter:
    """Writes (or resumes writing) one split of a cache, alone or as one of several processes.

    `manifest_fields` holds every manifest key except `version`, `dtype`, `num_layers` and `splits`
    (those are filled here): task, encoder, encoder_config_hash, compute_dtype, layers, hidden_size,
    classes, fingerprint, grouping. Opening a folder whose manifest differs in any identity field raises
    DaamkitError (a cache never mixes encoders or datasets).

    With `shard=(rank, world)` and a `barrier` that waits for all processes, every process writes its own
    rows of the one memory-mapped array; `pending(batch_size)` hands each its share of the rows not yet
    written (by any earlier attempt, whatever its process count). A row is committed once its item line
    is in the process's `items.<rank>.jsonl` (written after the arrays are flushed).

        writer = FeatureCacheWriter(out, fields, "train", num_items=N, num_layers=L, hidden_size=d)
        for start, stop in writer.pending(batch): writer.write(start, feats, labels, items)
        writer.finish()
    """

    def __init__(
        self,
        directory: str | Path,
        manifest_fields: dict[str, Any],
        split: str,
        num_items: int,
        num_layers: int,
        hidden_size: int,
        shard: tuple[int, int] = (0, 1),
        barrier: Callable[[], None] = lambda: None,
    ):
        if num_items <= 0:
            raise DaamkitError(f"split {split!r} is empty: nothing to extract")
        if len(manifest_fields["layers"]) != num_layers or manifest_fields["hidden_size"] != hidden_size:
            raise ValueError("manifest layers/hidden_size disagree with num_layers/hidden_size")
        self.directory = Path(directory)
        self.split = split
        self.num_items = num_items
        self.folder = self.directory / split
        self.rank, self.world = shard
        self._barrier = barrier
        self._shape = (num_items, num_layers, hidden_size)
        if self.rank == 0:
            self._manifest = self._prepare_manifest(manifest_fields, num_layers)
            self._create_arrays()
        self._barrier()
        self._manifest = read_manifest(self.directory)
        self._features = open_memmap(self.folder / FEATURES_FILE, mode="r+")
        self._labels = open_memmap(self.folder / LABELS_FILE, mode="r+")
        self.done = np.zeros(num_items, dtype=bool)
        for record in self._committed_items():
            self.done[record["row"]] = True
        self._barrier()  # every process has read the progress before anyone adds to it
        self.completed = int(self.done.sum())
        self._items_path = self.folder / f"items.{self.rank}{PARTIAL_ITEMS_SUFFIX}"

    def _prepare_manifest(self, fields: dict[str, Any], num_layers: int) -> dict[str, Any]:
        existing = read_manifest(self.directory)
        if existing is None:
            manifest = {**fields, "version": FORMAT_VERSION, "dtype": STORAGE_DTYPE, "num_layers": num_layers,
                        "splits": {}}
        else:
            mismatch = identity_mismatch(existing, fields)
            if mismatch:
                raise DaamkitError(
                    f"feature cache {self.directory} was built with other settings ({mismatch}); "
                    "use another `out` folder or delete this one"
                )
            manifest = existing
        previous = manifest["splits"].get(self.split)
        if previous is not None and previous["num_items"] != self.num_items:
            raise DaamkitError(
                f"split {self.split!r} of {self.directory} holds {previous['num_items']} items, not {self.num_items}; "
                "use another `out` folder or delete this one"
            )
        if previous is None or previous.get("complete"):
            manifest["splits"][self.split] = {"num_items": self.num_items, "complete": False}
            for stale in self.folder.glob(f"items.*{PARTIAL_ITEMS_SUFFIX}"):  # a finished split is rewritten
                stale.unlink()
        atomic_write_json(self.directory / MANIFEST_FILE, manifest)
        return manifest

    def _create_arrays(self) -> None:
        """Fresh arrays unless rows of an interrupted attempt are there to keep (rank 0 only)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        features_path, labels_path = self.folder / FEATURES_FILE, self.folder / LABELS_FILE
        if features_path.is_file() and labels_path.is_file() and any(True for _ in self._committed_items()):
            features = np.load(features_path, mmap_mode="r")
            if features.shape != self._shape:
                raise DaamkitError(f"{features_path} has shape {features.shape}, expected {self._shape}")
            return
        for stale in self.folder.glob(f"items.*{PARTIAL_ITEMS_SUFFIX}"):
            stale.unlink()
        open_memmap(features_path, mode="w+", dtype=np.float16, shape=self._shape).flush()
        open_memmap(labels_path, mode="w+", dtype=np.int64, shape=(self.num_items,)).flush()

    def _committed_items(self):
        """Item records (with their `row`) of every committed row, from every process's items file."""
        for path in sorted(self.folder.glob(f"items.*{PARTIAL_ITEMS_SUFFIX}")):
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut off by an interruption: its row is not committed
                    continue
                if 0 <= record.get("row", -1) < self.num_items:
                    yield record

    def pending(self, batch_size: int) -> list[tuple[int, int]]:
        """This process's share of the batches of rows not yet written: [start, stop) ranges in order."""
        batches: list[list[int]] = []
        for row in np.flatnonzero(~self.done).tolist():
            if batches and batches[-1][1] == row and row - batches[-1][0] < batch_size:
                batches[-1][1] = row + 1
            else:
                batches.append([row, row + 1])
        return [(start, stop) for start, stop in batches[self.rank::self.world]]

    def write(self, start: int, features: np.ndarray, labels: Sequence[int], items: Sequence[dict[str, Any]]) -> None:
        """Store rows [start, start + len(features)) and commit them (flush, then their item lines)."""
        count = len(features)
        if count != len(labels) or count != len(items) or start < 0 or start + count > self.num_items:
            raise ValueError(f"bad batch: {count} feature rows, {len(labels)} labels, {len(items)} items at {start}")
        if self.done[start:start + count].any():
            raise ValueError(f"rows {start}..{start + count - 1} are already written")
        features = np.asarray(features, dtype=np.float32)
        if not np.isfinite(features).all() or np.abs(features).max(initial=0.0) > _FLOAT16_MAX:
            raise DaamkitError(
                f"encoder features of items {start}..{start + count - 1} are not finite or exceed the float16 "
                "range; try `dtype` float32"
            )
        self._features[start:start + count] = features.astype(np.float16)
        self._labels[start:start + count] = np.asarray(labels, dtype=np.int64)
        self._features.flush()
        self._labels.flush()
        with open(self._items_path, "a") as handle:
            handle.writelines(json.dumps({"row": start + i, **_item_record(item)}) + "\n"
                              for i, item in enumerate(items))
        self.done[start:start + count] = True

    def finish(self) -> None:
        """Once every process is done: write items.json, drop the partial files, mark the split complete."""
        self._barrier()
        del self._features, self._labels
        if self.rank == 0:
            records = {record["row"]: record for record in self._committed_items()}
            if len(records) != self.num_items:
                raise ValueError(f"split {self.split!r} has {len(records)} of {self.num_items} rows")
            items = [{key: records[row][key] for key in ("id", "group", "utterance")} for row in range(self.num_items)]
            atomic_write_json(self.folder / ITEMS_FILE, items)
            self._manifest["splits"][self.split]["complete"] = True
            atomic_write_json(self.directory / MANIFEST_FILE, self._manifest)
            for path in self.folder.glob(f"items.*{PARTIAL_ITEMS_SUFFIX}"):
                path.unlink()
        self._barrier()


def _item_record(item: dict[str, Any]) -> dict[str, Any]:
    return {"id": str(item["id"]), "group": item.get("group"), "utterance": item.get("utterance")}
