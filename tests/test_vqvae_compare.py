"""DAAM block variants (`attention`) and `vqvae compare` on tiny configs and PNG folders."""

from __future__ import annotations

import json

import pytest
import torch
from test_vqvae_runs import TINY_ARGS, invoke, write_images

from daamkit.infra.checkpoint import save_checkpoint
from daamkit.infra.errors import DaamkitError
from daamkit.vqvae.compare import _summarise, compare
from daamkit.vqvae.config import ATTENTION_CHOICES, TrainConfig, VQVAEConfig, checkpoint_config
from daamkit.vqvae.io import load_model
from daamkit.vqvae.model import VQVAE, GatedDAAM

TINY_MODEL = dict(base_channels=8, num_downsamples=2, embedding_dim=4, num_embeddings=16, heads=3, gaussians=2)


def _model(attention: str, seed: int = 0) -> VQVAE:
    torch.manual_seed(seed)
    return VQVAE(VQVAEConfig(attention=attention, **TINY_MODEL))


@pytest.mark.parametrize("attention", ATTENTION_CHOICES)
def test_every_variant_trains_a_step_and_round_trips_through_a_checkpoint(attention, tmp_path):
    model = _model(attention)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out = model(images)
    (out.reconstruction - images).abs().mean().add(out.quant.loss).backward()
    optimizer.step()
    save_checkpoint(tmp_path / "ckpt", model.state_dict(), checkpoint_config(model.config, None))
    loaded, _ = load_model(tmp_path / "ckpt")
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(images).reconstruction, model(images).reconstruction)
    if attention in ("daam-gated", "daam-gated-inner"):  # the step moved the gates off zero
        assert any(m.alpha.abs().sum() > 0 for m in model.modules() if isinstance(m, GatedDAAM))


@pytest.mark.parametrize("attention", ["daam-gated", "daam-gated-inner"])
def test_gated_variant_at_initialisation_is_exactly_the_none_network(attention):
    plain, gated = _model("none"), _model(attention, seed=1)
    missing, unexpected = gated.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(".attention." in name for name in missing)
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    plain.eval(), gated.eval()
    with torch.no_grad():
        assert torch.equal(gated(images).reconstruction, plain(images).reconstruction)
    # and the same seed gives the same convolution weights whatever the variant
    same_seed = _model(attention).state_dict()
    assert all(torch.equal(p, same_seed[k]) for k, p in plain.state_dict().items())


def test_gated_form_follows_its_formula_with_uneven_heads_and_channels_last():
    config = VQVAEConfig(attention="daam-gated", **TINY_MODEL)  # 8 channels in 3 heads: sizes 2, 2, 4
    gate = GatedDAAM(8, config).double()
    with torch.no_grad():
        gate.alpha.copy_(torch.linspace(-1, 1, 8))
    h = torch.randn(2, 8, 5, 5, dtype=torch.float64, requires_grad=True)
    _, mix = gate.mixture(h, return_gate=True)
    head_size = torch.tensor([2., 2., 2., 2., 4., 4., 4., 4.], dtype=torch.float64).view(1, 8, 1, 1)
    assert torch.equal(gate.head_size.view(1, 8, 1, 1), head_size)
    expected = h * (1 + gate.alpha.view(1, 8, 1, 1) * (head_size * mix - 1))
    out = gate(h)
    torch.testing.assert_close(out, expected)
    last = h.detach().to(memory_format=torch.channels_last).requires_grad_(True)
    out_last = gate(last)
    torch.testing.assert_close(out_last, out)
    grad = torch.randn_like(out)
    (g_contig,) = torch.autograd.grad(out, h, grad)
    (g_last,) = torch.autograd.grad(out_last, last, grad)
    torch.testing.assert_close(g_last, g_contig)


def test_compare_writes_the_table_and_a_second_call_reuses_finished_runs(tmp_path, capsys):
    data = tmp_path / "images"
    write_images(data, 6)
    model = VQVAEConfig(**{**TINY_MODEL, "heads": 2})
    budget = TrainConfig(data=str(data), image_size=16, steps=2, batch_size=4, warmup_steps=1, val_images=4)
    out = tmp_path / "cmp"
    first = compare(model, budget, ["daam-gated", "none"], [0, 1], out)
    assert first.status == "completed"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [
        "daam-gated-seed0", "daam-gated-seed1", "none-seed0", "none-seed1"]
    assert [row["variant"] for row in first.summary] and {row["variant"] for row in first.summary} == {"daam-gated", "none"}
    for row in first.summary:
        assert row["seeds"] == [0, 1] and row["psnr_std"] is not None and row["ms_per_step"] > 0
    gated_row = next(row for row in first.summary if row["variant"] == "daam-gated")
    none_row = next(row for row in first.summary if row["variant"] == "none")
    assert gated_row["parameters"] > none_row["parameters"]
    table = (out / "compare.md").read_text()
    assert "| variant | seeds | held-out PSNR (dB)" in table and "(best)" in table and "std" in table
    assert json.loads((out / "compare.json").read_text())["status"] == "completed"
    weights = out / "none-seed1" / "checkpoints" / "last" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    capsys.readouterr()
    second = compare(model, budget, ["daam-gated", "none"], [0, 1], out)
    assert "reusing the finished run" in capsys.readouterr().err
    assert weights.stat().st_mtime_ns == stamp
    assert second.runs == first.runs
    with pytest.raises(DaamkitError, match="other settings"):
        (out / "none-seed0" / "compare_run.json").unlink()
        compare(model, budget.replace(lr=1e-3), ["none"], [0], out)


def test_compare_cli_prints_json_and_refuses_unknown_variants(tmp_path):
    data = tmp_path / "images"
    write_images(data, 4)
    bad = invoke("vqvae", "compare", "--data", data, "--variants", "daam,fancy", "--out", tmp_path / "x", *TINY_ARGS)
    assert bad.exit_code == 2 and "error: --variants lists 'fancy'" in bad.output and "Traceback" not in bad.output
    assert not (tmp_path / "x").exists()
    ok = invoke("vqvae", "compare", "--data", data, "--variants", "none", "--seeds", "3", "--steps", "1",
                "--out", tmp_path / "y", "--json", *TINY_ARGS)
    assert ok.exit_code == 0, ok.output
    result = json.loads(ok.stdout.strip().splitlines()[-1])
    assert result["runs"][0]["seed"] == 3 and result["summary"][0]["variant"] == "none"
    assert (tmp_path / "y" / "none-seed3" / "checkpoints" / "last").is_dir()


def test_gaps_are_judged_seed_by_seed():
    runs = [{"variant": v, "seed": s, "psnr": p, "ssim": 0.5, "lpips": None, "codebook_usage": 90.0,
             "perplexity": 10.0, "ms_per_step": 1.0, "parameters": 1}
            for v, s, p in [("a", 0, 20.0), ("a", 1, 24.0), ("a", 2, 22.0),
                            ("b", 0, 19.5), ("b", 1, 23.6), ("b", 2, 21.4),   # 0.5 below on every seed
                            ("c", 0, 21.0), ("c", 1, 22.0), ("c", 2, 22.4)]]  # gaps -1, +2, -0.4
    rows, notes = _summarise(runs, ["a", "b", "c"])
    assert [row["variant"] for row in rows] == ["a", "c", "b"]
    # b's mean is well within one (unpaired) std of a's, yet b is below a by more than its paired spread
    assert notes[1].startswith("c: 0.20 +- ") and notes[1].endswith("within one std")
    assert notes[2].startswith("b: 0.50 +- 0.10 dB below") and notes[2].endswith("larger than one std")
