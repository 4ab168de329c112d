"""The bad-input sweep: every input a user can get wrong ends in one `error:` line, exit code 2, no
traceback, and leaves every file already on disk exactly as it was."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from daamkit.cli.main import app
from classify_caches import write_train_test_cache
from test_vqvae_runs import TINY_ARGS, write_images

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every file and folder under `root` with its content hash (or "dir") and modification time."""
    state = {}
    for path in sorted(root.rglob("*")):
        digest = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
        state[str(path.relative_to(root))] = (digest, path.stat().st_mtime_ns if path.is_file() else 0)
    return state


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A tiny trained run plus every kind of bad file the sweep hands to the CLI."""
    root = tmp_path_factory.mktemp("sweep")
    write_images(root / "images", 4)
    result = invoke("vqvae", "train", "--data", root / "images", "--out", root / "run", "--steps", "2",
                    "--eval-every", "2", *TINY_ARGS)
    assert result.exit_code == 0, result.output
    shutil.copytree(root / "run" / "checkpoints" / "last", root / "bad_weights")
    truncate(root / "bad_weights" / "model.safetensors")
    shutil.copytree(root / "run", root / "bad_state_run")
    truncate(root / "bad_state_run" / "checkpoints" / "last" / "state.pt")
    (root / "a_file.txt").write_text("not a folder\n")
    (root / "existing.npz").write_bytes(b"an earlier result")
    (root / "dir.npz").mkdir()
    (root / "full_out").mkdir()
    (root / "full_out" / "0000_old.png").write_bytes(b"an earlier picture")
    (root / "toml_dir").mkdir()
    for name, text in {"data5": "data = 5\n", "lr_fast": 'lr = "fast"\n', "steps_float": "steps = 1.5\n",
                       "heads_bool": "heads = true\n", "epochs_text": 'epochs = "many"\n',
                       "unknown": "colour = 3\n"}.items():
        (root / f"{name}.toml").write_text(text)
    cache = write_train_test_cache(root / "cache", num_train=24, num_test=8)
    result = invoke("classify", "train", "--features", cache, "--decoder", "linear", "--epochs", "1", "--lr", "1e-3",
                    "--out", root / "classify_run", "--quiet")
    assert result.exit_code == 0, result.output
    shutil.copytree(cache, root / "damaged_cache")
    truncate(root / "damaged_cache" / "test" / "features.npy")
    truncate(next((root / "classify_run").rglob("best/model.safetensors")))
    (root / "list_config").mkdir()
    (root / "list_config" / "config.json").write_text("[1, 2]\n")
    (root / "list_config" / "model.safetensors").write_bytes(b"")
    return root


CKPT = "{root}/run/checkpoints/last"
SWEEP = [
    # options mistyped on the command line
    (["vqvae", "train", "--steps", "abc", "--out", "{root}/new"], "Invalid value for '--steps'"),
    (["vqvae", "train", "--stepz", "3", "--out", "{root}/new"], "No such option: --stepz"),
    (["classify", "train", "--epochs", "many"], "Invalid value for '--epochs'"),
    (["classify", "train", "--features", "{root}/cache", "--decoder", "mha", "--head", "mlp", "--out", "{root}/new"],
     "--head must be one of conv, linear, mix, got 'mlp'"),
    (["classify", "train", "--features", "{root}/cache", "--decoder", "linear", "--head", "conv", "--out", "{root}/new"],
     "decoder linear is one Linear layer and has no conv head; leave --head unset"),
    (["classify", "train", "--features", "{root}/cache", "--decoder", "mixture", "--residual", "--out", "{root}/new"],
     "decoder mixture has no residual path; leave --residual unset"),
    (["vqvae", "reconstruct", CKPT], "Missing argument"),
    # --config values of the wrong type or kind
    (["vqvae", "train", "--config", "{root}/data5.toml", "--out", "{root}/new"], "--data must be a string, got 5"),
    (["vqvae", "train", "--config", "{root}/lr_fast.toml", "--out", "{root}/new"], "--lr must be a number, got 'fast'"),
    (["vqvae", "train", "--config", "{root}/steps_float.toml", "--out", "{root}/new"], "--steps must be an integer"),
    (["vqvae", "train", "--config", "{root}/heads_bool.toml", "--out", "{root}/new"], "--heads must be an integer"),
    (["vqvae", "train", "--config", "{root}/unknown.toml", "--out", "{root}/new"], "unknown option(s): colour"),
    (["vqvae", "train", "--config", "{root}/toml_dir", "--out", "{root}/new"], "is a folder"),
    (["classify", "train", "--config", "{root}/epochs_text.toml", "--features", "{root}/f", "--decoder", "mha",
      "--out", "{root}/new"], "--epochs must be an integer"),
    (["classify", "train", "--config", "{root}/toml_dir", "--features", "{root}/f", "--decoder", "mha",
      "--out", "{root}/new"], "is a folder"),
    # outputs that are files or folders of the wrong kind, or already exist
    (["vqvae", "train", "--data", "{root}/images", "--out", "{root}/a_file.txt"], "a_file.txt is a file"),
    (["vqvae", "train", "--data", "{root}/images", "--out", "{root}/a_file.txt/run"], "a_file.txt is a file"),
    (["vqvae", "reconstruct", CKPT, "{root}/images", "--out", "{root}/a_file.txt"], "a_file.txt is a file"),
    (["vqvae", "reconstruct", CKPT, "{root}/images", "--out", "{root}/full_out"], "is not empty; pass --overwrite"),
    (["vqvae", "decode", CKPT, "{root}/existing.npz", "--out", "{root}/a_file.txt"], "a_file.txt is a file"),
    (["vqvae", "decode", CKPT, "{root}/existing.npz", "--out", "{root}/full_out"], "is not empty; pass --overwrite"),
    (["vqvae", "encode", CKPT, "{root}/images", "--out", "{root}/dir.npz"], "dir.npz is a folder"),
    (["vqvae", "encode", CKPT, "{root}/images", "--out", "{root}/existing.npz"], "already exists; pass --overwrite"),
    (["vqvae", "encode", CKPT, "{root}/images", "--out", "{root}/a_file.txt/t.npz"], "a_file.txt is a file"),
    (["classify", "train", "--features", "{root}/f", "--decoder", "mha", "--out", "{root}/a_file.txt"],
     "a_file.txt is a file"),
    (["classify", "extract", "--task", "text-csv", "--data", "{root}/d", "--encoder", "e", "--out", "{root}/a_file.txt"],
     "a_file.txt is a file"),
    # inputs of the wrong kind
    (["vqvae", "compare", "--out", "{root}/a_file.txt"], "a_file.txt is a file"),
    (["vqvae", "compare", "--out", "{root}/new", "--eval-data", "{root}/a_file.txt"],
     "--eval-data {root}/a_file.txt is a file, not a folder"),
    (["vqvae", "compare", "--out", "{root}/new", "--config", "{root}/lr_fast.toml"], "--lr must be a number"),
    (["vqvae", "compare", "--out", "{root}/new", "--seeds", "0,,1"], "--seeds has an empty entry in '0,,1'"),
    (["vqvae", "compare", "--out", "{root}/new", "--variants", "daam,"], "--variants has an empty entry in 'daam,'"),
    (["vqvae", "train", "--perceptual-weight", "0.1", "--image-size", "32", "--lpips-weights", "{root}/toml_dir",
      "--out", "{root}/new"], "--lpips-weights {root}/toml_dir is a folder"),
    (["vqvae", "train", "--perceptual-weight", "0.1", "--image-size", "32", "--lpips-weights", "{root}/a_file.txt",
      "--out", "{root}/new"], "not a readable PyTorch weights file"),
    (["vqvae", "train", "--data", "{root}/a_file.txt", "--out", "{root}/new"], "is a file, not a folder"),
    (["vqvae", "evaluate", CKPT, "--data", "{root}/a_file.txt"], "is a file, not a folder"),
    (["vqvae", "evaluate", "{root}/a_file.txt"], "is a file, not a checkpoint folder"),
    (["vqvae", "decode", CKPT, "{root}/dir.npz", "--out", "{root}/new"], "is a folder, not a token file"),
    (["vqvae", "evaluate", "{root}/list_config"], "not a daamkit VQ-VAE checkpoint"),
    (["classify", "evaluate", "{root}/a_file.txt"], "not a training run folder"),
    # corrupt or truncated checkpoint files
    (["vqvae", "evaluate", "{root}/bad_weights"], "model.safetensors is damaged or truncated"),
    (["vqvae", "reconstruct", "{root}/bad_weights", "{root}/images", "--out", "{root}/new"], "damaged or truncated"),
    (["vqvae", "train", "--out", "{root}/bad_state_run", "--resume"], "state.pt is damaged or truncated"),
    (["classify", "evaluate", "{root}/classify_run"], "model.safetensors is damaged or truncated"),
    (["classify", "train", "--features", "{root}/damaged_cache", "--decoder", "linear", "--out", "{root}/new"],
     "damaged_cache/test is damaged or truncated"),
    # a resumed run cannot go backwards
    (["vqvae", "train", "--out", "{root}/run", "--resume", "--steps", "1"], "--steps 1 is below the step"),
    (["vqvae", "reconstruct", CKPT, "{root}/images", "--out", "{root}/new", "--image-size", "0"],
     "--image-size 0 must be a positive multiple of 4"),
    # nothing usable among the inputs
    (["vqvae", "encode", CKPT, "{root}/images/img0.png", "--out", "{root}/new.npz", "--image-size", "64"],
     "no input image could be processed"),
]


@pytest.mark.parametrize("args, message", SWEEP, ids=[" ".join(a[:2]) + f" [{i}]" for i, (a, _) in enumerate(SWEEP)])
def test_bad_input_is_one_error_line_and_changes_nothing(world, args, message):
    before = snapshot(world)
    result = invoke(*[a.format(root=world) for a in args])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2, result.output
    assert len(errors) == 1 and message.format(root=world) in errors[0], result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # a clean exit, not a crash
    assert snapshot(world) == before, "a refused command changed files on disk"


# --------------------------------------------------------------------------- images decode right or are skipped

def _decoded(path: Path):
    from daamkit.infra.images import read_rgb

    image = read_rgb(path)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    return image


def test_every_image_kind_decodes_to_the_rgb_a_viewer_shows(tmp_path):
    ramp = (np.arange(64, dtype=np.uint32)[None, :].repeat(8, 0) * 1024).astype(np.uint16)  # 0 .. 64,512
    Image.fromarray(ramp).save(tmp_path / "deep.png")  # 16-bit greyscale
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    np.testing.assert_allclose(_decoded(tmp_path / "deep.png")[0, :, 0], np.round(ramp[0] / 257), atol=1)

    palette = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.save(tmp_path / "palette.png", transparency=1)  # index 1 (blue) is transparent
    np.testing.assert_array_equal(_decoded(tmp_path / "palette.png"), [[[255, 0, 0], [255, 255, 255]],
                                                                         [[255, 255, 255], [255, 0, 0]]])

    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)  # pure red in CMYK
    red = _decoded(tmp_path / "cmyk.jpg")
    assert red[..., 0].min() > 240 and red[..., 1:].max() < 15

    Image.new("L", (4, 4), 77).save(tmp_path / "grey.png")
    assert (_decoded(tmp_path / "grey.png") == 77).all()

    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (10, 200, 30, 255)  # opaque green-ish; the rest fully transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    np.testing.assert_array_equal(_decoded(tmp_path / "alpha.png")[0], [[10, 200, 30], [255, 255, 255]])

    tall = np.zeros((6, 4, 3), np.uint8)
    tall[0, 0] = 255  # white top-left pixel of the upright picture
    stored = Image.fromarray(np.rot90(tall, k=1).copy())  # stored lying on its side (4 rows x 6 columns)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    stored.save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    upright = _decoded(tmp_path / "rotated.jpg")
    assert upright.shape == (6, 4, 3) and upright[0, 0].min() > 200 and upright[-1, -1].max() < 50


def _jpeg(path: Path, size: int = 24, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path, quality=90)
    return path.read_bytes()


def test_training_lists_every_skipped_file_with_its_reason(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from daamkit.infra import images as images_module

    images = tmp_path / "images"
    write_images(images, 4)
    whole = _jpeg(tmp_path / "whole.jpg")
    (images / "cut.jpg").write_bytes(whole[: 3 * len(whole) // 4])  # header intact, pixels cut
    (images / "junk.png").write_bytes(b"not an image")
    Image.new("RGB", (8, 8)).save(images / "small.png")
    result = invoke("vqvae", "train", "--data", images, "--out", tmp_path / "run", "--steps", "2", "--eval-every", "2",
                    *TINY_ARGS)
    assert result.exit_code == 0, result.output
    listed = dict(line.split("\t") for line in (tmp_path / "run" / "skipped.txt").read_text().splitlines())
    assert {Path(name).name for name in listed} == {"cut.jpg", "junk.png", "small.png"}
    assert "truncated" in listed[str(images / "cut.jpg")].lower() and "smaller than the 16 px crop" in listed[str(images / "small.png")]
    assert "each is listed with its reason in" in result.output

    # a folder too large to decode at scan time: the cut file passes the header scan, fails on first use,
    # is warned about once, counted in TensorBoard and listed as well
    monkeypatch.setattr(images_module, "FULL_DECODE_LIMIT", 0)
    result = invoke("vqvae", "train", "--data", images, "--out", tmp_path / "big", "--steps", "6", "--eval-every", "6",
                    "--image-size", "16", "--batch-size", "3", *TINY_ARGS[4:])
    assert result.exit_code == 0, result.output
    assert result.output.count("warning: skipping") == 1
    listed = (tmp_path / "big" / "skipped.txt").read_text()
    assert "cut.jpg\tunreadable" in listed and "junk.png" in listed and "small.png" in listed
    events = EventAccumulator(str(tmp_path / "big" / "tb")).Reload()
    assert events.Scalars("data/skipped_images")[-1].value == 3


def test_reconstruct_and_encode_skip_bad_inputs_and_write_the_good_ones(world, tmp_path):
    folder = tmp_path / "mixed"
    write_images(folder, 2)
    (folder / "cut.png").write_bytes((folder / "img0.png").read_bytes()[:60])
    ckpt = world / "run" / "checkpoints" / "last"
    result = invoke("vqvae", "reconstruct", ckpt, folder, "--out", tmp_path / "rec")
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "rec").glob("*.png"))) == 2
    assert (tmp_path / "rec" / "skipped.txt").read_text().startswith(f"{folder / 'cut.png'}\tunreadable")
    assert "skipped 1 of 3 input image(s)" in result.output

    result = invoke("vqvae", "encode", ckpt, folder, "--out", tmp_path / "t.npz")
    assert result.exit_code == 0, result.output
    assert f"{folder / 'cut.png'}: unreadable" in result.output
    with np.load(tmp_path / "t.npz") as saved:
        assert saved["tokens"].shape[0] == 2 and len(saved["files"]) == 2


def test_encode_full_reports_every_grid_size(world, tmp_path):
    write_images(tmp_path / "a", 1, size=32)
    write_images(tmp_path / "b", 1, size=24, seed=1)
    ckpt = world / "run" / "checkpoints" / "last"
    result = invoke("vqvae", "encode", ckpt, tmp_path / "a", tmp_path / "b", "--full", "--out", tmp_path / "t.npz")
    assert result.exit_code == 0, result.output
    assert "wrote 2 token grid(s) of 8x8, 6x6" in result.output


def test_evaluate_without_lpips_weights_gives_no_training_advice(world, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    result = invoke("vqvae", "evaluate", world / "run" / "checkpoints" / "last", "--data", world / "images")
    assert result.exit_code == 0, result.output
    assert "lpips reported as null" in result.output and "perceptual" not in result.output


# --------------------------------------------------------------------------- runs tell the truth over time

class _Killed(BaseException):
    """Stands in for kill -9: nothing after it runs in the training loop."""


def test_tensorboard_keeps_every_step_up_to_the_checkpoint_across_a_kill_and_resume(world, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from daamkit.vqvae import train as train_module

    original = train_module.Trainer._train_step

    def dies_in_step_4(self, images, stop):
        if self.step == 3:  # steps 1-3 logged, checkpoint (and validation) at step 2
            self.writer.flush()
            raise _Killed
        return original(self, images, stop)

    args = ["vqvae", "train", "--data", world / "images", "--out", tmp_path / "run", "--steps", "4", "--eval-every", "2",
            *TINY_ARGS]
    monkeypatch.setattr(train_module.Trainer, "_train_step", dies_in_step_4)
    with pytest.raises(_Killed):
        invoke(*args)
    monkeypatch.setattr(train_module.Trainer, "_train_step", original)
    result = invoke(*args, "--resume")
    assert result.exit_code == 0, result.output
    events = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"scalars": 0, "images": 0}).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("val/psnr")] == [2, 4]
    assert [e.step for e in events.Images("val/originals_vs_reconstructions")] == [2, 4]


def test_progress_is_written_as_plain_lines_when_stderr_is_not_a_terminal(monkeypatch):
    from daamkit.infra import progress

    now = [0.0]
    lines = []
    monkeypatch.setattr(progress, "log", lines.append)
    task = progress._PlainTask("training", total=1000, completed=100, clock=lambda: now[0])
    for _ in range(900):
        now[0] += 0.5
        task.advance(loss=0.25)
    task.finish()
    # a line every 5% of the run (50 steps = 25 s here, sooner than every 30 s), the last one at 100%
    assert len(lines) == 18 and lines[-1].startswith("training: 1000/1000 (100%)")
    assert lines[0] == "training: 150/1000 (15%)  2.00/s  elapsed 0:00:25  eta 0:07:05  loss=0.25"


def test_a_second_ctrl_c_says_it_aborts_without_saving(monkeypatch):
    import signal

    from daamkit.vqvae import train as train_module

    lines = []
    monkeypatch.setattr(train_module, "log", lines.append)
    stop = train_module._StopRequest()
    stop._handle(signal.SIGINT, None)
    assert stop.requested and "saving a checkpoint" in lines[-1]
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)
    assert lines[-1].startswith("aborted without saving")


def test_utf8_bom_csv_from_excel_is_read(tmp_path):
    from daamkit.classify.datasets import load_task

    for split in ("train", "test"):
        (tmp_path / f"{split}.csv").write_text("text,label\nfirst,pos\nsecond,neg\n", encoding="utf-8-sig")
    data = load_task("text-csv", tmp_path)
    assert sorted(data.splits) == ["test", "train"]
