"""Controlled comparison of `attention` variants: variants x seeds trained on one budget and data, each
evaluated on the same held-out images, summarised as mean +- std per variant.

Each run lives in `OUT/<variant>-seed<k>/` (a normal `train` run folder) and, once evaluated, holds
`compare_run.json`; a later call reuses finished runs and resumes interrupted ones, so a killed comparison
continues where it stopped. The summary is written to `OUT/compare.json` and `OUT/compare.md`.
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from daamkit.infra.checkpoint import atomic_write_bytes, atomic_write_json, read_json
from daamkit.infra.errors import DaamkitError
from daamkit.infra.output_paths import output_folder
from daamkit.infra.progress import log, progress_bar
from daamkit.vqvae.config import ATTENTION_CHOICES, TrainConfig, VQVAEConfig
from daamkit.vqvae.data import CropDataset, evaluation_set, training_splits
from daamkit.vqvae.evaluate import evaluate_model, lpips_for_evaluation
from daamkit.vqvae.io import default_device, load_model
from daamkit.vqvae.train import RESUME_ADJUSTABLE, RunPaths, saved_run_configs, train

RUN_RECORD = "compare_run.json"
METRIC_LPIPS_NET = "alex"  # the reported LPIPS, as `evaluate` reports it (whatever trunk a run trains with)
METRICS = ("psnr", "ssim", "lpips", "codebook_usage", "perplexity", "ms_per_step")


@dataclass
class Comparison:
    status: str                    # "completed", "interrupted", or "running" (written between runs)
    runs: list[dict[str, Any]]     # one record per finished run
    summary: list[dict[str, Any]]  # one row per variant, best PSNR first
    notes: list[str]               # the best variant and which gaps are within one std

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def run_name(variant: str, seed: int) -> str:
    return f"{variant}-seed{seed}"


def _check_lists(variants: Sequence[str], seeds: Sequence[int]) -> None:
    if not variants:
        raise DaamkitError("`variants` is empty; give at least one `attention` value")
    if not seeds:
        raise DaamkitError("`seeds` is empty; give at least one seed")
    unknown = [variant for variant in variants if variant not in ATTENTION_CHOICES]
    if unknown:
        raise DaamkitError(f"`variants` lists {', '.join(map(repr, unknown))}; each must be one of {ATTENTION_CHOICES}")
    for name, values in (("variants", variants), ("seeds", seeds)):
        repeated = sorted({str(v) for v in values if list(values).count(v) > 1})
        if repeated:
            raise DaamkitError(f"`{name}` lists {', '.join(repeated)} more than once")
    if any(seed < 0 for seed in seeds):
        raise DaamkitError(f"`seeds` must be >= 0, got {list(seeds)}")


def _check_saved_run(folder: Path, model_config: VQVAEConfig, train_config: TrainConfig) -> None:
    """A run already in `folder` must have been started with exactly this comparison's settings."""
    saved_model, saved_train = saved_run_configs(folder)
    wanted, saved = {**model_config.to_dict(), **train_config.to_dict()}, {**saved_model.to_dict(), **saved_train.to_dict()}
    differing = sorted(key for key in wanted if key not in RESUME_ADJUSTABLE - {"steps"} and wanted[key] != saved.get(key))
    if differing:
        first = differing[0]
        raise DaamkitError(f"{folder} holds a run with other settings (`{first}` {saved.get(first)!r}, here "
                           f"{wanted[first]!r}); compare on one budget: use another `out` or remove that folder")


def _held_out(train_config: TrainConfig, eval_data: str | None) -> tuple[CropDataset, str]:
    """The images every run is evaluated on: `eval_data`'s, else the training source's held-out part."""
    if eval_data is not None:
        return (evaluation_set(eval_data, train_config.image_size, field="eval_data",
                               resize_mode=train_config.resize_mode), eval_data)
    splits = training_splits(train_config.data, train_config.image_size, seed=0, resize_mode=train_config.resize_mode)
    return splits.val, f"held-out part of {train_config.data}"


def _summarise(runs: list[dict[str, Any]], variants: Sequence[str]) -> tuple[list[dict[str, Any]], list[str]]:
    rows = []
    for variant in variants:
        mine = [run for run in runs if run["variant"] == variant]
        if not mine:
            continue
        row: dict[str, Any] = {"variant": variant, "seeds": [run["seed"] for run in mine],
                               "parameters": mine[0]["parameters"]}
        for key in METRICS:
            values = [run[key] for run in mine if run[key] is not None]
            row[key] = statistics.fmean(values) if values else None
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else None
        rows.append(row)
    rows.sort(key=lambda row: -row["psnr"])
    notes = []
    if rows:
        best = rows[0]
        notes.append(f"best held-out PSNR: {best['variant']} ({best['psnr']:.2f} dB over {len(best['seeds'])} seed(s))")
        notes += [_gap_note(best["variant"], row["variant"], runs) for row in rows[1:]]
    return rows, notes


def _gap_note(best: str, other: str, runs: list[dict[str, Any]]) -> str:
    """How far `other` is below `best`, seed by seed: a seed moves every variant alike (same crops, same
    initial convolutions), so the spread of the paired gaps is the noise a difference must beat."""
    psnr = {(run["variant"], run["seed"]): run["psnr"] for run in runs}
    gaps = [psnr[best, seed] - psnr[other, seed] for (variant, seed) in psnr if variant == other and (best, seed) in psnr]
    if len(gaps) < 2:
        return f"{other}: {statistics.fmean(gaps):.2f} dB below on {len(gaps)} shared seed(s): no std" if gaps else \
            f"{other}: no seed in common with {best}"
    mean, std = statistics.fmean(gaps), statistics.stdev(gaps)
    verdict = "within one std" if mean <= std else "larger than one std"
    return (f"{other}: {mean:.2f} +- {std:.2f} dB below (paired over {len(gaps)} seeds: "
            f"{', '.join(f'{gap:+.2f}' for gap in gaps)}), {verdict}")


def _number(value: float | None, std: float | None, digits: int) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f} +- {std:.{digits}f}" if std is not None else f"{value:.{digits}f}"


def markdown_table(comparison: Comparison) -> str:
    """The summary as a Markdown table (the best variant in bold) followed by the notes."""
    lines = ["| variant | seeds | held-out PSNR (dB) | SSIM | LPIPS | codebook usage % | perplexity | ms/step | parameters |",
             "|---|---|---|---|---|---|---|---|---|"]
    for index, row in enumerate(comparison.summary):
        name = f"**{row['variant']}** (best)" if index == 0 and len(comparison.summary) > 1 else row["variant"]
        lines.append(f"| {name} | {','.join(map(str, row['seeds']))} | {_number(row['psnr'], row['psnr_std'], 2)} | "
                     f"{_number(row['ssim'], row['ssim_std'], 4)} | {_number(row['lpips'], row['lpips_std'], 4)} | "
                     f"{_number(row['codebook_usage'], row['codebook_usage_std'], 1)} | "
                     f"{_number(row['perplexity'], row['perplexity_std'], 1)} | "
                     f"{_number(row['ms_per_step'], row['ms_per_step_std'], 0)} | {row['parameters']:,} |")
    return "\n".join(lines + [""] + [f"- {note}" for note in comparison.notes]) + "\n"


def _finished_record(folder: Path, steps: int, evaluated_on: str) -> dict[str, Any] | None:
    path = folder / RUN_RECORD
    if not path.is_file():
        return None
    record = read_json(path)
    if isinstance(record, dict) and record.get("step") == steps and record.get("evaluated_on") == evaluated_on:
        return record
    return None


def compare(model_config: VQVAEConfig, train_config: TrainConfig, variants: Sequence[str], seeds: Sequence[int],
            out_dir: str | Path, eval_data: str | None = None) -> Comparison:
    """Train (or reuse, or resume) every variant x seed with `train_config`'s budget and `model_config`'s
    architecture (only `attention` and `seed` change), evaluate each run's last checkpoint on the same
    held-out images, and write `compare.json` and `compare.md` into `out_dir`."""
    _check_lists(variants, seeds)
    # seed-major, so a comparison stopped early still has every variant on its first seeds; every variant's
    # config is validated here, before anything is trained
    plans = [(variant, seed, dataclasses.replace(model_config, attention=variant), train_config.replace(seed=seed))
             for seed in seeds for variant in variants]
    out = output_folder(out_dir)
    dataset, evaluated_on = _held_out(train_config, eval_data)
    device = default_device()
    lpips_model = lpips_for_evaluation(METRIC_LPIPS_NET, train_config.image_size, device)
    runs, status = [], "completed"
    log(f"comparing {len(variants)} variant(s) x {len(seeds)} seed(s), {train_config.steps} steps each, "
        f"evaluated on {evaluated_on} ({len(dataset)} images); runs in {out}")
    with progress_bar("runs", total=len(plans)) as task:
        for variant, seed, run_model, run_train in plans:
            folder = out / run_name(variant, seed)
            record = _finished_record(folder, run_train.steps, evaluated_on)
            if record is None:
                resume = RunPaths(folder).last.is_dir()
                if resume:
                    _check_saved_run(folder, run_model, run_train)
                result = train(run_model, run_train, folder, resume=resume)
                if result.status != "completed":
                    status = "interrupted"
                    break
                model, _ = load_model(RunPaths(folder).last, device)
                metrics = evaluate_model(model, dataset, device, run_train.batch_size, lpips_model,
                                         show_progress=False).metrics
                record = {"variant": variant, "seed": seed, "step": result.step, "evaluated_on": evaluated_on,
                          "parameters": model.num_parameters(), "ms_per_step": 1000.0 * result.train_seconds / result.step,
                          **{key: metrics[key] for key in ("psnr", "ssim", "lpips", "codebook_usage", "perplexity",
                                                           "num_images")}}
                atomic_write_json(folder / RUN_RECORD, record)
            else:
                log(f"reusing the finished run {folder}")
            runs.append(record)
            _write_table(out, Comparison("running", runs, *_summarise(runs, variants)))
            task.advance(psnr=record["psnr"])
    comparison = Comparison(status, runs, *_summarise(runs, variants))
    _write_table(out, comparison)
    return comparison


def _write_table(out: Path, comparison: Comparison) -> None:
    """`compare.json` and `compare.md`, rewritten after every run so a stopped comparison shows its finished runs."""
    atomic_write_json(out / "compare.json", comparison.to_dict())
    atomic_write_bytes(out / "compare.md", markdown_table(comparison).encode())
