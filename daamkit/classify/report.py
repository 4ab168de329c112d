"""Paper-style tables from finished run folders (`classify report RUN_DIR...`).

One accuracy table per (task, encoder) and metric (chunk-level `accuracy`; IEMOCAP adds
`utterance_accuracy`): one row per run (method), one column per fold/run, then mean +- std, as in the
paper's Tables 2-4, and a note when no `linear` probe row is among them, or naming the rows more than
`BEHIND_LINEAR` below it, and one naming the folds/runs that collapsed (`collapsed`). Runs of DAAM
decoders also fill the Gaussian-parameter table (paper Table 5): the min and max of the learned mean
offsets and scaled variances. Any run folder with a `metrics.json` of this shape takes part, so LoRA
baselines land in the same tables (their `trainable_parameters`, when given, is shown as the trainable
parameter count).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

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
            })
        if metrics.get("gaussian_parameters"):
            gaussian_rows.append({"method": method, "task": metrics.get("task"), "run_dir": str(run_dir),
                                  **metrics["gaussian_parameters"]})
    for table in tables.values():
        table["behind_linear"] = _behind_linear(table["rows"])
    return {"tables": list(tables.values()), "gaussian_parameters": gaussian_rows}


def _behind_linear(rows: list[dict]) -> list[dict]:
    """Rows whose mean is more than BEHIND_LINEAR below the best linear-probe row, with the gap (none without one)."""
    probes = [row["mean"] for row in rows if row["decoder"] == "linear"]
    if not probes:
        return []
    best = max(probes)
    return [{"method": row["method"], "gap": row["mean"] - best} for row in rows
            if row["decoder"] != "linear" and row["mean"] < best - BEHIND_LINEAR]


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
        header = ["Method", "Attention params", "Trainable params", *table["columns"], "Mean ± std"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in table["rows"]:
            cells = [row["method"], _count(row["attention_parameters"]), _count(row["trainable_parameters"])]
            cells += [_percent(row["per_split"].get(name)) for name in table["columns"]]
            cells.append(f"{_percent(row['mean'])} ± {_percent(row['std'])}")
            lines.append("| " + " | ".join(cells) + " |")
        if not any(row["decoder"] == "linear" for row in table["rows"]):
            lines.append("(no linear-probe row: train one with `classify train --decoder linear` on the same "
                         "features, the simplest honest baseline)")
        elif table["behind_linear"]:
            behind = ", ".join(f"{row['method']} {100 * row['gap']:+.2f}" for row in table["behind_linear"])
            lines.append(f"(more than {100 * BEHIND_LINEAR:g} points below the linear probe: {behind}; on these "
                         "features the simplest baseline is the better classifier for these rows)")
        stuck = [f"{row['method']} ({', '.join(row['collapsed'])})" for row in table["rows"] if row["collapsed"]]
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
            lines.append(f"| {row['method']} | {row['task']} | {offset['min']:.4f} | {offset['max']:.4f} | "
                         f"{variance['min']:.4f} | {variance['max']:.4f} |")
        lines.append("")
    return "\n".join(lines)


def render_report(run_dirs: Sequence[str | Path], fmt: str = "markdown") -> str:
    """The report of `run_dirs` as markdown or JSON text."""
    if fmt not in FORMATS:
        raise DaamkitError(f"`fmt` must be one of {', '.join(FORMATS)}, got {fmt!r}")
    report = build_report(run_dirs)
    return json.dumps(report, indent=2) if fmt == "json" else render_markdown(report)
