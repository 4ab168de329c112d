"""Training runs end to end on tiny caches: metrics.json, honest dev selection, evaluate, importance, report, CLI."""

import json
import math
import statistics

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from classify_caches import one_torch_thread, write_session_cache, write_train_test_cache  # noqa: F401
from daamkit.classify.batches import FeatureBatches
from daamkit.classify.evaluation import evaluate_run
from daamkit.classify.experiment import (
    LATE_EPOCHS,
    LR_GRID,
    MIN_TRAIN_STEPS,
    PAPER_EPOCHS,
    SMALL_POOL_ITEMS,
    SMALL_POOL_RUNS,
    USER_DROPOUT,
    USER_HEAD,
    default_epochs,
    resolve_runs,
)
from daamkit.classify.importance import importance_run
from daamkit.classify.report import build_report, render_report
from daamkit.classify.split_loop import CHANCE_BAND, chance_loss, focal_loss
from daamkit.classify.training import train_decoder
from daamkit.cli.main import app
from daamkit.infra.checkpoint import load_weights
from daamkit.infra.errors import DaamkitError
from daamkit.infra.progress import set_quiet

runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def _quiet_progress():
    """No progress bars in this module; restored afterwards so other modules still see their logs."""
    set_quiet(True)
    yield
    set_quiet(False)


@pytest.fixture(scope="module")
def session_cache(tmp_path_factory):
    return write_session_cache(tmp_path_factory.mktemp("iemocap") / "cache")


@pytest.fixture(scope="module")
def session_run(session_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "daam"
    return out, train_decoder(session_cache, "daam-v1", out, epochs=3, heads=2, batch_size=16)


@pytest.fixture(scope="module")
def agnews_cache(tmp_path_factory):
    return write_train_test_cache(tmp_path_factory.mktemp("agnews") / "cache", num_train=48)


@pytest.fixture(scope="module")
def agnews_run(agnews_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "mha"
    return out, train_decoder(agnews_cache, "mha", out, epochs=2, runs=2, layers="2-4", heads=4)


def test_session_metrics_json_shape(session_run):
    out, metrics = session_run
    assert json.loads((out / "metrics.json").read_text()) == metrics
    for key in ("accuracy", "utterance_accuracy"):
        block = metrics[key]
        assert [e["name"] for e in block["per_split"]] == [f"Session{s}" for s in range(1, 6)]
        accs = [e["accuracy"] for e in block["per_split"]]
        assert block["mean"] == pytest.approx(np.mean(accs)) and block["std"] == pytest.approx(np.std(accs))
        for entry in block["per_split"]:
            assert set(entry) == {"name", "accuracy", "dev_accuracy", "best_epoch"}
            assert 1 <= entry["best_epoch"] <= 3 and 0.0 <= entry["dev_accuracy"] <= 1.0
    assert metrics["accuracy"]["mean"] > 0.5  # the synthetic classes are separable
    assert metrics["attention_parameters"] == 2 * 2 * 16
    assert metrics["decoder"] == "daam-v1" and metrics["task"] == "iemocap" and metrics["epochs"] == 3
    ranges = metrics["gaussian_parameters"]
    assert ranges["mean_offset"]["min"] < 0 < ranges["mean_offset"]["max"]
    assert ranges["scaled_variance"]["min"] < 2.0 < ranges["scaled_variance"]["max"]
    for s in range(1, 6):
        assert (out / "splits" / f"Session{s}" / "best" / "model.safetensors").is_file()
    assert any((out / "tensorboard" / "Session1").iterdir())


def test_best_epoch_is_the_first_epoch_with_the_highest_dev_accuracy(session_run):
    _, metrics = session_run
    for entry in metrics["accuracy"]["per_split"]:
        dev = [record["dev_accuracy"] for record in metrics["history"][entry["name"]]]
        assert entry["best_epoch"] == int(np.argmax(dev)) + 1 and entry["dev_accuracy"] == max(dev)


def test_model_selection_never_sees_the_test_session(session_cache, session_run, tmp_path):
    """Replace Session1's features and labels with noise: fold Session1 must train and select identically."""
    out, metrics = session_run
    changed = tmp_path / "cache"
    changed.mkdir()
    for path in session_cache.rglob("*"):
        if path.is_file():
            target = changed / path.relative_to(session_cache)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    items = json.loads((changed / "all" / "items.json").read_text())
    session1 = np.asarray([item["group"] == "Session1" for item in items])
    features = np.load(changed / "all" / "features.npy", mmap_mode="r+")
    features[session1] = np.random.default_rng(9).normal(size=features[session1].shape) * 3
    features.flush()
    labels = np.load(changed / "all" / "labels.npy")
    labels[session1] = (labels[session1] + 1) % 4
    np.save(changed / "all" / "labels.npy", labels)

    again = train_decoder(changed, "daam-v1", tmp_path / "run", epochs=3, heads=2, batch_size=16)
    assert again["history"]["Session1"] == metrics["history"]["Session1"]
    first, second = (load_weights(d / "splits" / "Session1" / "best") for d in (out, tmp_path / "run"))
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert again["history"]["Session2"] != metrics["history"]["Session2"]  # Session1 does train fold 2


def test_evaluate_rescores_to_the_saved_test_accuracy(session_run, agnews_run):
    for out, metrics in (session_run, agnews_run):
        result = evaluate_run(out)
        assert result["accuracy"] == metrics["accuracy"]
        assert result.get("utterance_accuracy") == metrics.get("utterance_accuracy")


def test_mixed_precision_run_then_float32_evaluation_in_one_process(agnews_cache, tmp_path):
    metrics = train_decoder(agnews_cache, "daam-v2", tmp_path / "bf16", epochs=1, mixed_precision="bf16")
    assert json.loads((tmp_path / "bf16" / "run.json").read_text())["mixed_precision"] == "bf16"
    assert evaluate_run(tmp_path / "bf16", mixed_precision="bf16")["accuracy"] == metrics["accuracy"]
    assert 0.0 <= evaluate_run(tmp_path / "bf16", mixed_precision="no")["accuracy"]["mean"] <= 1.0


def test_runs_and_layer_subsets(agnews_run):
    out, metrics = agnews_run
    assert [e["name"] for e in metrics["accuracy"]["per_split"]] == ["run1", "run2"]
    assert metrics["seeds"] == [0, 1] and metrics["layers"] == [2, 3, 4]
    assert metrics["method"] == "mha [layers 2-4]"
    assert "utterance_accuracy" not in metrics and "gaussian_parameters" not in metrics
    assert json.loads((out / "run.json").read_text())["layer_positions"] == [1, 2, 3]
    assert not (out / "importance").exists()
    with pytest.raises(DaamkitError, match="no density gates"):
        importance_run(out)


def test_importance_outputs_written_after_training_and_on_demand(session_run):
    out, _ = session_run
    folder = out / "importance"
    summary = json.loads((folder / "importance.json").read_text())
    assert sorted(summary["ranked_layers"]) == list(range(1, 9))
    assert sum(summary["layer_share"].values()) == pytest.approx(1.0)
    matrix = np.load(folder / "if_matrix.npy")
    assert matrix.shape == (8, 16) and matrix.min() == 0.0 and matrix.max() == pytest.approx(1.0)
    for name in ("importance_heatmap.png", "importance_layers.png"):
        assert (folder / name).read_bytes()[:4] == b"\x89PNG"
    assert any((out / "tensorboard" / "importance").iterdir())
    (folder / "importance.json").unlink()
    assert importance_run(out)["ranked_layers"] == summary["ranked_layers"]
    assert summary["items"] > 0


def test_report_markdown_and_json(session_run, agnews_run):
    dirs = [session_run[0], agnews_run[0]]
    report = build_report(dirs)
    metrics = [(t["task"], t["metric"]) for t in report["tables"]]
    assert metrics == [("iemocap", "accuracy"), ("iemocap", "utterance_accuracy"), ("agnews", "accuracy")]
    assert report["tables"][0]["columns"] == [f"Session{s}" for s in range(1, 6)]
    assert [row["method"] for row in report["gaussian_parameters"]] == ["daam-v1"]
    text = render_report(dirs, "markdown")
    acc = session_run[1]["accuracy"]
    assert "| daam-v1 | 64 |" in text and f"{100 * acc['mean']:.2f} ± {100 * acc['std']:.2f}" in text
    assert "| Method | Attention params | Trainable params | run1 | run2 | Mean ± std |" in text
    assert "Learned Gaussian parameters" in text
    assert json.loads(render_report(dirs, "json")) == report


def _finished_run(root, name, decoder, accuracies, seeds=None, settings=None, data="cache-a"):
    """A run folder holding the metrics.json a finished run writes (runs named run1, run2, ...), and with
    `settings` (the options as given, but the seed) a run.json of those settings on the cache `data`."""
    folder = root / name
    folder.mkdir()
    if settings is not None:
        (folder / "run.json").write_text(json.dumps({"config": {**settings, "seed": seeds[0]},
                                                     "cache": {"fingerprint": data}, "features": f"features/{data}"}))
    per_split = [{"name": f"run{i + 1}", "accuracy": a} for i, a in enumerate(accuracies)]
    (folder / "metrics.json").write_text(json.dumps({
        "method": name, "decoder": decoder, "task": "text-csv", "encoder": "e", "seeds": seeds,
        "accuracy": {"mean": sum(accuracies) / len(accuracies), "std": 0.0, "per_split": per_split}}))
    return folder


def _with_gaussian_parameters(folders):
    """Give finished runs (`_finished_run`) the Gaussian parameters a density decoder's metrics.json holds."""
    gaussian = {"mean_offset": {"min": -0.1, "max": 0.1}, "scaled_variance": {"min": 1.5, "max": 2.5}}
    for folder in folders:
        metrics = json.loads((folder / "metrics.json").read_text())
        (folder / "metrics.json").write_text(json.dumps({**metrics, "gaussian_parameters": gaussian}))


def test_report_names_the_rows_more_than_2_points_below_the_linear_probe(tmp_path):
    dirs = [_finished_run(tmp_path, "linear", "linear", [0.80, 0.82]),
            _finished_run(tmp_path, "mha", "mha", [0.80, 0.805]),
            _finished_run(tmp_path, "daam-v1", "daam-v1", [0.76, 0.77])]
    (table,) = build_report(dirs)["tables"]
    assert [row["method"] for row in table["behind_linear"]] == ["daam-v1"]
    assert table["behind_linear"][0]["gap"] == pytest.approx(0.765 - 0.81)
    text = render_report(dirs)
    assert "(more than 2 points below the linear probe: daam-v1 -4.50;" in text and "no linear-probe row" not in text
    assert "points below" not in render_report(dirs[1:])  # no probe, no comparison: the missing-row note instead


def test_report_puts_the_linear_probe_rows_first_and_keeps_the_order_of_the_others(tmp_path):
    dirs = [_finished_run(tmp_path, "gqdaam", "gqdaam", [0.79]),
            _finished_run(tmp_path, "linear", "linear", [0.80]),
            _finished_run(tmp_path, "daam-v1", "daam-v1", [0.81])]  # as a shell glob orders them
    (table,) = build_report(dirs)["tables"]
    assert [row["method"] for row in table["rows"]] == ["linear", "gqdaam", "daam-v1"]
    rows = [line.split(" | ")[0] for line in render_report(dirs).splitlines() if line.startswith("| ")]
    assert rows == ["| Method", "| linear", "| gqdaam", "| daam-v1"]


def test_report_pairs_every_row_with_the_linear_probe_trained_with_the_same_seeds(tmp_path):
    dirs = [_finished_run(tmp_path, "linear", "linear", [0.80, 0.82, 0.78], seeds=[0, 1, 2]),
            _finished_run(tmp_path, "linear-s3", "linear", [0.90, 0.90, 0.90], seeds=[3, 4, 5]),
            _finished_run(tmp_path, "daam-v1", "daam-v1", [0.79, 0.83, 0.76], seeds=[0, 1, 2]),
            _finished_run(tmp_path, "one-run", "mha", [0.81], seeds=[0, 1, 2]),
            _finished_run(tmp_path, "other-seeds", "mixture", [0.70, 0.71, 0.72], seeds=[7, 8, 9])]
    rows = {row["method"]: row for row in build_report(dirs)["tables"][0]["rows"]}
    diffs = [-0.01, 0.01, -0.02]  # daam-v1 minus the seed-0 probe, run by run (not the better seed-3 probe)
    stderr = statistics.stdev(diffs) / math.sqrt(3)
    assert rows["daam-v1"]["vs_linear"] == pytest.approx(
        {"gap": sum(diffs) / 3, "stderr": stderr, "splits": 3, "invocations": 1, "linear": "linear"})
    assert rows["one-run"]["vs_linear"] == pytest.approx(
        {"gap": 0.01, "stderr": None, "splits": 1, "invocations": 1, "linear": "linear"})
    assert rows["other-seeds"]["vs_linear"] is None and rows["linear"]["vs_linear"] is None
    text = render_report(dirs)
    assert "| Mean ± std | Δ vs linear ± s.e. |" in text
    assert f"| 79.33 ± 0.00 | -0.67 ± {100 * stderr:.2f} |" in text and "| 81.00 ± 0.00 | +1.00 |" in text
    assert "| 71.00 ± 0.00 | - |" in text
    assert "Δ vs linear" not in render_report(dirs[2:])  # without a probe there is nothing to pair with
    tie = _finished_run(tmp_path, "tie", "mha", [0.80 - 1e-6, 0.82, 0.78], seeds=[0, 1, 2])
    assert "| +0.00 ± " in render_report([dirs[0], tie])  # a gap that rounds to zero has no minus sign


def test_report_labels_the_rows_of_one_method_trained_with_different_seeds(tmp_path):
    (tmp_path / "s0").mkdir()
    (tmp_path / "s3").mkdir()
    dirs = [_finished_run(tmp_path / "s0", "linear", "linear", [0.80, 0.82, 0.78], seeds=[0, 1, 2]),
            _finished_run(tmp_path / "s3", "linear", "linear", [0.81, 0.80, 0.79], seeds=[3, 4, 5]),
            _finished_run(tmp_path / "s0", "daam-v1", "daam-v1", [0.75, 0.76, 0.74], seeds=[0, 1, 2]),
            _finished_run(tmp_path / "s3", "daam-v1", "daam-v1", [0.80, 0.80, 0.80], seeds=[3, 4, 5]),
            _finished_run(tmp_path, "folds", "mha", [0.7, 0.7], seeds=[7, 7]),
            _finished_run(tmp_path / "s0", "folds", "mha", [0.7, 0.7], seeds=[1, 5])]
    rows = build_report(dirs)["tables"][0]["rows"]
    assert [row["label"] for row in rows] == ["linear (seeds 0-2)", "linear (seeds 3-5)", "daam-v1 (seeds 0-2)",
                                              "daam-v1 (seeds 3-5)", "folds (seed 7)", "folds (seeds 1, 5)"]
    assert rows[3]["vs_linear"]["linear"] == "linear (seeds 3-5)"  # each invocation beside its own probe
    text = render_report(dirs)
    assert "| daam-v1 (seeds 0-2) |" in text and "below the linear probe: daam-v1 (seeds 0-2) -5.00" in text
    single = build_report(dirs[2:3])["tables"][0]["rows"][0]
    assert single["label"] == "daam-v1"  # a method that appears once keeps its plain name
    _with_gaussian_parameters(dirs[2:4])  # the two daam-v1 runs also fill the Gaussian-parameter table
    assert [row["label"] for row in build_report(dirs)["gaussian_parameters"]] == [
        "daam-v1 (seeds 0-2)", "daam-v1 (seeds 3-5)"]
    assert "| daam-v1 (seeds 3-5) | text-csv | -0.1000 |" in render_report(dirs)


def test_report_pools_the_runs_of_one_method_and_settings_trained_with_other_seeds(tmp_path):
    for folder in ("s0", "s3", "again", "other"):
        (tmp_path / folder).mkdir()
    plain = {"decoder": "daam-v1", "dropout": None}
    dirs = [_finished_run(tmp_path / "s0", "linear", "linear", [0.80, 0.82, 0.78], [0, 1, 2], {"decoder": "linear"}),
            _finished_run(tmp_path / "s3", "linear", "linear", [0.81, 0.80, 0.79], [3, 4, 5], {"decoder": "linear"}),
            _finished_run(tmp_path / "s0", "daam-v1", "daam-v1", [0.79, 0.83, 0.76], [0, 1, 2], plain),
            _finished_run(tmp_path / "s3", "daam-v1", "daam-v1", [0.82, 0.80, 0.81], [3, 4, 5], plain),
            _finished_run(tmp_path / "other", "daam-v1", "daam-v1", [0.70, 0.70, 0.70], [6, 7, 8],
                          {**plain, "dropout": 0.5}),  # other settings: a row of its own
            _finished_run(tmp_path / "other", "mha", "mha", [0.75, 0.76, 0.77], [0, 1, 2], {"decoder": "mha"}),
            _finished_run(tmp_path / "again", "mha", "mha", [0.78, 0.78, 0.78], [0, 1, 2], {"decoder": "mha"}),
            _finished_run(tmp_path / "s3", "mha", "mha", [0.80, 0.80, 0.80], [3, 4, 5],
                          {"decoder": "mha"}),  # a group with the same seeds twice is never pooled
            _finished_run(tmp_path / "s3", "gqa", "gqa", [0.79, 0.79, 0.79], [3, 4, 5], {"decoder": "gqa"})]
    assert len(build_report(dirs)["tables"][0]["rows"]) == 9  # pooling is asked for, never implied
    (table,) = build_report(dirs, pool_seeds=True)["tables"]
    assert [row["label"] for row in table["rows"]] == [
        "linear (seeds 0-5)", "daam-v1 (seeds 0-5)", "daam-v1 (seeds 6-8)", f"mha (seeds 0-2) [{dirs[5]}]",
        f"mha (seeds 0-2) [{dirs[6]}]", "mha (seeds 3-5)", "gqa"]  # the same label twice: the folders tell them apart
    rows = {row["label"]: row for row in table["rows"]}
    pooled = rows["daam-v1 (seeds 0-5)"]
    assert pooled["per_split"] == {"run1 (seeds 0-2)": 0.79, "run2 (seeds 0-2)": 0.83, "run3 (seeds 0-2)": 0.76,
                                   "run1 (seeds 3-5)": 0.82, "run2 (seeds 3-5)": 0.80, "run3 (seeds 3-5)": 0.81}
    assert pooled["mean"] == pytest.approx(0.80166667) and pooled["run_dir"] is None
    invocation_gaps = [(-0.01 + 0.01 - 0.02) / 3, (0.01 + 0.0 + 0.02) / 3]  # each beside the probe of its seeds
    assert [member["vs_linear"]["gap"] for member in pooled["members"]] == pytest.approx(invocation_gaps)
    assert pooled["vs_linear"] == pytest.approx({
        "gap": sum(invocation_gaps) / 2, "stderr": statistics.stdev(invocation_gaps) / math.sqrt(2), "splits": 6,
        "invocations": 2, "linear": "linear (seeds 0-5)"})
    assert rows["daam-v1 (seeds 6-8)"]["vs_linear"] is None  # no probe was trained with its seeds
    assert rows["gqa"]["vs_linear"]["invocations"] == 1 and rows["gqa"]["vs_linear"]["linear"] == "linear (seeds 0-5)"
    text = render_report(dirs, pool_seeds=True)
    assert "| Method | Attention params | Trainable params | Runs | Mean ± std | Δ vs linear ± s.e. |" in text
    spread = 100 * statistics.pstdev(pooled["per_split"].values())
    assert f"| daam-v1 (seeds 0-5) | - | - | 6 | 80.17 ± {spread:.2f} | " \
           f"+0.17 ± {100 * statistics.stdev(invocation_gaps) / math.sqrt(2):.2f} |" in text
    assert "standard error over the invocations" in text
    folds = [_finished_run(tmp_path / folder, "mixture", "mixture", [0.7, 0.8], [seed, seed], {"decoder": "mixture"})
             for folder, seed in (("s0", 4), ("s3", 9))]  # the folds of one run share its seed
    assert build_report(folds, pool_seeds=True)["tables"][0]["rows"][0]["label"] == "mixture (seeds 4, 9)"
    assert table["unpooled"] == [row["label"] for row in table["rows"][1:6]]  # said, since pooling was asked for
    assert f"(left apart: daam-v1 (seeds 0-5), daam-v1 (seeds 6-8), mha (seeds 0-2) [{dirs[5]}]" in text


def test_report_keeps_runs_on_other_data_in_a_table_of_their_own(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    dirs = [_finished_run(tmp_path / data, decoder, decoder, accuracies, [0, 1], {"decoder": decoder}, data=data)
            for data, decoder, accuracies in [("a", "linear", [0.80, 0.80]), ("a", "daam-v1", [0.81, 0.83]),
                                              ("b", "linear", [0.60, 0.60]), ("b", "daam-v1", [0.61, 0.61])]]
    tables = build_report(dirs)["tables"]
    assert [(table["data"], [row["label"] for row in table["rows"]]) for table in tables] == [
        ("a", ["linear", "daam-v1"]), ("b", ["linear", "daam-v1"])]  # no "(seeds 0-1)": each is alone in its table
    assert [table["rows"][1]["vs_linear"]["gap"] for table in tables] == pytest.approx([0.02, 0.01])
    text = render_report(dirs)
    assert "### text-csv · e · features/a · accuracy (%)" in text
    assert "### text-csv · e · features/b · accuracy (%)" in text
    assert "### text-csv · e · accuracy (%)" in render_report(dirs[:2])  # one data set: the heading stays short
    _with_gaussian_parameters([dirs[1], dirs[3]])
    assert [row["label"] for row in build_report(dirs)["gaussian_parameters"]] == ["daam-v1", "daam-v1"]
    text = render_report(dirs)
    assert "| Method | Task | Data | Mean offset min |" in text
    assert "| daam-v1 | text-csv | features/b | -0.1000 |" in text
    assert "| Method | Task | Mean offset min |" in render_report(dirs[:2])


def test_focal_loss_matches_its_formula():
    logits, target = torch.tensor([[2.0, 0.0, -1.0], [0.1, 0.2, 0.3]]), torch.tensor([0, 2])
    p = torch.softmax(logits, -1)[torch.arange(2), target]
    assert focal_loss(logits, target) == pytest.approx((-0.25 * (1 - p) ** 2.5 * p.log()).mean().item())


def test_chance_loss_is_the_loss_of_predicting_the_class_frequencies():
    counts = torch.tensor([6, 3, 0, 1])  # a class absent from the epoch adds nothing
    p = counts.double() / counts.sum()
    entropy = -sum(q * q.log() for q in p if q > 0)
    assert chance_loss(torch.nn.functional.cross_entropy, counts) == pytest.approx(entropy.item())
    labels = torch.repeat_interleave(torch.arange(4), counts)
    constant = p.log().float().expand(len(labels), -1)
    assert chance_loss(focal_loss, counts) == pytest.approx(focal_loss(constant, labels).item(), rel=1e-6)


def test_a_run_that_collapses_to_the_class_frequencies_is_named_in_metrics_log_and_report(agnews_cache, tmp_path,
                                                                                          capsys):
    def train(name, lr):
        return train_decoder(agnews_cache, "mha", tmp_path / name, epochs=3, runs=2, layers="2-4", heads=4, lr=lr,
                             method=name)

    set_quiet(False)
    try:
        stuck, learned = train("stuck", 1e-9), train("learned", 1e-2)
    finally:
        set_quiet(True)
    assert stuck["collapsed"] == ["run1", "run2"] and learned["collapsed"] == []
    ratio = {name: [h[-1]["train_loss"] / h[-1]["chance_loss"] for h in metrics["history"].values()]
             for name, metrics in (("stuck", stuck), ("learned", learned))}
    assert all(abs(r - 1) <= CHANCE_BAND for r in ratio["stuck"]) and all(r < 1 - CHANCE_BAND for r in ratio["learned"])
    assert capsys.readouterr().err.count("collapsed to always predicting the class frequencies") == 1
    text = render_report([tmp_path / "learned", tmp_path / "stuck"])
    assert "(collapsed to always predicting the class frequencies: stuck (run1, run2);" in text


def test_feature_batches_cover_every_item_once_in_float32(agnews_cache):
    features = np.load(agnews_cache / "train" / "features.npy", mmap_mode="r")
    labels = np.load(agnews_cache / "train" / "labels.npy")
    subset = np.arange(3, 40)
    seen = []
    for x, y, idx in FeatureBatches(features, labels, subset, 8, layers=[1, 3], seed=0):
        assert x.dtype == torch.float32 and x.shape[1:] == (2, 16)
        assert torch.equal(x, torch.from_numpy(features[idx.numpy()][:, [1, 3]].astype(np.float32)))
        assert torch.equal(y, torch.from_numpy(labels[idx.numpy()]))
        seen.extend(idx.tolist())
    assert sorted(seen) == subset.tolist() and seen != subset.tolist()  # shuffled across batches


def test_cli_train_evaluate_report_and_errors(agnews_cache, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["classify", "train", "--features", str(agnews_cache), "--decoder", "daam-v2",
                                 "--out", str(out), "--epochs", "1", "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["attention_parameters"] == 32
    result = runner.invoke(app, ["classify", "evaluate", str(out), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["accuracy"]["per_split"][0]["name"] == "run1"
    result = runner.invoke(app, ["classify", "report", str(out), "--format", "json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["tables"][0]["rows"][0]["method"] == "daam-v2"
    again = tmp_path / "run-seed5"  # the same settings with another seed: one row with --pool-seeds
    result = runner.invoke(app, ["classify", "train", "--features", str(agnews_cache), "--decoder", "daam-v2",
                                 "--out", str(again), "--epochs", "1", "--seed", "5", "--quiet"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["classify", "report", str(out), str(again), "--pool-seeds", "--format", "json"])
    (row,) = json.loads(result.stdout)["tables"][0]["rows"]
    assert row["label"] == "daam-v2 (seeds 0, 5)" and len(row["members"]) == 2 and len(row["per_split"]) == 2
    run_file = out / "run.json"
    run_file.write_text(run_file.read_text().replace(str(agnews_cache.resolve()), str(tmp_path / "moved")))
    result = runner.invoke(app, ["classify", "evaluate", str(out), "--features", str(agnews_cache), "--json"])
    assert result.exit_code == 0, result.output
    config = tmp_path / "train.toml"
    config.write_text(f'features = "{agnews_cache}"\ndecoder = "gqa"\nepochs = 0\n')
    for args, message in [
        (["train", "--features", str(agnews_cache), "--decoder", "daam-v2", "--out", str(out)], "already holds"),
        (["train", "--features", str(tmp_path), "--decoder", "mha", "--out", str(tmp_path / "x")], "not a feature cache"),
        (["train", "--features", str(agnews_cache), "--decoder", "daam-v1", "--heads", "4", "--out",
          str(tmp_path / "x")], "use --heads 2 or fewer"),
        (["train", "--features", str(agnews_cache), "--decoder", "mha", "--lr", "fast", "--out", str(tmp_path / "x")],
         "--lr must be a positive number or auto"),
        (["train", "--config", str(config), "--out", str(tmp_path / "x")], "--epochs must be an integer of at least 1"),
        (["train", "--config", str(config)], "--out is required"),
        (["evaluate", str(tmp_path)], "not a training run folder"),
        (["evaluate", str(out)], "is gone; pass --features"),
        (["importance", str(out), "--features", str(tmp_path)], "not a feature cache"),
        (["report", str(tmp_path)], "not a finished run"),
        (["report", str(out), "--format", "html"], "--format must be one of"),
    ]:
        result = runner.invoke(app, ["classify", *args])
        assert result.exit_code == 2, (args, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, lines)


def test_unknown_names_are_reported_before_any_file_is_read(tmp_path):
    result = runner.invoke(app, ["classify", "train", "--features", str(tmp_path / "none"), "--decoder", "bogus",
                                 "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "unknown decoder 'bogus'" in result.stderr
    result = runner.invoke(app, ["classify", "extract", "--task", "speech", "--data", str(tmp_path),
                                 "--encoder", "no/such-model", "--out", str(tmp_path / "cache")])
    assert result.exit_code == 2 and "unknown task 'speech'" in result.stderr


def test_config_file_takes_the_lr_as_a_number_or_as_auto(tmp_path):
    cache = write_train_test_cache(tmp_path / "cache", task="text-csv", num_train=24)
    for name, line, expected in [("number", "lr = 1e-3", 1e-3), ("auto", 'lr = "auto"', LR_GRID)]:
        config = tmp_path / f"{name}.toml"
        config.write_text(f'{line}\nepochs = 1\n')
        result = runner.invoke(app, ["classify", "train", "--config", str(config), "--features", str(cache),
                                     "--decoder", "linear", "--out", str(tmp_path / name), "--quiet", "--json"])
        assert result.exit_code == 0, result.output
        run = json.loads((tmp_path / name / "run.json").read_text())
        assert run["lr"] == expected if name == "number" else run["lr_search"]["grid"] == list(expected)


def test_linear_probe_with_lr_auto_on_a_user_task(tmp_path):
    """A user's task defaults to lr auto: each grid lr trains the first split, the lowest late dev loss wins."""
    cache = write_train_test_cache(tmp_path / "cache", task="text-csv", num_train=48)
    metrics = train_decoder(cache, "linear", tmp_path / "run", epochs=3)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert metrics["layers"] == [4] and metrics["attention_parameters"] == 0 and metrics["decoder"] == "linear"
    search = run["lr_search"]
    assert search["grid"] == list(LR_GRID) and run["lr"] == metrics["lr"] == search["chosen"]
    assert search["dev_loss"][f"{search['chosen']:g}"] == min(search["dev_loss"].values())
    assert run["selection"] == "last-epoch"  # a user's task keeps the converged last epoch
    history = metrics["history"]["run1"]  # the winner's history; its score is the mean dev loss of its last epochs
    late = [record["dev_loss"] for record in history[-LATE_EPOCHS:]]
    assert search["dev_loss"][f"{search['chosen']:g}"] == pytest.approx(sum(late) / len(late))
    split = metrics["accuracy"]["per_split"][0]  # the winner's checkpoint is its last epoch
    assert split["best_epoch"] == len(history) == 3 and split["dev_accuracy"] == history[-1]["dev_accuracy"]
    assert sorted(p.name for p in (tmp_path / "run" / "lr_search").iterdir()) == [f"lr{lr:g}" for lr in sorted(LR_GRID)]
    paper = train_decoder(write_train_test_cache(tmp_path / "agnews"), "linear", tmp_path / "paper", epochs=1)
    assert paper["lr"] == 1e-4  # the paper's tasks keep the paper's lr and best-epoch selection
    assert json.loads((tmp_path / "paper" / "run.json").read_text())["selection"] == "best-epoch"
    assert run["decoder"]["dropout"] == 0.0  # the linear probe has no hidden layer to regularise with dropout


@pytest.mark.parametrize(("task", "options", "expected"), [
    ("text-csv", {}, USER_DROPOUT),  # a DAT decoder on a user's task: dropout on the classifier inputs
    ("agnews", {}, 0.0),  # the paper's tasks keep the paper's head
    ("text-csv", {"dropout": 0.2}, 0.2),
])
def test_dat_decoder_dropout_default_depends_on_the_task(tmp_path, task, options, expected):
    cache = write_train_test_cache(tmp_path / "cache", task=task, num_train=48)
    train_decoder(cache, "mha", tmp_path / "run", epochs=1, lr=1e-3, heads=2, **options)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["decoder"]["dropout"] == expected


@pytest.mark.parametrize(("task", "options", "expected"), [
    ("text-csv", {}, USER_HEAD),  # a DAT decoder on a user's task: a learned mix of the layers, then a Linear
    ("agnews", {}, "conv"),  # the paper's tasks keep the paper's conv head
    ("text-csv", {"head": "conv"}, "conv"),
])
def test_dat_decoder_head_default_depends_on_the_task(tmp_path, task, options, expected):
    cache = write_train_test_cache(tmp_path / "cache", task=task, num_train=48)
    metrics = train_decoder(cache, "daam-v1", tmp_path / "run", epochs=1, lr=1e-3, heads=2, **options)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["decoder"]["head"] == expected
    assert metrics["method"] == ("daam-v1 [head conv]" if options else "daam-v1")  # a head chosen by hand is named
    conv_parameters = 2 * 9 * 512 * 4 + 512 + 4  # the two conv layers of the paper's head over the 4 layers
    assert (metrics["decoder_parameters"] - metrics["attention_parameters"] > conv_parameters) == (expected == "conv")
    if expected == "mix":  # the mix head's layer shares, by encoder layer number, are part of the metrics
        assert list(metrics["layer_share"]) == [str(n) for n in metrics["layers"]]
        assert sum(metrics["layer_share"].values()) == pytest.approx(1.0)
    else:
        assert "layer_share" not in metrics


@pytest.mark.parametrize(("task", "decoder", "options", "expected", "method"), [
    ("text-csv", "mha", {}, True, "mha"),  # a user's task: mha starts from the encoder's features
    ("text-csv", "gqdaam", {}, True, "gqdaam"),  # and so do gqa, gqdaam, daam-v1 and daam-v2
    ("text-csv", "daam-v1", {}, True, "daam-v1"),
    ("text-csv", "mixture", {}, False, "mixture"),  # no residual option: its DensityBlock always has skips
    ("agnews", "mha", {}, False, "mha"),  # the paper's tasks keep the paper's decoder
    ("text-csv", "mha-bn", {"residual": False}, False, "mha-bn [no residual]"),
    ("agnews", "mha", {"residual": True}, True, "mha [residual]"),
])
def test_residual_default_depends_on_the_task_and_decoder(tmp_path, task, decoder, options, expected, method):
    cache = write_train_test_cache(tmp_path / "cache", task=task, num_train=48)
    metrics = train_decoder(cache, decoder, tmp_path / "run", epochs=1, lr=1e-3, heads=2, **options)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["decoder"]["residual"] is expected
    assert metrics["method"] == method


@pytest.mark.parametrize(("task", "options", "expected"), [
    ("text-csv", {}, SMALL_POOL_RUNS),  # a user's small pool: one run's accuracy is too noisy to report alone
    ("agnews", {}, 1),  # the paper's tasks keep one run per `classify train`
    ("text-csv", {"runs": 1}, 1),
])
def test_runs_default_depends_on_the_task(tmp_path, task, options, expected):
    cache = write_train_test_cache(tmp_path / "cache", task=task, num_train=48)
    metrics = train_decoder(cache, "linear", tmp_path / "run", epochs=1, lr=1e-3, **options)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["runs"] == len(metrics["accuracy"]["per_split"]) == len(set(metrics["seeds"])) == expected
    assert run["config"]["runs"] == options.get("runs")  # the config as given; run.json holds the resolved value


def test_runs_default_grows_only_on_a_users_small_train_test_pool():
    assert resolve_runs(None, {"task": "text-csv"}, SMALL_POOL_ITEMS - 1) == SMALL_POOL_RUNS
    assert resolve_runs(None, {"task": "text-csv"}, SMALL_POOL_ITEMS) == 1  # the paper's smallest set: one run
    assert resolve_runs(None, {"task": "image-folder"}, 100) == SMALL_POOL_RUNS
    assert resolve_runs(None, {"task": "audio-folder", "grouping": "speaker"}, 100) == 1  # one model per fold
    assert resolve_runs(None, {"task": "cifar100"}, 100) == 1
    assert resolve_runs(2, {"task": "text-csv"}, 100) == 2


def test_default_epochs_reach_the_step_floor():
    assert default_epochs(120_000, 32) == PAPER_EPOCHS
    assert default_epochs(540, 32) == PAPER_EPOCHS  # 17 steps x 35 epochs >= MIN_TRAIN_STEPS
    assert default_epochs(360, 32) == -(-MIN_TRAIN_STEPS // 12)
    assert default_epochs(10, 32) == MIN_TRAIN_STEPS


def test_resume_continues_an_interrupted_run_exactly(tmp_path, monkeypatch):
    """Interrupted inside the lr search and again inside run 2, then resumed: same result as one go.

    mha-bn: its BatchNorm running statistics must come back too, not only the trained weights.
    """
    from daamkit.classify import split_loop

    cache = write_train_test_cache(tmp_path / "cache", task="text-csv", num_train=40, num_layers=4)
    options = {"epochs": 3, "runs": 2, "heads": 2}
    full = train_decoder(cache, "mha-bn", tmp_path / "full", **options)
    original, calls = split_loop.dev_scores, []

    def interrupt_at(*stops):  # counts the dev evaluations, one per epoch
        def dev_scores(*args):
            calls.append(1)
            if len(calls) in stops:
                raise KeyboardInterrupt
            return original(*args)
        monkeypatch.setattr(split_loop, "dev_scores", dev_scores)

    out = tmp_path / "resumed"
    interrupt_at(5)  # lr search, second candidate, epoch 2
    with pytest.raises(KeyboardInterrupt):
        train_decoder(cache, "mha-bn", out, **options)
    result = runner.invoke(app, ["classify", "train", "--features", str(cache), "--decoder", "mha-bn", "--out",
                                 str(out), "--quiet"])
    assert result.exit_code == 2 and "pass --resume to continue it" in result.stderr
    calls.clear()
    interrupt_at(8)  # 3 epochs of the third candidate, then run2 epoch 2
    with pytest.raises(KeyboardInterrupt):
        train_decoder(None, None, out, resume=True)
    monkeypatch.setattr(split_loop, "dev_scores", original)
    result = runner.invoke(app, ["classify", "train", "--out", str(out), "--resume", "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    resumed = json.loads(result.stdout)
    assert resumed == full
    for split in ("run1", "run2"):
        assert load_weights(out / "splits" / split / "best") .keys() == load_weights(
            tmp_path / "full" / "splits" / split / "best").keys()
        for key, value in load_weights(out / "splits" / split / "best").items():
            assert torch.equal(value, load_weights(tmp_path / "full" / "splits" / split / "best")[key]), (split, key)
    result = runner.invoke(app, ["classify", "train", "--out", str(out), "--resume"])
    assert result.exit_code == 2 and "has finished already" in result.stderr


class _ScriptedDevJob:
    """A SplitJob whose dev accuracy follows a script, to see which epoch each selection keeps."""

    def __init__(self, dev_accuracies):
        self.dev = list(dev_accuracies)
        self.rng = np.random.default_rng(0)
        self.model = torch.nn.Linear(2, 2)

    def build(self, lr):
        return self.model, torch.optim.AdamW(self.model.parameters(), lr=lr)

    def steps_per_epoch(self):
        return 1

    def batches(self):
        yield torch.randn(4, 2), torch.tensor([0, 1, 0, 1])

    def after_first_step(self):
        pass

    def dev_predictions(self):  # 10 dev items of class 0, the scripted fraction of them predicted right
        right = round(self.dev.pop(0) * 10)
        logits = np.zeros((10, 2), dtype=np.float32)
        logits[:right, 0] = logits[right:, 1] = 1.0
        return logits, np.zeros(10, dtype=np.int64)

    def checkpoint_state(self):
        return self.model.state_dict()

    def load_checkpoint_state(self, state):
        self.model.load_state_dict(state)

    def checkpoint_config(self):
        return {}


@pytest.mark.parametrize(("selection", "kept"), [("best-epoch", 1), ("last-epoch", 3)])
def test_selection_keeps_the_first_best_or_the_last_epoch(tmp_path, selection, kept):
    from daamkit.classify.experiment import make_accelerator
    from daamkit.classify.split_loop import fit_split
    from daamkit.infra.checkpoint import load_config

    fit_split(_ScriptedDevJob([0.9, 0.5, 0.6]), epochs=3, lr=1e-3, loss="ce", accelerator=make_accelerator("no", cpu=True),
              folder=tmp_path / "split", log_dir=tmp_path / "tb", label="t", selection=selection)
    assert load_config(tmp_path / "split" / "best")["best_epoch"] == kept


def _scripted_history(accuracies, losses=None):
    return [{"epoch": epoch, "dev_accuracy": accuracy, **({} if losses is None else {"dev_loss": losses[epoch - 1]})}
            for epoch, accuracy in enumerate(accuracies, 1)]


@pytest.mark.parametrize(("selection", "every_loss", "chosen", "criterion", "scores"), [
    # the lowest mean dev loss of the last 2 epochs wins over a higher late accuracy
    ("last-epoch", True, 0.01, "dev_loss", {"0.001": 0.95, "0.01": 0.45, "0.1": 0.75}),
    # one candidate saved before dev_loss was recorded: the whole search ranks by the late dev accuracy
    ("last-epoch", False, 0.1, "dev_accuracy", {"0.001": 0.55, "0.01": 0.65, "0.1": 0.85}),
    # the paper's criterion: the best epoch's dev accuracy
    ("best-epoch", True, 0.1, "dev_accuracy", {"0.001": 0.6, "0.01": 0.7, "0.1": 0.9}),
    # a search told to rank by accuracy (LoRA's)
    ("by-accuracy", True, 0.1, "dev_accuracy", {"0.001": 0.55, "0.01": 0.65, "0.1": 0.85}),
])
def test_lr_auto_ranks_last_epoch_candidates_by_their_late_dev_loss(tmp_path, selection, every_loss, chosen, criterion,
                                                                     scores):
    from daamkit.classify.experiment import make_accelerator
    from daamkit.classify.split_loop import pick_lr

    script = {0.001: ([0.5, 0.6], [1.0, 0.9]), 0.01: ([0.6, 0.7], [0.5, 0.4]), 0.1: ([0.9, 0.8], [0.8, 0.7])}

    def train(lr, folder):
        (folder / "best").mkdir(parents=True)
        (folder / "best" / "lr.txt").write_text(f"{lr:g}")
        accuracies, losses = script[lr]
        return _scripted_history(accuracies, losses if every_loss or lr != 0.1 else None)

    lr, history, search = pick_lr(train, grid=tuple(script), selection=selection.replace("by-accuracy", "last-epoch"),
                                  late_epochs=2, folder=tmp_path / "search", split_dir=tmp_path / "run1",
                                  accelerator=make_accelerator("no", cpu=True), by_loss=selection != "by-accuracy")
    assert lr == search["chosen"] == chosen and search[criterion] == pytest.approx(scores)
    assert history[-1]["dev_accuracy"] == script[chosen][0][-1]
    assert (tmp_path / "run1" / "best" / "lr.txt").read_text() == f"{chosen:g}"  # the winner becomes the split's
    assert json.loads((tmp_path / "run1" / "history.json").read_text()) == history


def test_lr_auto_never_picks_a_candidate_whose_dev_loss_diverged(tmp_path):
    from daamkit.classify.experiment import make_accelerator
    from daamkit.classify.split_loop import pick_lr

    losses = {0.001: float("nan"), 0.01: 0.9, 0.1: float("inf")}

    def train(lr, folder):
        (folder / "best").mkdir(parents=True)
        return _scripted_history([0.5, 0.5], [losses[lr]] * 2)

    lr, _, _ = pick_lr(train, grid=tuple(losses), selection="last-epoch", late_epochs=2, folder=tmp_path / "search",
                       split_dir=tmp_path / "run1", accelerator=make_accelerator("no", cpu=True))
    assert lr == 0.01
