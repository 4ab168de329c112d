"""The DAAM mechanisms against loop-based oracles, gradients, masks, precision and parameter counts."""

import pytest
import torch

from daam_reference import daam_reference, mixture_reference
from daamkit.common import heads as heads_module
from daamkit.common import DensityAdaptiveAttention, DensityBlock, MixtureDensityAdaptiveAttention


def _randomise(module, seed=0):
    """Give a module's parameters non-trivial values so the oracles exercise every term."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.mean_offset.copy_(torch.randn(module.mean_offset.shape, generator=gen) * 0.5)
        module.c.copy_(torch.rand(module.c.shape, generator=gen) * 2.5 + 0.5)
        if hasattr(module, "mixture_logits"):
            module.mixture_logits.copy_(torch.randn(module.mixture_logits.shape, generator=gen))
    return module


DAAM_CASES = [  # shape, heads, norm_axis, feature_axis
    ((2, 24, 16), 8, 1, -1),  # DAT layout [B, layers, d]
    ((2, 10, 6), 3, 1, -1),  # uneven split: 3 + 3 + 4
    ((2, 12, 3, 4), 4, 1, -1),  # NCHW channel axis
    ((3, 5, 12), 4, -1, 1),  # feature axis before the norm axis
    ((2, 7, 9), 2, -2, 2),  # uneven, negative norm axis
]


@pytest.mark.parametrize("shape,heads,norm_axis,feature_axis", DAAM_CASES)
def test_daam_matches_loop_reference(shape, heads, norm_axis, feature_axis):
    torch.manual_seed(1)
    x = torch.randn(shape) * 2 + 0.3
    feats = shape[feature_axis]
    module = _randomise(DensityAdaptiveAttention(heads, feats, norm_axis, feature_axis))
    out, gate = module(x, return_gate=True)
    ref_out, ref_gate = daam_reference(x, module.mean_offset.detach(), module.c.detach(), norm_axis, feature_axis)
    torch.testing.assert_close(gate.double(), ref_gate, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-5)


MIXTURE_CASES = [  # shape, heads, gaussians, norm_axis
    ((2, 32, 3, 3), 8, 4, 1),  # NCHW channel axis, the VQ-VAE layout
    ((2, 11, 5), 3, 2, 1),  # uneven split
    ((3, 4, 10), 2, 3, -1),
    ((2, 6, 5), 1, 1, -2),
]


@pytest.mark.parametrize("combine", ["product", "sum"])
@pytest.mark.parametrize("shape,heads,gaussians,norm_axis", MIXTURE_CASES)
def test_mixture_matches_loop_reference(shape, heads, gaussians, norm_axis, combine):
    torch.manual_seed(2)
    x = torch.randn(shape) * 1.5 - 0.2
    module = _randomise(MixtureDensityAdaptiveAttention(heads, gaussians, norm_axis, combine=combine))
    out, gate = module(x, return_gate=True)
    logits = module.mixture_logits.detach() if combine == "sum" else None
    ref_out, ref_gate = mixture_reference(x, module.mean_offset.detach(), module.c.detach(), norm_axis, None, logits)
    torch.testing.assert_close(gate.double(), ref_gate, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-6)


def test_daam_masked_statistics_are_exact_and_padding_passes_through():
    torch.manual_seed(3)
    x = torch.randn(3, 12, 8)
    mask = torch.ones(3, 12, 1, dtype=torch.bool)
    mask[0, 9:] = False  # padding at the end of the first item
    mask[2, 1] = mask[2, 4] = mask[2, 10] = False  # and holes
    module = _randomise(DensityAdaptiveAttention(3, 8, norm_axis=1, feature_axis=-1))
    out, gate = module(x, mask=mask, return_gate=True)
    ref_out, ref_gate = daam_reference(x, module.mean_offset.detach(), module.c.detach(), 1, -1, mask)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-5)
    full = mask.expand_as(x)
    assert torch.equal(out[~full], x[~full])
    assert torch.all(gate[~full] == 1)


@pytest.mark.parametrize("combine", ["product", "sum"])
def test_mixture_masked_statistics_are_exact(combine):
    torch.manual_seed(4)
    shape = (3, 13, 4)
    x = torch.randn(shape)
    x_padded_garbage = x.clone()
    mask = torch.ones(3, 13, 1, dtype=torch.bool)
    mask[0, 10:] = False  # trailing padding: the last head keeps 2 of its 5 positions
    mask[1, 2] = mask[1, 7] = False  # holes
    x_padded_garbage[~mask.expand(shape)] = 1e3  # what sits in padded slots must not matter
    module = _randomise(MixtureDensityAdaptiveAttention(3, 4, norm_axis=1, combine=combine))
    out, gate = module(x_padded_garbage, mask=mask, return_gate=True)
    logits = module.mixture_logits.detach() if combine == "sum" else None
    ref_out, _ = mixture_reference(x, module.mean_offset.detach(), module.c.detach(), 1, mask, logits)
    valid = mask.expand(shape)
    torch.testing.assert_close(out[valid].double(), ref_out[valid], rtol=1e-4, atol=1e-6)
    assert torch.equal(out[~valid], x_padded_garbage[~valid])


def test_masked_result_equals_unpadded_result():
    """Padding a sequence and masking the padding gives the features of the unpadded sequence."""
    torch.manual_seed(6)
    short = torch.randn(1, 9, 8)
    padded = torch.cat([short, torch.randn(1, 5, 8)], dim=1)
    mask = torch.zeros(1, 14, 1, dtype=torch.bool)
    mask[:, :9] = True
    for module in (MixtureDensityAdaptiveAttention(1, 3, norm_axis=1), DensityAdaptiveAttention(1, 8, 1, -1)):
        _randomise(module)
        torch.testing.assert_close(module(padded, mask=mask)[:, :9], module(short), rtol=1e-5, atol=1e-6)


def test_gradcheck_float64():
    torch.manual_seed(7)
    mask = torch.ones(2, 6, 1, dtype=torch.bool)
    mask[1, 4:] = False
    # without a mask Algorithm 1 runs its hand-written backward: even (2 x 3) and uneven (1+1+4) splits
    for heads, feature_axis, m in ((2, -1, None), (3, -1, None), (2, 0, None), (2, -1, mask)):
        daam = _randomise(DensityAdaptiveAttention(heads, 2 if feature_axis == 0 else 3, 1, feature_axis)).double()
        x = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
        params = [daam.mean_offset.detach().clone().requires_grad_(), daam.c.detach().clone().requires_grad_()]
        assert torch.autograd.gradcheck(lambda i, o, c: torch.func.functional_call(
            daam, {"mean_offset": o, "c": c}, (i,), {"mask": m}), (x, *params))

    for combine, heads, m in (("product", 2, None), ("product", 4, None), ("product", 2, mask), ("sum", 2, None)):
        # product without a mask runs the hand-written backward (also with an uneven 1+1+1+3 split)
        mix = _randomise(MixtureDensityAdaptiveAttention(heads, 3, norm_axis=1, combine=combine)).double()
        names = [name for name, _ in mix.named_parameters()]
        values = [p.detach().clone().requires_grad_() for p in mix.parameters()]
        xm = torch.randn(2, 6, 2, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda i, *p: torch.func.functional_call(mix, dict(zip(names, p)), (i,), {"mask": m}), (xm, *values))


def _backward_nodes(out: torch.Tensor) -> set[str]:
    """Names of the autograd nodes that produced `out`."""
    seen, pending = {}, [out.grad_fn]
    while pending:
        node = pending.pop()
        if node is not None and id(node) not in seen:
            seen[id(node)] = type(node).__name__
            pending += [parent for parent, _ in node.next_functions]
    return set(seen.values())


@pytest.mark.parametrize("heads, masked, combine", [(4, False, "product"), (5, False, "product"), (4, True, "product"),
                                                    (4, False, "sum")], ids=["fused", "uneven", "masked", "sum"])
def test_skip_form_is_x_plus_the_mixture_output_with_exact_gradients(heads, masked, combine):
    """`skip=True` gives x + MixtureDAAM(x) (padded positions stay x): fused for product heads without a mask
    (even or uneven 2+2+2+2+4 split), composed otherwise; float64 gradcheck of both (also with the gate as a second output), and float32
    gradients equal to the composed form."""
    torch.manual_seed(8)
    mask = (torch.rand(2, 1, 3) > 0.3) if masked else None
    plain = _randomise(MixtureDensityAdaptiveAttention(heads, 3, norm_axis=1, combine=combine))
    skip = MixtureDensityAdaptiveAttention(heads, 3, norm_axis=1, combine=combine, skip=True)
    skip.load_state_dict(plain.state_dict())
    x = torch.randn(2, 12, 3, requires_grad=True)
    grad = torch.randn(2, 12, 3)
    expected = plain(x, mask=mask)
    expected = expected + x if mask is None else torch.where(mask, expected + x, x)
    results = []
    for out in (expected, skip(x, mask=mask)):
        results.append((out, *torch.autograd.grad(out, [x, *plain.parameters(), *skip.parameters()], grad,
                                                  allow_unused=True)))
    torch.testing.assert_close(results[1][0], results[0][0])
    assert ("_ProductMixtureSkipBackward" in _backward_nodes(results[1][0])) == (not masked and combine == "product")
    n = len(list(plain.parameters()))
    composed_grads = [results[0][1], *results[0][2:2 + n]]
    fused_grads = [results[1][1], *results[1][2 + n:]]
    for fused_grad, composed_grad in zip(fused_grads, composed_grads):
        torch.testing.assert_close(fused_grad, composed_grad)
    skip = skip.double()
    names = [name for name, _ in skip.named_parameters()]
    values = [p.detach().clone().requires_grad_() for p in skip.parameters()]
    x64 = torch.randn(2, 12, 2, dtype=torch.float64, requires_grad=True)
    m = None if mask is None else mask[..., :2]
    for return_gate in (False, True):  # the gate as a second output takes gradients too
        assert torch.autograd.gradcheck(lambda i, *p: torch.func.functional_call(
            skip, dict(zip(names, p)), (i,), {"mask": m, "return_gate": return_gate}), (x64, *values))


@pytest.mark.parametrize("heads, masked", [(3, False), (2, True)], ids=["plain", "masked"])
def test_daam_skip_form_is_x_plus_the_gated_input_with_exact_gradients(heads, masked):
    """DensityAdaptiveAttention(skip=True) gives x + x * gate with the same gate (padded positions stay x, not
    2x); float64 gradcheck against autograd, with and without the gate as a second output."""
    torch.manual_seed(9)
    mask = (torch.rand(2, 6, 1) > 0.3) if masked else None
    plain = _randomise(DensityAdaptiveAttention(heads, 4, norm_axis=1, feature_axis=-1)).double()
    skip = DensityAdaptiveAttention(heads, 4, norm_axis=1, feature_axis=-1, skip=True).double()
    skip.load_state_dict(plain.state_dict())
    x = torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=True)
    out, gate = skip(x, mask=mask, return_gate=True)
    plain_out, plain_gate = plain(x, mask=mask, return_gate=True)
    expected = plain_out + x if mask is None else torch.where(mask, plain_out + x, x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(gate, plain_gate)
    if masked:
        assert torch.equal(out[~mask.expand_as(x)], x[~mask.expand_as(x)])
    names = [name for name, _ in skip.named_parameters()]
    values = [p.detach().clone().requires_grad_() for p in skip.parameters()]
    for return_gate in (False, True):
        assert torch.autograd.gradcheck(lambda i, *p: torch.func.functional_call(
            skip, dict(zip(names, p)), (i,), {"mask": mask, "return_gate": return_gate}), (x, *values))


@pytest.mark.parametrize("native", [True, False], ids=["native-view", "contiguous-copy"])
@pytest.mark.parametrize("build", [
    lambda: MixtureDensityAdaptiveAttention(4, 3, norm_axis=1),  # hand-written backward
    lambda: MixtureDensityAdaptiveAttention(3, 2, norm_axis=1),  # uneven 2 + 2 + 4
    lambda: MixtureDensityAdaptiveAttention(2, 3, norm_axis=1, combine="sum"),
    lambda: MixtureDensityAdaptiveAttention(4, 3, norm_axis=1, skip=True),  # the fused skip form
    lambda: DensityAdaptiveAttention(2, 3, norm_axis=1, feature_axis=-1),  # hand-written backward
    lambda: DensityAdaptiveAttention(2, 5, norm_axis=1, feature_axis=2),
], ids=["mixture", "mixture-uneven", "mixture-sum", "mixture-skip", "daam", "daam-feature-h"])
def test_channels_last_input_gives_same_output_and_gradients(build, native, monkeypatch):
    """Channels-last NCHW input (float64): same output, gate and gradients as contiguous input, in both the
    no-copy view (the norm axis moved last) and the contiguous copy, with the output kept channels-last on
    the no-copy view; also with a mask."""
    monkeypatch.setattr(heads_module, "CPU_MIN_VIEW_HEAD", 1 if native else 10**9)
    module = _randomise(build()).double()
    torch.manual_seed(3)
    x = torch.randn(2, 8, 5, 3, dtype=torch.float64)
    grad = torch.randn_like(x)
    mask = torch.rand(2, 1, 5, 3) > 0.3
    for m in (None, mask):
        results = []
        for layout in (torch.contiguous_format, torch.channels_last):
            xi = x.contiguous(memory_format=layout).requires_grad_()
            out, gate = module(xi, mask=m, return_gate=True)
            if native and layout is torch.channels_last:
                assert out.is_contiguous(memory_format=torch.channels_last)
            grads = torch.autograd.grad(out, [xi, *module.parameters()], grad)
            results.append((out, gate, *grads))
        for contiguous_result, channels_last_result in zip(*results):
            torch.testing.assert_close(channels_last_result, contiguous_result, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("heads,features,expected", [(8, 1024, 16_384), (8, 5120, 81_920), (1, 1024, 2_048),
                                                     (1, 5120, 10_240)])
def test_daam_parameter_counts_match_paper_table_1(heads, features, expected):
    module = DensityAdaptiveAttention(heads, features)
    assert sum(p.numel() for p in module.parameters()) == expected
    assert module.mean_offset.shape == module.c.shape == (heads, features)


def test_mixture_parameter_count():
    assert sum(p.numel() for p in MixtureDensityAdaptiveAttention(8, 4).parameters()) == 64
    assert sum(p.numel() for p in MixtureDensityAdaptiveAttention(8, 4, combine="sum").parameters()) == 96


def test_bf16_autocast_stays_finite_where_naive_product_underflows():
    torch.manual_seed(8)
    raw = torch.randn(2, 2, 4, 6)  # 2 heads x 4 channels; standardise each head so sigma = 1 exactly
    x = ((raw - raw.mean(2, keepdim=True)) / raw.std(2, keepdim=True)).flatten(1, 2)
    module = MixtureDensityAdaptiveAttention(2, 4, norm_axis=1)
    with torch.no_grad():
        module.mean_offset.fill_(12.0)  # every position sits 10.5-13.5 sigma from each of the 4 Gaussians
        module.c.fill_(1.0)
    # the literal product in float32 underflows to 0 everywhere, so its normalisation is 0/0
    xs = x.unflatten(1, (2, 4))
    z = (xs - xs.mean(2, keepdim=True) - 12.0) / xs.var(2, keepdim=True).add(1e-8).sqrt()
    naive = torch.exp(-z ** 2 / 2) ** 4  # float32; the float64 oracle below still resolves it
    assert torch.isnan(naive / naive.sum(2, keepdim=True)).all()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, gate = module(x.bfloat16(), return_gate=True)
    assert torch.isfinite(out).all() and torch.isfinite(gate).all()
    assert out.dtype == torch.bfloat16 and gate.dtype == torch.float32
    _, ref_gate = mixture_reference(x.bfloat16().float(), module.mean_offset.detach(), module.c.detach(), 1)
    torch.testing.assert_close(gate.double(), ref_gate, rtol=2e-2, atol=2e-3)


def test_statistics_are_float32_under_autocast():
    torch.manual_seed(9)
    x = torch.randn(2, 16, 32)
    module = _randomise(DensityAdaptiveAttention(4, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, gate = module(x.bfloat16(), return_gate=True)
    _, ref = daam_reference(x.bfloat16().float(), module.mean_offset.detach(), module.c.detach(), 1, -1)
    torch.testing.assert_close(gate.double(), ref, rtol=1e-4, atol=1e-5)


def test_daam_keeps_c_positive():
    module = DensityAdaptiveAttention(1, 4)
    with torch.no_grad():
        module.c.fill_(-3.0)
    out = module(torch.randn(2, 5, 4))
    assert torch.isfinite(out).all() and (out.abs() <= 1e3).all()


def test_density_block_is_residual_stack():
    torch.manual_seed(10)
    block = DensityBlock(num_layers=2, num_heads=4, num_gaussians=3, norm_axis=1)
    for layer in block.layers:
        _randomise(layer)
    plain = [MixtureDensityAdaptiveAttention(4, 3, norm_axis=1) for _ in block.layers]  # the same, without skip
    for reference, layer in zip(plain, block.layers):
        reference.load_state_dict(layer.state_dict())
    x = torch.randn(2, 8, 5)
    expected = x
    for layer in plain:
        expected = layer(expected) + expected
    out, gate = block(x, return_gate=True)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(gate, plain[-1](plain[0](x) + x, return_gate=True)[1])

    mask = torch.ones(2, 8, 1, dtype=torch.bool)
    mask[1, 6:] = False
    masked = block(x, mask=mask)
    assert torch.equal(masked[1, 6:], x[1, 6:])


@pytest.mark.parametrize("factory", [
    lambda: MixtureDensityAdaptiveAttention(4, 3, norm_axis=1),
    lambda: MixtureDensityAdaptiveAttention(4, 3, norm_axis=1, combine="sum"),
    lambda: MixtureDensityAdaptiveAttention(4, 3, norm_axis=1, skip=True),  # the fused skip form
    lambda: DensityAdaptiveAttention(4, 6, norm_axis=1, feature_axis=-1),
    lambda: DensityAdaptiveAttention(4, 6, norm_axis=1, feature_axis=-1, skip=True),
    lambda: DensityBlock(2, 4, 3, norm_axis=1),
])
def test_traces_without_graph_breaks(factory):
    """fullgraph=True raises on any graph break; the eager backend keeps the test fast."""
    torch._dynamo.reset()
    module = factory()
    x = torch.randn(2, 8, 6)
    compiled = torch.compile(module, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), module(x))


@pytest.mark.parametrize("build,shape,message", [
    (lambda: MixtureDensityAdaptiveAttention(2, 2, norm_axis=3), (2, 4, 4), "out of range"),
    (lambda: MixtureDensityAdaptiveAttention(8, 2, norm_axis=1), (2, 4, 4), "fewer than the 8 heads"),
    (lambda: DensityAdaptiveAttention(2, 4, norm_axis=1, feature_axis=1), (2, 4, 4), "must differ"),
    (lambda: DensityAdaptiveAttention(2, 5, norm_axis=1), (2, 4, 4), "num_features=5"),
])
def test_bad_axes_raise_value_error(build, shape, message):
    with pytest.raises(ValueError, match=message):
        build()(torch.randn(shape))


def test_bad_mask_and_options_raise_value_error():
    module = MixtureDensityAdaptiveAttention(2, 2)
    with pytest.raises(ValueError, match="bool"):
        module(torch.randn(2, 4, 3), mask=torch.ones(2, 4, 3))
    with pytest.raises(ValueError, match="does not broadcast"):
        module(torch.randn(2, 4, 3), mask=torch.ones(2, 5, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="combine"):
        MixtureDensityAdaptiveAttention(2, 2, combine="max")
