"""DAT decoders: shapes, parameter counts (paper Table 1), attention over layer tokens, one training step."""

import pytest
import torch

from classify_caches import one_torch_thread  # noqa: F401
from daamkit.classify.decoders import (
    DECODERS,
    DENSITY_DECODERS,
    build_decoder,
    count_parameters,
    decoder_config,
    gaussian_parameter_ranges,
    grid_shape,
)
from daamkit.infra.errors import DaamkitError

N, D, C = 8, 32, 3
# Fewer heads than the paper's 8 so that each density head spans several of the 8 toy layers (with 2
# positions per head a standardised value is always +-1, whatever the other layer holds).
HEADS = {"mha": 4, "mha-bn": 4, "gqa": 4, "daam-v1": 2, "daam-v2": None, "gqdaam": 2, "mixture": 2}


def _decoder(name, n=N, d=D, classes=C):
    return build_decoder(decoder_config(name, n, d, classes, heads=HEADS[name]))


def _gqa_params(d_in, q_heads, kv_heads=2, head_dim=64):
    width, kv = q_heads * head_dim, kv_heads * head_dim
    return d_in * width + width + 2 * (d_in * kv + kv) + width * width + width


def expected_attention_parameters(name, n=N, d=D):
    heads = HEADS[name] or 1
    return {
        "mha": 4 * d * d + 4 * d,
        "mha-bn": 4 * d * d + 4 * d + 2 * n,
        "gqa": _gqa_params(d, heads),
        "daam-v1": 2 * heads * d,
        "daam-v2": 2 * d,
        "gqdaam": 2 * heads * d + d * 512 + 512 + _gqa_params(512, 8),
        "mixture": 2 * heads * 4,
    }[name]


def test_grid_is_as_square_as_possible():
    assert grid_shape(1024) == (32, 32)
    assert grid_shape(5120) == (64, 80)
    assert grid_shape(512) == (16, 32)
    assert grid_shape(17) == (1, 17)


@pytest.mark.parametrize("name", DECODERS)
def test_parameter_counts_follow_the_formulas(name):
    model = _decoder(name)
    width = {"gqa": HEADS["gqa"] * 64, "gqdaam": 512}.get(name, D)
    head = (N * 512 * 9 + 512) + (512 * N * 9 + N) + (N * width * C + C)
    assert count_parameters(model.attention) == expected_attention_parameters(name)
    assert count_parameters(model) == expected_attention_parameters(name) + head


@pytest.mark.parametrize(("name", "layers", "hidden", "expected"), [
    ("daam-v1", 24, 1024, 16_384), ("daam-v1", 40, 5120, 81_920),
    ("daam-v2", 24, 1024, 2_048), ("daam-v2", 40, 5120, 10_240),
    ("mixture", 24, 1024, 64),
])
def test_paper_table1_attention_parameter_counts(name, layers, hidden, expected):
    model = build_decoder(decoder_config(name, layers, hidden, 4))
    assert count_parameters(model.attention) == expected


def test_gqa_outputs_512_wide_features_reshaped_16x32():
    model = build_decoder(decoder_config("gqdaam", 24, 1024, 4))
    assert model.attention.out_features == 512 and model.grid == (16, 32)


@pytest.mark.parametrize("name", DECODERS)
def test_attention_is_over_layer_tokens_not_the_batch(name):
    torch.manual_seed(0)
    model = _decoder(name).eval()
    x = torch.randn(3, N, D)
    changed = x.clone()
    changed[1:] = torch.randn(2, N, D) * 5
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], model(changed)[0])

        # and the layer tokens do interact: changing layer 0 changes the attention output at layer 1
        layer_changed = x.clone()
        layer_changed[0, 0] += 3.0
        assert not torch.allclose(model.attention(x)[0][0, 1], model.attention(layer_changed)[0][0, 1])


@pytest.mark.parametrize("name", DECODERS)
def test_every_decoder_trains_a_step(name):
    torch.manual_seed(0)
    model = _decoder(name)
    x, y = torch.randn(6, N, D), torch.tensor([0, 1, 2, 0, 1, 2])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logits, gate = model(x, return_gate=True)
    assert logits.shape == (6, C)
    assert (gate is not None) == (name in DENSITY_DECODERS)
    if gate is not None:
        assert gate.shape == (6, N, D)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.nn.functional.cross_entropy(logits, y).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    optimizer.step()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("attention.") for k in changed) and any(k.startswith("head.") for k in changed)


def test_gaussian_ranges_only_for_density_decoders():
    assert gaussian_parameter_ranges(_decoder("mha")) is None
    ranges = gaussian_parameter_ranges(_decoder("daam-v1"))
    assert ranges == {"mean_offset": {"min": 0.0, "max": 0.0}, "scaled_variance": {"min": 2.0, "max": 2.0}}


@pytest.mark.parametrize(("args", "message"), [
    (("daam-v1", 4, 32, 3, 8), "splits the 4 encoder layer"),
    (("mixture", 2, 32, 3, None), "splits the 2 encoder layer"),
    (("mha", 8, 30, 3, 8), "not divisible by 8 heads"),
    (("gqa", 8, 32, 3, 3), "multiple of the 2 key/value heads"),
    (("transformer", 8, 32, 3, None), "unknown decoder"),
    (("daam-v2", 8, 32, 1, None), "at least 2 classes"),
])
def test_bad_decoder_settings_are_one_clear_error(args, message):
    with pytest.raises(DaamkitError, match=message):
        decoder_config(*args)
