"""Paper-style tables from finished run folders (`classify report RUN_DIR...`).

One accuracy table per (task, encoder) and metric (chunk-level `accuracy`; IEMOCAP adds
`utterance_accuracy`): one row per run (method), one column per fold/run, then mean +- std, as in the
paper's Tables 2-4, and a note when no `linear` probe row is among them, or naming the rows more than
`BEHIND_LINEAR` below it, and one naming the folds/runs that collapsed (`collapsed`). Beside a probe, every
other row gets its paired gap to it (`vs_linear`, see `paired_gap`). Rows of one method trained more than
once (e.g. with several seeds) are labelled with their seeds (`label`). Runs of DAAM
decoders also fill the Gaussian-parameter table (paper Table 5): the min and max of the learned mean
offsets and scaled variances. Any run folder with a `metrics.json` of this shape takes part, so LoRA
baselines land in the same tables (their `trainable_parameters`, when given, is shown as the trainable
parameter count).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from statistics import fmean, stdev
from typing import Optional, Sequence

from daamkit.classify.experiment import METRICS_FILE
from daamkit.infra.checkpoint import read_json
from daamkit.infra.errors import DaamkitError

METRICS = ("accuracy", "utterance_accuracy")
FORMATS = ("markdown", "json")
# A row whose mean accuracy is this far below the best linear-probe row of its table is named under it.
BEHIND_LINEAR = 0.02


def _read_metrics(run_dir: Path) -> dict:
    path = run_dir / METRICS_FILE
    metrics = read_json(path, f"{run_dir} is not a finished run ({METRICS_FILE} is missing)")
    if not isinstance(metrics.get("accuracy"), dict) or "per_split" not in metrics["accuracy"]:
        raise DaamkitError(f"{path} has no accuracy.per_split; is it a daamkit classify run?")
    return metrics


def build_report(run_dirs: Sequence[str | Path]) -> dict:
    """The report as data: `tables` (accuracy tables) and `gaussian_parameters` (rows of Table 5)."""
    if not run_dirs:
        raise DaamkitError("give at least one run folder")
    tables: dict[tuple, dict] = {}
    gaussian_rows = []
    for run_dir in map(Path, run_dirs):
        metrics = _read_metrics(run_dir)
        method = metrics.get("method") or metrics.get("decoder") or run_dir.name
        for metric in METRICS:
            block = metrics.get(metric)
            if block is None:
                continue
            key = (metrics.get("task"), metrics.get("encoder"), metric)
            table = tables.setdefault(key, {"task": key[0], "encoder": key[1], "metric": metric, "columns": [],
                                            "rows": []})
            per_split = {entry["name"]: entry["accuracy"] for entry in block["per_split"]}
            table["columns"] += [name for name in per_split if name not in table["columns"]]
            table["rows"].append({
                "method": method,
                "decoder": metrics.get("decoder"),
                "run_dir": str(run_dir),
                "attention_parameters": metrics.get("attention_parameters"),
                "trainable_parameters": metrics.get("trainable_parameters", metrics.get("decoder_parameters")),
                "per_split": per_split,
                "mean": block["mean"],
                "std": block["std"],
                "collapsed": metrics.get("collapsed", []),
                "seeds": metrics.get("seeds"),
            })
        if metrics.get("gaussian_parameters"):
            gaussian_rows.append({"method": method, "task": metrics.get("task"), "run_dir": str(run_dir),
                                  "seeds": metrics.get("seeds"), **metrics["gaussian_parameters"]})
    _label_rows(gaussian_rows)
    for table in tables.values():
        _label_rows(table["rows"])
        probes = [row for row in table["rows"] if row["decoder"] == "linear"]
        table["behind_linear"] = _behind_linear(table["rows"], probes)
        for row in table["rows"]:
            row["vs_linear"] = None if row["decoder"] == "linear" else paired_gap(row, probes)
    return {"tables": list(tables.values()), "gaussian_parameters": gaussian_rows}


def _label_rows(rows: list[dict]) -> None:
    """Set each row's `label`: its method, with its seeds where another row has the same method."""
    repeated = Counter(row["method"] for row in rows)
    for row in rows:
        row["label"] = _seeded_label(row) if repeated[row["method"]] > 1 else row["method"]


def _seeded_label(row: dict) -> str:
    """The method name with the seeds of its runs, which tell apart two invocations of one method."""
    seeds = row["seeds"]
    if not seeds:
        return f"{row['method']} ({Path(row['run_dir']).name})"
    if len(set(seeds)) == 1:  # one run, or folds that all share the run's seed
        return f"{row['method']} (seed {seeds[0]})"
    if list(seeds) == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"{row['method']} (seeds {seeds[0]}-{seeds[-1]})"
    return f"{row['method']} (seeds {', '.join(map(str, seeds))})"


def _behind_linear(rows: list[dict], probes: list[dict]) -> list[dict]:
    """Rows whose mean is more than BEHIND_LINEAR below the best of the linear-probe `probes`, with the gap (none
    without one)."""
    if not probes:
        return []
    best = max(probe["mean"] for probe in probes)
    return [{"method": row["method"], "label": row["label"], "gap": row["mean"] - best} for row in rows
            if row["decoder"] != "linear" and row["mean"] < best - BEHIND_LINEAR]


def paired_gap(row: dict, probes: list[dict]) -> Optional[dict]:
    """`row`'s accuracy minus the best probe's trained with the same seeds, over the folds/runs both have.

    Same seeds mean the same dev split and test items in every fold/run, so the per-split differences
    cancel the split-to-split noise that the rows' own std carries; `stderr` is the standard error of
    their mean (None with one split), blind to what all splits share (the lr that lr auto picked on the
    first one). None when no probe shares the row's seeds and splits.
    """
    matching = [probe for probe in probes if probe["seeds"] == row["seeds"]
                and set(probe["per_split"]) & set(row["per_split"])]
    if not matching:
        return None
    probe = max(matching, key=lambda candidate: candidate["mean"])
    shared = [name for name in row["per_split"] if name in probe["per_split"]]
    diffs = [row["per_split"][name] - probe["per_split"][name] for name in shared]
    stderr = stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
    return {"gap": fmean(diffs), "stderr": stderr, "splits": len(diffs), "linear": probe["label"]}


def _gap_cell(gap: Optional[dict]) -> str:
    if gap is None:
        return "-"
    return f"{100 * gap['gap']:+.2f}" + ("" if gap["stderr"] is None else f" ± {100 * gap['stderr']:.2f}")


def _percent(value) -> str:
    return "-" if value is None else f"{100.0 * value:.2f}"


def _count(value) -> str:
    return "-" if value is None else f"{value:,}"


def render_markdown(report: dict) -> str:
    """Markdown tables (accuracies in %) for the terminal or a README."""
    lines: list[str] = []
    for table in report["tables"]:
        title = "utterance-level accuracy (%)" if table["metric"] == "utterance_accuracy" else "accuracy (%)"
        lines += [f"### {table['task']} · {table['encoder']} · {title}", ""]
        paired = any(row["vs_linear"] for row in table["rows"])
        header = ["Method", "Attention params", "Trainable params", *table["columns"], "Mean ± std"]
        header += ["Δ vs linear ± s.e."] if paired else []
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in table["rows"]:
            cells = [row["label"], _count(row["attention_parameters"]), _count(row["trainable_parameters"])]
            cells += [_percent(row["per_split"].get(name)) for name in table["columns"]]
            cells.append(f"{_percent(row['mean'])} ± {_percent(row['std'])}")
            cells += [_gap_cell(row["vs_linear"])] if paired else []
            lines.append("| " + " | ".join(cells) + " |")
        if paired:
            lines.append("(Δ vs linear: the mean of the per-fold/run differences from the linear probe trained "
                         "with the same seeds, so on the same dev splits and test items; ± its standard error, "
                         "which does not cover a choice shared by all of them, such as the lr picked by lr auto: "
                         "another --seed shows that)")
        if not any(row["decoder"] == "linear" for row in table["rows"]):
            lines.append("(no linear-probe row: train one with `classify train --decoder linear` on the same "
                         "features, the simplest honest baseline)")
        elif table["behind_linear"]:
            behind = ", ".join(f"{row['label']} {100 * row['gap']:+.2f}" for row in table["behind_linear"])
            lines.append(f"(more than {100 * BEHIND_LINEAR:g} points below the linear probe: {behind}; on these "
                         "features the simplest baseline is the better classifier for these rows)")
        stuck = [f"{row['label']} ({', '.join(row['collapsed'])})" for row in table["rows"] if row["collapsed"]]
        if stuck:
            lines.append(f"(collapsed to always predicting the class frequencies: {'; '.join(stuck)}; these "
                         "accuracies say little about the model: raise the lr or train longer)")
        lines.append("")
    if report["gaussian_parameters"]:
        lines += ["### Learned Gaussian parameters", "",
                  "| Method | Task | Mean offset min | Mean offset max | Scaled variance min | Scaled variance max |",
                  "|---|---|---|---|---|---|"]
        for row in report["gaussian_parameters"]:
            offset, variance = row["mean_offset"], row["scaled_variance"]
            lines.append(f"| {row['label']} | {row['task']} | {offset['min']:.4f} | {offset['max']:.4f} | "
                         f"{variance['min']:.4f} | {variance['max']:.4f} |")
        lines.append("")
    return "\n".join(lines)


def render_report(run_dirs: Sequence[str | Path], fmt: str = "markdown") -> str:
    """The report of `run_dirs` as markdown or JSON text."""
    if fmt not in FORMATS:
        raise DaamkitError(f"`fmt` must be one of {', '.join(FORMATS)}, got {fmt!r}")
    report = build_report(run_dirs)
    return json.dumps(report, indent=2) if fmt == "json" else render_markdown(report)
