"""The Importance-Factor layer ablation (paper Tables 6-7): does the IF ranking point at the layers that matter?

`run_ablation(RUN_DIR)` reads the ranked layers of a finished DAAM run (`RUN_DIR/importance/importance.json`),
trains the same decoder with the same settings, folds and seeds on its top-k and on its bottom-k layers
(`classify train --layers`), and writes the comparison: layers chosen, per-split and mean accuracy of
both, and their difference, with the full-layer run as a reference row (`ablation.md`, `ablation.json`).
The two runs live in `OUT/top` and `OUT/bottom`; a rerun reuses whichever already finished and continues
an interrupted one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from daamkit.classify.decoders import MIN_LAYERS_PER_HEAD, max_density_heads
from daamkit.classify.experiment import METRICS_FILE, RUN_FILE, RunContext, load_run
from daamkit.classify.importance import IMPORTANCE_DIR
from daamkit.classify.report import METRICS
from daamkit.classify.training import train_decoder
from daamkit.infra.checkpoint import atomic_write_json, read_json
from daamkit.infra.errors import DaamkitError
from daamkit.infra.output_paths import output_folder
from daamkit.infra.progress import log

ABLATION_JSON, ABLATION_MD = "ablation.json", "ablation.md"


def read_ranking(run_dir: Path) -> list[int]:
    """Encoder layer numbers of a DAAM run, most important first (from its Importance Factor outputs)."""
    path = run_dir / IMPORTANCE_DIR / "importance.json"
    importance = read_json(path, (
        f"{run_dir} has no Importance Factor ranking ({path} is missing); the ablation needs a finished "
        "DAAM run (daam-v1, daam-v2, gqdaam, mixture); run `daamkit classify importance RUN_DIR` first"
    ))
    try:
        return [int(layer) for layer in importance["ranked_layers"]]
    except (KeyError, TypeError, ValueError) as err:
        raise DaamkitError(f"{path} holds no list of ranked_layers: {err}") from err


def choose_layers(ranking: list[int], k: int) -> dict[str, list[int]]:
    """The k highest- and k lowest-IF layers (each sorted by layer number)."""
    if k < 1 or 2 * k > len(ranking):
        raise DaamkitError(
            f"`k` must be between 1 and {len(ranking) // 2} for a run on {len(ranking)} layers "
            f"(top-k and bottom-k must not overlap), got {k}"
        )
    return {"top": sorted(ranking[:k]), "bottom": sorted(ranking[-k:])}


def _train_or_reuse(context: RunContext, out: Path, layers: list[int], label: str, mixed_precision: str,
                    cpu: bool) -> dict:
    """metrics.json of the decoder trained on `layers` in `out` (trained now unless it already finished)."""
    path = out / METRICS_FILE
    if path.is_file():
        metrics = read_json(path)
        if metrics.get("layers") != layers:
            raise DaamkitError(
                f"{out} already holds a run on layers {metrics.get('layers')}, not {layers} (the IF ranking "
                "changed?); delete it or pass another `out`"
            )
        log(f"{label}: reusing the finished run in {out}")
        return metrics
    run, source_decoder = context.run, context.decoder
    decoder, heads, method = ablation_decoder(run["decoder"], len(layers))
    return train_decoder(
        context.cache.directory, decoder, out, layers=",".join(map(str, layers)), epochs=run["epochs"],
        lr=run["lr"], batch_size=run["batch_size"], seed=run["seed"], runs=run["runs"], heads=heads,
        gaussians=source_decoder.gaussians, dropout=source_decoder.dropout, head=source_decoder.head,
        selection=context.selection,
        dev_fraction=run["dev_fraction"], loss=run["loss"],
        weight_decay=run["weight_decay"], mixed_precision=mixed_precision, cpu=cpu,
        method=f"{run['method']} · {label}{method}", resume=(out / RUN_FILE).is_file(),
    )


def ablation_decoder(source: dict, num_layers: int) -> tuple[str, Optional[int], str]:
    """(decoder, heads, label suffix) for the source decoder on `num_layers` layers, said in one log line.

    Every head must span at least 2 layers, so heads are the source's or fewer. Over one layer DAAM is the
    identity (its gate is exactly 1), so a single-layer ablation trains the decoder's head alone, labelled so.
    """
    name = source["decoder"]
    if num_layers < MIN_LAYERS_PER_HEAD:
        log(f"ablation on {num_layers} layer: DAAM over one layer is the identity, so the {name} decoder is "
            "trained without it (its head only)")
        return "conv-head", None, " (no DAAM: identity over one layer)"
    heads = min(source["heads"], max_density_heads(num_layers))
    log(f"ablation on {num_layers} layers: {name} with {heads} head(s) (the source run had {source['heads']}; "
        f"each head spans at least {MIN_LAYERS_PER_HEAD} layers)")
    return name, heads, ""


def _row(name: str, label: str, layers: list[int], metrics: dict, metric: str, run_dir: Path) -> dict:
    block = metrics[metric]
    return {"name": name, "label": label, "layers": layers, "run_dir": str(run_dir),
            "per_split": {e["name"]: e["accuracy"] for e in block["per_split"]}, "mean": block["mean"],
            "std": block["std"]}


def comparison(run: dict, source: dict, results: dict, layers: dict, k: int, out_dir: Path, run_dir: Path) -> dict:
    """The ablation as data: one table per metric with reference/top/bottom rows and top - bottom."""
    tables = []
    for metric in METRICS:
        if metric not in results["top"]:
            continue
        rows = [_row("all", "All layers (reference)", run["layer_numbers"], source, metric, run_dir)]
        for name in ("top", "bottom"):
            rows.append(_row(name, f"{name.capitalize()}-{k} IF layers", layers[name], results[name], metric,
                             out_dir / name))
        top, bottom = rows[1], rows[2]
        tables.append({
            "metric": metric,
            "columns": list(top["per_split"]),
            "rows": rows,
            "difference": {"per_split": {s: top["per_split"][s] - bottom["per_split"][s] for s in top["per_split"]},
                           "mean": top["mean"] - bottom["mean"]},
        })
    return {"task": run["task"], "encoder": run["encoder"], "decoder": run["decoder"]["decoder"],
            "method": run["method"], "k": k, "ranking": results["ranking"], "tables": tables}


def render_markdown(table: dict) -> str:
    """Markdown tables in the layout of the paper's Tables 6-7 (accuracy in %)."""
    lines: list[str] = []
    for block in table["tables"]:
        title = "utterance-level accuracy (%)" if block["metric"] == "utterance_accuracy" else "accuracy (%)"
        lines += [f"### IF layer ablation · {table['task']} · {table['method']} · {title}", ""]
        header = ["Layers", "Encoder layers", *block["columns"], "Mean ± std"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in block["rows"]:
            cells = [row["label"], ", ".join(map(str, row["layers"]))]
            cells += [f"{100 * row['per_split'][name]:.2f}" for name in block["columns"]]
            lines.append("| " + " | ".join([*cells, f"{100 * row['mean']:.2f} ± {100 * row['std']:.2f}"]) + " |")
        diff = block["difference"]
        cells = [f"{100 * diff['per_split'][name]:+.2f}" for name in block["columns"]]
        cells = ["Difference (top − bottom)", "", *cells, f"{100 * diff['mean']:+.2f}"]
        lines += ["| " + " | ".join(cells) + " |", ""]
    return "\n".join(lines)


def run_ablation(run_dir: str | Path, features_dir: Optional[str | Path] = None, *, k: int = 3,
                 out_dir: Optional[str | Path] = None, mixed_precision: str = "auto", cpu: bool = False) -> dict:
    """Train on the top-k and bottom-k IF layers of `run_dir` and write the comparison into `out_dir`.

    Returns {"table": the comparison as data, "markdown": its text, "out_dir": where it was written}.
    """
    run_dir = Path(run_dir)
    source = read_json(run_dir / METRICS_FILE, f"{run_dir} is not a finished run ({METRICS_FILE} is missing)")
    ranking = read_ranking(run_dir)
    layers = choose_layers(ranking, k)
    context = load_run(run_dir, features_dir)  # also checks that the feature cache matches the run
    out_dir = output_folder(out_dir if out_dir is not None else run_dir / f"ablation-k{k}")
    results: dict = {"ranking": ranking}
    for name in ("top", "bottom"):
        results[name] = _train_or_reuse(context, out_dir / name, layers[name],
                                        f"{name}-{k} IF layers", mixed_precision, cpu)
    table = comparison(context.run, source, results, layers, k, out_dir, run_dir)
    markdown = render_markdown(table)
    atomic_write_json(out_dir / ABLATION_JSON, table)
    (out_dir / ABLATION_MD).write_text(markdown + "\n")
    return {"table": table, "markdown": markdown, "out_dir": str(out_dir)}
