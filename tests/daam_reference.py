"""Direct, loop-based implementations of the paper's DAAM formulas, used only as test oracles.

They loop over every row of the norm axis, every head and every Gaussian, and take the product of
Gaussians literally (float64), so they share no code or algebra with the library.
"""

from __future__ import annotations

import itertools
import math

import torch


def _rows(x, mask, axis):
    """Yield (index, values, valid) for every 1-D line of x along `axis` (index into the moved layout)."""
    moved = x.movedim(axis, -1)
    moved_mask = torch.ones_like(moved, dtype=torch.bool) if mask is None else mask.expand(x.shape).movedim(axis, -1)
    for index in itertools.product(*(range(s) for s in moved.shape[:-1])):
        yield index, moved[index], moved_mask[index]


def _head_bounds(size, num_heads):
    base = size // num_heads
    bounds = [(h * base, (h + 1) * base) for h in range(num_heads - 1)]
    bounds.append(((num_heads - 1) * base, size))
    return bounds


def daam_reference(x, mean_offset, c, norm_axis, feature_axis, mask=None):
    """Algorithm 1, one line and one head at a time. Returns (out, gate) in float64."""
    x = x.double()
    ndim = x.dim()
    axis, feat = norm_axis % ndim, feature_axis % ndim
    moved_feat = feat if feat < axis else feat - 1  # position of the feature axis among the non-norm axes
    out_moved = x.movedim(axis, -1).clone()
    gate_moved = torch.ones_like(out_moved)
    for index, values, valid in _rows(x, mask, axis):
        f = index[moved_feat]
        for h, (start, stop) in enumerate(_head_bounds(values.numel(), mean_offset.shape[0])):
            seg, ok = values[start:stop], valid[start:stop]
            picked = seg[ok]
            mu = picked.mean()
            var = abs((picked ** 2).mean() - mu ** 2) + 1e-8
            for j in range(start, stop):
                if not valid[j]:
                    continue
                z = (values[j] - (mu + mean_offset[h, f].double())) / math.sqrt(var + 1e-5)
                g = torch.exp(-z ** 2 / (2 * c[h, f].double()))
                gate_moved[index + (j,)] = g
                out_moved[index + (j,)] = values[j] * g
    return out_moved.movedim(-1, axis), gate_moved.movedim(-1, axis)


def mixture_reference(x, mean_offset, c, norm_axis, mask=None, mixture_logits=None):
    """Algorithm 2 with a literal product (or weighted sum) of Gaussians. Returns (out, gate) in float64."""
    x = x.double()
    axis = norm_axis % x.dim()
    out_moved = x.movedim(axis, -1).clone()
    gate_moved = torch.ones_like(out_moved)
    for index, values, valid in _rows(x, mask, axis):
        for h, (start, stop) in enumerate(_head_bounds(values.numel(), mean_offset.shape[0])):
            positions = [j for j in range(start, stop) if valid[j]]
            picked = values[positions]
            mu = picked.mean()
            var = (picked.var(unbiased=True) if len(positions) > 1 else torch.zeros((), dtype=torch.float64)) + 1e-8
            densities = []
            for j in positions:
                terms = []
                for i in range(mean_offset.shape[1]):
                    ci = c[h, i].double()
                    z = (values[j] - (mu + mean_offset[h, i].double())) / torch.sqrt(var)
                    terms.append(torch.exp(-z ** 2 / (2 * ci ** 2)) / torch.sqrt(2 * math.pi * ci ** 2))
                if mixture_logits is None:
                    density = torch.prod(torch.stack(terms))
                else:
                    weights = torch.softmax(mixture_logits[h].double(), 0)
                    density = (weights * torch.stack(terms)).sum()
                densities.append(density)
            total = torch.stack(densities).sum()
            for j, density in zip(positions, densities):
                gate_moved[index + (j,)] = density / total
                out_moved[index + (j,)] = values[j] * density / total
    return out_moved.movedim(-1, axis), gate_moved.movedim(-1, axis)
