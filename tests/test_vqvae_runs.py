"""VQ-VAE data, training, resume, LPIPS weights and CLI round trips on tiny PNG folders."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from daamkit.cli.main import app
from daamkit.infra.checkpoint import load_training_state, load_weights
from daamkit.infra.errors import DaamkitError
from daamkit.infra import images as images_module
from daamkit.vqvae import train as train_module
from daamkit.vqvae.data import StepBatchSampler, evaluation_set, training_splits

runner = CliRunner()
TINY_ARGS = ["--image-size", "16", "--batch-size", "4", "--base-channels", "8", "--num-downsamples", "2",
             "--embedding-dim", "4", "--num-embeddings", "16", "--heads", "2", "--gaussians", "2",
             "--warmup-steps", "1", "--val-images", "4", "--log-every", "1"]


def write_images(folder: Path, count: int, size: int = 24, seed: int = 0) -> list[Path]:
    """Smooth random colour PNGs (gradients + blobs) in `folder` and a nested sub-folder."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    paths = []
    for i in range(count):
        a, b, c = rng.uniform(0, 1, 3)
        image = np.stack([a * xx + (1 - a) * yy, np.sin(6 * b * xx) * 0.5 + 0.5, c * (xx * yy)], -1)
        path = folder / ("nested" if i % 2 else "") / f"img{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    write_images(folder, 6)
    return folder


@pytest.fixture(scope="module")
def trained(image_dir, tmp_path_factory) -> Path:
    """A tiny run trained through the CLI, with a TOML config whose values the flags override."""
    out = tmp_path_factory.mktemp("run")
    toml = out.parent / "run.toml"
    toml.write_text(f'data = "{image_dir}"\nsteps = 9\nnum-embeddings = 8\neval-every = 2\n')
    result = invoke("vqvae", "train", "--config", toml, "--out", out, "--steps", "3", *TINY_ARGS)
    assert result.exit_code == 0, result.output
    return out


def test_train_writes_the_run_layout_and_flags_win_over_the_config_file(trained, image_dir):
    for sub in ("checkpoints/last/model.safetensors", "checkpoints/last/config.json", "checkpoints/last/state.pt",
                "checkpoints/best/model.safetensors", "samples/final.png", "samples/step_000002.png"):
        assert (trained / sub).is_file(), sub
    assert list((trained / "tb").glob("events.out.tfevents.*"))
    state = load_training_state(trained / "checkpoints" / "last")
    assert state["step"] == 3 and state["best_psnr"] is not None
    assert all(torch.isfinite(w).all() for w in load_weights(trained / "checkpoints" / "last").values())
    config = json.loads((trained / "checkpoints" / "last" / "config.json").read_text())
    assert config["model"]["num_embeddings"] == 16 and config["train"]["steps"] == 3  # flags win
    assert config["train"]["data"] == str(image_dir) and config["train"]["eval_every"] == 2  # file fills the rest


def test_corrupt_and_small_files_are_skipped_counted_and_reported(tmp_path, capsys, monkeypatch):
    write_images(tmp_path, 3)
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "tiny.png")
    data = (tmp_path / "img0.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])  # valid header, cut pixel data
    splits = training_splits(str(tmp_path), 16, seed=0)
    err = capsys.readouterr().err
    assert "skipped 3 of 6 image file(s): 2 unreadable, 1 too small" in err
    assert len(splits.train) + len(splits.val) == 3  # a small folder is fully decoded: truncation found at scan
    assert {path.name: reason.split(" (")[0] for path, reason in splits.skipped} == {
        "broken.png": "unreadable", "truncated.png": "unreadable", "tiny.png": "8x8 is smaller than the 16 px crop"}
    monkeypatch.setattr(images_module, "FULL_DECODE_LIMIT", 2)  # a "large" folder: headers only
    evaluated = evaluation_set(str(tmp_path), 16)
    items = [evaluated[i] for i in range(len(evaluated))]
    assert sum(item is None for item in items) == 1  # the truncated file fails only when decoded
    names = [Path(n).name for n in evaluated.names]
    assert "broken.png" not in names and "tiny.png" not in names


def test_coco_layout_is_detected(tmp_path):
    write_images(tmp_path / "train2017", 4)
    write_images(tmp_path / "val2017", 2, seed=1)
    splits = training_splits(str(tmp_path), 16, seed=0)
    assert "COCO 2017" in splits.description and len(splits.train) == 4 and len(splits.val) == 2
    assert len(evaluation_set(str(tmp_path), 16)) == 2


def test_sample_photos_hold_out_their_bottom_strip():
    splits = training_splits("samples", 64, seed=0)
    assert len(splits.train) >= 6 and len(splits.val) >= 20
    photo = splits.train.load(0)
    crop = splits.val.load(0)
    assert crop.shape == (64, 64, 3) and photo.shape[0] == 192  # 256-px photo, top 75% for training


def test_step_batch_sampler_is_resumable_and_disjoint_across_ranks():
    full = StepBatchSampler(5, 3, seed=1)
    it = iter(full)
    batches = [next(it) for _ in range(4)]
    resumed = iter(StepBatchSampler(5, 3, seed=1, start_step=2))
    assert [next(resumed), next(resumed)] == batches[2:]
    rank0, rank1 = next(iter(StepBatchSampler(8, 2, 0, rank=0, world_size=2))), next(iter(StepBatchSampler(8, 2, 0, rank=1, world_size=2)))
    assert {k[1] for k in rank0}.isdisjoint({k[1] for k in rank1})


def _train_cli(image_dir, out, *extra):
    return invoke("vqvae", "train", "--data", image_dir, "--out", out, "--eval-every", "2", *TINY_ARGS, *extra)


def test_resume_after_ctrl_c_equals_an_uninterrupted_run(image_dir, tmp_path, monkeypatch):
    straight = _train_cli(image_dir, tmp_path / "a", "--steps", "5", "--eval-every", "100")
    assert straight.exit_code == 0, straight.output

    original = train_module.Trainer._train_step

    def interrupted_step(self, images, stop):
        if self.step == 2:
            signal.raise_signal(signal.SIGINT)  # as if the user pressed Ctrl-C during step 3
        return original(self, images, stop)

    monkeypatch.setattr(train_module.Trainer, "_train_step", interrupted_step)
    first = _train_cli(image_dir, tmp_path / "b", "--steps", "5", "--eval-every", "100")
    assert first.exit_code == 130, first.output
    assert load_training_state(tmp_path / "b" / "checkpoints" / "last")["step"] == 3
    monkeypatch.setattr(train_module.Trainer, "_train_step", original)
    resumed = _train_cli(image_dir, tmp_path / "b", "--steps", "5", "--eval-every", "100", "--resume")
    assert resumed.exit_code == 0, resumed.output
    a, b = (load_weights(tmp_path / run / "checkpoints" / "last") for run in ("a", "b"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7, msg=key)


def test_step_statistics_leave_the_device_only_on_logging_steps(image_dir, tmp_path, monkeypatch):
    """`.item()`-style syncs only every `log_every` steps (and step 1); TensorBoard gets exactly those numbers."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    converted = {}
    original = train_module.Trainer._step_metrics

    def recording(stats):
        values = original(stats)
        assert all(isinstance(value, float) for value in values.values())
        converted[len(converted)] = values
        return values

    monkeypatch.setattr(train_module.Trainer, "_step_metrics", staticmethod(recording))
    result = _train_cli(image_dir, tmp_path / "run", "--steps", "5", "--eval-every", "100", "--log-every", "2")
    assert result.exit_code == 0, result.output
    events = EventAccumulator(str(tmp_path / "run" / "tb")).Reload()
    logged = events.Scalars("train/loss")
    assert [event.step for event in logged] == [1, 2, 4] and len(converted) == 3
    assert [event.value for event in logged] == pytest.approx([converted[i]["loss"] for i in range(3)])
    usage = events.Scalars("codebook/batch_usage")  # from the step's code histogram, in percent
    assert all(0 < event.value <= 100 for event in usage) and len(usage) == 3


def test_resume_refuses_changed_model_options(trained):
    result = invoke("vqvae", "train", "--out", trained, "--resume", "--num-embeddings", "32")
    assert result.exit_code == 2 and "--num-embeddings 32 differs" in result.output


def test_existing_run_needs_resume_or_overwrite(trained, image_dir):
    result = invoke("vqvae", "train", "--data", image_dir, "--out", trained, *TINY_ARGS)
    assert result.exit_code == 2 and "already holds a run" in result.output


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(image_dir, tmp_path, monkeypatch):
    original = train_module.reconstruction_loss
    calls = {"n": 0}

    def poisoned(kind, recon, target):
        calls["n"] += 1
        loss = original(kind, recon, target)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(train_module, "reconstruction_loss", poisoned)
    result = _train_cli(image_dir, tmp_path / "nan", "--steps", "6")
    assert result.exit_code == 2
    assert "loss became nan at step 3" in result.output and "last good checkpoint" in result.output
    assert load_training_state(tmp_path / "nan" / "checkpoints" / "last")["step"] == 2


def test_missing_lpips_weights_stop_before_training(image_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    result = invoke("vqvae", "train", "--data", image_dir, "--out", tmp_path / "run", "--image-size", "32",
                    "--perceptual-weight", "0.5")
    assert result.exit_code == 2
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "vgg16-397923af.pth"  # the training default
    line = result.output.strip()
    assert line.startswith("error:") and "\n" not in line, line
    assert str(expected) in line and "--perceptual-weight 0" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_lpips_loss_and_metric_use_the_local_trunk_file(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    trunk = tmp_path / "torch" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    trunk.parent.mkdir(parents=True)
    features = {k: v for k, v in torchvision.models.alexnet(weights=None).state_dict().items() if k.startswith("features.")}
    torch.save(features, trunk)
    images = tmp_path / "images"
    write_images(images, 3, size=32)
    small = ["--batch-size", "2", "--base-channels", "8", "--embedding-dim", "4", "--num-embeddings", "16",
             "--heads", "2", "--gaussians", "2", "--val-images", "2"]
    result = invoke("vqvae", "train", "--data", images, "--out", tmp_path / "run", "--image-size", "32",
                    "--steps", "1", "--perceptual-weight", "0.5", "--lpips-net", "alex", *small)
    assert result.exit_code == 0, result.output
    result = invoke("vqvae", "evaluate", tmp_path / "run" / "checkpoints" / "last", "--data", images, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["lpips"] > 0


def test_evaluate_json(trained, image_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    result = invoke("vqvae", "evaluate", trained / "checkpoints" / "best", "--data", image_dir, "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert set(metrics) == {"psnr", "ssim", "lpips", "rfid", "codebook_usage", "perplexity", "num_images"}
    assert metrics["lpips"] is None and metrics["rfid"] is None and metrics["num_images"] == 6
    assert 0 < metrics["psnr"] < 100 and -1 <= metrics["ssim"] <= 1 and 0 < metrics["codebook_usage"] <= 100


def test_reconstruct_encode_decode_round_trip(trained, image_dir, tmp_path):
    ckpt = trained / "checkpoints" / "last"
    result = invoke("vqvae", "reconstruct", ckpt, image_dir, "--out", tmp_path / "rec")
    assert result.exit_code == 0, result.output
    pictures = sorted((tmp_path / "rec").glob("*.png"))
    assert len(pictures) == 6 and Image.open(pictures[0]).size == (16 * 2 + 4, 16)

    result = invoke("vqvae", "encode", ckpt, image_dir, "--out", tmp_path / "tok.npz")
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "tok.npz") as data:
        tokens = data["tokens"]
    assert tokens.shape == (6, 4, 4) and tokens.max() < 16
    result = invoke("vqvae", "decode", ckpt, tmp_path / "tok.npz", "--out", tmp_path / "dec")
    assert result.exit_code == 0, result.output
    decoded = sorted((tmp_path / "dec").glob("*.png"))
    assert len(decoded) == 6
    # decoding the tokens gives exactly the right half of the reconstruct picture
    rec_right = np.asarray(Image.open(pictures[0]))[:, 20:]
    assert np.abs(np.asarray(Image.open(decoded[0])).astype(int) - rec_right.astype(int)).max() <= 1

    result = invoke("vqvae", "encode", ckpt, image_dir / "img0.png", "--full", "--out", tmp_path / "full.npz")
    assert result.exit_code == 0 and np.load(tmp_path / "full.npz")["tokens"].shape == (1, 6, 6)


@pytest.mark.parametrize("args, message", [
    (["evaluate", "{missing}"], "does not exist"),
    (["evaluate", "{ckpt}", "--data", "{missing}"], "does not exist"),
    (["reconstruct", "{ckpt}", "{missing}", "--out", "{tmp}/rec"], "does not exist"),
    (["encode", "{ckpt}", "{big}", "--out", "{tmp}/t.npz", "--image-size", "64"], "smaller than the 64 px crop"),
    (["encode", "{ckpt}", "{images}", "--out", "{tmp}/t.txt"], "must end in .npz"),
    (["decode", "{ckpt}", "{bad_npz}", "--out", "{tmp}/dec"], "not a readable .npz"),
    (["evaluate", "{images}"], "config.json is missing"),
    (["train", "--data", "{missing}", "--out", "{tmp}/r"], "does not exist"),
    (["train", "--attention", "softmax", "--out", "{tmp}/r"], "attention must be one of"),
    (["train", "--image-size", "30", "--out", "{tmp}/r"], "must be a multiple of 4"),
    (["train", "--config", "{bad_toml}", "--out", "{tmp}/r"], "not valid TOML"),
    (["train", "--mixed-precision", "fp16", "--out", "{tmp}/r", "--data", "{images}"], "needs a CUDA GPU"),
])
def test_bad_inputs_give_one_error_line(args, message, trained, image_dir, tmp_path):
    (tmp_path / "bad.npz").write_text("nope")
    (tmp_path / "bad.toml").write_text("steps = = 3")
    if torch.cuda.is_available() and "fp16" in args:
        pytest.skip("fp16 is valid on a GPU")
    fill = dict(missing=tmp_path / "nope", ckpt=trained / "checkpoints" / "last", tmp=tmp_path,
                big=image_dir / "img0.png", images=image_dir, bad_npz=tmp_path / "bad.npz", bad_toml=tmp_path / "bad.toml")
    result = invoke("vqvae", *[a.format(**fill) for a in args])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output


def test_checkpoint_of_another_shape_is_refused(trained, tmp_path):
    config = json.loads((trained / "checkpoints" / "last" / "config.json").read_text())
    config["model"]["num_embeddings"] = 32
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(config))
    (other / "model.safetensors").write_bytes((trained / "checkpoints" / "last" / "model.safetensors").read_bytes())
    result = invoke("vqvae", "evaluate", other)
    assert result.exit_code == 2 and "does not fit this model" in result.output


def test_two_process_gloo_run(tmp_path):
    """DDP on CPU; files that fail when first decoded on the second process reach skipped.txt too."""
    data = tmp_path / "images"
    good = write_images(data, 2)  # img0.png trains, nested/img1.png (last in order) is held out
    for i in range(4):  # headers intact, pixel data cut: they pass a header-only scan and fail on use
        (data / f"cut{i}.png").write_bytes(good[0].read_bytes()[:80])
    # training files in order: cut0..cut3, img0; with batch 1 each process starts at its own index and, on a
    # failure, tries the next. Pick a seed where process 1 starts before process 0, so it alone meets cut<i1>.
    seed = next(s for s in range(100) if next(iter(StepBatchSampler(5, 1, s, rank=1, world_size=2)))[0][0]
                < next(iter(StepBatchSampler(5, 1, s, rank=0, world_size=2)))[0][0])
    first = next(iter(StepBatchSampler(5, 1, seed, rank=1, world_size=2)))[0][0]
    launcher = tmp_path / "launch.py"  # runs the CLI as if the folder were too large to decode when scanned
    launcher.write_text("import daamkit.infra.images as d; d.FULL_DECODE_LIMIT = 0\n"
                        "from daamkit.cli.main import main; main()\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_HOME": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(launcher),
               "vqvae", "train", "--data", str(data), "--out", str(tmp_path / "ddp"), "--steps", "2",
               "--eval-every", "2", *TINY_ARGS, "--batch-size", "1", "--seed", str(seed)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "processes=2" in " ".join(done.stderr.split())
    assert load_training_state(tmp_path / "ddp" / "checkpoints" / "last")["step"] == 2
    listed = (tmp_path / "ddp" / "skipped.txt").read_text()
    assert f"cut{first}.png\tunreadable" in listed


def test_training_library_errors_are_daamkit_errors(tmp_path):
    with pytest.raises(DaamkitError, match="no checkpoint"):
        train_module.saved_run_configs(tmp_path)
