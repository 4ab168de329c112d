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
    <split>/progress.json  {"completed": n}: rows [0, n) are final (written only while extracting)

`layers` are indices into the encoder's `hidden_states` tuple (0 = embedding output), so `layers[i]` is
the encoder layer stored in `features[:, i]`. Row order is the extractor's choice (text splits run
longest text first); `items[i]` and `labels[i]` always describe row i. IEMOCAP has one split "all"
with `grouping: "session"` and items grouped "Session1".."Session5"; other tasks have "train", "test".

Rows are written in order. After each batch the arrays are flushed and `progress.json` is replaced
atomically, so an interrupted extraction resumes from the last committed row. `items.json` is produced
when a split completes (rows in flight live in `items.partial.jsonl` until then).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

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
PROGRESS_FILE = "progress.json"
PARTIAL_ITEMS_FILE = "items.partial.jsonl"

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
        features = np.load(folder / FEATURES_FILE, mmap_mode="r")
        labels = np.load(folder / LABELS_FILE)
        items = json.loads((folder / ITEMS_FILE).read_text())
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
    """Writes (or resumes writing) one split of a cache; rows must arrive in order.

    `manifest_fields` holds every manifest key except `version`, `dtype`, `num_layers` and `splits`
    (those are filled here): task, encoder, encoder_config_hash, compute_dtype, layers, hidden_size,
    classes, fingerprint, grouping. Opening a folder whose manifest differs in any identity field raises
    DaamkitError (a cache never mixes encoders or datasets). `completed` says where to resume.

        writer = FeatureCacheWriter(out, fields, "train", num_items=N, num_layers=L, hidden_size=d)
        for start in range(writer.completed, N, batch): writer.write(start, feats, labels, items)
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
    ):
        if num_items <= 0:
            raise DaamkitError(f"split {split!r} is empty: nothing to extract")
        if len(manifest_fields["layers"]) != num_layers or manifest_fields["hidden_size"] != hidden_size:
            raise ValueError("manifest layers/hidden_size disagree with num_layers/hidden_size")
        self.directory = Path(directory)
        self.split = split
        self.num_items = num_items
        self.folder = self.directory / split
        self._shape = (num_items, num_layers, hidden_size)
        self._manifest = self._prepare_manifest(manifest_fields, num_layers)
        self.completed = self._open_arrays()

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
            if previous is not None:  # rewriting a finished split: its old rows are no longer valid
                (self.folder / PROGRESS_FILE).unlink(missing_ok=True)
        atomic_write_json(self.directory / MANIFEST_FILE, manifest)
        return manifest

    def _open_arrays(self) -> int:
        self.folder.mkdir(parents=True, exist_ok=True)
        progress = self.folder / PROGRESS_FILE
        completed = json.loads(progress.read_text())["completed"] if progress.is_file() else 0
        features_path, labels_path = self.folder / FEATURES_FILE, self.folder / LABELS_FILE
        if completed and features_path.is_file() and labels_path.is_file():
            self._features = open_memmap(features_path, mode="r+")
            self._labels = open_memmap(labels_path, mode="r+")
            if self._features.shape != self._shape or self._labels.shape != (self.num_items,):
                raise DaamkitError(f"{features_path} has shape {self._features.shape}, expected {self._shape}")
        else:
            completed = 0
            self._features = open_memmap(features_path, mode="w+", dtype=np.float16, shape=self._shape)
            self._labels = open_memmap(labels_path, mode="w+", dtype=np.int64, shape=(self.num_items,))
        self._items_path = self.folder / PARTIAL_ITEMS_FILE
        kept = self._items_path.read_text().splitlines()[:completed] if completed and self._items_path.is_file() else []
        if len(kept) != completed:
            raise DaamkitError(f"{self._items_path} lost rows; delete {self.folder} and extract again")
        self._items_path.write_text("".join(line + "\n" for line in kept))
        return completed

    def write(self, start: int, features: np.ndarray, labels: Sequence[int], items: Sequence[dict[str, Any]]) -> None:
        """Store rows [start, start + len(features)) and commit them (flush + atomic progress update)."""
        if start != self.completed:
            raise ValueError(f"rows must be written in order: expected start {self.completed}, got {start}")
        count = len(features)
        if count != len(labels) or count != len(items) or start + count > self.num_items:
            raise ValueError(f"bad batch: {count} feature rows, {len(labels)} labels, {len(items)} items at {start}")
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
            handle.writelines(json.dumps(_item_record(item)) + "\n" for item in items)
        self.completed = start + count
        atomic_write_json(self.folder / PROGRESS_FILE, {"completed": self.completed})

    def finish(self) -> None:
        """Mark the split complete: write items.json, drop the progress files, update the manifest."""
        if self.completed != self.num_items:
            raise ValueError(f"split {self.split!r} has {self.completed} of {self.num_items} rows")
        items = [json.loads(line) for line in self._items_path.read_text().splitlines()]
        atomic_write_json(self.folder / ITEMS_FILE, items)
        del self._features, self._labels
        self._manifest["splits"][self.split]["complete"] = True
        atomic_write_json(self.directory / MANIFEST_FILE, self._manifest)
        self._items_path.unlink()
        (self.folder / PROGRESS_FILE).unlink()


def _item_record(item: dict[str, Any]) -> dict[str, Any]:
    return {"id": str(item["id"]), "group": item.get("group"), "utterance": item.get("utterance")}
