"""The tokenizer recipe: PatchGAN + adaptive weight + LeCam, weight EMA, and their exact resume."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from daamkit.infra.checkpoint import load_training_state, load_weights
from daamkit.infra.errors import DaamkitError
from daamkit.vqvae import train as train_module
from daamkit.vqvae.config import TrainConfig
from daamkit.vqvae.discriminator import (LeCam, PatchDiscriminator, adaptive_weight, discriminator_loss,
                                         generator_loss)
from daamkit.vqvae.weight_ema import WeightEMA
from test_vqvae_runs import TINY_ARGS, invoke, write_images

GAN_ARGS = ["--disc-weight", "0.5", "--disc-start", "2", "--disc-layers", "2", "--disc-channels", "8",
            "--lecam-weight", "0.1", "--weight-ema", "0.9", "--eval-every", "100"]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("recipe_images")
    write_images(folder, 6)
    return folder


def _train(image_dir, out, *extra):
    return invoke("vqvae", "train", "--data", image_dir, "--out", out, *TINY_ARGS, *extra)


def test_patch_discriminator_scores_patches_and_refuses_too_small_images():
    disc = PatchDiscriminator(3, 8, layers=2)
    assert disc(torch.randn(2, 3, 16, 16)).shape == (2, 1, 2, 2)
    assert PatchDiscriminator(3, 8, layers=3)(torch.randn(1, 3, 24, 24)).shape == (1, 1, 1, 1)
    with pytest.raises(DaamkitError, match="`disc_layers` 3"):
        TrainConfig(image_size=16, disc_weight=0.5)


def test_stacked_real_and_fake_batches_are_normalised_as_separate_calls():
    """One call on [real; fake] with batches=2 equals two calls (taming's D step): logits and BatchNorm stats."""
    torch.manual_seed(0)
    real, fake = torch.randn(3, 3, 16, 16) + 1.0, torch.randn(3, 3, 16, 16) * 0.5
    stacked, separate = PatchDiscriminator(3, 8, layers=2), PatchDiscriminator(3, 8, layers=2)
    separate.load_state_dict(stacked.state_dict())
    together = stacked(torch.cat([real, fake]), batches=2)
    torch.testing.assert_close(together, torch.cat([separate(real), separate(fake)]))
    for key, value in separate.state_dict().items():  # running statistics updated once per side, in order
        torch.testing.assert_close(stacked.state_dict()[key], value, msg=key)
    mixed = PatchDiscriminator(3, 8, layers=2)
    mixed.load_state_dict(separate.state_dict())
    assert not torch.allclose(mixed(torch.cat([real, fake])), separate(torch.cat([real, fake]), batches=2))


def test_adversarial_losses_match_their_formulas():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.2, 1.5])
    hinge = 0.5 * (sum(max(0.0, 1 - r) for r in real.tolist()) / 3 + sum(max(0.0, 1 + f) for f in fake.tolist()) / 3)
    assert discriminator_loss("hinge", real, fake).item() == pytest.approx(hinge)
    ns = 0.5 * (torch.log1p(torch.exp(-real)).mean() + torch.log1p(torch.exp(fake)).mean())
    assert discriminator_loss("non-saturating", real, fake).item() == pytest.approx(ns.item())
    assert generator_loss("hinge", fake).item() == pytest.approx(-fake.mean().item())
    assert generator_loss("non-saturating", fake).item() == pytest.approx(torch.log1p(torch.exp(-fake)).mean().item())


def test_adaptive_weight_is_the_gradient_norm_ratio():
    w = torch.randn(4, requires_grad=True)
    nll, adv = (3 * w).sum(), (w * 0.5).sum()  # gradients 3 and 0.5 per element
    expected = (3 * 2) / (0.5 * 2 + 1e-4)
    assert adaptive_weight(nll, adv, w).item() == pytest.approx(expected, rel=1e-5)


def test_lecam_uses_running_means_of_the_other_side():
    lecam = LeCam(decay=0.5)
    first = lecam(torch.tensor([1.0]), torch.tensor([0.0]))  # means start at real 1, fake 0
    assert first.item() == pytest.approx(1.0 + 1.0)
    lecam(torch.tensor([3.0]), torch.tensor([-1.0]))
    assert lecam.ema_real.item() == pytest.approx(2.0) and lecam.ema_fake.item() == pytest.approx(-0.5)


def test_weight_ema_averages_floats_and_copies_flags():
    model = torch.nn.BatchNorm1d(2)
    ema = WeightEMA(model, 0.75)
    with torch.no_grad():
        model.weight.fill_(5.0)
        model.num_batches_tracked.fill_(7)
    ema.update(model, step=100)  # past the warm-up: the configured decay
    assert torch.allclose(ema.module.weight, torch.full((2,), 0.75 * 1 + 0.25 * 5))
    assert int(ema.module.num_batches_tracked) == 7 and not ema.module.weight.requires_grad


def test_weight_ema_warms_up_so_a_short_run_is_not_its_initialisation():
    model = torch.nn.Linear(1, 1, bias=False)
    ema = WeightEMA(model, 0.9999)
    assert [ema.decay_at(step) for step in (0, 1, 8)] == [0.1, pytest.approx(2 / 11), pytest.approx(0.5)]
    assert ema.decay_at(10**6) == 0.9999
    with torch.no_grad():
        model.weight.fill_(0.0)
        ema.module.weight.fill_(1.0)
    ema.update(model, step=0)  # the first update keeps 10 % of the initial weights, not 99.99 %
    assert ema.module.weight.item() == pytest.approx(0.1)


def test_gan_and_weight_ema_run_resumes_bit_for_bit_and_evaluates_the_ema(image_dir, tmp_path, monkeypatch):
    straight = _train(image_dir, tmp_path / "a", "--steps", "5", *GAN_ARGS)
    assert straight.exit_code == 0, straight.output
    original = train_module.Trainer._train_step

    def interrupted_step(self, images, stop):
        if self.step == 3:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C during step 4, with the GAN already active
        return original(self, images, stop)

    monkeypatch.setattr(train_module.Trainer, "_train_step", interrupted_step)
    first = _train(image_dir, tmp_path / "b", "--steps", "5", *GAN_ARGS)
    assert first.exit_code == 130, first.output
    last_b = tmp_path / "b" / "checkpoints" / "last"
    state = load_training_state(last_b)
    assert state["step"] == 4 and state["disc_optimizer"]["state"] and state["lecam"]["ema_real"] is not None
    monkeypatch.setattr(train_module.Trainer, "_train_step", original)
    resumed = _train(image_dir, tmp_path / "b", "--steps", "5", *GAN_ARGS, "--resume")
    assert resumed.exit_code == 0, resumed.output
    for name in ("model.safetensors", "discriminator.safetensors", "ema.safetensors"):
        a, b = (load_weights(tmp_path / run / "checkpoints" / "last", name=name) for run in ("a", "b"))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    raw, ema = load_weights(last_b), load_weights(last_b, name="ema.safetensors")
    assert not torch.equal(raw["decoder.conv_out.weight"], ema["decoder.conv_out.weight"])
    # evaluate (like reconstruct, encode and decode) uses the EMA weights unless --raw-weights is given
    metrics = [json.loads(invoke("vqvae", "evaluate", last_b, "--data", image_dir, "--json", *flag).stdout)
               for flag in ([], ["--raw-weights"])]
    assert metrics[0]["psnr"] != metrics[1]["psnr"]


def _random_alexnet_trunk(path):
    import torchvision

    path.parent.mkdir(parents=True, exist_ok=True)
    state = torchvision.models.alexnet(weights=None).state_dict()
    torch.save({k: v for k, v in state.items() if k.startswith("features.")}, path)
    return path


def test_lpips_trunk_from_an_explicit_file_outside_the_cache(tmp_path, monkeypatch):
    from daamkit.vqvae.losses import load_lpips, resolve_lpips_trunk

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_cache"))
    trunk = _random_alexnet_trunk(tmp_path / "mine" / "alexnet.pth")
    assert resolve_lpips_trunk("alex", trunk) == trunk
    model = load_lpips("alex", trunk)
    first_conv = next(iter(model.net.slice1.parameters()))
    assert torch.equal(first_conv, torch.load(trunk, weights_only=True)["features.0.weight"])
    with pytest.raises(DaamkitError, match="`lpips_weights`"):
        resolve_lpips_trunk("alex", tmp_path / "nope.pth")


def test_lpips_download_when_offline_is_one_line_naming_file_path_and_the_way_out(tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setenv("DAAMKIT_OFFLINE", "0")  # downloads allowed, but the network does not answer
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    images = tmp_path / "images"
    write_images(images, 2, size=32)
    result = invoke("vqvae", "train", "--data", images, "--out", tmp_path / "run", "--image-size", "32",
                    "--perceptual-weight", "1", "--lpips-net", "alex")
    line = result.output.strip()
    assert result.exit_code == 2 and line.startswith("error:") and "\n" not in line, line
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    for part in (str(expected), "download failed", "Name or service not known", "--lpips-weights",
                 "--perceptual-weight 0"):
        assert part in line, part
    assert not (tmp_path / "run").exists()


TINY_NET = ["--base-channels", "8", "--num-downsamples", "2", "--embedding-dim", "4", "--num-embeddings", "16",
            "--heads", "2", "--gaussians", "2", "--batch-size", "2", "--mixed-precision", "no"]


def test_dry_run_reads_no_data_writes_nothing_and_projects_the_cost(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no_cache"))  # LPIPS on: a random trunk, no file needed
    result = invoke("vqvae", "train", "--data", tmp_path / "no_such_folder", "--out", tmp_path / "run", "--dry-run",
                    "--image-size", "32", "--steps", "1000", "--perceptual-weight", "1", "--lpips-net", "alex", "--disc-weight", "0.5",
                    "--disc-start", "500", "--disc-layers", "2", "--weight-ema", "0.99", *TINY_NET)
    assert result.exit_code == 0, result.output
    assert list(tmp_path.iterdir()) == []
    for label in ("parameters", "(+ discriminator", "tokens per image  64 (8 x 8)", "ms per step", "peak memory",
                  "for 1,000 steps"):
        assert label in result.stdout, label
    result = invoke("vqvae", "train", "--dry-run", "--json", "--image-size", "16", "--steps", "10", *TINY_NET)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ms_per_step"] > 0 and report["peak_memory_gib"] > 0 and report["discriminator_parameters"] == 0
    assert report["projected_hours"] == pytest.approx(10 * report["ms_per_step"] / 3.6e6)


@pytest.mark.parametrize("failure", [RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1"),
                                     torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")])
def test_dry_run_that_does_not_fit_in_memory_is_one_line_naming_the_batch(tmp_path, monkeypatch, failure):
    def out_of_memory(self, images):
        raise failure

    monkeypatch.setattr(train_module.Trainer, "timed_step", out_of_memory)
    result = invoke("vqvae", "train", "--dry-run", "--image-size", "16", *TINY_NET, "--batch-size", "3")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: --batch-size 3 at --image-size 16 does not fit in cpu memory: lower --batch-size or --image-size "
        "(the cost of a step scales with both)"]


def test_presets_are_listed_and_used_with_flags_winning(tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "DRY_RUN_STEPS", 1)  # the presets' values are what is checked here
    listing = invoke("vqvae", "presets")
    assert listing.exit_code == 0
    assert [line.split()[0] for line in listing.stdout.splitlines()[:3]] == ["coco-f8", "paper-coco", "samples-cpu"]
    config = tmp_path / "mine.toml"
    config.write_text("steps = 7\n")
    shrink = ["--image-size", "32", "--disc-layers", "2", "--num-embeddings", "16", "--embedding-dim", "4",
              "--lpips-net", "alex"]
    for preset, steps in (("paper-coco", 100000), ("coco-f8", 200000), ("samples-cpu", 1000)):
        result = invoke("vqvae", "train", "--preset", preset, "--dry-run", "--json", "--base-channels", "8",
                        "--batch-size", "1", "--heads", "2", "--gaussians", "2", "--mixed-precision", "no", *shrink)
        assert result.exit_code == 0, (preset, result.output)
        report = json.loads(result.stdout)
        assert report["steps"] == steps
        assert report["tokens_per_image"] == (32 // (8 if preset != "samples-cpu" else 4)) ** 2
        assert (report["discriminator_parameters"] > 0) == (preset == "coco-f8")
    with_file = invoke("vqvae", "train", "--preset", "paper-coco", "--config", config, "--dry-run", "--json",
                       "--base-channels", "8", "--batch-size", "1", "--heads", "2", "--mixed-precision", "no", *shrink)
    assert with_file.exit_code == 0, with_file.output
    assert json.loads(with_file.stdout)["steps"] == 7  # --config wins over the preset
    unknown = invoke("vqvae", "train", "--preset", "nope", "--dry-run")
    assert unknown.exit_code == 2 and "--preset 'nope' does not exist; choose one of coco-f8" in unknown.output


def _random_inception_weights(path, monkeypatch):
    """torch-fidelity's Inception-V3 with random weights, saved under the real file's keys (proves loading)."""
    from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

    with monkeypatch.context() as patch:  # build it without fetching or loading anything
        patch.setattr(tf_inception, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        model = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def test_evaluate_reports_rfid_from_weights_on_disk_and_null_without(image_dir, tmp_path, monkeypatch):
    from daamkit.vqvae import fid

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    # the whole weights file is loaded strictly; the metric then reads the first block's 64 features, not pool3's
    # 2048 (the same code path, seconds instead of a minute on a CPU)
    monkeypatch.setattr(fid, "FID_FEATURES", 64)
    assert _train(image_dir, tmp_path / "run", "--steps", "1").exit_code == 0
    last = tmp_path / "run" / "checkpoints" / "last"
    result = invoke("vqvae", "evaluate", last, "--data", image_dir, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rfid"] is None
    assert "weights-inception-2015-12-05-6726825d.pth" in result.stderr and "fid_weights" in result.stderr
    _random_inception_weights(tmp_path / "torch" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth",
                              monkeypatch)
    result = invoke("vqvae", "evaluate", last, "--data", image_dir, "--json")
    assert result.exit_code == 0, result.output
    rfid = json.loads(result.stdout)["rfid"]
    assert rfid is not None and rfid >= 0
    bad = invoke("vqvae", "evaluate", last, "--data", image_dir, "--fid-weights", tmp_path / "nope.pth")
    assert bad.exit_code == 2 and "--fid-weights" in bad.output


def test_resize_crop_scales_the_shorter_side_first_and_auto_keeps_small_folders_cropped(tmp_path):
    import numpy as np
    from PIL import Image

    from daamkit.vqvae.data import _resize_shorter, center_crop, evaluation_set, to_tensor, training_splits

    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)).save(tmp_path / f"wide{i}.png")
    image = np.asarray(Image.open(tmp_path / "wide0.png").convert("RGB"))
    resized = evaluation_set(str(tmp_path), 16, resize_mode="resize-crop")[0]
    assert torch.equal(resized, to_tensor(center_crop(_resize_shorter(image, 16), 16)))
    assert torch.equal(evaluation_set(str(tmp_path), 16)[0], to_tensor(center_crop(image, 16)))  # auto, 2 files
    splits = training_splits(str(tmp_path), 16, seed=0, resize_mode="resize-crop")
    crop, _ = splits.train[(0, 3)]
    assert crop.shape == (3, 16, 16) and "resize-crop" in splits.description
    with pytest.raises(DaamkitError, match="`resize_mode`"):
        TrainConfig(resize_mode="stretch")
