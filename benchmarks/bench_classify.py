"""Classifier-suite throughput: feature extraction batched vs one item at a time, and DAT decoder training
from the on-disk feature cache vs the same passes on tensors already in memory.

(a) `extract_features` on an image-folder dataset with a tiny random BEiT (saved with `save_pretrained`
    into a temp dir), `--extract-batch` items per batch vs batch size 1 (the whole pipeline, including the
    per-batch commit to the cache), and the encoder's forward alone on the same images. Target: >= 5x.
(b) One epoch of DAT decoder training (`daam-v1`, forward + backward + AdamW) on `(24, 1024)` items read
    through `FeatureBatches` from a memory-mapped float16 cache on disk, vs the identical batches held as
    float32 tensors in memory. Target: disk epoch <= 1.1x the in-memory one. The achieved GFLOP/s counts
    the conv head and classifier, 3x the forward FLOPs for forward + backward (~1.4 GFLOP per item).

Ratios are measured in one run (the machines are noisy); each epoch variant runs `--repeats` times,
interleaved in alternating order, and the fastest is kept; (b) runs at each `--threads` count. Run: `python benchmarks/bench_classify.py [--quick]`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from daamkit.classify.batches import FeatureBatches
from daamkit.classify.decoders import CONV_CHANNELS, build_decoder, decoder_config
from daamkit.classify.feature_cache import FeatureCache, FeatureCacheWriter
from daamkit.infra.progress import set_quiet


def tiny_beit(folder: Path) -> Path:
    """A 4-layer random BEiT on 32x32 images (the extraction benchmark's encoder)."""
    from transformers import BeitConfig, BeitImageProcessor, BeitModel

    torch.manual_seed(0)
    config = BeitConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=128)
    BeitModel(config).save_pretrained(folder)
    BeitImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False).save_pretrained(folder)
    return folder


def image_folder(root: Path, per_class: int) -> Path:
    """`root/{train,test}/<class>/*.png` with random 32x32 images, two classes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("test", 1)):
        for name in ("cat", "dog"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def bench_extraction(work: Path, per_class: int, batch_size: int) -> None:
    from daamkit.classify.encoders import FrozenEncoder
    from daamkit.classify.extract import extract_features

    encoder = FrozenEncoder.from_pretrained(str(tiny_beit(work / "beit")), device="cpu")
    data = image_folder(work / "images", per_class)
    rates, forward_rates = {}, {}
    from PIL import Image

    images = [Image.open(path).convert("RGB") for path in sorted((data / "train").rglob("*.png"))]
    for size in (1, batch_size):
        summary = extract_features("image-folder", data, encoder, work / f"cache-b{size}", batch_size=size)
        train = summary["splits"]["train"]
        rates[size] = train["num_items"] / train["seconds"]
        start = time.perf_counter()
        for first in range(0, len(images), size):
            encoder.encode(images[first : first + size])
        forward_rates[size] = len(images) / (time.perf_counter() - start)
    for label, measured in (("extract_features (read, encode, commit to cache)", rates),
                            ("encoder.encode only (in-memory images)", forward_rates)):
        print(f"(a) {label}, tiny BEiT, {len(images)} images: batch 1 {measured[1]:.1f} items/s, "
              f"batch {batch_size} {measured[batch_size]:.1f} items/s -> "
              f"{measured[batch_size] / measured[1]:.2f}x (target >= 5x)")


def head_flops_per_item(layers: int, hidden: int, classes: int, height: int, width: int) -> float:
    """Forward+backward FLOPs of the conv head and classifier for one item (3x the forward FLOPs)."""
    conv = 2 * (2 * layers * CONV_CHANNELS * 9 * height * width)  # two 3x3 convs, 2 FLOPs per MAC
    linear = 2 * layers * hidden * classes
    return 3.0 * (conv + linear)


def write_cache(folder: Path, items: int, layers: int, hidden: int, classes: int) -> FeatureCache:
    rng = np.random.default_rng(0)
    fields = {"task": "bench", "encoder": "random", "encoder_config_hash": "0", "compute_dtype": "float32",
              "layers": list(range(1, layers + 1)), "hidden_size": hidden,
              "classes": [f"c{i}" for i in range(classes)], "fingerprint": "bench", "grouping": None}
    writer = FeatureCacheWriter(folder, fields, "train", items, layers, hidden)
    for start in range(0, items, 64):
        count = min(64, items - start)
        writer.write(start, rng.normal(size=(count, layers, hidden)).astype(np.float32),
                     rng.integers(0, classes, count), [{"id": str(start + i)} for i in range(count)])
    writer.finish()
    return FeatureCache.open(folder)


def bench_training(work: Path, items: int, batch_size: int, repeats: int, thread_counts: list[int]) -> None:
    layers, hidden, classes = 24, 1024, 4
    split = write_cache(work / "features", items, layers, hidden, classes).split("train")
    torch.manual_seed(0)
    model = build_decoder(decoder_config("daam-v1", layers, hidden, classes))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    disk = FeatureBatches(split.features, split.labels, np.arange(items), batch_size, seed=0)
    in_memory = [(x.clone(), y.clone()) for x, y, _ in disk]

    def step(x, y):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def epoch(batches) -> float:
        start = time.perf_counter()
        for batch in batches:
            step(batch[0], batch[1])
        return time.perf_counter() - start

    step(*in_memory[0])  # warm-up (allocator, kernels)
    variants = {"disk": disk, "memory": in_memory}
    for threads in thread_counts:
        torch.set_num_threads(threads)
        times = {"disk": [], "memory": []}
        for repeat in range(repeats):  # interleaved, alternating order, fastest kept: the machine is noisy
            for name in (("disk", "memory") if repeat % 2 == 0 else ("memory", "disk")):
                times[name].append(epoch(variants[name]))
        disk_s, memory_s = min(times["disk"]), min(times["memory"])
        flops = head_flops_per_item(layers, hidden, classes, *model.grid) * items
        print(f"(b) daam-v1 training epoch, {items} cached (24, 1024) items, batch {batch_size}, {threads} torch "
              f"thread(s): disk cache {disk_s:.2f} s, in memory {memory_s:.2f} s -> {disk_s / memory_s:.3f}x "
              "(target <= 1.1x)")
        print(f"    conv head + classifier {flops / items / 1e9:.2f} GFLOP per item fwd+bwd; achieved "
              f"{flops / disk_s / 1e9:.1f} GFLOP/s from disk, {flops / memory_s / 1e9:.1f} GFLOP/s in memory")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer items (smoke run)")
    parser.add_argument("--items", type=int, default=256, help="cached items per training epoch")
    parser.add_argument("--images", type=int, default=256, help="images to extract")
    parser.add_argument("--extract-batch", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32, help="decoder training batch")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-extraction", action="store_true")
    parser.add_argument("--threads", default=f"1,{torch.get_num_threads()}",
                        help="comma-separated torch thread counts for (b); on a busy 2-core machine two contended "
                             "threads time erratically, one thread is the stable reference")
    args = parser.parse_args()
    if args.quick:
        args.items, args.images, args.repeats = 64, 64, 2
    set_quiet(True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not args.skip_extraction:
            bench_extraction(work, args.images // 2, args.extract_batch)
        threads = sorted({int(t) for t in args.threads.split(",")})
        bench_training(work, args.items, args.batch_size, args.repeats, threads)


if __name__ == "__main__":
    main()
