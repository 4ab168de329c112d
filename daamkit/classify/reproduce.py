"""One command per paper experiment (`classify reproduce`): every row of the paper's tables, resumable.

For a task, data folder and encoder it runs, in `OUT`:

    features/                      the feature cache (`classify extract`, reused when valid)
    runs/<decoder>/                one `classify train` run per decoder (linear probe, mha ... mixture)
    runs/lora-r<R>/, runs/loraplus-r<R>/   the LoRA and LoRA+ baselines (`classify lora`)
    ablation-k<K>/                 the IF layer ablation of the `--ablation-source` run (`classify ablate`)
    report.md, report.json         the accuracy tables of every finished run plus the ablation table
    reproduce.json                 the settings; resuming finished runs with other settings is refused

A run counts as finished when its `metrics.json` exists; a rerun skips it, so an interrupted experiment
resumes where it stopped (an unfinished decoder run continues from its last epoch, a LoRA run restarts).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from daamkit.classify.ablation import render_markdown as render_ablation
from daamkit.classify.ablation import run_ablation
from daamkit.classify.decoders import DENSITY_DECODERS, REGISTRY, TABLE_DECODERS, decoder_config
from daamkit.classify.experiment import LORA_FILE, LORA_PAPER_EPOCHS, METRICS_FILE, PAPER_EPOCHS, RUN_FILE, default_lr
from daamkit.classify.extract import extract_features
from daamkit.classify.feature_cache import FeatureCache
from daamkit.classify.lora import train_lora
from daamkit.classify.report import build_report, render_markdown
from daamkit.classify.training import train_decoder
from daamkit.infra.checkpoint import atomic_write_json, read_json
from daamkit.infra.errors import DaamkitError
from daamkit.infra.output_paths import output_folder
from daamkit.infra.progress import log

LORA_METHODS = ("lora", "loraplus")
METHODS = (*TABLE_DECODERS, *LORA_METHODS, "ablation")
GROUPED_TASKS = ("iemocap",)  # leave-one-session-out folds instead of seeded runs
SETTINGS_FILE = "reproduce.json"
QUICK = {"epochs": 2, "lora_epochs": 1, "runs": 1, "max_items": 64}
FULL = {"epochs": PAPER_EPOCHS, "lora_epochs": LORA_PAPER_EPOCHS, "runs": 3, "max_items": None}


@dataclass(frozen=True)
class ReproduceOptions:
    """What to run and how; `build` parses the CLI values and fills the paper (or `--quick`) defaults."""

    methods: tuple[str, ...]
    epochs: int
    lora_epochs: int
    runs: int
    seed: int
    heads: Optional[int]
    lora_ranks: tuple[int, ...]
    k: int
    ablation_source: str
    max_items: Optional[int]
    batch_size: int
    dtype: str
    mixed_precision: str
    cpu: bool

    @classmethod
    def build(cls, *, methods: Optional[str] = None, quick: bool = False, epochs: Optional[int] = None,
              lora_epochs: Optional[int] = None, runs: Optional[int] = None, seed: int = 0,
              heads: Optional[int] = None, lora_ranks: str = "4,8", k: int = 3, ablation_source: str = "daam-v1",
              max_items: Optional[int] = None, batch_size: int = 8, dtype: str = "float32",
              mixed_precision: str = "auto", cpu: bool = False) -> "ReproduceOptions":
        defaults = QUICK if quick else FULL
        chosen = METHODS if methods is None else tuple(m.strip() for m in methods.split(",") if m.strip())
        unknown = [m for m in chosen if m not in METHODS]
        if unknown or not chosen:
            raise DaamkitError(f"`methods`: unknown or empty {unknown or methods!r}; choose from {', '.join(METHODS)}")
        if ablation_source not in DENSITY_DECODERS:
            raise DaamkitError(f"`ablation_source` must be a DAAM decoder ({', '.join(DENSITY_DECODERS)}), "
                               f"got {ablation_source!r}")
        if "ablation" in chosen and ablation_source not in chosen:
            raise DaamkitError(f"the ablation ranks layers with the {ablation_source} run; add {ablation_source} "
                               "to `methods` or choose another `ablation_source`")
        try:
            ranks = tuple(int(r) for r in lora_ranks.split(",") if r.strip())
        except ValueError as err:
            message = f"`lora_ranks` must be comma-separated integers such as 4,8, got {lora_ranks!r}"
            raise DaamkitError(message) from err
        if not ranks or min(ranks) < 1:
            raise DaamkitError(f"`lora_ranks` must list ranks of at least 1, got {lora_ranks!r}")
        return cls(
            methods=chosen, epochs=epochs or defaults["epochs"], lora_epochs=lora_epochs or defaults["lora_epochs"],
            runs=runs or defaults["runs"], seed=seed, heads=heads, lora_ranks=ranks, k=k,
            ablation_source=ablation_source, max_items=max_items or defaults["max_items"], batch_size=batch_size,
            dtype=dtype, mixed_precision=mixed_precision, cpu=cpu,
        )


def _check_settings(out: Path, settings: dict) -> None:
    """Refuse to resume an experiment folder whose finished runs were made with other result-changing settings."""
    path = out / SETTINGS_FILE
    if path.is_file() and any(out.glob(f"runs/*/{METRICS_FILE}")):
        previous = read_json(path)
        changed = sorted(key for key in settings if previous.get(key) != settings[key])
        if changed:
            raise DaamkitError(
                f"{out} holds an experiment run with other settings ({', '.join(changed)} differ); "
                "use another `out` or the same options"
            )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, settings)


def _finished(run_dir: Path, label: str) -> bool:
    if (run_dir / METRICS_FILE).is_file():
        log(f"{label}: finished already ({run_dir}), skipping")
        return True
    log(f"{label}: training into {run_dir}")
    return False


def reproduce_experiment(task: str, data_dir: str | Path, encoder: str, out_dir: str | Path,
                         options: ReproduceOptions) -> dict:
    """Run (or resume) the whole experiment into `out_dir`; returns {"report", "markdown", "run_dirs"}."""
    out, data_dir = output_folder(out_dir), Path(data_dir)
    settings = {"task": task, "data": str(data_dir.resolve()), "encoder": encoder,
                **{key: value for key, value in asdict(options).items() if key not in ("methods", "batch_size", "cpu")}}
    settings["lora_ranks"] = list(options.lora_ranks)
    _check_settings(out, settings)
    runs = 1 if task in GROUPED_TASKS else options.runs
    common = {"seed": options.seed, "runs": runs, "mixed_precision": options.mixed_precision, "cpu": options.cpu}
    features = out / "features"
    run_dirs: list[Path] = []
    decoders = [m for m in options.methods if m in TABLE_DECODERS]
    # --heads applies to decoders with heads; the linear probe reads the last layer
    heads = {d: None if REGISTRY[d].paper_heads is None else options.heads for d in decoders}
    if decoders:
        extract_features(task, data_dir, encoder, features, batch_size=options.batch_size, dtype=options.dtype,
                         device="cpu" if options.cpu else "auto", max_items=options.max_items)
        cache = FeatureCache.open(features)
        for decoder in decoders:  # a bad --heads for any decoder fails now, not hours into the experiment
            layers = 1 if REGISTRY[decoder].one_layer else len(cache.layers)
            decoder_config(decoder, layers, cache.manifest["hidden_size"], len(cache.classes), heads[decoder])
    for decoder in decoders:
        run_dir = out / "runs" / decoder
        if not _finished(run_dir, decoder):
            train_decoder(features, decoder, run_dir, epochs=options.epochs, lr=default_lr(cache.manifest),
                          heads=heads[decoder], resume=(run_dir / RUN_FILE).is_file(), **common)
        run_dirs.append(run_dir)
    for method in (m for m in options.methods if m in LORA_METHODS):
        for rank in options.lora_ranks:
            run_dir = out / "runs" / f"{method}-r{rank}"
            if not _finished(run_dir, f"{method} r={rank}"):
                train_lora(task, data_dir, encoder, run_dir, rank=rank, plus=method == "loraplus",
                           epochs=options.lora_epochs, max_items=options.max_items, dtype=options.dtype,
                           resume=(run_dir / LORA_FILE).is_file(), **common)
            run_dirs.append(run_dir)
    ablation = None
    if "ablation" in options.methods:
        k = min(options.k, len(FeatureCache.open(features).layers) // 2)
        if k != options.k:
            log(f"ablation: the encoder has too few layers for k={options.k}; using k={k}")
        ablation = run_ablation(out / "runs" / options.ablation_source, k=k, out_dir=out / f"ablation-k{k}",
                                mixed_precision=options.mixed_precision, cpu=options.cpu)["table"]
    report = {"task": task, "encoder": encoder, **build_report(run_dirs), "ablation": ablation}
    markdown = render_markdown(report) + ("\n" + render_ablation(ablation) if ablation else "")
    atomic_write_json(out / "report.json", report)
    (out / "report.md").write_text(markdown + "\n")
    return {"report": report, "markdown": markdown, "run_dirs": [str(p) for p in run_dirs]}
