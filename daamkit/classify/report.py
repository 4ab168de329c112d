"""Paper-style tables from finished run folders (`classify report RUN_DIR...`).

One accuracy table per (task, encoder, task data) and metric (chunk-level `accuracy`; IEMOCAP adds
`utterance_accuracy`): one row per run (method), one column per fold/run, then mean +- std, as in the
paper's Tables 2-4 (the `linear` probe rows first, the others in the order given), and a note when no
`linear` probe row is among them, or naming the rows more than `BEHIND_LINEAR` below it, and one naming
the folds/runs that collapsed (`collapsed`). Beside a probe, every other row gets its paired gap to it
(`vs_linear`, see `paired_gap`). Rows of one method trained more than once (e.g. with several seeds) are
labelled with their seeds (`label`); with `pool_seeds` the runs of one method and settings that differ
only in their seeds become one row (`pool_seed_rows`). Runs of DAAM decoders also fill the
Gaussian-parameter table (paper Table 5): the min and max of the learned mean offsets and scaled
variances. Any run folder with a `metrics.json` of this shape takes part, so LoRA baselines land in the
same tables (their `trainable_parameters`, when given, is shown as the trainable parameter count).
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path
from statistics import fmean, stdev
from typing import Optional, Sequence

from daamkit.classify.experiment import LORA_FILE, METRICS_FILE, RUN_FILE, summarize
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


def _run_settings(run_dir: Path) -> dict:
    """What a run's run.json (DAT) or lora.json (LoRA) says about its settings and data: `config` (the options
    as given), `data` (the fingerprint of the task data read) and `data_path` (the features or data folder).
    Empty for a folder without either file, or with one of another shape."""
    for name in (RUN_FILE, LORA_FILE):
        if (run_dir / name).is_file():
            run = read_json(run_dir / name)
            if not isinstance(run, dict):
                return {}
            cache = run.get("cache") if isinstance(run.get("cache"), dict) else {}
            config = run.get("config")
            return {"config": config if isinstance(config, dict) else None,
                    "data": cache.get("fingerprint") or run.get("fingerprint"),
                    "data_path": run.get("features") or run.get("data")}
    return {}


def _settings_key(run: dict) -> Optional[str]:
    """A run's settings as given, but its seed, and its data (`_run_settings`): what runs pooled into one row
    must share. None without settings (such a run is never pooled)."""
    if not run.get("config"):
        return None
    settings = {key: value for key, value in run["config"].items() if key != "seed"}
    return json.dumps([settings, run["data"]], sort_keys=True)


def build_report(run_dirs: Sequence[str | Path], pool_seeds: bool = False) -> dict:
    """The report as data: `tables` (accuracy tables) and `gaussian_parameters` (rows of Table 5).

    `pool_seeds`: the runs of one method trained with the same settings and data but other seeds become
    one row (`pool_seed_rows`)."""
    if not run_dirs:
        raise DaamkitError("give at least one run folder")
    tables: dict[tuple, dict] = {}
    gaussian_rows = []
    settings: dict[str, Optional[str]] = {}  # run folder -> what its pooled row must share (with `pool_seeds`)
    for run_dir in map(Path, run_dirs):
        metrics = _read_metrics(run_dir)
        run = _run_settings(run_dir)
        if pool_seeds:
            settings[str(run_dir)] = _settings_key(run)
        method = metrics.get("method") or metrics.get("decoder") or run_dir.name
        for metric in METRICS:
            block = metrics.get(metric)
            if block is None:
                continue
            # one table per task data too: a probe is only ever compared with decoders on its own data
            key = (metrics.get("task"), metrics.get("encoder"), run.get("data"), metric)
            table = tables.setdefault(key, {"task": key[0], "encoder": key[1], "data": key[2],
                                            "data_path": run.get("data_path"), "metric": metric, "columns": [],
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
            gaussian_rows.append({"method": method, "task": metrics.get("task"), "data": run.get("data"),
                                  "data_path": run.get("data_path"), "run_dir": str(run_dir),
                                  "seeds": metrics.get("seeds"), **metrics["gaussian_parameters"]})
    for data in dict.fromkeys(row["data"] for row in gaussian_rows):  # labels tell apart the runs of one data set
        _label_rows([row for row in gaussian_rows if row["data"] == data])
    for table in tables.values():
        _finish_table(table, settings if pool_seeds else None)
    return {"tables": list(tables.values()), "gaussian_parameters": gaussian_rows}


def _finish_table(table: dict, settings: Optional[dict[str, Optional[str]]]) -> None:
    """Pool a table's rows (when given the runs' `settings`), label them, and compare them with its probe."""
    probe_runs = [row for row in table["rows"] if row["decoder"] == "linear"]  # paired invocation by invocation
    if settings is not None:
        table["rows"] = pool_seed_rows(table["rows"], settings)
    table["rows"].sort(key=lambda row: row["decoder"] != "linear")  # the baseline first, the rest as given
    _label_rows(table["rows"])
    table["unpooled"] = []  # with pooling: the rows of a method whose runs stayed apart
    if settings is not None:
        repeated = Counter(row["method"] for row in table["rows"])
        table["unpooled"] = [row["label"] for row in table["rows"] if repeated[row["method"]] > 1]
    probes = [row for row in table["rows"] if row["decoder"] == "linear"]
    table["behind_linear"] = _behind_linear(table["rows"], probes)
    for row in table["rows"]:
        row["vs_linear"] = _gap_to_probe(row, probe_runs)


def _gap_to_probe(row: dict, probe_runs: list[dict]) -> Optional[dict]:
    """A row's `paired_gap` to the probe runs (None for a probe); a pooled row's `pooled_gap` of its runs'
    paired gaps, each also kept as that run's `vs_linear`."""
    for member in row.get("members", []):
        member["vs_linear"] = _gap_to_probe(member, probe_runs)
    if row["decoder"] == "linear":
        return None
    if "members" in row:
        return pooled_gap([member["vs_linear"] for member in row["members"]])
    return paired_gap(row, probe_runs)


def pool_seed_rows(rows: list[dict], settings: dict[str, Optional[str]]) -> list[dict]:
    """`rows` with every group of runs of one method, settings and data (`settings[run_dir]`, see
    `_settings_key`) but disjoint seeds merged into one row at the place of its first run.

    A pooled row holds every fold/run of its runs (named `run1 (seeds 3-5)`), their mean and population std,
    and its runs as `members`. Runs whose seeds overlap (the same seed trained twice) stay apart: pooling
    them would count one run twice.
    """
    groups = defaultdict(list)
    for row in rows:
        key = settings.get(row["run_dir"])
        if key is not None and row["seeds"]:
            groups[(row["method"], key)].append(row)
    pooled: dict[int, dict] = {}
    for members in groups.values():
        seeds = [seed for member in members for seed in set(member["seeds"])]
        if len(members) > 1 and len(seeds) == len(set(seeds)):
            merged = _pooled_row(members)
            pooled.update({id(member): merged for member in members})
    out, placed = [], set()
    for row in rows:
        merged = pooled.get(id(row), row)
        if id(merged) not in placed:
            placed.add(id(merged))
            out.append(merged)
    return out


def _pooled_row(members: list[dict]) -> dict:
    """One row for the runs `members`: their folds/runs side by side, tagged with the seeds of their run."""
    per_split = {f"{name} ({_seed_text(member['seeds'])})": accuracy
                 for member in members for name, accuracy in member["per_split"].items()}
    first = members[0]
    return {**{key: first[key] for key in ("method", "decoder", "attention_parameters", "trainable_parameters")},
            "run_dir": None, "per_split": per_split, **summarize(list(per_split.values())),
            "collapsed": [f"{name} ({_seed_text(member['seeds'])})" for member in members
                          for name in member["collapsed"]],
            "seeds": [seed for member in members for seed in member["seeds"]], "members": members}


def _label_rows(rows: list[dict]) -> None:
    """Set each row's `label`: its method, with its seeds where another row has the same method or it is pooled,
    and with its run folder where two rows would still read the same (e.g. one seed, other settings). The runs
    of a pooled row carry its label, the row they are shown in."""
    repeated = Counter(row["method"] for row in rows)
    for row in rows:
        row["label"] = _seeded_label(row) if repeated[row["method"]] > 1 or "members" in row else row["method"]
    clashes = Counter(row["label"] for row in rows)
    for row in rows:
        if clashes[row["label"]] > 1:
            row["label"] += f" [{row['run_dir'] or row['members'][0]['run_dir']}]"
        for member in row.get("members", []):
            member["label"] = row["label"]


def _seeded_label(row: dict) -> str:
    """The method name with the seeds of its runs, which tell apart two invocations of one method."""
    if not row["seeds"]:
        return f"{row['method']} ({Path(row['run_dir']).name})"
    return f"{row['method']} ({_seed_text(row['seeds'])})"


def _seed_text(seeds: Sequence[int]) -> str:
    """`seed 7` (one run, or folds that all share the run's seed), `seeds 0-2` or `seeds 1, 5`."""
    unique = sorted(set(seeds))
    if len(unique) == 1:
        return f"seed {unique[0]}"
    if unique == list(range(unique[0], unique[-1] + 1)):
        return f"seeds {unique[0]}-{unique[-1]}"
    return f"seeds {', '.join(map(str, unique))}"


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
    return {"gap": fmean(diffs), "stderr": stderr, "splits": len(diffs), "invocations": 1, "linear": probe["label"]}


def pooled_gap(gaps: list[Optional[dict]]) -> Optional[dict]:
    """A pooled row's gap to the probe from its runs' `paired_gap`s: their mean, ± the standard error over the
    runs (invocations), each one observation.

    The runs of one invocation share the lr that lr auto picked on its first run; across invocations that
    choice varies too, so this error covers it, which the per-split error of one invocation cannot. With a
    single paired invocation it is that invocation's gap.
    """
    paired = [gap for gap in gaps if gap is not None]
    if len(paired) < 2:
        return paired[0] if paired else None
    values = [gap["gap"] for gap in paired]
    return {"gap": fmean(values), "stderr": stdev(values) / math.sqrt(len(values)),
            "splits": sum(gap["splits"] for gap in paired), "invocations": len(paired),
            "linear": ", ".join(dict.fromkeys(gap["linear"] for gap in paired))}


def _gap_cell(gap: Optional[dict]) -> str:
    if gap is None:
        return "-"
    points = round(100 * gap["gap"], 2) + 0.0  # a gap that rounds to zero reads +0.00, not -0.00
    return f"{points:+.2f}" + ("" if gap["stderr"] is None else f" ± {100 * gap['stderr']:.2f}")


def _percent(value) -> str:
    return "-" if value is None else f"{100.0 * value:.2f}"


def _count(value) -> str:
    return "-" if value is None else f"{value:,}"


def render_markdown(report: dict) -> str:
    """Markdown tables (accuracies in %) for the terminal or a README."""
    lines: list[str] = []
    headings = Counter((table["task"], table["encoder"], table["metric"]) for table in report["tables"])
    for table in report["tables"]:
        title = "utterance-level accuracy (%)" if table["metric"] == "utterance_accuracy" else "accuracy (%)"
        data = ""  # named where the same task and encoder ran on other data too
        if headings[table["task"], table["encoder"], table["metric"]] > 1:
            data = f" · {table['data_path'] or 'data ' + str(table['data'])}"
        lines += [f"### {table['task']} · {table['encoder']}{data} · {title}", ""]
        paired = any(row["vs_linear"] for row in table["rows"])
        pooled = any("members" in row for row in table["rows"])
        columns = ["Runs"] if pooled else table["columns"]  # pooled rows' folds/runs do not line up in columns
        header = ["Method", "Attention params", "Trainable params", *columns, "Mean ± std"]
        header += ["Δ vs linear ± s.e."] if paired else []
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in table["rows"]:
            cells = [row["label"], _count(row["attention_parameters"]), _count(row["trainable_parameters"])]
            cells += ([str(len(row["per_split"]))] if pooled
                      else [_percent(row["per_split"].get(name)) for name in table["columns"]])
            cells.append(f"{_percent(row['mean'])} ± {_percent(row['std'])}")
            cells += [_gap_cell(row["vs_linear"])] if paired else []
            lines.append("| " + " | ".join(cells) + " |")
        if paired and pooled:
            lines.append("(Δ vs linear: each invocation's mean difference from the linear probe trained with the "
                         "same seeds, so on the same dev splits and test items; for a row pooled from several "
                         "invocations, their mean ± its standard error over the invocations, which covers the lr "
                         "each one picked; for one invocation, ± the standard error over its folds/runs)")
        elif paired:
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
        if table["unpooled"]:
            lines.append(f"(left apart: {', '.join(table['unpooled'])}; runs pool only with the same method, "
                         "settings and features, disjoint seeds, and a run.json or lora.json)")
        stuck = [f"{row['label']} ({', '.join(row['collapsed'])})" for row in table["rows"] if row["collapsed"]]
        if stuck:
            lines.append(f"(collapsed to always predicting the class frequencies: {'; '.join(stuck)}; these "
                         "accuracies say little about the model: raise the lr or train longer)")
        lines.append("")
    if report["gaussian_parameters"]:
        rows = report["gaussian_parameters"]
        several = len({row["data"] for row in rows}) > 1  # then a Data column says which set each run learned on
        header = ["Method", "Task", *(["Data"] if several else []), "Mean offset min", "Mean offset max",
                  "Scaled variance min", "Scaled variance max"]
        lines += ["### Learned Gaussian parameters", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in rows:
            offset, variance = row["mean_offset"], row["scaled_variance"]
            data = [row["data_path"] or f"data {row['data']}"] if several else []
            cells = [row["label"], row["task"], *data, f"{offset['min']:.4f}", f"{offset['max']:.4f}",
                     f"{variance['min']:.4f}", f"{variance['max']:.4f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def render_report(run_dirs: Sequence[str | Path], fmt: str = "markdown", pool_seeds: bool = False) -> str:
    """The report of `run_dirs` as markdown or JSON text (`pool_seeds`: see `build_report`)."""
    if fmt not in FORMATS:
        raise DaamkitError(f"`fmt` must be one of {', '.join(FORMATS)}, got {fmt!r}")
    report = build_report(run_dirs, pool_seeds)
    return json.dumps(report, indent=2) if fmt == "json" else render_markdown(report)
