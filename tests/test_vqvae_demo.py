"""The reconstruction demo: gate capture, the library behind the page, and the Gradio app over HTTP."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from daamkit.cli.main import app as cli_app
from daamkit.infra.checkpoint import save_checkpoint
from daamkit.infra.errors import DaamkitError
from daamkit.vqvae.config import TrainConfig, VQVAEConfig, checkpoint_config
from daamkit.infra.images import read_rgb
from daamkit.vqvae.data import CropDataset
from daamkit.vqvae.demo import MAX_FULL_PIXELS, DemoModel, read_upload
from daamkit.vqvae.evaluate import evaluate_model
from daamkit.vqvae.model import VQVAE
from daamkit.vqvae.reconstruction import gate_entropy
from daamkit.vqvae.tokens import decode_file

TINY = dict(base_channels=8, num_downsamples=2, embedding_dim=4, num_embeddings=16, attention="daam", heads=2, gaussians=2)


def save_random_checkpoint(folder: Path, attention: str = "daam", seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = VQVAEConfig(**{**TINY, "attention": attention})
    return save_checkpoint(folder, VQVAE(config).state_dict(), checkpoint_config(config, TrainConfig(image_size=16)))


def write_photo(path: Path, width: int, height: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    picture = np.stack([xx, yy, np.sin(8 * xx * yy + rng.uniform())], -1) * 0.5 + 0.4
    Image.fromarray((picture.clip(0, 1) * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("demo")
    (root / "notes.png").write_text("not an image")
    return {
        "daam": save_random_checkpoint(root / "daam"),
        "none": save_random_checkpoint(root / "none", attention="none", seed=1),
        "photo": write_photo(root / "photo.png", 30, 22),
        "tiny": write_photo(root / "tiny.png", 8, 8),
        "text": root / "notes.png",
        "root": root,
    }


def test_forward_returns_one_gate_per_daam_block_and_leaves_the_output_unchanged():
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(**TINY)).eval()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        plain, inspected = model(images), model(images, return_gates=True)
    assert list(inspected.gates) == ["encoder.blocks.0.residual.attention", "encoder.blocks.1.residual.attention",
                                     "decoder.blocks.0.residual.attention", "decoder.blocks.1.residual.attention"]
    assert [tuple(g.shape) for g in inspected.gates.values()] == [(2, 8, 8, 8), (2, 16, 4, 4), (2, 8, 8, 8), (2, 8, 16, 16)]
    assert torch.equal(plain.reconstruction, inspected.reconstruction)
    # each head's gate is a distribution over its channels
    gate = inspected.gates["encoder.blocks.0.residual.attention"]
    assert torch.allclose(gate.unflatten(1, (2, 4)).sum(2), torch.ones(2, 2, 8, 8), atol=1e-5)
    assert not plain.gates
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # hooks removed
    assert not VQVAE(VQVAEConfig(**{**TINY, "attention": "none"}))(images, return_gates=True).gates


def test_gate_entropy_is_zero_for_one_hot_and_one_for_uniform_heads_with_a_remainder_head():
    gate = torch.zeros(1, 5, 1, 2)
    gate[0, 0, 0, 0] = gate[0, 3, 0, 0] = 1.0      # pixel 0: both heads one-hot
    gate[0, :2, 0, 1] = 0.5                        # pixel 1: head 0 (2 ch) uniform,
    gate[0, 2:, 0, 1] = 1 / 3                      # head 1 (3 ch, the remainder) uniform
    assert torch.allclose(gate_entropy(gate, 2), torch.tensor([[[0.0, 1.0]]]), atol=1e-6)
    half = torch.tensor([0.5, 0.5, 0.0, 0.0]).reshape(1, 4, 1, 1)
    assert torch.allclose(gate_entropy(half, 1), torch.tensor(0.5), atol=1e-6)  # log 2 / log 4


def test_demo_run_matches_evaluate_and_its_tokens_decode_to_the_reconstruction(files, tmp_path):
    model = DemoModel(files["daam"], device="cpu")
    stages = []
    result = model.run(files["photo"], full=False, report=lambda fraction, stage: stages.append(fraction))
    assert stages == sorted(stages) and len(stages) == 3 and stages[0] == 0.0  # progress moves forward
    rec = result.reconstruction
    assert rec.original.shape == rec.reconstruction.shape == (16, 16, 3) and rec.tokens.shape == (4, 4)
    assert result.token_image.shape == (16, 16, 3)
    assert [m.shape for m, _ in result.gate_maps] == [(16, 16, 3)] * 4
    assert result.gate_maps[0][1].startswith("encoder block 1 (8x8): entropy")
    assert rec.metrics["tokens"] == 16 and rec.metrics["distinct_codes"] == len(np.unique(rec.tokens))
    image = read_upload(files["photo"], 16, False, 4)[0]  # the center crop `evaluate` takes too
    metrics = evaluate_model(model.model, CropDataset(lambda i: read_rgb(files["photo"]), 1, 16), torch.device("cpu"),
                             show_progress=False).metrics
    assert rec.metrics["psnr"] == pytest.approx(metrics["psnr"], abs=1e-4)
    assert rec.metrics["ssim"] == pytest.approx(metrics["ssim"], abs=1e-5)
    assert torch.equal(image, torch.from_numpy(rec.original).permute(2, 0, 1).float().div(127.5).sub(1))
    token_file = tmp_path / "tokens.npz"
    token_file.write_bytes(result.token_file)
    decoded = decode_file(files["daam"], token_file, tmp_path / "decoded")
    assert np.array_equal(np.asarray(Image.open(decoded[0])), rec.reconstruction)


def test_full_images_are_trimmed_to_the_factor_and_bad_uploads_say_why(files, tmp_path):
    model = DemoModel(files["none"], device="cpu")
    result = model.run(files["photo"], full=True)
    assert result.reconstruction.original.shape == (20, 28, 3) and result.reconstruction.tokens.shape == (5, 7)
    assert not result.gate_maps and not model.has_daam
    with pytest.raises(DaamkitError, match="notes.png is not a readable image"):
        model.run(files["text"], full=False)
    with pytest.raises(DaamkitError, match="tiny.png: 8x8 is smaller than the 16 px crop"):
        model.run(files["tiny"], full=False)
    side = int(MAX_FULL_PIXELS ** 0.5) + 1
    huge = tmp_path / "huge.png"
    Image.new("RGB", (side, side)).save(huge)
    with pytest.raises(DaamkitError, match="over the demo's limit of 4 megapixels for the full image"):
        model.run(huge, full=True)
    assert model.run(huge, full=False).reconstruction.original.shape == (16, 16, 3)  # a crop of it is fine


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(files):
    pytest.importorskip("gradio")
    from daamkit.cli.demo_app import serve

    page, url = serve([files["daam"], files["none"]], "127.0.0.1", free_port())
    yield url
    page.close()


def test_app_serves_its_page_and_reconstructions_and_survives_a_bad_upload(server, files):
    import httpx
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    page = httpx.get(server, timeout=30)
    assert page.status_code == 200 and "daamkit VQ-VAE demo" in page.text
    assert "fonts.googleapis" not in page.text and "cdn." not in page.text
    client = Client(server, verbose=False)
    with pytest.raises(AppError, match="notes.png is not a readable image"):
        client.predict(handle_file(str(files["text"])), "crop", api_name="/reconstruct")
    outputs = client.predict(handle_file(str(files["photo"])), "full", api_name="/reconstruct")
    assert len(outputs) == 10  # pair, metrics, tokens, gates, downloads per checkpoint
    pair, metrics, tokens, gates, downloads = outputs[:5]
    assert np.asarray(Image.open(pair)).shape == (20, 28 * 2 + 4, 3)
    assert metrics.startswith("PSNR ") and "35 tokens" in metrics
    assert np.asarray(Image.open(tokens)).shape == (20, 28, 3)
    assert len(gates) == 4 and not outputs[8]  # one heatmap per DAAM block; none for the `none` checkpoint
    assert sorted(Path(d).name for d in downloads) == ["photo_1_reconstruction.png", "photo_1_tokens.npz"]


def test_demo_command_refuses_a_missing_checkpoint_in_one_line(tmp_path):
    result = CliRunner().invoke(cli_app, ["vqvae", "demo", str(tmp_path / "nowhere"), "--port", str(free_port())])
    assert result.exit_code == 2 and result.output.strip().startswith("error: checkpoint folder")


def test_demo_command_without_gradio_says_how_to_install_it(files, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now raises ImportError
    monkeypatch.delitem(sys.modules, "daamkit.cli.demo_app", raising=False)
    result = CliRunner().invoke(cli_app, ["vqvae", "demo", str(files["daam"])])
    assert result.exit_code == 2
    assert result.output.strip() == "error: the demo needs Gradio (gradio is missing): pip install 'daamkit[demo]'"


def test_demo_command_on_a_taken_port_says_so_in_one_line(files):
    pytest.importorskip("gradio")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(cli_app, ["vqvae", "demo", str(files["daam"]), "--port", str(port)])
    assert result.exit_code == 2
    assert result.output.strip() == (f"error: cannot listen on 127.0.0.1:{port} (in use or not an address of this "
                                     "machine); choose another --port or --host")


def test_demo_model_prefers_weight_ema_weights_unless_raw_weights(tmp_path):
    from daamkit.vqvae.weight_ema import EMA_WEIGHTS_FILE

    config = VQVAEConfig(**TINY)
    torch.manual_seed(0)
    raw, ema = VQVAE(config).state_dict(), VQVAE(config).state_dict()
    folder = save_checkpoint(tmp_path / "ckpt", raw, checkpoint_config(config, TrainConfig(image_size=16)),
                             extra_weights={EMA_WEIGHTS_FILE: ema})
    with_ema, without = DemoModel(folder, device="cpu"), DemoModel(folder, device="cpu", raw_weights=True)
    assert with_ema.label.endswith("weight-EMA weights)") and "EMA" not in without.label
    assert torch.equal(with_ema.model.state_dict()["encoder.conv_in.weight"], ema["encoder.conv_in.weight"])
    assert torch.equal(without.model.state_dict()["encoder.conv_in.weight"], raw["encoder.conv_in.weight"])


def test_demo_reports_lpips_with_a_trunk_file_and_refuses_a_missing_one(files, tmp_path):
    from torchvision.models import alexnet

    trunk = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(alexnet().state_dict(), trunk)  # random weights in the real file format: the path is under test
    config = VQVAEConfig(**TINY)
    folder = save_checkpoint(tmp_path / "ckpt32", VQVAE(config).state_dict(),
                             checkpoint_config(config, TrainConfig(image_size=32)))
    crop = write_photo(tmp_path / "photo40.png", 40, 36)
    metrics = DemoModel(folder, device="cpu", lpips_weights=trunk).run(crop, full=False).reconstruction.metrics
    assert isinstance(metrics["lpips"], float) and metrics["lpips"] >= 0
    with pytest.raises(DaamkitError, match="does not exist"):
        DemoModel(folder, device="cpu", lpips_weights=tmp_path / "missing.pth")
