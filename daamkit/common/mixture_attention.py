"""Mixture of Density Adaptive Attention, paper Algorithm 2 / Appendix B (used by the VQ-VAE and the
`mixture` DAT decoder), and the `DensityBlock` that stacks it with skip connections."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from daamkit.common.heads import (
    apply_per_head,
    check_heads,
    finish_gate,
    head_view,
    masked_mean,
    normalize_axis,
    prepare_mask,
    reduction_layout,
    stats_dtype,
)

VARIANCE_EPS = 1e-8  # added to the unbiased variance, as `torch.var(...) + eps` in the paper
MIN_C_SQUARED = 1e-8  # c_i^2 is clamped to at least this, so no Gaussian collapses to zero width
COMBINES = ("product", "sum")


def _product_gate(x: Tensor, half_p: Tensor, q: Tensor, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """The product-of-Gaussians map of one unmasked head layout, and the `(c, inv_var)` its gradient needs.

    With c = x - mean(x), var the unbiased variance + eps, a = q / var and b = p / (2 var) per column,
    the gate is softmax(c * (a - b c)) over `dim` (the same as softmax(z (Q / sigma - P z / 2))). Few
    passes over memory: the variance is one fused dot product of c with itself. With narrow heads the
    per-column statistics are a sizeable tensor too, so they are scaled in place.
    """
    n = x.shape[dim]
    c = x - x.mean(dim, keepdim=True)
    inv_var = torch.linalg.vecdot(c, c, dim=dim).unsqueeze(dim).div_(max(n - 1, 1)).add_(VARIANCE_EPS).reciprocal_()
    logits = torch.addcmul(q * inv_var, half_p * inv_var, c, value=-1.0).mul_(c)
    return torch.softmax(logits, dim), c, inv_var


def _product_gate_grads(grad_gate: Tensor, gate: Tensor, c: Tensor, inv_var: Tensor, half_p: Tensor, q: Tensor,
                        dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Hand-derived gradients of `_product_gate` for x, half_p and q: the softmax gradient in one fused
    kernel, sum(softmax grad) = 0 and sum(c) = 0 leave only two reductions over `dim` (a sum and a dot
    product), and grad_x is built in three fused multiply-adds."""
    n = c.shape[dim]
    u = torch._softmax_backward_data(grad_gate, gate, dim, gate.dtype)  # grad of the logits
    uc = u * c
    grad_a_scaled = uc.sum(dim, keepdim=True).mul_(inv_var)  # dL/da * inv_var = dL/dq per column
    sum_ucc_scaled = torch.linalg.vecdot(uc, c, dim=dim).unsqueeze(dim).mul_(inv_var)  # -dL/d(half_p)
    # a = q / var and b = p / (2 var) depend on var, and var on c (d var / d c = 2 c / (n - 1)):
    var_coeff = torch.addcmul(sum_ucc_scaled * half_p, grad_a_scaled, q, value=-1.0).mul_(inv_var * (2.0 / max(n - 1, 1)))
    # grad_c = u a - 2 b u c + c var_coeff; grad_x = grad_c - mean(grad_c) = grad_c + 2 b dL/da / n
    grad_x = torch.addcmul(grad_a_scaled * (half_p * (2.0 / n)), u, q * inv_var)
    grad_x.addcmul_(uc, (half_p * -2.0) * inv_var).addcmul_(c, var_coeff)
    return grad_x, -sum_ucc_scaled.sum_to_size(half_p.shape), grad_a_scaled.sum_to_size(q.shape)


class _ProductMixtureGate(torch.autograd.Function):
    """`_product_gate` with its hand-derived backward (fewer passes than autograd's)."""

    @staticmethod
    def forward(ctx, x: Tensor, half_p: Tensor, q: Tensor, dim: int) -> Tensor:
        gate, c, inv_var = _product_gate(x, half_p, q, dim)
        ctx.save_for_backward(gate, c, inv_var, half_p, q)
        ctx.dim = dim
        return gate

    @staticmethod
    def backward(ctx, grad_gate: Tensor):
        return *_product_gate_grads(grad_gate, *ctx.saved_tensors, ctx.dim), None


class _ProductMixtureSkip(torch.autograd.Function):
    """`(x + x * gate, gate)`: the skip form in one pass, its backward adding grad * (1 + gate) to the gate's.
    The gate is an output too (for `return_gate`); when it is not used its gradient is never built."""

    @staticmethod
    def forward(ctx, x: Tensor, half_p: Tensor, q: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        gate, c, inv_var = _product_gate(x, half_p, q, dim)
        ctx.save_for_backward(x, gate, c, inv_var, half_p, q)
        ctx.dim = dim
        ctx.set_materialize_grads(False)
        return torch.addcmul(x, x, gate), gate

    @staticmethod
    def backward(ctx, grad_out: Optional[Tensor], grad_gate: Optional[Tensor]):
        x, gate, *saved = ctx.saved_tensors
        total_grad_gate = grad_gate if grad_out is None else grad_out * x
        if grad_out is not None and grad_gate is not None:
            total_grad_gate.add_(grad_gate)
        if total_grad_gate is None:
            return None, None, None, None
        grad_x, grad_half_p, grad_q = _product_gate_grads(total_grad_gate, gate, *saved, ctx.dim)
        if grad_out is not None:
            grad_x.add_(grad_out).addcmul_(grad_out, gate)
        return grad_x, grad_half_p, grad_q, None


class MixtureDensityAdaptiveAttention(nn.Module):
    """Multi-head mixture of Gaussians over the norm axis (paper Algorithm 2). Returns `x * mix`, or with
    `skip=True` `x + x * mix` (the VQ-VAE's `h + MixtureDAAM(h)`), fused into one pass per head group for the
    product form without a mask (`_ProductMixtureSkip`), composed from the gate otherwise.

    Per head h (a contiguous chunk of `norm_axis`), with mu and the unbiased variance var taken over the
    head's positions and G Gaussians with learnable scalars `mean_offset[h, i]` (init 0) and `c[h, i]`
    (init `init_c`)::

        g_i = exp(-((x - (mu + m_i)) / sqrt(var + 1e-8))^2 / (2 c_i^2)) / sqrt(2 pi c_i^2)
        mix = prod_i g_i / sum(prod_i g_i, norm_axis)        # combine="product" (the paper)
        mix = sum_i w_i g_i / sum(sum_i w_i g_i, norm_axis)  # combine="sum", w = softmax(mixture_logits)

    Computed in the log domain, so it never underflows: with z = (x - mu) / sigma, every term of
    sum_i log g_i that is constant along the norm axis cancels in the normalisation and the product is
    exactly `softmax(z * (Q / sigma - P * z / 2))` with P = sum_i 1/c_i^2 and Q = sum_i m_i/c_i^2 per head.
    The sum form uses logsumexp over the Gaussians. Statistics are float32 even under autocast; c_i^2 is
    clamped to >= 1e-8.

    `mask` (bool, broadcastable to x, True = valid) gives exact statistics and normalisation over valid
    positions; padded positions are returned unchanged and get gate 1.

    Channels-last input (norm axis innermost in memory) is used without a layout copy and the output comes
    back channels-last, except on CPU with heads narrower than 32, where a contiguous copy is faster
    (`daamkit.common.heads.reduction_layout`).
    """

    def __init__(self, num_heads: int, num_gaussians: int, norm_axis: int = 1, init_c: float = 2.0,
                 combine: str = "product", skip: bool = False):
        super().__init__()
        if num_heads < 1 or num_gaussians < 1:
            raise ValueError(f"num_heads and num_gaussians must be >= 1, got {num_heads} and {num_gaussians}")
        if combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
        if init_c == 0:
            raise ValueError("init_c must be non-zero")
        self.num_heads, self.num_gaussians = num_heads, num_gaussians
        self.norm_axis, self.combine, self.skip = norm_axis, combine, skip
        self.mean_offset = nn.Parameter(torch.zeros(num_heads, num_gaussians))
        self.c = nn.Parameter(torch.full((num_heads, num_gaussians), float(init_c)))
        if combine == "sum":
            self.mixture_logits = nn.Parameter(torch.zeros(num_heads, num_gaussians))

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, num_gaussians={self.num_gaussians}, "
                f"norm_axis={self.norm_axis}, combine={self.combine!r}, skip={self.skip}")

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, return_gate: bool = False):
        axis = normalize_axis(self.norm_axis, x.dim(), "norm_axis")
        check_heads(x.shape[axis], self.num_heads, axis)
        mask = prepare_mask(mask, x)
        x, view_axis, restore = reduction_layout(x, axis, self.num_heads)
        mask = None if mask is None else mask.movedim(axis, view_axis)
        axis = view_axis
        dtype = stats_dtype(x)
        c_sq = (self.c.to(dtype) ** 2).clamp_min(MIN_C_SQUARED)
        offsets = self.mean_offset.to(dtype)
        stat_axis = axis + 1
        if self.combine == "product":
            inv_var_sum = (1.0 / c_sq).sum(-1)  # P per head
            offset_sum = (offsets / c_sq).sum(-1)  # Q per head

            def product_terms(xg: Tensor, heads: slice) -> tuple[Tensor, Tensor]:
                """P / 2 and Q of `heads`, shaped to broadcast against the grouped view."""
                return (head_view(0.5 * inv_var_sum[heads], xg.dim(), axis),
                        head_view(offset_sum[heads], xg.dim(), axis))

            if self.skip and mask is None and x.dtype == dtype:
                def skip_fn(xg: Tensor, mg: None, heads: slice) -> tuple[Tensor, Tensor]:  # the fused skip form
                    return _ProductMixtureSkip.apply(xg, *product_terms(xg, heads), stat_axis)

                out, gate = (restore(t) for t in apply_per_head(x, None, axis, self.num_heads, skip_fn))
                return (out, gate) if return_gate else out

        def gate_fn(xg: Tensor, mg: Optional[Tensor], heads: slice) -> Tensor:
            xg = xg.to(dtype)
            if self.combine == "product":
                half_p, q = product_terms(xg, heads)
                if mg is None:
                    return _ProductMixtureGate.apply(xg, half_p, q, stat_axis)
            mu, count = masked_mean(xg, mg, stat_axis)
            centred = xg - mu
            sq = centred * centred if mg is None else torch.where(mg, centred * centred, 0.0)
            bessel = max(count - 1.0, 1.0) if mg is None else (count - 1.0).clamp_min(1.0)
            var = sq.sum(stat_axis, keepdim=True) / bessel  # unbiased, like torch.var
            inv_sigma = torch.rsqrt(var + VARIANCE_EPS)
            z = centred * inv_sigma
            if self.combine == "product":
                logits = z * torch.addcmul(q * inv_sigma, half_p, z, value=-1.0)
            else:
                logits = self._sum_logits(z, inv_sigma, c_sq[heads], offsets[heads], heads, axis)
            if mg is not None:
                logits = logits.masked_fill(~mg, torch.finfo(logits.dtype).min)
            return torch.softmax(logits, dim=stat_axis)

        gate = apply_per_head(x, mask, axis, self.num_heads, gate_fn)
        out, gate = finish_gate(x, gate, mask, self.skip)
        return (restore(out), restore(gate)) if return_gate else restore(out)

    def _sum_logits(self, z: Tensor, inv_sigma: Tensor, c_sq: Tensor, offsets: Tensor, heads: slice,
                    axis: int) -> Tensor:
        """log(sum_i w_i g_i) for the given heads, all Gaussians in one expression on a trailing axis."""
        log_w = torch.log_softmax(self.mixture_logits.to(c_sq.dtype)[heads], dim=-1)
        shape = [1] * z.dim() + [self.num_gaussians]  # (h, G) -> [1.., h, 1.., G]
        shape[axis] = c_sq.shape[0]
        c_sq, offsets, log_w = (t.reshape(shape) for t in (c_sq, offsets, log_w))
        diff = z.unsqueeze(-1) - offsets * inv_sigma.unsqueeze(-1)
        log_g = -(diff * diff) / (2.0 * c_sq) - 0.5 * torch.log(2.0 * math.pi * c_sq)
        return torch.logsumexp(log_w + log_g, dim=-1)


class DensityBlock(nn.Module):
    """`num_layers` Mixture-DAAM layers, each inside a skip connection: x = layer(x) + x (the layers' own
    `skip=True` form, fused where it can be).

    With a mask, padded positions are left unchanged by every layer (no doubling through the skip).
    `return_gate=True` also returns the last layer's mixture map.
    """

    def __init__(self, num_layers: int, num_heads: int, num_gaussians: int, norm_axis: int = 1,
                 init_c: float = 2.0, combine: str = "product"):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.layers = nn.ModuleList(
            MixtureDensityAdaptiveAttention(num_heads, num_gaussians, norm_axis, init_c, combine, skip=True)
            for _ in range(num_layers)
        )

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, return_gate: bool = False):
        gate = None
        for layer in self.layers:
            x, gate = layer(x, mask=mask, return_gate=True)
        return (x, gate) if return_gate else x
