"""Datasets for training and benchmarking compiled models.

Images are loaded whole into memory as uint8 tensors ``(N, C, H, W)`` with int64
labels ``(N,)``; :func:`normalize` converts to float and :func:`batches` iterates
over (optionally shuffled and augmented) mini-batches. Each on-disk format has
its own ``load_*`` function returning that pair, so new formats only need a new
loader.

CIFAR-10 is read from a single npz of JPEG files (see ``shared/data/README.md``):
``{split}_jpeg`` (uint8 bytes), ``{split}_offsets`` (int64, N+1), ``{split}_labels``
(uint8) for ``split`` in ``train``/``test``, and ``classes`` (names). Image ``i``
is ``jpeg[offsets[i]:offsets[i+1]]``. A class-balanced subset in the same format
(100 train and 50 test images per class) ships with the package; see
:func:`load_bundled_cifar10` and ``bench/make_cifar_subset.py``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "SPLITS",
    "batches",
    "bundled_cifar10_path",
    "load_bundled_cifar10",
    "load_cifar10_npz",
    "normalize",
]

# Per-channel statistics of the CIFAR-10 training set (pixel values in [0, 1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

SPLITS = ("train", "test")


def _check_split(split: str, path: Path | str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for {path}; expected one of {SPLITS}")


def _decode_jpegs(blob: np.ndarray, offsets: np.ndarray, indices: np.ndarray) -> torch.Tensor:
    """Decode the JPEGs ``blob[offsets[i]:offsets[i+1]]`` for ``i`` in ``indices`` to uint8 (N, 3, H, W)."""
    images = []
    for i in indices:
        data = blob[offsets[i] : offsets[i + 1]].tobytes()
        with Image.open(io.BytesIO(data)) as img:
            images.append(np.asarray(img.convert("RGB"), dtype=np.uint8))
    if not images:
        return torch.empty((0, 3, 32, 32), dtype=torch.uint8)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def load_cifar10_npz(
    path: str | Path,
    split: str = "train",
    limit: int | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split of a CIFAR-10 JPEG npz.

    Returns ``(images, labels)``: uint8 ``(N, 3, 32, 32)`` and int64 ``(N,)``.
    With ``limit``, returns a random subset of ``min(limit, N)`` images drawn
    with ``seed`` (the file is sorted by class, so a prefix would not do), in
    the order drawn; without it, the whole split in file order.
    """
    path = Path(path)
    _check_split(split, path)
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 npz not found: {path}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be non-negative, got {limit}")

    keys = (f"{split}_jpeg", f"{split}_offsets", f"{split}_labels")
    with np.load(path) as npz:
        missing = [k for k in keys if k not in npz.files]
        if missing:
            raise ValueError(f"{path} is not a CIFAR-10 JPEG npz: missing arrays {missing}")
        blob, offsets, labels = (npz[k] for k in keys)

    n = len(labels)
    if len(offsets) != n + 1:
        raise ValueError(f"{path}: {split}_offsets has {len(offsets)} entries, expected {n + 1}")
    if limit is None:
        indices = np.arange(n)
    else:
        indices = np.random.default_rng(seed).permutation(n)[: min(limit, n)]

    images = _decode_jpegs(blob, offsets, indices)
    return images, torch.from_numpy(labels[indices].astype(np.int64))


def normalize(
    images: torch.Tensor,
    mean: tuple[float, ...] = CIFAR10_MEAN,
    std: tuple[float, ...] = CIFAR10_STD,
) -> torch.Tensor:
    """Map uint8 images ``(..., C, H, W)`` to float32 ``(x / 255 - mean) / std`` per channel."""
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 images, got {images.dtype}")
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    return (images.float() / 255.0 - m) / s


def bundled_cifar10_path() -> Path:
    """Path of the CIFAR-10 subset shipped in ``fraccompile/assets``."""
    return Path(__file__).resolve().parent / "assets" / "cifar10_subset.npz"


def load_bundled_cifar10(
    split: str = "train", limit: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load the bundled subset: 1,000 train / 500 test images, balanced over the 10 classes."""
    return load_cifar10_npz(bundled_cifar10_path(), split, limit=limit, seed=seed)


def _augment(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop after zero padding by ``padding`` pixels, then random horizontal flip."""
    b, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # (B, 1, 1, W)
    crops = padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    flip = torch.rand(b, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], crops.flip(-1), crops)


def batches(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    augment: bool = False,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(normalized float images, labels)`` mini-batches from uint8 images.

    Shuffling and augmentation (random crop with 4-pixel zero padding and
    horizontal flip, as in He et al. 2016) draw from one ``torch.Generator``
    seeded with ``seed``, so a given seed always yields the same batches.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    generator = torch.Generator().manual_seed(seed)
    n = len(images)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        x = images[idx]
        if augment:
            x = _augment(x, generator)
        yield normalize(x), labels[idx]
