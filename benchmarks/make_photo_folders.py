"""Build the real-photograph folders of the README's `vqvae compare` study from photos that ship inside
installed Python packages (none of them in scikit-image, so none in `--data samples`).

    python benchmarks/make_photo_folders.py OUT [--tile 64]   # writes OUT/train/*.png and OUT/heldout/*.png

Training photos: scikit-learn's china.jpg and flower.jpg, matplotlib's grace_hopper.jpg, Gradio's
cheetah.jpg and tower.jpg. Held-out photos (never trained on): Gradio's lion.jpg and cheetah1.jpg, cut into
non-overlapping `--tile`-sized squares (the training crop size) so the evaluation has many images. Every photo is first resized so its shorter
side is 256 px, like the built-in samples. Needs scikit-learn, matplotlib and Gradio (the `[demo]` extra).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

SHORTER_SIDE = 256


def _package_file(package: str, *parts: str) -> Path:
    module = __import__(package)
    return Path(module.__file__).parent.joinpath(*parts)


def _photos() -> tuple[list[Path], list[Path]]:
    train = [
        _package_file("sklearn", "datasets", "images", "china.jpg"),
        _package_file("sklearn", "datasets", "images", "flower.jpg"),
        _package_file("matplotlib", "mpl-data", "sample_data", "grace_hopper.jpg"),
        _package_file("gradio", "media_assets", "images", "cheetah.jpg"),
        _package_file("gradio", "media_assets", "images", "tower.jpg"),
    ]
    held_out = [
        _package_file("gradio", "media_assets", "images", "lion.jpg"),
        _package_file("gradio", "media_assets", "images", "cheetah1.jpg"),
    ]
    return train, held_out


def _resized(path: Path) -> Image.Image:
    image = Image.open(path).convert("RGB")
    scale = SHORTER_SIDE / min(image.size)
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--tile", type=int, default=64, help="held-out tile size in pixels (default 64)")
    args = parser.parse_args()
    train, held_out = _photos()
    (args.out / "train").mkdir(parents=True, exist_ok=True)
    (args.out / "heldout").mkdir(parents=True, exist_ok=True)
    for path in train:
        _resized(path).save(args.out / "train" / f"{path.stem}.png")
    tiles = 0
    for path in held_out:
        image = _resized(path)
        for top in range(0, image.height - args.tile + 1, args.tile):
            for left in range(0, image.width - args.tile + 1, args.tile):
                image.crop((left, top, left + args.tile, top + args.tile)).save(args.out / "heldout" / f"{path.stem}_{top}_{left}.png")
                tiles += 1
    print(f"{len(train)} training photos in {args.out / 'train'}, {tiles} held-out tiles in {args.out / 'heldout'}")


if __name__ == "__main__":
    main()
