"""Density Adaptive Attention, paper Algorithm 1 (the DAAMv1 / DAAMv2 / GQDAAM gate of the DAT decoders)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from daamkit.common.heads import (
    apply_per_head,
    check_heads,
    finish_gate,
    head_view,
    masked_mean,
    moved_axis,
    normalize_axis,
    prepare_mask,
    reduction_layout,
    stats_dtype,
)

VARIANCE_EPS = 1e-8  # added to |E[x^2] - mu^2| (Algorithm 1)
STD_EPS = 1e-5  # added under the square root of the standardisation
MIN_C = 1e-4  # `c` is clamped to at least this in the forward pass, so the gate's width stays positive


class _DensityGate(torch.autograd.Function):
    """Algorithm 1's gate exp(k z^2) (k = -1 / (2c)) for one unmasked head layout, with a hand-derived
    backward that recomputes z from x instead of keeping autograd's intermediates (fewer passes)."""

    @staticmethod
    def forward(ctx, x: Tensor, offset: Tensor, k: Tensor, dim: int) -> Tensor:
        mu = x.mean(dim, keepdim=True)
        centred_sq = (x * x).mean(dim, keepdim=True) - mu * mu
        inv_std = torch.rsqrt(centred_sq.abs() + (VARIANCE_EPS + STD_EPS))
        shift = mu + offset
        z = (x - shift) * inv_std
        gate = torch.exp(z * z * k)
        ctx.save_for_backward(x, gate, mu, shift, inv_std, centred_sq.sign(), k)
        ctx.dim, ctx.offset_shape = dim, offset.shape
        return gate

    @staticmethod
    def backward(ctx, grad_gate: Tensor):
        x, gate, mu, shift, inv_std, var_sign, k = ctx.saved_tensors
        dim, n = ctx.dim, x.shape[ctx.dim]
        z = (x - shift) * inv_std
        h = grad_gate * gate
        grad_z = h * z * (2.0 * k)
        sum_grad_z = grad_z.sum(dim, keepdim=True)
        grad_inv_std = (grad_z * z).sum(dim, keepdim=True) / inv_std
        # var = |E[x^2] - mu^2|, inv_std = (var + eps)^-1/2; shift = mu + offset
        grad_var = -0.5 * grad_inv_std * inv_std ** 3 * var_sign
        grad_mu = -sum_grad_z * inv_std - 2.0 * mu * grad_var
        grad_x = grad_z * inv_std + (grad_mu + 2.0 * grad_var * x) / n
        grad_offset = (-sum_grad_z * inv_std).sum_to_size(ctx.offset_shape)
        grad_k = (h * z * z).sum(dim, keepdim=True).sum_to_size(k.shape)  # the axis first: much faster
        return grad_x, grad_offset, grad_k, None


class DensityAdaptiveAttention(nn.Module):
    """Multi-head Gaussian gate of paper Algorithm 1.

    For each head h (a contiguous chunk of `norm_axis`)::

        mu   = mean(x_h, norm_axis);   var = |mean(x_h^2, norm_axis) - mu^2| + 1e-8
        z    = (x_h - (mu + mean_offset[h])) / sqrt(var + 1e-5)
        gate = exp(-z^2 / (2 * c[h]))          # c, not c^2: Algorithm 1 and the authors' code
        out  = x_h * gate                      # skip=True: x_h + x_h * gate

    `mean_offset` (init 0) and `c` (init `init_c`) have shape `(num_heads, num_features)` and vary along
    `feature_axis` (for DAT input `[B, N_layers, d]`: norm_axis=1, feature_axis=-1, so 8 heads x 1024 =
    16,384 parameters). `c` is clamped to >= 1e-4 in the forward pass so the gate is always a Gaussian.
    Statistics are computed in float32 (float64 for float64 input) even under autocast.

    `skip=True` returns the residual form `x + x * gate` (the DAT decoders' `residual`): every value keeps
    at least itself, so a gate that is small where a layer stands out from the others scales that layer's
    features by 1 to 2 instead of wiping them out.

    `mask` (bool, broadcastable to x, True = valid) gives exact statistics over valid positions only;
    padded positions are returned unchanged and get gate 1.

    Channels-last input (norm axis innermost in memory) is used without a layout copy and the output comes
    back channels-last, except on CPU with heads narrower than 32, where a contiguous copy is faster
    (`daamkit.common.heads.reduction_layout`).
    """

    def __init__(self, num_heads: int, num_features: int, norm_axis: int = 1, feature_axis: int = -1,
                 init_c: float = 2.0, skip: bool = False):
        super().__init__()
        if num_heads < 1 or num_features < 1:
            raise ValueError(f"num_heads and num_features must be >= 1, got {num_heads} and {num_features}")
        if init_c <= 0:
            raise ValueError(f"init_c must be positive, got {init_c}")
        self.num_heads, self.num_features = num_heads, num_features
        self.norm_axis, self.feature_axis, self.skip = norm_axis, feature_axis, skip
        self.mean_offset = nn.Parameter(torch.zeros(num_heads, num_features))
        self.c = nn.Parameter(torch.full((num_heads, num_features), float(init_c)))

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, num_features={self.num_features}, "
                f"norm_axis={self.norm_axis}, feature_axis={self.feature_axis}, skip={self.skip}")

    def _axes(self, x: Tensor) -> tuple[int, int]:
        axis = normalize_axis(self.norm_axis, x.dim(), "norm_axis")
        feature_axis = normalize_axis(self.feature_axis, x.dim(), "feature_axis")
        if axis == feature_axis:
            raise ValueError(f"norm_axis and feature_axis must differ, both are dim {axis}")
        check_heads(x.shape[axis], self.num_heads, axis)
        if x.shape[feature_axis] != self.num_features:
            raise ValueError(
                f"feature axis (dim {feature_axis}) has size {x.shape[feature_axis]}, "
                f"but the module was built for num_features={self.num_features}"
            )
        return axis, feature_axis

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, return_gate: bool = False):
        axis, feature_axis = self._axes(x)
        mask = prepare_mask(mask, x)
        x, view_axis, restore = reduction_layout(x, axis, self.num_heads)
        mask = None if mask is None else mask.movedim(axis, view_axis)
        axis, feature_axis = view_axis, moved_axis(feature_axis, axis, view_axis)
        dtype = stats_dtype(x)
        grouped_feature_axis = feature_axis + 1 if feature_axis > axis else feature_axis
        offset_all = self.mean_offset.to(dtype)
        c_all = self.c.to(dtype).clamp_min(MIN_C)

        def gate_fn(xg: Tensor, mg: Optional[Tensor], heads: slice) -> Tensor:
            xg = xg.to(dtype)
            offset = head_view(offset_all[heads], xg.dim(), axis, grouped_feature_axis)
            neg_half_inv_c = head_view(-0.5 / c_all[heads], xg.dim(), axis, grouped_feature_axis)
            if mg is None:
                return _DensityGate.apply(xg, offset, neg_half_inv_c, axis + 1)
            mu, _ = masked_mean(xg, mg, axis + 1)
            mean_sq, _ = masked_mean(xg * xg, mg, axis + 1)
            var = (mean_sq - mu * mu).abs()
            z = (xg - (mu + offset)) * torch.rsqrt(var + (VARIANCE_EPS + STD_EPS))
            return torch.exp(z * z * neg_half_inv_c)

        gate = apply_per_head(x, mask, axis, self.num_heads, gate_fn)
        out, gate = finish_gate(x, gate, mask, self.skip)
        return (restore(out), restore(gate)) if return_gate else restore(out)
