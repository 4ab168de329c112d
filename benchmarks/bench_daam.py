"""Forward+backward speed of the DAAM modules vs normalisation layers and loop implementations.

Prints ratios measured in one run (this machine is noisy, so absolute times matter less than ratios):
  * Mixture-DAAM (8 heads x 4 Gaussians, channel axis) on (32, 256, 32, 32) vs nn.GroupNorm(8, 256)
    and vs a loop over heads and Gaussians with the literal product of Gaussians (the authors' style);
  * Algorithm 1 (8 heads, layer axis) on (64, 24, 1024) vs nn.LayerNorm(1024) and vs a loop over heads;
each eager and under torch.compile. Run: `python benchmarks/bench_daam.py [--quick] [--repeats N]`.
`--channels-last` gives the image benchmarks channels-last input (Mixture-DAAM then runs on its no-copy
view, 32-channel heads) and adds, eager, the same module forced onto a contiguous copy.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from torch import nn

from daamkit.common import DensityAdaptiveAttention, MixtureDensityAdaptiveAttention
from daamkit.common import heads


class LoopMixture(nn.Module):
    """Mixture-DAAM the direct way: Python loops over heads and Gaussians, product of densities."""

    def __init__(self, num_heads: int, num_gaussians: int, norm_axis: int = 1, eps: float = 1e-8):
        super().__init__()
        self.num_heads, self.num_gaussians, self.norm_axis, self.eps = num_heads, num_gaussians, norm_axis, eps
        self.mean_offset = nn.Parameter(torch.zeros(num_heads, num_gaussians))
        self.c = nn.Parameter(torch.full((num_heads, num_gaussians), 2.0))

    def forward(self, x):
        outputs = []
        for h, chunk in enumerate(x.chunk(self.num_heads, dim=self.norm_axis)):
            mean = chunk.mean(self.norm_axis, keepdim=True)
            std = (chunk.var(self.norm_axis, keepdim=True) + self.eps).sqrt()
            density = torch.ones_like(chunk)
            for i in range(self.num_gaussians):
                y = (chunk - (mean + self.mean_offset[h, i])) / std
                c_sq = self.c[h, i] ** 2
                density = density * torch.exp(-y ** 2 / (2 * c_sq)) / torch.sqrt(2 * math.pi * c_sq)
            density = density / density.sum(self.norm_axis, keepdim=True)
            outputs.append(chunk * density)
        return torch.cat(outputs, dim=self.norm_axis)


class LoopDensityAttention(nn.Module):
    """Algorithm 1 the direct way: a Python loop over heads, features on the last axis."""

    def __init__(self, num_heads: int, num_features: int, norm_axis: int = 1):
        super().__init__()
        self.num_heads, self.norm_axis = num_heads, norm_axis
        self.mean_offset = nn.Parameter(torch.zeros(num_heads, num_features))
        self.c = nn.Parameter(torch.full((num_heads, num_features), 2.0))

    def forward(self, x):
        outputs = []
        for h, chunk in enumerate(x.chunk(self.num_heads, dim=self.norm_axis)):
            mean = chunk.mean(self.norm_axis, keepdim=True)
            var = ((chunk ** 2).mean(self.norm_axis, keepdim=True) - mean ** 2).abs() + 1e-8
            z = (chunk - (mean + self.mean_offset[h])) / torch.sqrt(var + 1e-5)
            outputs.append(chunk * torch.exp(-z ** 2 / (2 * self.c[h])))
        return torch.cat(outputs, dim=self.norm_axis)


class ContiguousCopy(nn.Module):
    """A DAAM module forced to run on a contiguous copy of its input, whatever its head width."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x):
        saved, heads.CPU_MIN_VIEW_HEAD = heads.CPU_MIN_VIEW_HEAD, 10**9
        try:
            return self.module(x)
        finally:
            heads.CPU_MIN_VIEW_HEAD = saved


def fwd_bwd_seconds(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    """Seconds of one forward+backward pass."""
    x.grad = None
    module.zero_grad(set_to_none=True)
    start = time.perf_counter()
    module(x).backward(grad)
    return time.perf_counter() - start


def compare(title: str, shape: tuple[int, ...], candidates: dict[str, nn.Module], repeats: int,
            layout: torch.memory_format = torch.contiguous_format) -> dict[str, float]:
    """Median fwd+bwd time of every candidate on the same tensor (in `layout`), printed with ratios to
    'daamkit'.

    Candidates run round-robin (two warm-up rounds, which also compile), so a change in machine load
    during the run hits all of them alike.
    """
    torch.manual_seed(0)
    x = torch.randn(shape).contiguous(memory_format=layout).requires_grad_()
    grad = torch.randn(shape).contiguous(memory_format=layout)
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for round_index in range(repeats + 2):
        for name, module in candidates.items():
            seconds = fwd_bwd_seconds(module, x, grad)
            if round_index >= 2:
                samples[name].append(seconds)
    times = {name: statistics.median(values) for name, values in samples.items()}
    ours = times["daamkit"]
    print(f"\n{title}  input {tuple(shape)}")
    for name, seconds in times.items():
        print(f"  {name:<28} {seconds * 1e3:9.1f} ms   daamkit / this = {ours / seconds:6.2f}x")
    return times


def compiled(module: nn.Module) -> nn.Module:
    """torch.compile with fullgraph=True, so a graph break is an error rather than a silent slowdown."""
    torch._dynamo.reset()
    return torch.compile(module, fullgraph=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller tensors (smoke run)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--channels-last", action="store_true", help="channels-last input for the image benchmarks")
    args = parser.parse_args()
    image_shape = (4, 256, 16, 16) if args.quick else (32, 256, 32, 32)
    layer_shape = (8, 24, 1024) if args.quick else (64, 24, 1024)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")

    mixture, group_norm, loop_mix = MixtureDensityAdaptiveAttention(8, 4, norm_axis=1), nn.GroupNorm(8, 256), LoopMixture(8, 4)
    daam, layer_norm, loop_daam = DensityAdaptiveAttention(8, 1024, 1, -1), nn.LayerNorm(1024), LoopDensityAttention(8, 1024)
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    image_title = "channels-last" if args.channels_last else "contiguous"
    eager_mix = {"daamkit": mixture, "nn.GroupNorm(8)": group_norm, "loop heads x Gaussians": loop_mix}
    if args.channels_last:
        eager_mix["daamkit on a contiguous copy"] = ContiguousCopy(mixture)
    results = {}
    results["mix_eager"] = compare(f"Mixture-DAAM 8x4, channel axis, {image_title} input, eager", image_shape,
                                   eager_mix, args.repeats, layout)
    results["daam_eager"] = compare("DAAM Algorithm 1, 8 heads, layer axis, eager", layer_shape,
                                    {"daamkit": daam, "nn.LayerNorm(1024)": layer_norm, "loop over heads": loop_daam},
                                    args.repeats)
    if not args.no_compile:
        results["mix_compiled"] = compare(
            f"Mixture-DAAM, {image_title} input, torch.compile", image_shape,
            {"daamkit": compiled(mixture), "nn.GroupNorm(8) compiled": compiled(group_norm),
             "loop compiled": compiled(loop_mix), "loop eager": loop_mix}, args.repeats, layout)
        results["daam_compiled"] = compare(
            "DAAM Algorithm 1, torch.compile", layer_shape,
            {"daamkit": compiled(daam), "nn.LayerNorm compiled": compiled(layer_norm),
             "loop compiled": compiled(loop_daam), "loop eager": loop_daam}, args.repeats)

    print("\nSummary (targets: mixture / GroupNorm <= 6x eager, <= 3x compiled (stretch 2x); >= 10x faster than "
          "the loop; eager never slower)")
    eager = results["mix_eager"]
    print(f"  eager    mixture / GroupNorm          = {eager['daamkit'] / eager['nn.GroupNorm(8)']:.2f}x")
    if args.channels_last:
        print(f"  eager    no-copy view / copy          = {eager['daamkit'] / eager['daamkit on a contiguous copy']:.2f}x")
    print(f"  eager    loop / mixture (speed-up)    = {eager['loop heads x Gaussians'] / eager['daamkit']:.2f}x")
    d_eager = results["daam_eager"]
    print(f"  eager    DAAM / LayerNorm             = {d_eager['daamkit'] / d_eager['nn.LayerNorm(1024)']:.2f}x")
    print(f"  eager    loop / DAAM (speed-up)       = {d_eager['loop over heads'] / d_eager['daamkit']:.2f}x")
    if not args.no_compile:
        comp = results["mix_compiled"]
        print(f"  compiled mixture / GroupNorm compiled = {comp['daamkit'] / comp['nn.GroupNorm(8) compiled']:.2f}x")
        print(f"  compiled mixture / GroupNorm eager    = {comp['daamkit'] / eager['nn.GroupNorm(8)']:.2f}x")
        print(f"  loop eager / compiled mixture         = {comp['loop eager'] / comp['daamkit']:.2f}x")
        print(f"  loop compiled / compiled mixture      = {comp['loop compiled'] / comp['daamkit']:.2f}x")
        d_comp = results["daam_compiled"]
        print(f"  compiled DAAM / LayerNorm compiled    = {d_comp['daamkit'] / d_comp['nn.LayerNorm compiled']:.2f}x")
        print(f"  loop eager / compiled DAAM            = {d_comp['loop eager'] / d_comp['daamkit']:.2f}x")


if __name__ == "__main__":
    main()
