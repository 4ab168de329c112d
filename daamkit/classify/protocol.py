"""The honest evaluation protocol: which items train, which select the best epoch, which are tested.

- Tasks with a `train`/`test` split: `runs` repeated runs with seeds seed, seed+1, ...; the test split
  is the official test set.
- Tasks grouped by session (IEMOCAP): leave-one-session-out folds; a fold's test items are exactly one
  session and its training pool is every other session.
- In both, the dev split that picks the best epoch is carved from the training pool only (stratified by
  class, seeded). Items that share an utterance (IEMOCAP 5 s chunks) stay together on one side, so the
  dev accuracy is not inflated by chunks of utterances that are also trained on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from daamkit.infra.errors import DaamkitError


@dataclass(frozen=True)
class SplitPlan:
    """One fold or run: indices into the cache split `train_source` (train, dev) and `test_source` (test)."""

    name: str
    seed: int
    train_source: str
    test_source: str
    train: np.ndarray
    dev: np.ndarray
    test: np.ndarray


def parse_layers(spec: Optional[str], available: Sequence[int]) -> Optional[list[int]]:
    """Positions in the cache's layer axis for a `--layers` spec such as "9", "19-21" or "1,3,5-7".

    Numbers are encoder layer numbers as listed in the manifest's `layers`; None means all layers.
    """
    if spec is None or not str(spec).strip():
        return None
    wanted: list[int] = []
    for part in str(spec).split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise DaamkitError(f"`layers` {spec!r}: expected numbers and ranges such as 9, 19-21 or 1,3,5-7")
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if last < first:
            raise DaamkitError(f"`layers` {spec!r}: range {first}-{last} is backwards")
        wanted.extend(range(first, last + 1))
    available = list(available)
    missing = [layer for layer in wanted if layer not in available]
    if missing:
        raise DaamkitError(
            f"`layers` {spec!r}: layer(s) {missing} are not in the feature cache (it holds layers "
            f"{available[0]}-{available[-1]})"
        )
    if len(set(wanted)) != len(wanted):
        raise DaamkitError(f"`layers` {spec!r} names a layer twice")
    return [available.index(layer) for layer in wanted]


def dev_split(
    pool: np.ndarray, labels: np.ndarray, units: Optional[Sequence[str]], fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split `pool` (item indices) into (train, dev), stratified by class; items of one unit stay together.

    `units[i]` names the unit of item i (e.g. its utterance id) or is None for one unit per item. Every
    class with at least two units gives round(fraction * units) >= 1 of them to dev.
    """
    if not 0.0 < fraction < 1.0:
        raise DaamkitError(f"`dev_fraction` must be between 0 and 1, got {fraction}")
    unit_of = pool if units is None else np.asarray([units[i] for i in pool], dtype=object)
    unit_names, first, inverse = np.unique(unit_of, return_index=True, return_inverse=True)
    unit_labels = labels[pool[first]]
    dev_units = []
    for label in np.unique(unit_labels):
        members = np.flatnonzero(unit_labels == label)
        if len(members) < 2:
            continue
        take = min(len(members) - 1, max(1, int(round(fraction * len(members)))))
        dev_units.extend(rng.permutation(members)[:take])
    in_dev = np.isin(inverse, np.asarray(dev_units, dtype=np.int64))
    if not in_dev.any() or in_dev.all():
        raise DaamkitError(
            f"the training pool ({len(pool)} items, {len(unit_names)} units) is too small to carve a dev split"
        )
    return np.sort(pool[~in_dev]), np.sort(pool[in_dev])


def leave_one_group_out(
    groups: Sequence[str], labels: np.ndarray, units: Optional[Sequence[str]], source: str, seed: int,
    dev_fraction: float,
) -> list[SplitPlan]:
    """One fold per group (IEMOCAP session): test = that group, train/dev carved from the other groups."""
    groups = np.asarray(groups, dtype=object)
    names = sorted(set(groups), key=_natural_key)
    if len(names) < 2:
        raise DaamkitError(f"leave-one-group-out needs at least 2 groups, the cache has {names}")
    plans = []
    for k, name in enumerate(names):
        test = np.flatnonzero(groups == name)
        pool = np.flatnonzero(groups != name)
        train, dev = dev_split(pool, labels, units, dev_fraction, np.random.default_rng([seed, k]))
        plans.append(SplitPlan(name, seed, source, source, train, dev, test))
    return plans


def repeated_runs(
    num_train: int, num_test: int, labels: np.ndarray, units: Optional[Sequence[str]], runs: int, seed: int,
    dev_fraction: float,
) -> list[SplitPlan]:
    """`runs` runs on the official train/test split, seeds seed..seed+runs-1, each with its own dev split."""
    if runs < 1:
        raise DaamkitError(f"`runs` must be at least 1, got {runs}")
    plans = []
    for r in range(runs):
        run_seed = seed + r
        train, dev = dev_split(np.arange(num_train), labels, units, dev_fraction, np.random.default_rng(run_seed))
        plans.append(SplitPlan(f"run{r + 1}", run_seed, "train", "test", train, dev, np.arange(num_test)))
    return plans


def _natural_key(name: str) -> list:
    """Sort "Session10" after "Session9"."""
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", str(name))]
