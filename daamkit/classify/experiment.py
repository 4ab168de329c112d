"""One run's setup, shared by train, evaluate and importance: the cache, the paper defaults, the splits,
the device, and `run.json`, from which a finished run can be rebuilt exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from daamkit.classify.decoders import DecoderConfig
from daamkit.classify.feature_cache import FeatureCache, FeatureSplit
from daamkit.classify.protocol import SplitPlan, leave_one_group_out, repeated_runs
from daamkit.classify.run_config import MIXED_PRECISION
from daamkit.infra.checkpoint import read_json
from daamkit.infra.errors import DaamkitError

RUN_FILE = "run.json"
LORA_FILE = "lora.json"  # a LoRA run's settings, in place of run.json
METRICS_FILE = "metrics.json"
SPEECH_TASKS = ("iemocap", "audio-folder")
# The paper's experiments; every other task is a user's own data, where `lr` defaults to "auto".
PAPER_TASKS = ("iemocap", "agnews", "cifar100")
PAPER_EPOCHS = 35
LORA_PAPER_EPOCHS = 3  # the paper's LoRA / LoRA+ baselines
# The paper's budget (35 epochs over 5k-120k items) is thousands of optimizer steps; on a user's few
# hundred items 35 epochs are a few hundred steps, so the default budget is at least this many steps.
MIN_TRAIN_STEPS = 500
# Dropout on a DAT decoder's classifier inputs on a user's task (the paper's tasks: none): on a few hundred
# items a DAT decoder memorises the training set within a few epochs. Measured with the linear head over
# five Debian text sets x 3 seeds: daam-v1, daam-v2 and mixture ended 0.88 points below the linear probe on
# average with 0.8 and 1.38 with 0.5 (mha and gqa, three sets: 1.42 vs 1.31); with the mix head on debian7
# and lang6, 0.5 instead of 0.8 was lower in 6 of 10 decoder x set cells and higher in 4. The linear
# probe has no hidden layer to regularise this way (its best test accuracy fell by 1-2 points with it), so
# it keeps none.
USER_DROPOUT = 0.8
# The DAT decoder head on a user's task (the paper's tasks: `conv`, the paper's). On the README's five
# Debian text sets (270-540 training items, all-MiniLM-L6-v2, 3 seeds) the `mix` head put 31 of the 35
# decoder x set cells within 2 points of the linear probe, the `linear` head (one Linear over all N x d
# features) 26; on debian7, where the encoder's last layer alone beats all layers even for a converged
# logistic regression, daam-v1 went from 4.5 to 1.4 points below the probe. Both are far cheaper than the
# conv head (a daam-v1 run with the linear head trained about 20x faster on the CPU).
USER_HEAD = "mix"
# The residual path (x + attention(x)) of the decoders that have one, on a user's task (the paper's tasks:
# none, as the paper's decoders). With the mix head on the README's five Debian text sets (3 seeds each) it
# moved mha's gap to the linear probe from -0.56 / +1.17 / -1.79 / -0.97 / +0.63 points to +0.44 / +1.33 /
# -0.12 / -0.69 / -0.42, and mha-bn's (BatchNorm after the sum) from -1.67 / +1.17 / -4.64 / -0.14 / +0.00 to
# -0.11 / +2.00 / -1.90 / -0.56 / +0.63. Giving gqa, gqdaam, daam-v1 and daam-v2 one too and moving mha-bn's
# BatchNorm before the attention then moved, on debian7 (the set where the other layers hurt most) over 12
# seeds (4 runs of 3): mha-bn -2.11 -> -1.25, gqdaam -2.92 -> -1.99, daam-v2 -2.86 -> -1.76, gqa -2.32 ->
# -2.35 (the README has the other sets).
USER_RESIDUAL = True
# `runs` on a user's train/test task whose training pool is below SMALL_POOL_ITEMS items (the paper's
# smallest set has 5k): one run's test accuracy there moves with its seed (dev split and initialisation) by
# a standard deviation of up to 2.2 points on the README's five Debian sets, as much as the decoders differ,
# so a run reports the mean and spread of SMALL_POOL_RUNS seeded runs. Cheap: these pools train in seconds.
SMALL_POOL_ITEMS = 5000
SMALL_POOL_RUNS = 3
# The last `LATE_EPOCHS` epochs' mean dev loss ranks the lr candidates of a last-epoch run.
LATE_EPOCHS = 10
# `lr="auto"`: candidates tried on the first fold/run, the best on its dev items wins (see split_loop.pick_lr).
LR_GRID = (3e-4, 1e-3, 3e-3)


def is_speech(manifest: dict) -> bool:
    """Speech tasks get batch 8 and the focal loss (paper defaults)."""
    return manifest.get("task") in SPEECH_TASKS


def is_paper_task(manifest: dict) -> bool:
    """The paper's experiments keep the paper's recipe; every other task gets the small-data defaults."""
    return manifest.get("task") in PAPER_TASKS


def default_lr(manifest: dict) -> float:
    """1e-4, or 5e-5 when the frozen encoder is a Llama model (paper defaults)."""
    return 5e-5 if "llama" in str(manifest.get("encoder", "")).lower() else 1e-4


def default_batch_size(manifest: dict) -> int:
    return 8 if is_speech(manifest) else 32


def resolve_lr(lr, manifest: dict) -> float | str:
    """A positive float, or "auto"; None is "auto" on a user's task and the paper's value on the paper's tasks."""
    if lr is None:
        return default_lr(manifest) if is_paper_task(manifest) else "auto"
    if isinstance(lr, str) and lr.strip().lower() == "auto":
        return "auto"
    try:
        value = float(lr)
    except (TypeError, ValueError):
        value = float("nan")
    if not value > 0:
        raise DaamkitError(f"`lr` must be a positive number or auto, got {lr!r}")
    return value


def default_epochs(num_train_items: int, batch_size: int, paper_epochs: int = PAPER_EPOCHS) -> int:
    """The paper's epochs, or more when they are fewer than MIN_TRAIN_STEPS steps of this training pool."""
    steps_per_epoch = -(-num_train_items // batch_size)
    return max(paper_epochs, -(-MIN_TRAIN_STEPS // steps_per_epoch))


def _task_default(value: Any, manifest: dict, *, paper: Any, user: Any) -> Any:
    """`value` as given; None is `paper` on the paper's tasks and `user` on a user's task."""
    if value is not None:
        return value
    return paper if is_paper_task(manifest) else user


def resolve_dropout(dropout: Optional[float], manifest: dict, linear_probe: bool) -> float:
    """`dropout` as given; None is USER_DROPOUT for a DAT decoder on a user's task, else 0 (the paper's)."""
    return float(_task_default(dropout, manifest, paper=0.0, user=0.0 if linear_probe else USER_DROPOUT))


def resolve_head(head: Optional[str], manifest: dict) -> str:
    """The DAT decoder's head; None is `mix` on a user's task (see USER_HEAD), `conv` (the paper's) on the paper's."""
    return _task_default(head, manifest, paper="conv", user=USER_HEAD)


def resolve_residual(residual: Optional[bool], manifest: dict, decoder_has_one: bool) -> bool:
    """The residual path of a decoder that has one (`DecoderSpec.residual`); None is on for them on a user's task
    (see USER_RESIDUAL), off on the paper's."""
    return bool(_task_default(residual, manifest, paper=False, user=USER_RESIDUAL and decoder_has_one))


def resolve_runs(runs: Optional[int], manifest: dict, train_items: int) -> int:
    """Seeded runs; None is SMALL_POOL_RUNS on a user's train/test task under SMALL_POOL_ITEMS training items,
    else 1 (the paper's tasks keep one run; a session-grouped cache trains one model per fold instead)."""
    small_pool = not manifest.get("grouping") and train_items < SMALL_POOL_ITEMS
    return _task_default(runs, manifest, paper=1, user=SMALL_POOL_RUNS if small_pool else 1)


def resolve_selection(selection: Optional[str], manifest: dict) -> str:
    """The checkpoint a split keeps; None is "last-epoch" on a user's task and "best-epoch" on the paper's."""
    return _task_default(selection, manifest, paper="best-epoch", user="last-epoch")


def resolve_mixed_precision(choice: str) -> str:
    """`auto` -> bf16 on a GPU that supports it, fp16 on other GPUs, no mixed precision on CPU."""
    if choice not in MIXED_PRECISION:
        raise DaamkitError(f"`mixed_precision` must be one of {', '.join(MIXED_PRECISION)}, got {choice!r}")
    if choice != "auto":
        return choice
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def make_accelerator(mixed_precision: str, cpu: bool = False):
    """An Accelerate `Accelerator` for device placement and mixed precision (works under `accelerate launch`).

    Accelerate keeps one global state per process; in a single process (e.g. a notebook that trains in
    bf16 and then evaluates in float32) that state is reset so each call gets the settings it asks for.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    precision = resolve_mixed_precision(mixed_precision)
    try:
        return Accelerator(mixed_precision=precision, cpu=cpu)
    except ValueError as err:
        if PartialState().num_processes > 1:
            raise DaamkitError(f"cannot change mixed precision/device inside a distributed launch: {err}") from err
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(mixed_precision=precision, cpu=cpu)


def plan_splits(grouping: Optional[str], sources: dict[str, FeatureSplit], *, seed: int, runs: int,
                dev_fraction: float) -> list[SplitPlan]:
    """Leave-one-group-out folds when items are grouped (IEMOCAP sessions), else `runs` seeded runs on train/test."""
    if grouping:
        if runs != 1:
            raise DaamkitError("`runs` is for train/test tasks; a session-grouped cache trains one model per fold")
        (source,) = sources.values()
        return leave_one_group_out(source.groups, source.labels, _units(source), source.name, seed, dev_fraction)
    train, test = sources["train"], sources["test"]
    return repeated_runs(len(train), len(test), train.labels, _units(train), runs, seed, dev_fraction)


def open_sources(cache: FeatureCache) -> dict[str, FeatureSplit]:
    """The splits a run reads: the one grouped split, or `train` and `test`."""
    if cache.manifest.get("grouping"):
        if len(cache.splits) != 1:
            raise DaamkitError(f"a session-grouped cache must hold one split, {cache.directory} has {cache.splits}")
        return {name: cache.split(name) for name in cache.splits}
    missing = [name for name in ("train", "test") if name not in cache.splits]
    if missing:
        raise DaamkitError(f"feature cache {cache.directory} has no {' or '.join(missing)} split; extract it first")
    return {name: cache.split(name) for name in ("train", "test")}


def _units(split: FeatureSplit) -> Optional[list]:
    """Utterance ids when items are chunks of utterances (kept together in dev splits), else None."""
    utterances = [item.get("utterance") for item in split.items]
    return utterances if any(u is not None for u in utterances) else None


@dataclass
class RunContext:
    """A run rebuilt from `run.json` plus a feature cache: what evaluate and importance need."""

    run_dir: Path
    run: dict[str, Any]
    cache: FeatureCache
    sources: dict[str, FeatureSplit]
    plans: list[SplitPlan]

    @property
    def layer_positions(self) -> list[int]:
        return self.run["layer_positions"]

    @property
    def decoder(self) -> DecoderConfig:
        """The run's decoder (fields a run.json saved before them lacks, such as `head`, take their defaults)."""
        return DecoderConfig(**self.run["decoder"])

    @property
    def selection(self) -> str:
        """The checkpoint each split keeps (runs saved before `selection` existed kept the best epoch)."""
        return self.run.get("selection", "best-epoch")

    def checkpoint_dir(self, split_name: str) -> Path:
        return split_checkpoint_dir(self.run_dir, split_name)


def check_new_run_folder(out_dir: Path, settings_file: str, overwrite: bool) -> None:
    """A new run replaces a finished run (METRICS_FILE) or an unfinished one (`settings_file`) only with `overwrite`."""
    if overwrite:
        return
    if (out_dir / METRICS_FILE).exists():
        raise DaamkitError(f"{out_dir} already holds a finished run; pass `overwrite` or choose another `out`")
    if (out_dir / settings_file).exists():
        raise DaamkitError(f"{out_dir} holds an unfinished run; pass `resume` to continue it or `overwrite`")


def resumable_settings(out_dir: Path, settings_file: str) -> dict:
    """The saved settings of the unfinished run in `out_dir` (`resume`); a missing or finished run is refused."""
    settings = read_json(out_dir / settings_file,
                         f"`resume`: {out_dir} holds no run to continue ({settings_file} is missing)")
    if (out_dir / METRICS_FILE).exists():
        raise DaamkitError(f"`resume`: the run in {out_dir} has finished already ({METRICS_FILE} exists)")
    return settings


def split_checkpoint_dir(run_dir: Path, split_name: str) -> Path:
    """Where the best checkpoint of one fold/run lives."""
    return Path(run_dir) / "splits" / split_name / "best"


def load_run(run_dir: str | Path, features_dir: Optional[str | Path] = None) -> RunContext:
    """Rebuild a finished run: its settings, its cache (or `features_dir`, which must match) and its splits."""
    run_dir = Path(run_dir)
    run = read_json(run_dir / RUN_FILE, f"{run_dir} is not a training run folder ({RUN_FILE} is missing)")
    if features_dir is None and not Path(run["features"]).is_dir():
        raise DaamkitError(f"the feature cache of run {run_dir} ({run['features']}) is gone; pass `features` DIR")
    cache = FeatureCache.open(features_dir if features_dir is not None else run["features"])
    manifest = cache.manifest
    for key in ("classes", "hidden_size", "layers", "grouping", "fingerprint", "encoder_config_hash"):
        if manifest.get(key) != run["cache"].get(key):
            raise DaamkitError(
                f"feature cache {cache.directory} does not match run {run_dir}: its {key} differs "
                f"({manifest.get(key)!r} vs {run['cache'].get(key)!r})"
            )
    sources = open_sources(cache)
    plans = plan_splits(manifest.get("grouping"), sources, seed=run["seed"], runs=run["runs"],
                        dev_fraction=run["dev_fraction"])
    return RunContext(run_dir, run, cache, sources, plans)


def summarize(values: list[float]) -> dict[str, float]:
    """Mean and population standard deviation of per-split accuracies."""
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std())}
