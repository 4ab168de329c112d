"""LoRA / LoRA+ baselines on tiny random encoders: only adapters and head train, dead adapters are caught,
the protocol and metrics.json match `classify train`, CLI errors are one line."""

import json
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from daamkit.classify import lora, split_loop
from daamkit.classify.encoders import FrozenEncoder
from daamkit.classify.experiment import LORA_PAPER_EPOCHS, LR_GRID, MIN_TRAIN_STEPS, SMALL_POOL_RUNS, default_epochs
from daamkit.classify.extract import extract_features
from daamkit.classify.lora import default_target_modules, train_lora
from daamkit.classify.report import build_report
from daamkit.classify.run_config import LoRARunConfig
from daamkit.classify.training import train_decoder
from daamkit.cli.main import app
from daamkit.infra import progress
from daamkit.infra.checkpoint import load_weights
from daamkit.infra.errors import DaamkitError

runner = CliRunner()


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    """No progress output, restored afterwards (a module-level set_quiet would leak into other test files)."""
    monkeypatch.setattr(progress, "_quiet", True)


def _capture_base(monkeypatch) -> list:
    """Record the encoder model `train_lora` loads (the object adapters are injected into and removed from)."""
    loaded = []
    original = FrozenEncoder.load

    def load(self):
        loaded.append(original(self))
        return loaded[-1]

    monkeypatch.setattr(FrozenEncoder, "load", load)
    return loaded


def test_lora_changes_only_adapter_and_head_weights(tmp_path, agnews_dir, tiny_bert, monkeypatch):
    loaded = _capture_base(monkeypatch)
    before = {k: v.clone() for k, v in FrozenEncoder.from_pretrained(str(tiny_bert), device="cpu").load()
              .state_dict().items()}
    metrics = train_lora("agnews", agnews_dir, str(tiny_bert), tmp_path / "run", rank=4, epochs=2, lr=1e-2)
    after = loaded[0].state_dict()
    assert after.keys() == before.keys()  # adapters were removed again after the run
    assert all(torch.equal(after[k], before[k]) for k in before)  # the encoder's own weights never moved

    weights = load_weights(tmp_path / "run" / "splits" / "run1" / "best")
    assert weights and all("lora_" in k or k.startswith("head.") for k in weights)
    adapted = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in weights if "lora_" in k}
    assert adapted == {"query", "key"} and metrics["lora"]["target_modules"] == ["query", "key"]
    assert any(k.endswith("lora_B.default.weight") and v.abs().sum() > 0 for k, v in weights.items())
    adapter_count = sum(v.numel() for k, v in weights.items() if "lora_" in k)
    # 3 layers x 2 modules x rank 4 x (24 in + 24 out); head 24 x 4 classes + 4
    assert metrics["adapter_parameters"] == adapter_count == 3 * 2 * 4 * 48
    assert metrics["trainable_parameters"] == adapter_count + 24 * 4 + 4
    assert metrics["encoder_parameters"] == sum(v.numel() for v in before.values())

    block = metrics["accuracy"]
    assert [e["name"] for e in block["per_split"]] == ["run1"]
    assert set(block["per_split"][0]) == {"name", "accuracy", "dev_accuracy", "best_epoch"}
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == metrics
    row = build_report([tmp_path / "run"])["tables"][0]["rows"][0]
    assert row["method"] == "LoRA (r=4)" and row["trainable_parameters"] == metrics["trainable_parameters"]
    extract_features("agnews", agnews_dir, str(tiny_bert), tmp_path / "features", device="cpu")
    train_decoder(tmp_path / "features", "linear", tmp_path / "probe", epochs=1)
    (table,) = build_report([tmp_path / "run", tmp_path / "probe"])["tables"]  # the same data: one table
    assert [row["method"] for row in table["rows"]] == ["linear", "LoRA (r=4)"]  # the probe first
    with pytest.raises(DaamkitError, match="already holds a finished run"):
        train_lora("agnews", agnews_dir, str(tiny_bert), tmp_path / "run", rank=4, epochs=1)

    # parity with DAT runs: TensorBoard curves from the shared loop, and `classify evaluate` re-scores the run
    events = list((tmp_path / "run" / "tensorboard" / "run1").glob("events.out.tfevents.*"))
    assert events and json.loads((tmp_path / "run" / "splits" / "run1" / "history.json").read_text()) == \
        metrics["history"]["run1"]
    result = runner.invoke(app, ["classify", "evaluate", str(tmp_path / "run"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["accuracy"] == metrics["accuracy"]


def test_loraplus_uses_peft_helper_with_the_ratio(tmp_path, agnews_dir, tiny_llama, monkeypatch):
    from peft.optimizers import create_loraplus_optimizer

    calls = []

    def spy(model, optimizer_cls, **kwargs):
        calls.append(kwargs)
        return create_loraplus_optimizer(model, optimizer_cls, **kwargs)

    monkeypatch.setattr("peft.optimizers.create_loraplus_optimizer", spy)
    metrics = train_lora("agnews", agnews_dir, str(tiny_llama), tmp_path / "plus", rank=2, plus=True,
                         loraplus_ratio=8.0, epochs=1, runs=2)
    assert [c["loraplus_lr_ratio"] for c in calls] == [8.0, 8.0] and calls[0]["lr"] == 5e-5  # Llama default lr
    assert metrics["method"] == "LoRA+ (r=2)" and metrics["lora"]["target_modules"] == ["q_proj", "k_proj"]
    assert [e["name"] for e in metrics["accuracy"]["per_split"]] == ["run1", "run2"] and metrics["seeds"] == [0, 1]


def test_resume_continues_an_interrupted_lora_run_exactly(tmp_path, agnews_dir, tiny_bert, monkeypatch):
    """Interrupted inside run 2, refused as a new run, resumed from the CLI: the result of one go, bit for bit."""
    options = {"rank": 2, "epochs": 3, "runs": 2, "lr": 1e-2}
    full = train_lora("agnews", agnews_dir, str(tiny_bert), tmp_path / "full", **options)
    original, calls = split_loop.dev_scores, []

    def dev_scores(*args):  # run1: dev epochs 1-3; run2: dev epoch 1, then stop
        calls.append("dev")
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(split_loop, "dev_scores", dev_scores)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train_lora("agnews", agnews_dir, str(tiny_bert), out, **options)
    assert (out / "splits" / "run1" / "history.json").is_file()
    assert not (out / "splits" / "run2" / "history.json").exists()
    calls.clear()
    monkeypatch.setattr(split_loop, "dev_scores", lambda *args: calls.append("dev") or original(*args))
    test_score = lora.accuracy
    monkeypatch.setattr(lora, "accuracy", lambda *args: calls.append("test") or test_score(*args))
    common = ["classify", "lora", "--out", str(out), "--quiet"]
    result = runner.invoke(app, [*common, "--task", "agnews", "--data", str(agnews_dir), "--encoder", str(tiny_bert)])
    assert result.exit_code == 2 and "pass --resume to continue it" in result.stderr
    result = runner.invoke(app, [*common, "--resume", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == full
    assert sorted(calls) == ["dev", "dev", "test", "test"]  # run2's dev epochs 2 and 3 (not 1 again), 2 test scores
    for split in ("run1", "run2"):
        resumed, straight = (load_weights(run / "splits" / split / "best") for run in (out, tmp_path / "full"))
        assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in straight)
    result = runner.invoke(app, [*common, "--resume"])
    assert result.exit_code == 2 and "has finished already" in result.stderr
    result = runner.invoke(app, ["classify", "lora", "--out", str(tmp_path / "new"), "--quiet"])
    assert result.exit_code == 2 and "needs --task, --data and --encoder (or --resume" in result.stderr


def test_lora_defaults_resolve_against_the_task_as_classify_train_does(tmp_path, agnews_dir, text_csv_dir, tiny_bert):
    """A user's task: lr auto, the 500-step floor, 3 runs on a small pool, the last epoch; the paper's AG News:
    its recipe (lr 1e-4, 3 epochs, one run, the best dev epoch)."""
    resolved = {}
    for task, data in (("text-csv", text_csv_dir), ("agnews", agnews_dir)):
        settings = lora._new_settings(task, data, str(tiny_bert), False, LoRARunConfig())
        _, _, plans = lora._open_job(settings, tmp_path, cpu=True)
        resolved[task] = {key: settings[key] for key in ("lr", "epochs", "runs", "selection")}
        train_items = min(len(plan.train) for plan in plans)
    assert resolved["agnews"] == {"lr": 1e-4, "epochs": LORA_PAPER_EPOCHS, "runs": 1, "selection": "best-epoch"}
    assert resolved["text-csv"] == {"lr": "auto", "epochs": default_epochs(train_items, 32, LORA_PAPER_EPOCHS),
                                    "runs": SMALL_POOL_RUNS, "selection": "last-epoch"}
    assert resolved["text-csv"]["epochs"] * -(-train_items // 32) >= MIN_TRAIN_STEPS


def test_lora_lr_auto_keeps_the_best_candidate_and_trains_it_as_a_fixed_lr_would(tmp_path, text_csv_dir, tiny_bert,
                                                                                  monkeypatch):
    """Every candidate adapts the same base model afresh (adapters removed between them): the chosen lr's
    run1 equals a run with that lr fixed, bit for bit, and run2 trains with it; a run interrupted inside the
    search and resumed ends the same."""
    options = {"rank": 2, "epochs": 2, "runs": 2}
    auto = train_lora("text-csv", text_csv_dir, str(tiny_bert), tmp_path / "auto", **options)
    settings = json.loads((tmp_path / "auto" / "lora.json").read_text())
    search = settings["lr_search"]
    assert search["grid"] == list(LR_GRID) and settings["lr"] == search["chosen"] == auto["lora"]["lr"] in LR_GRID
    assert set(search["dev_accuracy"]) == {f"{lr:g}" for lr in LR_GRID} and "dev_loss" not in search  # by accuracy
    assert sorted(p.name for p in (tmp_path / "auto" / "lr_search").iterdir()) == [f"lr{lr:g}" for lr in sorted(LR_GRID)]
    # the winner's history is run1's, so a resumed run would not train run1 again
    assert json.loads((tmp_path / "auto" / "splits" / "run1" / "history.json").read_text()) == auto["history"]["run1"]
    fixed = train_lora("text-csv", text_csv_dir, str(tiny_bert), tmp_path / "fixed", lr=search["chosen"], **options)
    assert auto["accuracy"] == fixed["accuracy"] and auto["history"] == fixed["history"]
    for split in ("run1", "run2"):
        a, b = (load_weights(run / "splits" / split / "best") for run in (tmp_path / "auto", tmp_path / "fixed"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    original, calls = split_loop.dev_scores, []

    def dev_scores(*args):  # the first candidate's 2 dev epochs, then stop at the second candidate's first
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(split_loop, "dev_scores", dev_scores)
    with pytest.raises(KeyboardInterrupt):
        train_lora("text-csv", text_csv_dir, str(tiny_bert), tmp_path / "cut", **options)
    monkeypatch.setattr(split_loop, "dev_scores", original)
    assert train_lora(None, None, None, tmp_path / "cut", resume=True) == auto


def test_wavlm_query_key_adapters_get_no_gradient_and_are_refused(tmp_path, audio_folder_dir, tiny_wavlm):
    with pytest.raises(DaamkitError, match=r"q_proj.*no gradient.*`target_modules` intermediate_dense,output_dense"):
        train_lora("audio-folder", audio_folder_dir, str(tiny_wavlm), tmp_path / "qk", rank=2, epochs=1,
                   target_modules=["q_proj", "k_proj"])
    assert not (tmp_path / "qk" / "metrics.json").exists()


def test_wavlm_default_targets_train_on_iemocap_folds(tmp_path, iemocap_dir, tiny_wavlm):
    base = FrozenEncoder.from_pretrained(str(tiny_wavlm), device="cpu").load()
    assert default_target_modules(base) == ["intermediate_dense", "output_dense"]
    metrics = train_lora("iemocap", iemocap_dir, str(tiny_wavlm), tmp_path / "iemocap", rank=2, epochs=1,
                         batch_size=4, max_items=15)
    for key in ("accuracy", "utterance_accuracy"):
        assert [e["name"] for e in metrics[key]["per_split"]] == [f"Session{s}" for s in range(1, 6)]
    assert metrics["adapter_parameters"] == 2 * 2 * 2 * (32 + 64)  # 2 layers x 2 modules x r=2 x (in + out)


def test_lora_uses_the_same_folds_and_dev_splits_as_classify_train(tmp_path, iemocap_dir, tiny_wavlm):
    from daamkit.classify.datasets import load_task
    from daamkit.classify.experiment import open_sources, plan_splits
    from daamkit.classify.extract import extract_features
    from daamkit.classify.feature_cache import FeatureCache

    extract_features("iemocap", iemocap_dir, str(tiny_wavlm), tmp_path / "cache", device="cpu", max_items=15)
    cache = FeatureCache.open(tmp_path / "cache")
    expected = plan_splits(cache.manifest.get("grouping"), open_sources(cache), seed=4, runs=1, dev_fraction=0.2)
    _, plans = lora.task_plans(load_task("iemocap", iemocap_dir, max_items=15), seed=4, runs=1, dev_fraction=0.2)
    assert [p.name for p in plans] == [p.name for p in expected] == [f"Session{s}" for s in range(1, 6)]
    for got, want in zip(plans, expected):
        assert got.seed == want.seed
        for part in ("train", "dev", "test"):
            assert getattr(got, part).tolist() == getattr(want, part).tolist()


def test_lora_text_runs_see_the_same_items_as_the_length_sorted_cache(tmp_path, agnews_dir, tiny_bert):
    from daamkit.classify.datasets import in_cache_order, load_task
    from daamkit.classify.experiment import open_sources, plan_splits
    from daamkit.classify.extract import extract_features
    from daamkit.classify.feature_cache import FeatureCache

    extract_features("agnews", agnews_dir, str(tiny_bert), tmp_path / "cache", device="cpu")
    cache = FeatureCache.open(tmp_path / "cache")
    sources = open_sources(cache)
    expected = plan_splits(cache.manifest.get("grouping"), sources, seed=3, runs=2, dev_fraction=0.25)
    data = load_task("agnews", agnews_dir)
    ordered = {name: in_cache_order(split, data.modality) for name, split in data.splits.items()}
    assert [item["id"] for item in ordered["train"].items] == [item["id"] for item in sources["train"].items]
    views, plans = lora.task_plans(replace(data, splits=ordered), seed=3, runs=2, dev_fraction=0.25)
    for got, want in zip(plans, expected, strict=True):
        for part in ("train", "dev", "test"):
            source = sources[want.test_source if part == "test" else want.train_source]
            got_ids = [views[got.test_source if part == "test" else got.train_source].items[i]["id"]
                       for i in getattr(got, part)]
            assert got_ids == [source.items[i]["id"] for i in getattr(want, part)]


def test_modules_without_gradient_ignores_the_zero_first_gradient_of_lora_a():
    from peft import LoraConfig, get_peft_model

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    adapted = get_peft_model(model, LoraConfig(r=2, target_modules=["0", "1"]))
    adapted(torch.randn(3, 4)).sum().backward()  # lora_A grads are zero (lora_B starts at zero)
    assert lora.modules_without_gradient(adapted) == []
    for param in adapted.parameters():
        param.grad = None
    assert len(lora.modules_without_gradient(adapted)) == 2


@pytest.mark.parametrize("args, message", [
    (["--rank", "0"], "--rank must be an integer of at least 1"),
    (["--plus", "--loraplus-ratio", "0.5"], "--loraplus-ratio must be at least 1"),
    (["--epochs", "0"], "--epochs must be an integer of at least 1"),
])
def test_cli_lora_errors_are_one_line(tmp_path, agnews_dir, tiny_bert, args, message):
    result = runner.invoke(app, ["classify", "lora", "--task", "agnews", "--data", str(agnews_dir), "--encoder",
                                 str(tiny_bert), "--out", str(tmp_path / "run"), *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
