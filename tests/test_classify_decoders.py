"""DAT decoders: shapes, parameter counts (paper Table 1), attention over layer tokens, one training step."""

import pytest
import torch

from classify_caches import one_torch_thread  # noqa: F401
from daamkit.classify.decoders import (
    DECODERS,
    DENSITY_DECODERS,
    HEADS as DECODER_HEADS,
    REGISTRY,
    DecoderConfig,
    attention_parameters,
    build_decoder,
    count_parameters,
    decoder_config,
    default_heads,
    gaussian_parameter_ranges,
    grid_shape,
    layer_mix_shares,
)
from daamkit.common import GroupedQueryAttention
from daamkit.infra.errors import DaamkitError

N, D, C = 8, 32, 3
# Fewer heads than the paper's 8 so that each density head spans several of the 8 toy layers (with 2
# positions per head a standardised value is always +-1, whatever the other layer holds).
HEADS = {"mha": 4, "mha-bn": 4, "gqa": 4, "daam-v1": 2, "daam-v2": None, "gqdaam": 2, "mixture": 2, "conv-head": None}
DAT_DECODERS = [name for name in DECODERS if name != "linear"]
ATTENTION_DECODERS = [name for name in DAT_DECODERS if name != "conv-head"]


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
        "conv-head": 0,
    }[name]


def test_grid_is_as_square_as_possible():
    assert grid_shape(1024) == (32, 32)
    assert grid_shape(5120) == (64, 80)
    assert grid_shape(512) == (16, 32)
    assert grid_shape(17) == (1, 17)


@pytest.mark.parametrize("name", DAT_DECODERS)
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


@pytest.mark.parametrize("name", ATTENTION_DECODERS)
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


@pytest.mark.parametrize("name", ATTENTION_DECODERS)
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


@pytest.mark.parametrize("name", ["linear", "daam-v1", "mha"])
def test_dropout_acts_on_the_classifier_inputs_only_while_training(name):
    torch.manual_seed(0)
    n = 1 if name == "linear" else N
    config = decoder_config(name, n, D, C, heads=HEADS.get(name), dropout=0.5)
    model, plain = build_decoder(config), build_decoder(decoder_config(name, n, D, C, heads=HEADS.get(name)))
    plain.load_state_dict(model.state_dict())  # dropout adds no parameters: checkpoints keep their keys
    x = torch.randn(4, n, D)
    model.train()
    assert not torch.equal(model(x), model(x))  # a fresh mask per pass
    model.eval(), plain.eval()
    assert torch.equal(model(x), model(x)) and torch.equal(model(x), plain(x))


@pytest.mark.parametrize("name", ATTENTION_DECODERS)
def test_linear_head_classifies_the_attention_output_directly(name):
    """head="linear": attention stage -> flatten -> one Linear layer (no conv), the same attention parameters."""
    torch.manual_seed(0)
    conv = build_decoder(decoder_config(name, N, D, C, heads=HEADS[name]))
    model = build_decoder(decoder_config(name, N, D, C, heads=HEADS[name], head="linear"))
    assert conv.config.head == "conv" and model.config.head == "linear"
    assert not any(isinstance(m, torch.nn.Conv2d) for m in model.head.modules())
    width = model.attention.out_features
    assert count_parameters(model) == expected_attention_parameters(name) + N * width * C + C
    model.eval()
    x = torch.randn(5, N, D)
    attended, _ = model.attention(x)
    assert torch.allclose(model(x), model.head[-1](attended.flatten(1)), atol=1e-6)


@pytest.mark.parametrize("name", ATTENTION_DECODERS)
def test_mix_head_classifies_a_weighted_sum_of_the_layers(name):
    """head="mix": attention stage -> weighted sum over layers (uniform at the start) -> one Linear layer."""
    torch.manual_seed(0)
    model = build_decoder(decoder_config(name, N, D, C, heads=HEADS[name], head="mix"))
    width = model.attention.out_features
    assert count_parameters(model) == expected_attention_parameters(name) + N + width * C + C
    assert layer_mix_shares(model) == pytest.approx([1 / N] * N)
    model.eval()
    x = torch.randn(5, N, D)
    attended, _ = model.attention(x)
    assert torch.allclose(model(x), model.head[-1](attended.mean(1) * N ** 0.5), atol=1e-5)


@pytest.mark.parametrize("name", ["daam-v1", "mixture", "mha"])
def test_mix_head_decoder_compiles_without_graph_breaks(name):
    """`--compile` with the mix head: fullgraph=True raises on any graph break (eager backend keeps it fast)."""
    torch.manual_seed(0)
    model = build_decoder(decoder_config(name, N, D, C, heads=HEADS[name], head="mix")).eval()
    x = torch.randn(4, N, D)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    assert torch.allclose(compiled(x), model(x), atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mix_head_learns_to_weight_the_informative_layer(seed):
    """Only layer 3 carries the label: 200 Adam steps give it the largest share, whatever the initial classifier
    (a softmax mix this fast locked onto layer 0 with seed 0). No attention stage here: DAAM's statistics
    across layers would spread the signal over the layers of its head."""
    torch.manual_seed(seed)
    model = build_decoder(decoder_config("conv-head", N, D, 2, head="mix"))
    labels = torch.randint(0, 2, (256,))
    x = torch.randn(256, N, D)
    x[:, 3, 0] += 3.0 * (2 * labels - 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(200):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), labels).backward()
        optimizer.step()
    shares = layer_mix_shares(model)
    assert sum(shares) == pytest.approx(1.0)
    assert shares.index(max(shares)) == 3 and shares[3] > 2 * max(shares[:3] + shares[4:])
    assert layer_mix_shares(_decoder("daam-v1")) is None


def test_residual_adds_the_input_to_the_self_attention_output():
    """mha, residual=True: x + attention(x), with no extra parameters."""
    torch.manual_seed(0)
    plain = build_decoder(decoder_config("mha", N, D, C, heads=HEADS["mha"], head="mix")).eval()
    model = build_decoder(decoder_config("mha", N, D, C, heads=HEADS["mha"], head="mix", residual=True)).eval()
    model.load_state_dict(plain.state_dict())  # the same parameters
    x = torch.randn(5, N, D)
    assert torch.allclose(model.attention(x)[0], x + plain.attention.module(x), atol=1e-6)


def test_mha_bn_residual_normalises_the_attention_input_and_saved_runs_keep_their_form():
    """New runs: x + attention(BatchNorm(x)) (`norm_first`); a run saved before `norm_first` existed
    rebuilds as trained, BatchNorm(x + attention(x)), from the same parameters."""
    torch.manual_seed(0)
    config = decoder_config("mha-bn", N, D, C, heads=HEADS["mha-bn"], head="mix", residual=True)
    assert config.norm_first and not decoder_config("mha-bn", N, D, C, heads=4).norm_first
    assert not decoder_config("mha", N, D, C, heads=4, residual=True).norm_first
    model = build_decoder(config).train()
    x = torch.randn(5, N, D) * 3 + 1
    stage = model.attention.module
    normalised = torch.nn.functional.batch_norm(x, None, None, stage.norm.weight, stage.norm.bias, training=True)
    torch.testing.assert_close(model.attention(x)[0], x + stage.attention(normalised))
    saved = {key: value for key, value in config.to_dict().items() if key != "norm_first"}  # an older run.json
    old = build_decoder(DecoderConfig(**saved)).train()
    old.attention.module[0].load_state_dict(stage.attention.state_dict())
    expected = torch.nn.functional.batch_norm(x + stage.attention(x), None, None, training=True)
    torch.testing.assert_close(old.attention(x)[0], expected)


def test_a_decoder_without_a_residual_path_refuses_one():
    with pytest.raises(DaamkitError, match="decoder mixture has no residual path .only mha, mha-bn, gqa, daam-v1, "
                                           "daam-v2, gqdaam.; leave `residual` unset"):
        decoder_config("mixture", N, D, C, heads=2, residual=True)


@pytest.mark.parametrize("name", ["daam-v1", "daam-v2"])
def test_daam_residual_is_the_skip_form_of_the_same_gate(name):
    """residual=True: x + x * gate, with the same parameters and the same gate (Importance Factor unchanged)."""
    torch.manual_seed(0)
    plain = build_decoder(decoder_config(name, N, D, C, heads=HEADS[name], head="mix")).eval()
    model = build_decoder(decoder_config(name, N, D, C, heads=HEADS[name], head="mix", residual=True)).eval()
    with torch.no_grad():
        plain.attention.module.mean_offset.normal_()
    model.load_state_dict(plain.state_dict())
    x = torch.randn(5, N, D)
    gated, gate = plain.attention(x, return_gate=True)
    out, skip_gate = model.attention(x, return_gate=True)
    torch.testing.assert_close(out, x + gated)
    torch.testing.assert_close(skip_gate, gate)
    assert gate.min() < 0.9  # the gate does something, so the two forms differ


@pytest.mark.parametrize("name", ["gqa", "gqdaam"])
def test_grouped_query_residual_projects_back_to_the_input_width_and_adds_the_input(name):
    """gqa: x + attention(x); gqdaam: gated + attention(proj(gated)); the head then reads d features per layer."""
    torch.manual_seed(0)
    model = build_decoder(decoder_config(name, N, D, C, heads=HEADS[name], head="mix", residual=True)).eval()
    module, x = model.attention.module, torch.randn(5, N, D)
    assert model.attention.out_features == D and model.head[-1].in_features == D
    if name == "gqa":
        expected = x + GroupedQueryAttention.forward(module, x)
    else:
        gated = module.daam(x)
        expected = gated + module.attention(module.proj(gated))
    out, _ = model.attention(x)
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, expected - x)  # the attention output alone is not what the head reads
    torch.nn.functional.cross_entropy(model.train()(x), torch.tensor([0, 1, 2, 0, 1])).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_a_decoder_config_saved_before_heads_existed_builds_the_conv_head():
    saved = decoder_config("daam-v1", N, D, C, heads=2).to_dict()
    del saved["head"]
    assert sum(isinstance(m, torch.nn.Conv2d) for m in build_decoder(DecoderConfig(**saved)).modules()) == 2


def test_gaussian_ranges_only_for_density_decoders():
    assert gaussian_parameter_ranges(_decoder("mha")) is None
    ranges = gaussian_parameter_ranges(_decoder("daam-v1"))
    assert ranges == {"mean_offset": {"min": 0.0, "max": 0.0}, "scaled_variance": {"min": 2.0, "max": 2.0}}


@pytest.mark.parametrize(("args", "message"), [
    (("daam-v1", 4, 32, 3, 8), "`heads` 8 on 4 layers leaves a head fewer than 2 layers.*use `heads` 2 or fewer"),
    (("gqdaam", 7, 32, 3, 4), "use `heads` 3 or fewer"),
    (("mixture", 1, 32, 3, None), "over 1 layer is the identity.*or use `decoder` linear"),
    (("linear", 3, 32, 3, None), "reads one layer's pooled features, got 3 layers"),
    (("linear", 1, 32, 3, 2), "has no attention heads"),
    (("mha", 8, 30, 3, 8), "not divisible by 8 heads"),
    (("gqa", 8, 32, 3, 3), "multiple of the 2 key/value heads"),
    (("transformer", 8, 32, 3, None), "unknown decoder"),
    (("daam-v2", 8, 32, 1, None), "at least 2 classes"),
    (("daam-v1", 8, 32, 3, 2, None, 1.0), "`dropout` must be at least 0 and below 1, got 1.0"),
    (("linear", 1, 32, 3, None, None, -0.1), "`dropout` must be at least 0 and below 1"),
    (("daam-v1", 8, 32, 3, 2, None, 0.0, "mlp"), "`head` must be one of conv, linear, mix, got 'mlp'"),
    (("linear", 1, 32, 3, None, None, 0.0, "conv"), "decoder linear is one Linear layer and has no conv head"),
])
def test_bad_decoder_settings_are_one_clear_error(args, message):
    with pytest.raises(DaamkitError, match=message):
        decoder_config(*args)


def test_registry_marks_density_decoders():
    assert DENSITY_DECODERS == ("daam-v1", "daam-v2", "gqdaam", "mixture")
    assert [name for name, spec in REGISTRY.items() if spec.one_layer] == ["linear"]
    assert [name for name, spec in REGISTRY.items() if not spec.table_row] == ["conv-head"]


def test_linear_probe_is_one_linear_layer_on_one_layer():
    torch.manual_seed(0)
    model = build_decoder(decoder_config("linear", 1, D, C))
    assert count_parameters(model) == D * C + C and attention_parameters(model) == 0
    assert gaussian_parameter_ranges(model) is None
    x = torch.randn(5, 1, D)
    logits, gate = model(x, return_gate=True)
    assert gate is None
    torch.testing.assert_close(logits, x[:, 0] @ model.head.weight.T + model.head.bias)


@pytest.mark.parametrize(("layers", "expected"), [(24, 8), (6, 3), (5, 2), (3, 1), (2, 1)])
def test_default_density_heads_give_every_head_two_layers(layers, expected):
    assert default_heads("daam-v1", layers) == expected
    assert default_heads("daam-v2", layers) == 1
    assert decoder_config("mixture", layers, D, C).heads == expected


def _accepted_density_configs():
    """Every (decoder, layers, heads, head) the CLI accepts for 2-7 layers: default heads and each explicit
    count, with each of the decoder heads."""
    for name in DENSITY_DECODERS:
        for layers in range(2, 8):
            for heads in (None, *range(1, layers + 1)):
                for head in DECODER_HEADS:
                    try:
                        yield decoder_config(name, layers, 16, C, heads, head=head)
                    except DaamkitError:
                        continue


def _daam_parameters(model):
    return [(n, p) for n, p in model.attention.named_parameters() if n.endswith("mean_offset") or n.endswith(".c")]


def _inert(config) -> bool:
    """Whether the DAAM parameters get an all-zero gradient at init, or the gate ignores the input once they move.

    With 2 layers per head the initial gate is constant (standardised values are +-1 and the offset is 0)
    but the offset's gradient is not zero; once it moves the gate depends on the input. With one layer per
    head the standardised value is always 0, so the gradients are exactly 0 and the gate never changes.
    """
    model = build_decoder(config)
    x = torch.randn(4, config.num_layers, config.hidden_size)
    model(x).square().sum().backward()
    if any(p.grad is None or not p.grad.abs().max() > 0 for _, p in _daam_parameters(model)):
        return True
    with torch.no_grad():
        for name, param in _daam_parameters(model):
            if name.endswith("mean_offset"):
                param.normal_(0.0, 0.5)
        gate = model(x, return_gate=True)[1]
    return not gate.std() > 1e-3


def test_no_accepted_density_configuration_is_inert():
    torch.manual_seed(0)
    configs = list(_accepted_density_configs())
    assert {c.decoder for c in configs} == set(DENSITY_DECODERS) and {c.head for c in configs} == set(DECODER_HEADS)
    assert len(configs) > 120
    assert [c for c in configs if _inert(c)] == []


@pytest.mark.parametrize("name", DENSITY_DECODERS)
def test_one_layer_per_head_is_inert_and_refused(name):
    """What the refusal prevents: a decoder built with one layer per head trains an inert DAAM."""
    torch.manual_seed(0)
    assert not _inert(decoder_config(name, 4, 16, C, 2))
    assert _inert(DecoderConfig(name, 4, 16, C, 4))  # built without validation
    with pytest.raises(DaamkitError, match="use `heads` 2 or fewer"):
        decoder_config(name, 4, 16, C, 4)
