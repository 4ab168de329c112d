"""VQ-VAE building blocks: quantizer search/EMA/restart, model wiring, configs, LR schedule."""

from __future__ import annotations

import json
import math

import pytest
import torch

from daamkit.infra.errors import DaamkitError
from daamkit.vqvae.config import TrainConfig, VQVAEConfig, checkpoint_config, parse_checkpoint_config
from daamkit.vqvae.model import VQVAE
from daamkit.vqvae.quantizer import VectorQuantizer, codebook_usage_and_perplexity, nearest_codes
from daamkit.vqvae.train import WarmupCosine

TINY = dict(base_channels=8, num_downsamples=2, embedding_dim=4, num_embeddings=16, attention="daam", heads=2, gaussians=2)


@pytest.mark.parametrize("chunk_elements", [1, 7 * 13, 1 << 24])
def test_nearest_codes_matches_direct_distances(chunk_elements):
    torch.manual_seed(0)
    vectors, codebook = torch.randn(101, 5), torch.randn(13, 5)
    expected = torch.tensor([int(((codebook - v) ** 2).sum(1).argmin()) for v in vectors])
    assert torch.equal(nearest_codes(vectors, codebook, chunk_elements), expected)


def test_nearest_codes_runs_in_float32_under_autocast():
    torch.manual_seed(1)
    vectors, codebook = torch.randn(64, 8), torch.randn(32, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = nearest_codes(vectors.bfloat16(), codebook)
    assert torch.equal(got, nearest_codes(vectors.bfloat16().float(), codebook))


def test_usage_and_perplexity_formula():
    usage, perplexity = codebook_usage_and_perplexity(torch.tensor([2.0, 2.0, 0.0, 0.0]))
    assert usage == pytest.approx(50.0) and perplexity == pytest.approx(2.0)
    counts = torch.tensor([3.0, 1.0, 0.0])
    p = counts[:2] / 4
    assert codebook_usage_and_perplexity(counts)[1] == pytest.approx(math.exp(-(p * p.log()).sum().item()))


def test_quantizer_straight_through_commitment_and_first_batch_init():
    torch.manual_seed(2)
    quantizer = VectorQuantizer(8, 3, beta=0.25, ema=False).train()
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    out = quantizer(z)
    # the first training batch places every code on an encoder output (no EMA step to move them after)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 3)
    assert all(((flat - code).abs().sum(1) < 1e-6).any() for code in quantizer.embedding)
    out.quantized.sum().backward()
    assert torch.allclose(z.grad, torch.ones_like(z))  # straight-through: identity gradient
    assert out.loss.item() == pytest.approx(1.25 * out.commitment.item(), rel=1e-5)  # beta + codebook term
    assert out.counts.sum() == 32


def test_ema_update_moves_codes_to_assigned_means_and_restarts_dead_codes():
    quantizer = VectorQuantizer(4, 2, decay=0.5, dead_code_threshold=1.0).train()
    quantizer.initialized.fill_(True)
    quantizer.embedding.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0], [100.0, 100.0], [-100.0, 100.0]]))
    quantizer.embed_sum.copy_(quantizer.embedding)
    flat = torch.tensor([[1.0, 1.0], [1.2, 1.0], [9.0, 9.0], [9.0, 10.0]])
    out = quantizer(flat.t().reshape(1, 2, 1, 4))
    assert out.indices.reshape(-1).tolist() == [0, 0, 1, 1]
    # cluster sizes: 0.5 * 1 + 0.5 * 2 = 1.5 for the used codes; unused ones fell to 0.5 < 1 -> restarted
    assert quantizer.cluster_size[:2].tolist() == pytest.approx([1.5, 1.5])
    for dead in (2, 3):
        assert ((flat - quantizer.embedding[dead]).abs().sum(1) < 1e-6).any()
    # EMA code 0 = (0.5 * [0,0] + 0.5 * [2.2, 2]) / (smoothed 1.5) ~= [0.733, 0.667]
    assert quantizer.embedding[0].tolist() == pytest.approx([1.1 / 1.5, 1.0 / 1.5], rel=1e-3)


def test_ema_loss_is_commitment_only_and_codebook_loss_trains_the_codebook_without_ema():
    torch.manual_seed(3)
    ema = VectorQuantizer(8, 3, beta=0.25).train()
    out = ema(torch.randn(2, 3, 4, 4))
    assert out.loss.item() == pytest.approx(0.25 * out.commitment.item())
    quantizer = VectorQuantizer(8, 3, ema=False).train()
    quantizer(torch.randn(2, 3, 4, 4)).loss.backward()
    assert isinstance(quantizer.embedding, torch.nn.Parameter) and quantizer.embedding.grad is not None


def test_l2_normalised_codes_are_unit_vectors():
    torch.manual_seed(4)
    quantizer = VectorQuantizer(8, 3, l2_normalize=True).train()
    out = quantizer(torch.randn(2, 3, 4, 4) * 5)
    norms = out.quantized.permute(0, 2, 3, 1).reshape(-1, 3).norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_model_shapes_and_ablation_differs_only_by_daam_parameters():
    torch.manual_seed(5)
    daam, plain = VQVAE(VQVAEConfig(**TINY)), VQVAE(VQVAEConfig(**{**TINY, "attention": "none"}))
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    out = daam(images)
    assert out.reconstruction.shape == images.shape and out.quant.indices.shape == (2, 4, 4)
    blocks = 2 * TINY["num_downsamples"]  # one DAAM residual block per down- and up-sampling block
    per_block = 2 * TINY["heads"] * TINY["gaussians"]  # mean offsets + spreads
    assert daam.num_parameters() - plain.num_parameters() == blocks * per_block
    assert len(daam.daam_parameters()) == 2 * blocks and not plain.daam_parameters()
    tokens = daam.eval().encode(images)
    assert daam.decode(tokens).shape == images.shape


def test_model_config_round_trips_through_json_and_rejects_bad_values():
    model, train = VQVAEConfig(**TINY, l2_normalize=True), TrainConfig(steps=7, data="x")

    raw = json.loads(json.dumps(checkpoint_config(model, train)))
    assert parse_checkpoint_config(raw, "ckpt") == (model, train)
    with pytest.raises(DaamkitError, match="unknown key"):
        VQVAEConfig.from_dict({**model.to_dict(), "colour": 1})
    with pytest.raises(DaamkitError, match="heads"):
        VQVAEConfig(base_channels=4, attention="daam", heads=8)
    with pytest.raises(DaamkitError, match="attention"):
        VQVAEConfig(attention="softmax")
    with pytest.raises(DaamkitError, match="`mixed_precision` must be one of"):
        TrainConfig(mixed_precision="fp8")
    with pytest.raises(DaamkitError, match="`lr` must be a number, got 'fast'"):
        TrainConfig(lr="fast")
    with pytest.raises(DaamkitError, match="`heads` must be an integer, got 2.5"):
        VQVAEConfig(heads=2.5)
    assert TrainConfig(lr=1).lr == 1.0 and isinstance(TrainConfig(lr=1).lr, float)  # ints are fine for floats
    with pytest.raises(DaamkitError, match="not a daamkit VQ-VAE"):
        parse_checkpoint_config({"kind": "classifier"}, "ckpt")


def test_warmup_cosine_schedule():
    schedule = WarmupCosine(warmup=4, total=20, min_ratio=0.1)
    assert [schedule(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert schedule(12) == pytest.approx(0.1 + 0.9 * 0.5)
    assert schedule(20) == pytest.approx(0.1) and schedule(50) == pytest.approx(0.1)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_blocks_keep_the_models_layout_and_the_result(layout):
    """Every DAAM block sees activations in the model's layout (the quantizer's output and CPU transposed
    convolutions come back channels-last), and a channels-last model reconstructs what a contiguous one does."""
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(**TINY)).eval()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    expected = model(images).reconstruction
    model = model.to(memory_format=layout)
    seen = []
    for module in model.modules():
        if type(module).__name__ == "MixtureDensityAdaptiveAttention":
            module.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous(memory_format=layout)))
    out = model(images.contiguous(memory_format=layout)).reconstruction
    assert seen == [True] * 4
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
