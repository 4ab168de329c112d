"""VQ-VAE benchmark: train-step time with Mixture-DAAM vs `--attention none`, the cost of the recipe's
LPIPS and GAN, and quantizer search memory.

Prints ratios measured in one run (the machines are noisy, so DAAM and none steps are interleaved):

    python benchmarks/bench_vqvae.py                       # default CPU training config
    python benchmarks/bench_vqvae.py --glibc-defaults      # the same without `vqvae train`'s CPU allocator setting
    python benchmarks/bench_vqvae.py --base-channels 128 --image-size 128 --batch-size 8

The recipe ratios time `vqvae train`'s own step (the Trainer of a dry run, no data) with LPIPS (random
trunk, same cost as the real one) or the PatchGAN (adaptive weight + discriminator update) on, against
the plain step, interleaved (`--skip-recipe` leaves them out).

Targets: DAAM adds <= 25% to the train step at the default config and <= 10% at `--base-channels 128`; the nearest-code search for 65,536 vectors x 16,384 codes
stays under 1 GiB. The search is measured in a fresh subprocess, above the inputs already allocated: on
CPU the peak resident set size sampled every 0.5 ms from /proc/self/statm, on a GPU
torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from daamkit.infra.cpu_memory import reuse_freed_memory
from daamkit.vqvae.config import VQVAEConfig
from daamkit.vqvae.model import VQVAE
from daamkit.vqvae.quantizer import nearest_codes


def _step_fn(config: VQVAEConfig, images: torch.Tensor, compile_model: bool = False):
    """A full training step (forward, L1 + VQ loss, backward, AdamW) of a fresh model for `config`."""
    torch.manual_seed(0)
    model = VQVAE(config).to(images.device).train()
    if compile_model:  # exactly as `vqvae train --compile`: encoder and decoder, not the quantizer
        model.encoder.compile()
        model.decoder.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        out = model(images)
        loss = F.l1_loss(out.reconstruction, images) + out.quant.loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def _timed(step, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_train_step(args, device: torch.device) -> dict:
    images = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device) * 2 - 1
    common = dict(base_channels=args.base_channels, num_downsamples=args.num_downsamples,
                  embedding_dim=args.embedding_dim, num_embeddings=args.num_embeddings)
    steps = {name: _step_fn(VQVAEConfig(**common, attention=name), images, args.compile) for name in ("daam", "none")}
    for step in steps.values():  # warm-up (allocator, codebook initialisation, kernels)
        for _ in range(2):
            step()
    times = {name: [] for name in steps}
    for _ in range(args.steps):
        for name, step in steps.items():
            times[name].append(_timed(step, device))
    daam, none = statistics.median(times["daam"]), statistics.median(times["none"])
    return {"config": {**common, "image_size": args.image_size, "batch_size": args.batch_size, "compile": args.compile},
            "daam_step_s": daam, "none_step_s": none, "daam_overhead_pct": 100 * (daam / none - 1)}


class _RssSampler:
    """Samples this process's resident set size every `interval` s in a thread; `.peak` in bytes."""

    def __init__(self, interval: float = 0.0005):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self) -> "_RssSampler":
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def _search_child(vectors: int, codes: int, dim: int, device: str) -> dict:
    """Runs in a fresh process: peak memory growth of one nearest-code search over fresh inputs."""
    torch.manual_seed(0)
    z = torch.randn(vectors, dim, device=device)
    codebook = torch.randn(codes, dim, device=device)
    start = time.perf_counter()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.max_memory_allocated()
        indices = nearest_codes(z, codebook)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        sampler = _RssSampler()
        before = sampler.rss()
        with sampler:
            indices = nearest_codes(z, codebook)
        peak = sampler.peak - before
    seconds = time.perf_counter() - start
    sample = torch.randint(0, vectors, (256,))
    exact = torch.cdist(z[sample].double(), codebook.double()).argmin(1).to(indices.device)
    return {"peak_extra_bytes": peak, "seconds": seconds, "matches_exact_on_sample": bool((exact == indices[sample]).all()),
            "full_distance_matrix_bytes": vectors * codes * 4}


def bench_search(args, device: torch.device) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
            f"from bench_vqvae import _search_child; "
            f"print(json.dumps(_search_child({args.search_vectors}, {args.search_codes}, {args.embedding_dim}, '{device.type}')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(vectors=args.search_vectors, codes=args.search_codes, dim=args.embedding_dim)
    return result


def bench_recipe(args) -> dict:
    """Median step seconds of `vqvae train`'s step: plain, + LPIPS (random trunk), + PatchGAN, interleaved."""
    from daamkit.vqvae.config import TrainConfig
    from daamkit.vqvae.train import Trainer

    model = VQVAEConfig(base_channels=args.base_channels, num_downsamples=args.num_downsamples,
                        embedding_dim=args.embedding_dim, num_embeddings=args.num_embeddings)
    base = TrainConfig(image_size=args.image_size, batch_size=args.batch_size, lpips_net=args.lpips_net)
    variants = {"plain": base, "lpips": base.replace(perceptual_weight=1.0),
                "gan": base.replace(disc_weight=0.5, disc_start=0)}
    trainers = {name: Trainer(model, config, Path("."), resume=False, dry_run=True) for name, config in variants.items()}
    device = trainers["plain"].accelerator.device
    images = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device) * 2 - 1
    for trainer in trainers.values():  # warm-up
        trainer.timed_step(images)
    times = {name: [] for name in trainers}
    for _ in range(args.recipe_steps):
        for name, trainer in trainers.items():
            times[name].append(trainer.timed_step(images))
    median = {name: statistics.median(values) for name, values in times.items()}
    return {"step_s": median, "lpips_ratio": median["lpips"] / median["plain"], "gan_ratio": median["gan"] / median["plain"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--base-channels", type=int, default=VQVAEConfig.base_channels)
    parser.add_argument("--num-downsamples", type=int, default=VQVAEConfig.num_downsamples)
    parser.add_argument("--embedding-dim", type=int, default=VQVAEConfig.embedding_dim)
    parser.add_argument("--num-embeddings", type=int, default=VQVAEConfig.num_embeddings)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--search-vectors", type=int, default=65_536)
    parser.add_argument("--search-codes", type=int, default=16_384)
    parser.add_argument("--skip-search", action="store_true")
    parser.add_argument("--skip-recipe", action="store_true", help="leave out the LPIPS / GAN step ratios")
    parser.add_argument("--recipe-steps", type=int, default=5, help="timed steps per recipe variant")
    parser.add_argument("--lpips-net", default="vgg", choices=("vgg", "alex"), help="LPIPS trunk of the recipe ratio")
    parser.add_argument("--compile", action="store_true", help="torch.compile encoder and decoder (both variants)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--glibc-defaults", action="store_true",
                        help="on CPU, keep glibc's allocator defaults instead of `vqvae train`'s reuse of freed memory "
                             "(implies --skip-recipe: its Trainer would switch to the reuse)")
    args = parser.parse_args()
    device = torch.device(args.device)
    allocator = "device (caching allocator)"
    if device.type == "cpu":
        reused = not args.glibc_defaults and reuse_freed_memory()
        allocator = "freed memory reused, as `vqvae train` on CPU" if reused else "glibc defaults"
        args.skip_recipe = args.skip_recipe or args.glibc_defaults

    step = bench_train_step(args, device)
    print(f"device {device}, threads {torch.get_num_threads()}, allocator: {allocator}, config {step['config']}")
    print(f"train step: daam {step['daam_step_s'] * 1e3:.1f} ms, none {step['none_step_s'] * 1e3:.1f} ms, "
          f"DAAM adds {step['daam_overhead_pct']:+.1f}% (target <= 25% at the default config, <= 10% at base 128)")
    if not args.skip_recipe:
        recipe = bench_recipe(args)
        ms = {name: seconds * 1e3 for name, seconds in recipe["step_s"].items()}
        print(f"recipe (vqvae train step): plain {ms['plain']:.1f} ms, + LPIPS-{args.lpips_net} {ms['lpips']:.1f} ms "
              f"(x{recipe['lpips_ratio']:.2f}), + PatchGAN {ms['gan']:.1f} ms (x{recipe['gan_ratio']:.2f})")
    if not args.skip_search:
        search = bench_search(args, device)
        print(f"quantizer search {search['vectors']:,} x {search['codes']:,} codes (dim {search['dim']}): "
              f"peak extra memory {search['peak_extra_bytes'] / 2**20:.1f} MiB (target < 1024 MiB; the full "
              f"distance matrix would be {search['full_distance_matrix_bytes'] / 2**20:.0f} MiB), "
              f"{search['seconds']:.2f} s, matches exact search on a sample: {search['matches_exact_on_sample']}")


if __name__ == "__main__":
    main()
