"""Image data for the VQ-VAE: built-in scikit-image photos, any image folder, or the COCO 2017 layout.

Training batches are a pure function of (seed, step, rank): `StepBatchSampler` picks items from a
per-epoch permutation and every random crop/flip is seeded by the sample's global position, so a resumed
run sees exactly the batches an uninterrupted run would, whatever the number of loader workers.
Images are float tensors in [-1, 1]. Unreadable files are skipped, counted and reported, never fatal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from daamkit.infra.checkpoint import atomic_write_bytes
from daamkit.infra.errors import DaamkitError
from daamkit.infra.images import LOAD_ERRORS, ScanResult, read_rgb, scan_images, unreadable_reason
from daamkit.infra.progress import log

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# Colour photographs bundled inside scikit-image (no download); loaders that fail are skipped.
SAMPLE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
                 "retina", "stereo_motorcycle")
HELD_OUT_FRACTION = 0.25   # bottom quarter of every sample photo is reserved for validation crops
FOLDER_HOLDOUT_EVERY = 20  # every 20th file of a plain folder is held out for validation
LARGE_FOLDER = 1000        # `resize_mode` auto: folders of at least this many images are resized, then cropped


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 HWC RGB -> float CHW in [-1, 1]."""
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [B, C, H, W] (or [C, H, W]) in [-1, 1] -> uint8 [..., H, W, C]."""
    images = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).cpu()
    return images.movedim(-3, -1).numpy()


def read_skipped_list(path: str | Path) -> dict[str, str]:
    """File -> reason from a list written by `write_skipped_list` (empty when there is none)."""
    path = Path(path)
    if not path.is_file():
        return {}
    pairs = (line.split("\t", 1) for line in path.read_text().splitlines() if "\t" in line)
    return {name: reason for name, reason in pairs}


def write_skipped_list(path: str | Path, skipped: Sequence[tuple[str | Path, str]]) -> None:
    """Write `path` with one `file<TAB>reason` line per skipped file (removes a stale list when none)."""
    if not skipped:
        Path(path).unlink(missing_ok=True)
        return
    atomic_write_bytes(path, "".join(f"{name}\t{reason}\n" for name, reason in skipped).encode())


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return image[top:top + size, left:left + size]


def random_crop_flip(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape[:2]
    top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    crop = image[top:top + size, left:left + size]
    return crop[:, ::-1] if rng.random() < 0.5 else crop


def list_images(folder: str | Path, field: str = "data") -> list[Path]:
    """Image files under `folder`, recursively, sorted; DaamkitError naming `field` when the folder is missing."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DaamkitError(f"`{field}` {folder} is a file, not a folder of images")
    if not folder.is_dir():
        raise DaamkitError(f"`{field}` folder {folder} does not exist (use `{field}` \"samples\" for the built-in photos)")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


class CropDataset(Dataset):
    """Fixed-size crops of `count` images produced by `load(i) -> uint8 HWC`.

    Keys are `(index, sample_id)` pairs from `StepBatchSampler` (random crop + flip seeded by
    (seed, sample_id)) or plain indices (deterministic center crop, for validation/evaluation). With
    `resize`, each image is first scaled (bicubic) so its shorter side equals `size` (resize-crop).
    A file that fails to decode is replaced by the next one (training: the item is `(crop, failures)`,
    failures being `(name, reason)` pairs) or returned as None (evaluation).
    """

    def __init__(self, load: Callable[[int], np.ndarray], count: int, size: int, seed: int = 0,
                 names: Sequence[str] | None = None, resize: bool = False):
        self.load, self.count, self.size, self.seed, self.resize = load, count, size, seed, resize
        self.names = list(names) if names is not None else [str(i) for i in range(count)]

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, key):
        if isinstance(key, tuple):
            index, sample_id = key
            failures = []
            for attempt in range(self.count):
                current = (index + attempt) % self.count
                try:
                    image = self.load(current)
                except LOAD_ERRORS as err:
                    failures.append((self.names[current], unreadable_reason(err)))
                    continue
                rng = np.random.default_rng((self.seed, sample_id))
                return to_tensor(random_crop_flip(self._fit(image), self.size, rng)), failures
            raise DaamkitError("no training image could be decoded")
        try:
            image = self.load(key)
        except LOAD_ERRORS:
            return None
        return to_tensor(center_crop(self._fit(image), self.size))

    def _fit(self, image: np.ndarray) -> np.ndarray:
        return _resize_shorter(image, self.size) if self.resize and min(image.shape[:2]) != self.size else image


def collate_train(batch: list[tuple[torch.Tensor, list[tuple[str, str]]]]) -> tuple[torch.Tensor, list[tuple[str, str]]]:
    """Stack the training crops of a batch; also return every `(name, reason)` of files that failed to decode."""
    return torch.stack([crop for crop, _ in batch]), [failure for _, failures in batch for failure in failures]


def collate_valid(batch: list[torch.Tensor | None]) -> tuple[torch.Tensor | None, int]:
    """Stack the decodable items of an evaluation batch; also return how many failed to decode."""
    good = [item for item in batch if item is not None]
    return (torch.stack(good) if good else None), len(batch) - len(good)


class StepBatchSampler(Sampler):
    """Endless batches of `(index, sample_id)` keys for one process, starting at `start_step`.

    Global sample position p = (step * world_size + rank) * batch_size + j; the item is the
    (p mod N)-th entry of a permutation seeded by (seed, p // N). Stateless, hence exactly resumable.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, start_step: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.start_step, self.rank, self.world_size = start_step, rank, world_size
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.num_items, generator=generator), epoch
        return self._perm

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while True:
            first = (step * self.world_size + self.rank) * self.batch_size
            keys = []
            for position in range(first, first + self.batch_size):
                epoch, offset = divmod(position, self.num_items)
                keys.append((int(self._permutation(epoch)[offset]), position))
            yield keys
            step += 1


@dataclass
class DataSplits:
    """Training crops (random) and validation/evaluation crops (deterministic) of one data source."""

    train: CropDataset
    val: CropDataset
    description: str
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # files left out by the scan, with reasons


def _resize_shorter(image: np.ndarray, shorter: int) -> np.ndarray:
    h, w = image.shape[:2]
    scale = shorter / min(h, w)
    size = (max(shorter, round(w * scale)), max(shorter, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC))


def sample_photos(image_size: int) -> list[tuple[str, np.ndarray]]:
    """The bundled scikit-image colour photos, resized so the shorter side is max(256, 4 * image_size)."""
    import skimage.data

    shorter = max(256, 4 * image_size)
    photos = []
    for name in SAMPLE_PHOTOS:
        try:
            image = getattr(skimage.data, name)()
        except Exception:  # noqa: BLE001 - a photo missing from this scikit-image build is just left out
            continue
        image = image[0] if isinstance(image, tuple) else image
        if image.ndim == 3 and image.shape[2] >= 3:
            photos.append((name, _resize_shorter(np.ascontiguousarray(image[..., :3]), shorter)))
    if not photos:
        raise DaamkitError("scikit-image ships none of the sample photos; set `data` to an image folder")
    return photos


def _sample_splits(image_size: int, seed: int) -> DataSplits:
    """Train on the top 75% of each photo; validate on non-overlapping crops of the held-out bottom strip."""
    photos = sample_photos(image_size)
    train_parts, val_crops, val_names = [], [], []
    for name, image in photos:
        cut = int(round(image.shape[0] * (1 - HELD_OUT_FRACTION)))
        train_parts.append(image[:cut])
        strip = image[image.shape[0] - image_size:]
        for left in range(0, strip.shape[1] - image_size + 1, image_size):
            val_crops.append(strip[:, left:left + image_size])
            val_names.append(f"{name}@{left}")
    train = CropDataset(_ArrayLoader(train_parts), len(train_parts), image_size, seed, [n for n, _ in photos])
    val = CropDataset(_ArrayLoader(val_crops), len(val_crops), image_size, names=val_names)
    return DataSplits(train, val, f"{len(photos)} scikit-image sample photos ({len(val_crops)} held-out crops)")


class _ArrayLoader:
    """Picklable `load(i)` over in-memory arrays (DataLoader workers may be spawned)."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays

    def __call__(self, index: int) -> np.ndarray:
        return self.arrays[index]


class _FileLoader:
    """Picklable `load(i)` that decodes the i-th file."""

    def __init__(self, files: list[Path]):
        self.files = files

    def __call__(self, index: int) -> np.ndarray:
        return read_rgb(self.files[index])


def _file_dataset(files: list[Path], image_size: int, seed: int, resize: bool) -> CropDataset:
    return CropDataset(_FileLoader(files), len(files), image_size, seed, [str(f) for f in files], resize)


def _scan_nonempty(folder: Path, image_size: int, what: str, field: str = "data") -> ScanResult:
    scan = scan_images(list_images(folder, field), what, image_size)
    if not scan.files:
        first = f"; e.g. {scan.skipped[0][0]}: {scan.skipped[0][1]}" if scan.skipped else ""
        raise DaamkitError(f"{folder} holds no readable image of at least {image_size}x{image_size} "
                           f"(looked for {', '.join(IMAGE_EXTENSIONS)} recursively{first})")
    return scan


def is_coco_root(path: Path) -> bool:
    return (path / "train2017").is_dir() or (path / "val2017").is_dir()


def uses_resize(resize_mode: str, coco: bool, num_files: int) -> bool:
    """Whether images are resized (shorter side to the crop size) before cropping: `resize-crop`, or `auto`
    on COCO and on folders of at least LARGE_FOLDER images; `crop` and the sample photos crop directly."""
    if resize_mode == "auto":
        return coco or num_files >= LARGE_FOLDER
    return resize_mode == "resize-crop"


def training_splits(data: str, image_size: int, seed: int, resize_mode: str = "auto") -> DataSplits:
    """Train and validation crops for `train`: samples, a COCO 2017 root, or an image folder."""
    if data == "samples":
        return _sample_splits(image_size, seed)
    root = Path(data).expanduser()
    if is_coco_root(root):
        if not (root / "train2017").is_dir():
            raise DaamkitError(f"COCO root {root} has no train2017/ folder to train on")
        train_scan = _scan_nonempty(root / "train2017", image_size, "train2017")
        skipped = list(train_scan.skipped)
        if (root / "val2017").is_dir():
            val_scan = _scan_nonempty(root / "val2017", image_size, "val2017")
            train_files, val_files = train_scan.files, val_scan.files
            skipped += val_scan.skipped
        else:
            train_files, val_files = _holdout(train_scan.files)
        resize = uses_resize(resize_mode, True, len(train_files))
        return DataSplits(_file_dataset(train_files, image_size, seed, resize),
                          _file_dataset(val_files, image_size, seed, resize),
                          f"COCO 2017 at {root} ({len(train_files)} train / {len(val_files)} val images"
                          f"{', resize-crop' if resize else ''})", skipped)
    scan = _scan_nonempty(root, image_size, "image")
    train_files, val_files = _holdout(scan.files)
    resize = uses_resize(resize_mode, False, len(scan.files))
    return DataSplits(_file_dataset(train_files, image_size, seed, resize), _file_dataset(val_files, image_size, seed, resize),
                      f"{root} ({len(train_files)} train / {len(val_files)} held-out images"
                      f"{', resize-crop' if resize else ''})", scan.skipped)


def _holdout(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """Every FOLDER_HOLDOUT_EVERY-th file (at least one) for validation; a single file serves both."""
    if len(files) < 2:
        return files, files
    val = files[FOLDER_HOLDOUT_EVERY - 1::FOLDER_HOLDOUT_EVERY] or files[-1:]
    held = set(val)
    return [f for f in files if f not in held], val


def evaluation_set(data: str, image_size: int, field: str = "data", resize_mode: str = "auto") -> CropDataset:
    """Center crops to evaluate on: the samples' held-out crops, COCO val2017, or every image of a folder;
    resized first (shorter side to `image_size`) as `uses_resize` decides. Errors name the argument `data`
    came from as `field`."""
    if data == "samples":
        return _sample_splits(image_size, seed=0).val
    root = Path(data).expanduser()
    coco = is_coco_root(root)
    if coco:
        if not (root / "val2017").is_dir():
            raise DaamkitError(f"COCO root {root} has no val2017/ folder to evaluate on")
        root = root / "val2017"
    scan = _scan_nonempty(root, image_size, "evaluation", field)
    for path, reason in scan.skipped:
        log(f"  skipped {path}: {reason}")
    return _file_dataset(scan.files, image_size, 0, uses_resize(resize_mode, coco, len(scan.files)))
