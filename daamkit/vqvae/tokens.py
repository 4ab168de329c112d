"""Images <-> token-id grids stored as `.npz` (`tokens` [N, h, w] int32 when all grids match, plus `files`).

Full-size images of different shapes are stored one array per image (`tokens_0`, `tokens_1`, ...).
`num_embeddings` is saved too so `decode` can refuse tokens from a different codebook.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from daamkit.infra.checkpoint import atomic_write_bytes
from daamkit.infra.errors import DaamkitError
from daamkit.infra.output_paths import output_file, output_folder
from daamkit.infra.progress import progress_bar
from daamkit.vqvae.data import to_uint8
from daamkit.vqvae.io import default_device, load_model, open_inputs, save_png


@torch.no_grad()
def encode_files(checkpoint_dir: str | Path, inputs: Sequence[str | Path], out_file: str | Path,
                 image_size: int | None = None, full: bool = False, overwrite: bool = False,
                 raw_weights: bool = False) -> dict:
    """Tokenise images into `out_file` (.npz; an existing file needs `overwrite`). Unusable inputs are
    skipped and reported; DaamkitError only when none could be processed. Returns a summary: `images`,
    `skipped` and `shapes` (the distinct token-grid sizes, in order of appearance)."""
    out_file = Path(out_file)
    if out_file.suffix != ".npz":
        raise DaamkitError(f"`out` {out_file} must end in .npz")
    output_file(out_file, overwrite=overwrite)
    images = open_inputs(checkpoint_dir, inputs, image_size, full, "encoding", raw_weights)
    grids, files = [], []
    for path, image in images:
        grids.append(images.model.encode(image)[0].cpu().numpy().astype(np.int32))
        files.append(path)
    images.finish(len(grids))
    atomic_write_bytes(out_file, token_file_bytes(grids, [str(f) for f in files], images.model.config.num_embeddings))
    shapes = list(dict.fromkeys(tuple(int(n) for n in g.shape) for g in grids))
    return {"images": len(grids), "skipped": len(images.skipped), "shapes": shapes}


def token_file_bytes(grids: Sequence[np.ndarray], names: Sequence[str], num_embeddings: int) -> bytes:
    """The `.npz` bytes of token grids [h, w] named after their sources, as `encode` writes and `decode` reads."""
    arrays: dict[str, np.ndarray] = {"files": np.array(list(names)), "num_embeddings": np.array(num_embeddings)}
    if len({g.shape for g in grids}) == 1:
        arrays["tokens"] = np.stack([g.astype(np.int32) for g in grids])
    else:
        arrays.update({f"tokens_{i}": g.astype(np.int32) for i, g in enumerate(grids)})
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def read_tokens(token_file: str | Path) -> tuple[list[np.ndarray], list[str], int | None]:
    """Token grids, their source names and the codebook size recorded in an `encode` .npz file."""
    token_file = Path(token_file)
    if token_file.is_dir():
        raise DaamkitError(f"{token_file} is a folder, not a token file (.npz written by encode)")
    if not token_file.is_file():
        raise DaamkitError(f"token file {token_file} does not exist")
    try:
        with np.load(token_file, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise DaamkitError(f"{token_file} is not a readable .npz token file ({err})") from err
    if "tokens" in arrays:
        grids = list(arrays["tokens"])
    else:
        keys = sorted((k for k in arrays if k.startswith("tokens_")), key=lambda k: int(k.split("_")[1]))
        grids = [arrays[k] for k in keys]
    if not grids or any(g.ndim != 2 or not np.issubdtype(g.dtype, np.integer) for g in grids):
        raise DaamkitError(f"{token_file} holds no 2-D integer token grids (write it with `daamkit vqvae encode`)")
    names = [str(n) for n in arrays["files"]] if "files" in arrays else [f"image{i}" for i in range(len(grids))]
    num_embeddings = int(arrays["num_embeddings"]) if "num_embeddings" in arrays else None
    return grids, names, num_embeddings


@torch.no_grad()
def decode_file(checkpoint_dir: str | Path, token_file: str | Path, out_dir: str | Path,
                overwrite: bool = False, raw_weights: bool = False) -> list[Path]:
    """Decode every token grid of `token_file` to a PNG in `out_dir` (a folder already holding files needs
    `overwrite`); returns the written paths."""
    out_dir = output_folder(out_dir, overwrite=overwrite)
    grids, names, num_embeddings = read_tokens(token_file)
    device = default_device()
    model, _ = load_model(checkpoint_dir, device, raw_weights)
    codebook_size = model.config.num_embeddings
    if num_embeddings is not None and num_embeddings != codebook_size:
        raise DaamkitError(f"{token_file} was encoded with {num_embeddings} codes but {checkpoint_dir} has {codebook_size}")
    largest = max(int(g.max()) for g in grids)
    if min(int(g.min()) for g in grids) < 0 or largest >= codebook_size:
        raise DaamkitError(f"{token_file} has token ids outside [0, {codebook_size}) for {checkpoint_dir}")
    written = []
    with progress_bar("decoding", total=len(grids)) as task:
        for index, (grid, name) in enumerate(zip(grids, names)):
            indices = torch.from_numpy(grid.astype(np.int64)).unsqueeze(0).to(device)
            image = to_uint8(model.decode(indices))[0]
            written.append(save_png(out_dir / f"{index:04d}_{Path(name).stem}.png", image))
            task.advance()
    return written
