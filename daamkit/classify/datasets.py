"""Classification datasets read from their original on-disk layouts, as lazily loaded item lists.

Tasks (`load_task(task, data_dir)`):
- `iemocap`: `IEMOCAP_full_release/Session{1..5}/sentences/wav/<dialog>/<utt>.wav`, labels from
  `Session*/dialog/EmoEvaluation/*.txt`; classes neu, hap (hap + exc), ang, sad; audio resampled to the
  encoder rate (16 kHz for WavLM) and cut into 5-second chunks that keep utterance id and session.
  One split, "all", grouped by session for leave-one-session-out folds.
- `agnews`: `train.csv` / `test.csv` without header: class 1-4, title, description (text = title + " " +
  description).
- `cifar100`: the `cifar-100-python/` pickles (`train`, `test`, `meta`), 100 fine labels.
- `text-csv`: `train.csv` / `test.csv` (UTF-8; `,`, `;` or tab-separated) with a header and columns `text`
  and `label` (any case, other columns ignored); rows with an empty text or label are skipped and counted.
- `image-folder` / `audio-folder`: `DIR/train/<class>/*` and `DIR/test/<class>/*`; images that cannot be
  decoded and audio files that cannot be read or hold no samples are skipped and counted.

Nothing heavy is read up front: a split holds item metadata, labels and a `load(i)` that returns the raw
input (a `str`, an RGB `PIL.Image`, or a mono float32 waveform at the requested sampling rate).
"""

from __future__ import annotations

import csv
import hashlib
import math
import pickle
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np

from daamkit.infra.errors import DaamkitError
from daamkit.infra.images import LOAD_ERRORS, read_rgb, scan_images, unreadable_reason
from daamkit.infra.progress import log

TASK_MODALITY = {
    "iemocap": "audio",
    "agnews": "text",
    "cifar100": "image",
    "text-csv": "text",
    "image-folder": "image",
    "audio-folder": "audio",
}
IEMOCAP_CLASSES = ["neu", "hap", "ang", "sad"]
IEMOCAP_LABEL_MAP = {"neu": "neu", "hap": "hap", "exc": "hap", "ang": "ang", "sad": "sad"}
AGNEWS_CLASSES = ["World", "Sports", "Business", "Sci/Tech"]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif"}
CHUNK_SECONDS = 5.0
MIN_CHUNK_SECONDS = 1.0  # a trailing remainder shorter than this is dropped (unless it is the whole utterance)

_EMO_LINE = re.compile(r"^\[\s*[\d.]+\s*-\s*[\d.]+\s*\]\t(\S+)\t(\S+)\t")


@dataclass
class DatasetSplit:
    """One split: item records ({"id", "group", "utterance"}), integer labels and a lazy raw-input loader."""

    name: str
    items: list[dict[str, Any]]
    labels: list[int]
    loader: Callable[[int], Any] = field(repr=False)

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> Any:
        return self.loader(index)

    def subset(self, indices: list[int]) -> "DatasetSplit":
        """The items at `indices` (in that order), loading through the same loader."""
        return DatasetSplit(
            self.name,
            [self.items[i] for i in indices],
            [self.labels[i] for i in indices],
            lambda i: self.loader(indices[i]),
        )


@dataclass
class TaskData:
    """A whole task: modality, class names (label order), splits and a fingerprint of what was read."""

    task: str
    modality: str
    classes: list[str]
    splits: dict[str, DatasetSplit]
    grouping: str | None
    fingerprint: str


def in_cache_order(split: DatasetSplit, modality: str) -> DatasetSplit:
    """The split in the row order of its feature cache: text longest first (batches of similar length waste
    little on padding), audio and images as read. Anything that indexes cache rows must use this order."""
    if modality != "text":
        return split
    return split.subset(sorted(range(len(split)), key=lambda i: -len(split.load(i))))


def check_task(task: str) -> None:
    """DaamkitError for a task name daamkit has no reader for."""
    if task not in TASK_MODALITY:
        raise DaamkitError(f"unknown task {task!r}; choose one of {', '.join(TASK_MODALITY)}")


def load_task(
    task: str,
    data_dir: str | Path,
    *,
    sampling_rate: int = 16000,
    max_items: int | None = None,
) -> TaskData:
    """Read `task` from `data_dir`; `max_items` keeps an evenly spaced subset of every split (smoke runs)."""
    check_task(task)
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise DaamkitError(f"data folder {data_dir} does not exist")
    if max_items is not None and max_items < 1:
        raise DaamkitError(f"`max_items` must be at least 1, got {max_items}")
    reader = _READERS[task]
    classes, splits, grouping, sources = reader(data_dir, sampling_rate)
    for split in splits.values():
        if not split.items:
            raise DaamkitError(f"split {split.name!r} of {task} data in {data_dir} is empty")
    if max_items is not None:
        splits = {name: split.subset(_spread(len(split), max_items)) for name, split in splits.items()}
    digest = hashlib.sha256(repr((task, sampling_rate if TASK_MODALITY[task] == "audio" else None, sources)).encode())
    for name, split in splits.items():
        digest.update(repr((name, [item["id"] for item in split.items], split.labels)).encode())
    return TaskData(task, TASK_MODALITY[task], classes, splits, grouping, digest.hexdigest()[:16])


def _spread(total: int, count: int) -> list[int]:
    """`count` indices spread evenly over range(total) (all of them when count >= total)."""
    if count >= total:
        return list(range(total))
    return sorted({round(x) for x in np.linspace(0, total - 1, count)})


def _file_signature(path: Path, root: Path) -> tuple[str, int]:
    return str(path.relative_to(root)), path.stat().st_size


# ---------------------------------------------------------------- audio


def _audio_length(path: Path, sampling_rate: int) -> int:
    """Number of samples of `path` once resampled to `sampling_rate` (the length `read_audio` returns)."""
    import soundfile

    try:
        info = soundfile.info(str(path))
    except (RuntimeError, soundfile.LibsndfileError) as err:
        raise DaamkitError(f"cannot read audio file {path}: {err}") from err
    if info.samplerate == sampling_rate:
        return info.frames
    return math.ceil(info.frames * sampling_rate / info.samplerate)


def _readable_audio(paths: list[Path], sampling_rate: int, what: str) -> dict[Path, int]:
    """The resampled length of every audio file whose header reads and that holds samples; the others are
    skipped and counted in one line."""
    lengths, skipped = {}, []
    for path in paths:
        try:
            length = _audio_length(path, sampling_rate)
        except DaamkitError:
            length = 0
        if length:
            lengths[path] = length
        else:
            skipped.append(path)
    if skipped:
        log(f"skipped {len(skipped)} of {len(paths)} {what} file(s) that cannot be read or hold no samples "
            f"(first: {skipped[0]})")
    return lengths


@lru_cache(maxsize=4)
def read_audio(path: Path, sampling_rate: int) -> np.ndarray:
    """A mono float32 waveform of `path` at `sampling_rate` (polyphase resampling when the file differs)."""
    import soundfile

    try:
        wave, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError) as err:
        raise DaamkitError(f"cannot read audio file {path}: {err}") from err
    wave = wave.mean(axis=1)
    if rate != sampling_rate:
        from scipy.signal import resample_poly

        divisor = math.gcd(rate, sampling_rate)
        wave = resample_poly(wave, sampling_rate // divisor, rate // divisor).astype(np.float32)
    return wave


def chunk_bounds(num_samples: int, sampling_rate: int, chunk_seconds: float = CHUNK_SECONDS) -> list[tuple[int, int]]:
    """[start, stop) sample ranges of consecutive chunks; a short trailing remainder is dropped."""
    size = int(round(chunk_seconds * sampling_rate))
    minimum = int(round(MIN_CHUNK_SECONDS * sampling_rate))
    bounds = [(start, min(start + size, num_samples)) for start in range(0, num_samples, size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < minimum:
        bounds.pop()
    return bounds


def _read_iemocap(root: Path, sampling_rate: int):
    if (root / "IEMOCAP_full_release").is_dir():
        root = root / "IEMOCAP_full_release"
    sessions = sorted(p for p in root.glob("Session[1-5]") if p.is_dir())
    if not sessions:
        raise DaamkitError(f"{root} has no Session1..Session5 folders; point `data` at IEMOCAP_full_release")
    items, labels, chunks, sources = [], [], [], []
    for session in sessions:
        emo_dir = session / "dialog" / "EmoEvaluation"
        label_files = sorted(p for p in emo_dir.glob("*.txt") if not p.name.startswith("."))
        if not label_files:
            raise DaamkitError(f"{emo_dir} holds no EmoEvaluation *.txt label files")
        for label_file in label_files:
            for line in label_file.read_text(errors="replace").splitlines():
                match = _EMO_LINE.match(line)
                if not match or match.group(2) not in IEMOCAP_LABEL_MAP:
                    continue
                utterance = match.group(1)
                wav = session / "sentences" / "wav" / utterance.rsplit("_", 1)[0] / f"{utterance}.wav"
                if not wav.is_file():
                    raise DaamkitError(f"{label_file} labels {utterance} but {wav} is missing")
                sources.append(_file_signature(wav, root))
                label = IEMOCAP_CLASSES.index(IEMOCAP_LABEL_MAP[match.group(2)])
                for k, (start, stop) in enumerate(chunk_bounds(_audio_length(wav, sampling_rate), sampling_rate)):
                    items.append({"id": f"{utterance}#{k}", "group": session.name, "utterance": utterance})
                    labels.append(label)
                    chunks.append((wav, start, stop))

    def load(index: int) -> np.ndarray:
        wav, start, stop = chunks[index]
        return read_audio(wav, sampling_rate)[start:stop]

    return IEMOCAP_CLASSES, {"all": DatasetSplit("all", items, labels, load)}, "session", sources


# ---------------------------------------------------------------- text


def _require_files(root: Path, names: tuple[str, ...]) -> None:
    for name in names:
        if not (root / name).is_file():
            raise DaamkitError(f"{root / name} is missing")


def _csv_rows(path: Path, delimiter: str = ","):
    """(first line number, fields) of every non-blank row of a UTF-8 CSV file (a BOM, as Excel's "CSV UTF-8"
    writes, is dropped); a file in another encoding or with broken quoting is one DaamkitError line."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle, delimiter=delimiter)
            start = 1
            for row in reader:
                if any(field.strip() for field in row):
                    yield start, row
                start = reader.line_num + 1
    except UnicodeDecodeError as err:
        raise DaamkitError(f"{path} is not UTF-8 text (byte {err.object[err.start]:#04x}); save it as UTF-8") from None
    except csv.Error as err:
        raise DaamkitError(f"{path}:{reader.line_num}: {err}") from None


def _read_agnews(root: Path, sampling_rate: int):
    _require_files(root, ("train.csv", "test.csv"))
    splits, sources = {}, []
    for name in ("train", "test"):
        path = root / f"{name}.csv"
        texts, labels = [], []
        for line_no, row in _csv_rows(path):
            if len(row) != 3:
                raise DaamkitError(f"{path}:{line_no}: expected 3 columns (class, title, description), got {len(row)}")
            if row[0].strip() not in {"1", "2", "3", "4"}:
                raise DaamkitError(f"{path}:{line_no}: unknown label {row[0]!r} (AG News classes are 1-4)")
            labels.append(int(row[0]) - 1)
            texts.append(f"{row[1].strip()} {row[2].strip()}")
        splits[name] = _text_split(name, texts, labels)
        sources.append((path.name, hashlib.sha256(path.read_bytes()).hexdigest()))
    return AGNEWS_CLASSES, splits, None, sources


def _text_split(name: str, texts: list[str], labels: list[int]) -> DatasetSplit:
    items = [{"id": f"{name}/{i}", "group": None, "utterance": None} for i in range(len(texts))]
    return DatasetSplit(name, items, labels, texts.__getitem__)


def _sorted_labels(names: set[str]) -> list[str]:
    """Class names in a natural order: numerically when every name is an integer, else alphabetically."""
    if all(re.fullmatch(r"-?\d+", name) for name in names):
        return sorted(names, key=int)
    return sorted(names)


def _header_delimiter(path: Path) -> str:
    """`,`, or the `;` or tab that splits the header line into names including text and label (spreadsheets in
    some locales export CSV with semicolons)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            header = handle.readline()
    except UnicodeDecodeError:
        return ","  # `_csv_rows` says what is wrong with the file
    for delimiter in (",", ";", "\t"):
        if {"text", "label"} <= {name.strip().strip('"').lower() for name in header.split(delimiter)}:
            return delimiter
    return ","


def _text_csv_rows(path: Path) -> list[tuple[int, str, str]]:
    """(line number, text, label) of a text-csv file. The header's `text` and `label` are found whatever their
    case and surrounding spaces, with `,`, `;` or a tab between fields; a row with another number of fields
    than the header is refused (usually a text with an unquoted comma); rows with an empty text or label are
    skipped and counted."""
    rows = _csv_rows(path, _header_delimiter(path))
    _, header = next(rows, (1, []))
    names = [name.strip().lower() for name in header]
    missing = [column for column in ("text", "label") if column not in names]
    if missing:
        raise DaamkitError(f"{path} has no column(s) {', '.join(missing)}; the header needs text,label")
    text_at, label_at = names.index("text"), names.index("label")
    kept, skipped = [], []
    for line_no, row in rows:
        if len(row) != len(names):
            raise DaamkitError(f"{path}:{line_no}: {len(row)} field(s) where the header has {len(names)}; a text "
                               "with a comma needs double quotes, and every opening quote a closing one")
        text, label = row[text_at], row[label_at].strip()
        if text.strip() and label:
            kept.append((line_no, text, label))
        else:
            skipped.append(line_no)
    if skipped:
        log(f"{path}: skipped {len(skipped)} row(s) with an empty text or label (line(s) "
            f"{', '.join(map(str, skipped[:5]))}{', ...' if len(skipped) > 5 else ''})")
    return kept


def _read_text_csv(root: Path, sampling_rate: int):
    _require_files(root, ("train.csv", "test.csv"))
    rows, sources = {}, []
    for name in ("train", "test"):
        path = root / f"{name}.csv"
        rows[name] = _text_csv_rows(path)
        sources.append((path.name, hashlib.sha256(path.read_bytes()).hexdigest()))
    classes = _sorted_labels({label for _, _, label in rows["train"]})
    index = {label: i for i, label in enumerate(classes)}
    splits = {}
    for name, triples in rows.items():
        for line_no, _, label in triples:
            if label not in index:
                raise DaamkitError(
                    f"{root / (name + '.csv')}:{line_no}: unknown label {label!r} (train.csv labels: {', '.join(classes)})"
                )
        splits[name] = _text_split(name, [text for _, text, _ in triples], [index[label] for _, _, label in triples])
    return classes, splits, None, sources


# ---------------------------------------------------------------- images


def _read_cifar100(root: Path, sampling_rate: int):
    if (root / "cifar-100-python").is_dir():
        root = root / "cifar-100-python"
    _require_files(root, ("train", "test", "meta"))
    meta = _unpickle(root / "meta")
    classes = [name.decode() if isinstance(name, bytes) else name for name in meta[b"fine_label_names"]]
    splits, sources = {}, []
    for name in ("train", "test"):
        batch = _unpickle(root / name)
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = [int(x) for x in batch[b"fine_labels"]]
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
            raise DaamkitError(f"{root / name} is not a CIFAR-100 pickle (data {data.shape}, {len(labels)} labels)")
        bad = [x for x in labels if not 0 <= x < len(classes)]
        if bad:
            raise DaamkitError(f"{root / name}: unknown label {bad[0]} (CIFAR-100 has {len(classes)} classes)")
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        items = [{"id": f"{name}/{i}", "group": None, "utterance": None} for i in range(len(labels))]
        splits[name] = DatasetSplit(name, items, labels, lambda i, images=images: _to_pil(images[i]))
        sources.append(_file_signature(root / name, root))
    return classes, splits, None, sources


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            return pickle.load(handle, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise DaamkitError(f"{path} is not a readable CIFAR-100 pickle: {err}") from err


def _to_pil(array: np.ndarray):
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(array), mode="RGB")


def _load_image(path: Path):
    """An RGB PIL image decoded as a viewer shows it (EXIF orientation, transparency on white, 16-bit scaled)."""
    from PIL import Image

    try:
        return Image.fromarray(read_rgb(path))
    except LOAD_ERRORS as err:  # only in folders too large to decode when listed (`scan_images`)
        raise DaamkitError(f"cannot read image {path}: {unreadable_reason(err)}") from err


# ---------------------------------------------------------------- class folders


def _class_files(root: Path, suffixes: set[str]):
    """(classes, {split: (files, labels)}, sources) of DIR/train/<class>/* and DIR/test/<class>/*.

    Classes come from train; test may not add any.
    """
    for name in ("train", "test"):
        if not (root / name).is_dir():
            raise DaamkitError(f"{root / name} is missing; expected {root}/train/<class>/ and {root}/test/<class>/")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir() and not p.name.startswith("."))
    index = {name: i for i, name in enumerate(classes)}
    splits, sources = {}, []
    for name in ("train", "test"):
        files, labels = [], []
        for class_dir in sorted(p for p in (root / name).iterdir() if p.is_dir() and not p.name.startswith(".")):
            if class_dir.name not in index:
                raise DaamkitError(f"unknown label {class_dir.name!r}: {class_dir} has no counterpart in {root / 'train'}")
            for path in sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in suffixes and p.is_file()):
                files.append(path)
                labels.append(index[class_dir.name])
        splits[name] = (files, labels)
        sources.extend(_file_signature(p, root) for p in files)
    return classes, splits, sources


def _read_image_folder(root: Path, sampling_rate: int):
    """Class-folder images; files that cannot be decoded are skipped and counted (`scan_images`)."""
    classes, files, sources = _class_files(root, IMAGE_SUFFIXES)
    splits = {}
    for name, (paths, labels) in files.items():
        readable = set(scan_images(paths, f"{name} image").files)
        kept = [i for i, path in enumerate(paths) if path in readable]
        paths, labels = [paths[i] for i in kept], [labels[i] for i in kept]
        items = [{"id": str(p.relative_to(root)), "group": None, "utterance": None} for p in paths]
        splits[name] = DatasetSplit(name, items, labels, lambda i, paths=paths: _load_image(paths[i]))
    return classes, splits, None, sources


def _read_audio_folder(root: Path, sampling_rate: int):
    """Class-folder audio cut into 5 s chunks like IEMOCAP; each chunk keeps its file as utterance id."""
    classes, files, sources = _class_files(root, AUDIO_SUFFIXES)
    splits = {}
    for name, (paths, file_labels) in files.items():
        lengths = _readable_audio(paths, sampling_rate, f"{name} audio")
        items, labels, chunks = [], [], []
        for path, label in zip(paths, file_labels):
            if path not in lengths:
                continue
            utterance = str(path.relative_to(root))
            for k, (start, stop) in enumerate(chunk_bounds(lengths[path], sampling_rate)):
                items.append({"id": f"{utterance}#{k}", "group": None, "utterance": utterance})
                labels.append(label)
                chunks.append((path, start, stop))

        def load(index: int, chunks=chunks) -> np.ndarray:
            path, start, stop = chunks[index]
            return read_audio(path, sampling_rate)[start:stop]

        splits[name] = DatasetSplit(name, items, labels, load)
    return classes, splits, None, sources


_READERS = {
    "iemocap": _read_iemocap,
    "agnews": _read_agnews,
    "cifar100": _read_cifar100,
    "text-csv": _read_text_csv,
    "image-folder": _read_image_folder,
    "audio-folder": _read_audio_folder,
}
