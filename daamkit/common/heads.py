"""Multi-head plumbing shared by both DAAM mechanisms.

A "head" owns a contiguous chunk of the norm axis (the remainder goes to the last head, as in the
authors' library). When the axis divides evenly the chunks become one extra tensor axis
(`unflatten`), so every head is computed in one batched expression; otherwise each head is computed on
its own chunk with the same code and the results are concatenated.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor

# fn(x_grouped, mask_grouped, head_slice) -> a tensor shaped like x_grouped (a gate), or a tuple of them (the
# fused skip form's output and gate). In x_grouped the head axis sits at the norm axis and the positions of
# one head at norm axis + 1.
GroupFn = Callable[[Tensor, Optional[Tensor], slice], Union[Tensor, tuple[Tensor, ...]]]


def normalize_axis(axis: int, ndim: int, name: str) -> int:
    """`axis` as a non-negative index, or ValueError in plain words."""
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}={axis} is out of range for a {ndim}-dimensional input")
    return axis % ndim


def check_heads(size: int, num_heads: int, axis: int) -> None:
    """Every head needs at least one position of the norm axis."""
    if size < num_heads:
        raise ValueError(
            f"the norm axis (dim {axis}) has {size} positions, fewer than the {num_heads} heads; "
            "use fewer heads or another norm axis"
        )


# On CPU, eager elementwise ops that broadcast per-head statistics along a short innermost head axis lose
# vectorisation: for heads narrower than this a contiguous copy of a channels-last input is faster than the
# no-copy view, for heads this wide or wider the view is (measured with 4 to 128 channels per head;
# `benchmarks/bench_daam.py --channels-last` shows the 32-channel case).
CPU_MIN_VIEW_HEAD = 32


def reduction_layout(x: Tensor, axis: int, num_heads: int) -> tuple[Tensor, int, Callable[[Tensor], Tensor]]:
    """x as the gates compute it: `(view, norm_axis_in_view, restore)`, where `restore` maps a result of
    the view's shape back to x's shape and layout.

    When the norm axis is innermost in memory (channels-last NCHW for norm_axis=1) the view moves it last:
    no copy, every head is a contiguous run, the per-head reductions and the softmax are last-axis
    kernels, and results come back channels-last. On CPU with heads narrower than `CPU_MIN_VIEW_HEAD`,
    and for other non-contiguous inputs, the gates run on a contiguous copy instead.
    """
    last = x.dim() - 1
    wide_enough = x.device.type != "cpu" or x.shape[axis] // num_heads >= CPU_MIN_VIEW_HEAD
    if axis != last and x.stride(axis) == 1 and wide_enough:
        moved = x.movedim(axis, last)
        if moved.is_contiguous():
            return moved, last, lambda t: t.movedim(last, axis)
    return x.contiguous(), axis, lambda t: t


def moved_axis(index: int, axis: int, view_axis: int) -> int:
    """Where dimension `index` (not the norm axis) of x sits in the `reduction_layout` view."""
    if view_axis == axis or index < axis:
        return index
    return index - 1


def prepare_mask(mask: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
    """The padding mask as a bool tensor of x's full shape (True = valid), or None."""
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True = valid), got {mask.dtype}")
    try:
        return mask.expand(x.shape)
    except RuntimeError as err:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to input {tuple(x.shape)}") from err


def head_sizes(size: int, num_heads: int) -> list[int]:
    """How `num_heads` heads split an axis of `size`: equal contiguous chunks, the last taking the remainder."""
    base = size // num_heads
    return [base] * (num_heads - 1) + [size - base * (num_heads - 1)]


def apply_per_head(x: Tensor, mask: Optional[Tensor], axis: int, num_heads: int,
                   fn: GroupFn) -> Union[Tensor, tuple[Tensor, ...]]:
    """Run `fn` on the head-grouped view of `x` and return its result (each tensor of it) in x's own layout."""
    size = x.shape[axis]
    if size % num_heads == 0:
        grouped = x.unflatten(axis, (num_heads, size // num_heads))
        grouped_mask = None if mask is None else mask.unflatten(axis, (num_heads, size // num_heads))
        result = fn(grouped, grouped_mask, slice(0, num_heads))
        if isinstance(result, tuple):
            return tuple(t.flatten(axis, axis + 1) for t in result)
        return result.flatten(axis, axis + 1)
    lengths = head_sizes(size, num_heads)
    x_chunks = x.split(lengths, dim=axis)
    mask_chunks = [None] * num_heads if mask is None else mask.split(lengths, dim=axis)
    results = [fn(chunk.unsqueeze(axis), None if m is None else m.unsqueeze(axis), slice(h, h + 1))
               for h, (chunk, m) in enumerate(zip(x_chunks, mask_chunks))]
    if isinstance(results[0], tuple):
        return tuple(torch.cat([r[k].squeeze(axis) for r in results], dim=axis) for k in range(len(results[0])))
    return torch.cat([r.squeeze(axis) for r in results], dim=axis)


def head_view(param: Tensor, ndim: int, head_axis: int, feature_axis: Optional[int] = None) -> Tensor:
    """Reshape a `(heads,)` or `(heads, features)` parameter to broadcast against a grouped tensor."""
    shape = [1] * ndim
    shape[head_axis] = param.shape[0]
    if feature_axis is None:
        return param.reshape(shape)
    shape[feature_axis] = param.shape[1]
    if feature_axis < head_axis:
        param = param.t()
    return param.reshape(shape)


def masked_mean(x: Tensor, mask: Optional[Tensor], dim: int) -> tuple[Tensor, Tensor | float]:
    """Mean over `dim` counting only valid positions, and the number of valid positions (keepdim tensor,
    or a plain float without a mask)."""
    if mask is None:
        return x.mean(dim, keepdim=True), float(x.shape[dim])
    weights = mask.to(x.dtype)
    count = weights.sum(dim, keepdim=True)
    return (x * weights).sum(dim, keepdim=True) / count.clamp_min(1.0), count


def stats_dtype(x: Tensor) -> torch.dtype:
    """float32 for half-precision inputs (also under autocast), the input's own dtype when wider."""
    return torch.promote_types(x.dtype, torch.float32)


def finish_gate(x: Tensor, gate: Tensor, mask: Optional[Tensor], skip: bool = False) -> tuple[Tensor, Tensor]:
    """Apply `gate` to x in the statistics dtype, `x * gate` (with `skip`, `x + x * gate`), and let padded
    positions pass through unchanged (gate 1, output x)."""
    if mask is not None:
        gate = torch.where(mask, gate, torch.ones_like(gate))
    wide = x.to(gate.dtype)
    out = wide * gate
    if skip:
        out = out + wide if mask is None else torch.where(mask, out + wide, wide)
    return out.to(x.dtype), gate
