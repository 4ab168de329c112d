"""Grouped-query attention against a per-head loop, GQDAAM wiring, and the Importance Factor."""

import math

import pytest
import torch
from PIL import Image

from daamkit.common import (
    GQDAAM,
    GroupedQueryAttention,
    ImportanceAccumulator,
    importance_factor,
    layer_shares,
    rank_layers,
    save_importance_figures,
)


def _gqa_loop(module, x, key_padding_mask=None):
    """Per query head: softmax(q k^T / sqrt(head_dim)) v with its group's key/value head."""
    hd, hq, hkv = module.head_dim, module.num_query_heads, module.num_kv_heads
    q, k, v = module.q_proj(x), module.k_proj(x), module.v_proj(x)
    outputs = []
    for head in range(hq):
        kv = head // (hq // hkv)
        qh = q[..., head * hd:(head + 1) * hd]
        kh, vh = k[..., kv * hd:(kv + 1) * hd], v[..., kv * hd:(kv + 1) * hd]
        scores = qh @ kh.transpose(1, 2) / math.sqrt(hd)
        if key_padding_mask is not None:
            scores = scores.masked_fill(~key_padding_mask[:, None, :], float("-inf"))
        outputs.append(torch.softmax(scores, -1) @ vh)
    return module.out_proj(torch.cat(outputs, -1))


def test_gqa_matches_per_head_loop_with_single_scaling():
    torch.manual_seed(0)
    module = GroupedQueryAttention(in_features=20, num_query_heads=4, num_kv_heads=2, head_dim=8)
    x = torch.randn(3, 6, 20)
    torch.testing.assert_close(module(x), _gqa_loop(module, x), rtol=1e-5, atol=1e-5)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 4:] = False
    torch.testing.assert_close(module(x, mask), _gqa_loop(module, x, mask), rtol=1e-5, atol=1e-5)


def test_gqa_attends_within_an_item_not_across_the_batch():
    torch.manual_seed(1)
    module = GroupedQueryAttention(16, 8, 2, 4).eval()
    x = torch.randn(4, 5, 16)
    changed = x.clone()
    changed[1:] = torch.randn(3, 5, 16)
    torch.testing.assert_close(module(x)[0], module(changed)[0])


def test_gqa_defaults_and_validation():
    module = GroupedQueryAttention(1024)
    assert module.embed_dim == 512 and module.k_proj.out_features == 128
    with pytest.raises(ValueError, match="multiple"):
        GroupedQueryAttention(16, num_query_heads=6, num_kv_heads=4)


def test_gqdaam_shapes_and_parameter_count():
    module = GQDAAM(num_features=1024)
    x = torch.randn(2, 24, 1024)
    out, gate = module(x, return_gate=True)
    assert out.shape == (2, 24, 512) and gate.shape == x.shape
    daam = 8 * 1024 * 2
    proj = 1024 * 512 + 512
    gqa = (512 * 512 + 512) * 2 + (512 * 128 + 128) * 2
    assert sum(p.numel() for p in module.parameters()) == daam + proj + gqa


def test_gqdaam_residual_adds_the_gated_input_at_its_width():
    torch.manual_seed(0)
    module = GQDAAM(num_features=48, num_heads=4, residual=True)
    x = torch.randn(2, 8, 48)
    out, gate = module(x, return_gate=True)
    gated = x * gate
    torch.testing.assert_close(out, gated + module.attention(module.proj(gated)))
    assert module.out_features == 48 and module.attention.out_proj.out_features == 48


def test_running_mean_equals_full_mean_over_uneven_batches():
    torch.manual_seed(2)
    gates = torch.rand(23, 4, 6)
    acc = ImportanceAccumulator()
    for start, stop in [(0, 5), (5, 6), (6, 19), (19, 23)]:
        acc.update(gates[start:stop])
    assert acc.count == 23
    torch.testing.assert_close(acc.mean, gates.mean(0))


def test_importance_factor_on_a_known_map():
    mean_gate = torch.tensor([[0.2, 0.4], [0.6, 1.0], [0.2, 0.2]])
    factor = importance_factor(mean_gate)
    torch.testing.assert_close(factor, torch.tensor([[0.0, 0.25], [0.5, 1.0], [0.0, 0.0]]))
    torch.testing.assert_close(layer_shares(factor), torch.tensor([0.25 / 1.75, 1.5 / 1.75, 0.0]))
    assert rank_layers(factor) == [1, 0, 2]
    assert torch.equal(importance_factor(torch.full((2, 3), 0.7)), torch.zeros(2, 3))


def test_importance_figures_are_written(tmp_path):
    factor = importance_factor(torch.rand(5, 16))
    paths = save_importance_figures(factor, tmp_path, layer_labels=[f"L{i}" for i in range(1, 6)])
    for path in paths.values():
        with Image.open(path) as image:
            assert image.size[0] > 100 and image.size[1] > 100
    with pytest.raises(ValueError, match="labels"):
        save_importance_figures(factor, tmp_path, layer_labels=["a"])


def test_accumulator_rejects_shape_changes_and_empty_reads():
    acc = ImportanceAccumulator()
    with pytest.raises(ValueError, match="no gates"):
        _ = acc.mean
    acc.update(torch.rand(2, 3, 4))
    with pytest.raises(ValueError, match="differs"):
        acc.update(torch.rand(2, 3, 5))
