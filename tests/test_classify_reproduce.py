"""`classify reproduce --quick` end to end on a tiny encoder, resuming without redoing finished runs."""

import json

import pytest
from typer.testing import CliRunner

from daamkit.classify import ablation, reproduce
from daamkit.classify.decoders import TABLE_DECODERS
from daamkit.classify.reproduce import ReproduceOptions
from daamkit.cli.main import app
from daamkit.infra import progress
from daamkit.infra.errors import DaamkitError

runner = CliRunner()


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    """No progress output, restored afterwards (a module-level set_quiet would leak into other test files)."""
    monkeypatch.setattr(progress, "_quiet", True)


def _invoke(agnews_dir, tiny_llama, out, *extra):
    return runner.invoke(app, ["classify", "reproduce", "--task", "agnews", "--data", str(agnews_dir), "--encoder",
                               str(tiny_llama), "--out", str(out), "--quick", "--lora-ranks", "2",
                               "--quiet", *extra])


def test_reproduce_quick_end_to_end_then_resume(tmp_path, agnews_dir, tiny_llama, monkeypatch):
    out = tmp_path / "exp"
    result = _invoke(agnews_dir, tiny_llama, out, "--epochs", "1")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    (table,) = report["tables"]
    methods = [row["method"] for row in table["rows"]]
    assert methods == [*TABLE_DECODERS, "LoRA (r=2)", "LoRA+ (r=2)"] and table["columns"] == ["run1"]
    lora_row = table["rows"][-1]
    assert lora_row["trainable_parameters"] > 0 and lora_row["attention_parameters"] is None
    abl = report["ablation"]
    assert abl["k"] == 1 and abl["decoder"] == "daam-v1"  # 2 encoder layers: k=3 is clamped to 1
    rows = {row["name"]: row["layers"] for row in abl["tables"][0]["rows"]}
    assert rows == {"all": [1, 2], "top": [abl["ranking"][0]], "bottom": [abl["ranking"][-1]]}
    markdown = (out / "report.md").read_text()
    assert "| LoRA+ (r=2) |" in markdown and "IF layer ablation" in markdown and "| LoRA+ (r=2) |" in result.output
    assert json.loads((out / "runs" / "mha" / "metrics.json").read_text())["epochs"] == 1

    calls = []
    for module, name in ((reproduce, "train_decoder"), (reproduce, "train_lora"), (ablation, "train_decoder")):
        monkeypatch.setattr(module, name, lambda *a, _n=name, **k: calls.append(_n))
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("metrics.json")}
    rerun = _invoke(agnews_dir, tiny_llama, out, "--epochs", "1", "--json")
    assert rerun.exit_code == 0, rerun.output
    assert calls == [] and {p: p.stat().st_mtime_ns for p in out.rglob("metrics.json")} == mtimes
    assert json.loads(rerun.output) == report

    changed = _invoke(agnews_dir, tiny_llama, out, "--epochs", "2")
    assert changed.exit_code == 2 and "epochs differ" in changed.output


def test_a_deleted_run_is_the_only_one_trained_again(tmp_path, agnews_dir, tiny_llama, monkeypatch):
    out = tmp_path / "exp"
    assert _invoke(agnews_dir, tiny_llama, out, "--methods", "mha,mha-bn", "--epochs", "1").exit_code == 0
    (out / "runs" / "mha-bn" / "metrics.json").unlink()
    trained = []
    original = reproduce.train_decoder
    monkeypatch.setattr(reproduce, "train_decoder", lambda f, d, *a, **k: trained.append(d) or original(f, d, *a, **k))
    assert _invoke(agnews_dir, tiny_llama, out, "--methods", "mha,mha-bn", "--epochs", "1").exit_code == 0
    assert trained == ["mha-bn"]


@pytest.mark.parametrize("kwargs, message", [
    ({"methods": "mha,bogus"}, "unknown or empty"),
    ({"methods": "mha,ablation"}, "add daam-v1 to `methods`"),
    ({"ablation_source": "mha"}, "`ablation_source` must be a DAAM decoder"),
    ({"lora_ranks": "4,x"}, "`lora_ranks` must be comma-separated integers"),
])
def test_reproduce_option_errors(kwargs, message):
    with pytest.raises(DaamkitError, match=message):
        ReproduceOptions.build(**kwargs)


def test_quick_and_full_defaults():
    quick, full = ReproduceOptions.build(quick=True), ReproduceOptions.build()
    assert (quick.epochs, quick.runs, quick.max_items) == (2, 1, 64)
    assert (full.epochs, full.lora_epochs, full.runs, full.max_items, full.lora_ranks) == (35, 3, 3, None, (4, 8))


def test_cli_reproduce_errors_are_one_line(tmp_path, agnews_dir):
    result = runner.invoke(app, ["classify", "reproduce", "--task", "agnews", "--data", str(agnews_dir), "--encoder",
                                 str(tmp_path / "no-model"), "--out", str(tmp_path / "exp"), "--methods", "mha,bogus"])
    assert result.exit_code == 2 and "error: --methods" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["classify", "reproduce", "--task", "agnews", "--data", str(agnews_dir), "--encoder",
                                 str(tmp_path / "no-model"), "--out", str(tmp_path / "exp"), "--methods", "mha"])
    assert result.exit_code == 2 and result.output.startswith("error: ") and "Traceback" not in result.output
