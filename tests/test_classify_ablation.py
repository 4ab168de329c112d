"""IF layer ablation: the right top/bottom layers from a known ranking, same settings, table, resume, errors."""

import json

import pytest
from typer.testing import CliRunner

from classify_caches import write_train_test_cache
from daamkit.classify import ablation
from daamkit.classify.ablation import choose_layers, run_ablation
from daamkit.classify.training import train_decoder
from daamkit.cli.main import app
from daamkit.infra import progress
from daamkit.infra.errors import DaamkitError

runner = CliRunner()


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    """No progress output, restored afterwards (a module-level set_quiet would leak into other test files)."""
    monkeypatch.setattr(progress, "_quiet", True)


KNOWN_RANKING = [5, 2, 8, 1, 7, 3, 6, 4]  # encoder layer numbers, most important first


@pytest.fixture(scope="module")
def daam_run(tmp_path_factory):
    """A finished daam-v1 run (2 seeded runs, head, dropout and selection other than the paper task's defaults)
    whose IF ranking is then replaced by a known one."""
    root = tmp_path_factory.mktemp("ablation")
    cache = write_train_test_cache(root / "cache", num_layers=8, num_train=30, num_test=12)
    run_dir = root / "daam"
    train_decoder(cache, "daam-v1", run_dir, epochs=1, runs=2, heads=4, seed=3, head="linear", dropout=0.25,
                  selection="last-epoch")
    path = run_dir / "importance" / "importance.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "ranked_layers": KNOWN_RANKING}))
    return cache, run_dir


def test_choose_layers_takes_the_ends_of_the_ranking():
    assert choose_layers(KNOWN_RANKING, 3) == {"top": [2, 5, 8], "bottom": [3, 4, 6]}
    assert choose_layers(KNOWN_RANKING, 1) == {"top": [5], "bottom": [4]}
    for k in (0, 5):
        with pytest.raises(DaamkitError, match="`k` must be between 1 and 4"):
            choose_layers(KNOWN_RANKING, k)


def test_ablation_trains_top_and_bottom_layers_with_the_runs_settings(daam_run, tmp_path, monkeypatch):
    cache, run_dir = daam_run
    calls = []
    original = ablation.train_decoder

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(ablation, "train_decoder", spy)
    result = run_ablation(run_dir, k=3, out_dir=tmp_path / "abl")
    assert [c["layers"] for c in calls] == ["2,5,8", "3,4,6"]
    for call in calls:  # same settings, seeds and runs as the source run; heads: 2+ layers each
        assert (call["epochs"], call["runs"], call["seed"], call["heads"]) == (1, 2, 3, 1)
        assert (call["head"], call["dropout"], call["selection"]) == ("linear", 0.25, "last-epoch")
    top = json.loads((tmp_path / "abl" / "top" / "metrics.json").read_text())
    bottom = json.loads((tmp_path / "abl" / "bottom" / "metrics.json").read_text())
    assert top["layers"] == [2, 5, 8] and bottom["layers"] == [3, 4, 6] and top["seeds"] == [3, 4]

    (block,) = result["table"]["tables"]
    assert [row["name"] for row in block["rows"]] == ["all", "top", "bottom"]
    assert block["columns"] == ["run1", "run2"]
    assert block["difference"]["mean"] == pytest.approx(top["accuracy"]["mean"] - bottom["accuracy"]["mean"])
    assert block["difference"]["per_split"]["run2"] == pytest.approx(
        top["accuracy"]["per_split"][1]["accuracy"] - bottom["accuracy"]["per_split"][1]["accuracy"])
    assert json.loads((tmp_path / "abl" / "ablation.json").read_text()) == result["table"]
    markdown = (tmp_path / "abl" / "ablation.md").read_text()
    assert "| Top-3 IF layers | 2, 5, 8 |" in markdown and "Difference (top − bottom)" in markdown

    calls.clear()  # a rerun reuses both finished runs
    assert run_ablation(run_dir, k=3, out_dir=tmp_path / "abl")["table"] == result["table"] and calls == []


def test_ablation_errors(daam_run, tmp_path):
    cache, run_dir = daam_run
    mha = tmp_path / "mha"
    train_decoder(cache, "mha", mha, epochs=1, heads=2)
    result = runner.invoke(app, ["classify", "ablate", str(mha)])
    assert result.exit_code == 2 and "no Importance Factor ranking" in result.output
    result = runner.invoke(app, ["classify", "ablate", str(run_dir), "--k", "9"])
    assert result.exit_code == 2 and "--k must be between 1 and 4" in result.output
    result = runner.invoke(app, ["classify", "ablate", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "is not a finished run" in result.output


def test_single_layer_ablation_trains_the_head_without_daam(daam_run, tmp_path):
    cache, run_dir = daam_run
    result = run_ablation(run_dir, k=1, out_dir=tmp_path / "abl1")
    top = json.loads((tmp_path / "abl1" / "top" / "metrics.json").read_text())
    assert top["decoder"] == "conv-head" and top["attention_parameters"] == 0 and top["layers"] == [5]
    assert top["decoder_parameters"] == 16 * 3 + 3  # the source run's linear head over the one layer
    assert "(no DAAM: identity over one layer)" in top["method"]
    assert "| Top-1 IF layers | 5 |" in result["markdown"]
