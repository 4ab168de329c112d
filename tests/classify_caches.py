"""Tiny synthetic feature caches in the real on-disk format, for the decoder/training/report tests.

Classes differ by a mean shift in a few "informative" layers only, so a decoder can learn them and the
density gates have something to find.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from daamkit.classify.feature_cache import FeatureCacheWriter

CLASSES = ["neu", "hap", "ang", "sad"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny decoders run faster on one thread than on two contended ones (tests share a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _fields(task: str, num_layers: int, hidden: int, classes: list[str], grouping) -> dict:
    return {
        "task": task,
        "encoder": "tiny-random-encoder",
        "encoder_config_hash": "0" * 8,
        "compute_dtype": "float32",
        "layers": list(range(1, num_layers + 1)),
        "hidden_size": hidden,
        "classes": classes,
        "fingerprint": f"synthetic-{task}",
        "grouping": grouping,
    }


def _features(rng: np.random.Generator, labels: np.ndarray, num_layers: int, hidden: int, signal: float):
    features = rng.normal(size=(len(labels), num_layers, hidden)).astype(np.float32)
    for label in np.unique(labels):
        direction = np.random.default_rng(100 + int(label)).normal(size=hidden)
        features[labels == label, num_layers // 2 :] += signal * direction  # informative: upper layers
    return features


def write_split(directory: Path, fields: dict, split: str, labels: np.ndarray, items: list[dict],
                features: np.ndarray) -> None:
    writer = FeatureCacheWriter(directory, fields, split, len(labels), features.shape[1], features.shape[2])
    writer.write(0, features, labels, items)
    writer.finish()


def write_train_test_cache(directory: Path, *, task: str = "agnews", num_train: int = 40, num_test: int = 16,
                           num_layers: int = 4, hidden: int = 16, num_classes: int = 3, seed: int = 0,
                           signal: float = 1.5) -> Path:
    """A `train`/`test` cache (AG News / CIFAR-100 style)."""
    rng = np.random.default_rng(seed)
    fields = _fields(task, num_layers, hidden, [f"class{i}" for i in range(num_classes)], None)
    for split, count in (("train", num_train), ("test", num_test)):
        labels = np.arange(count) % num_classes
        items = [{"id": f"{split}-{i}", "group": None, "utterance": None} for i in range(count)]
        write_split(directory, fields, split, labels, items, _features(rng, labels, num_layers, hidden, signal))
    return directory


def write_session_cache(directory: Path, *, sessions: int = 5, utterances_per_session: int = 8,
                        chunks_per_utterance: int = 2, num_layers: int = 8, hidden: int = 16, seed: int = 0,
                        signal: float = 1.5) -> Path:
    """An IEMOCAP-style cache: one split `all`, items grouped by session, utterances cut in chunks."""
    rng = np.random.default_rng(seed)
    fields = _fields("iemocap", num_layers, hidden, CLASSES, "session")
    labels, items = [], []
    for s in range(1, sessions + 1):
        for u in range(utterances_per_session):
            utterance = f"Ses0{s}_utt{u:02d}"
            for c in range(chunks_per_utterance):
                labels.append(u % len(CLASSES))
                items.append({"id": f"{utterance}_c{c}", "group": f"Session{s}", "utterance": utterance})
    labels = np.asarray(labels)
    write_split(directory, fields, "all", labels, items, _features(rng, labels, num_layers, hidden, signal))
    return directory
