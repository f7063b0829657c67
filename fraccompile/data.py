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
:func:`load_bundled_cifar10` and ``bench/make_cifar_subset.py``. The standard
python-pickle release (:func:`load_cifar10_pickle`) and image folders
(:func:`load_image_folder`) load the same way; :func:`load_cifar10` picks the
loader from what its ``source`` is.

For training, :class:`ClassificationData` (images) and :class:`CharDataset`
(characters, e.g. Tiny Shakespeare) share one interface: ``steps_per_epoch``,
``batches(epoch, start=0)`` and ``test_batches()``. Batch ``k`` of epoch ``e``
depends only on ``(seed, e, k)``, so ``batches(e, start=k)`` resumes a run with
exactly the batches it would have seen, without replaying the earlier ones.

Distributed training: ``shard(rank, world_size)`` returns the view of one process.
Step ``k``'s *global* batch (``world_size * batch_size`` samples, augmentation
included) is drawn from ``(seed, e, k)`` exactly as one process with that batch
size would draw it, and rank ``r`` takes rows ``r * batch_size`` to
``(r + 1) * batch_size - 1`` of it. So a process's batches depend only on
``(seed, e, k, rank, world_size)``, a resumed distributed run sees the batches an
uninterrupted one would, and N processes together see what one process with an N
times larger batch sees.
"""

from __future__ import annotations

import copy
import io
import os
import pickle
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "IMAGE_SUFFIXES",
    "SPLITS",
    "CharDataset",
    "ClassificationData",
    "batches",
    "bundled_cifar10_path",
    "load_bundled_cifar10",
    "load_cifar10",
    "load_cifar10_npz",
    "load_cifar10_pickle",
    "load_image_folder",
    "normalize",
]

# Per-channel statistics of the CIFAR-10 training set (pixel values in [0, 1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

SUPPORTED_LAYOUTS = (
    "a CIFAR-10 JPEG .npz file; a folder that is or contains 'cifar-10-batches-py' "
    "(python-pickle batches data_batch_1..5, test_batch); an image folder "
    "root/[train|test/]<class>/*.png|jpg|jpeg; or the string 'bundled'"
)


def _check_split(split: str, path: Path | str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for {path}; expected one of {SPLITS}")


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be non-negative, got {limit}")


def _subset(n: int, limit: int | None, seed: int) -> np.ndarray:
    """Indices of all ``n`` items in order, or of a ``seed``-ed random subset of ``min(limit, n)``."""
    _check_limit(limit)
    if limit is None:
        return np.arange(n)
    return np.random.default_rng(seed).permutation(n)[: min(limit, n)]


def _generator(*keys: int) -> torch.Generator:
    """A torch generator seeded from the non-negative integers ``keys`` (via numpy's SeedSequence)."""
    if any(int(k) < 0 for k in keys):
        raise ValueError(f"seed and epoch must be non-negative, got {keys}")
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed((int(state[0]) << 31) ^ int(state[1]))


# Stream tags, so that the epoch order, per-batch augmentation and text offsets never share a seed.
_ORDER, _AUGMENT, _TEXT = 0, 1, 2


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
    _check_limit(limit)

    keys = (f"{split}_jpeg", f"{split}_offsets", f"{split}_labels")
    with np.load(path) as npz:
        missing = [k for k in keys if k not in npz.files]
        if missing:
            raise ValueError(f"{path} is not a CIFAR-10 JPEG npz: missing arrays {missing}")
        blob, offsets, labels = (npz[k] for k in keys)

    n = len(labels)
    if len(offsets) != n + 1:
        raise ValueError(f"{path}: {split}_offsets has {len(offsets)} entries, expected {n + 1}")
    indices = _subset(n, limit, seed)
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


def load_cifar10_pickle(
    root: str | Path, split: str = "train", limit: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split of the python-pickle CIFAR-10 release (``cifar-10-batches-py``).

    ``root`` is that folder or its parent. ``train`` reads ``data_batch_1`` to
    ``data_batch_5`` (all must exist), ``test`` reads ``test_batch``; each is a
    pickled dict whose ``b"data"`` is uint8 ``(N, 3072)``, the red, green and
    blue 32x32 planes of each image in row-major order, and ``b"labels"`` its N
    labels. Pickles can run code when loaded: only use files you trust.
    Returns the same as :func:`load_cifar10_npz`, including the ``limit`` subset.
    """
    root = Path(root)
    has_batches = (root / "data_batch_1").is_file() or (root / "test_batch").is_file()
    folder = root if has_batches else root / "cifar-10-batches-py"
    _check_split(split, folder)
    _check_limit(limit)
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"CIFAR-10 pickle batch not found: {path}")
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        if not isinstance(batch, dict) or not {b"data", b"labels"} <= batch.keys():
            raise ValueError(f"{path} is not a CIFAR-10 pickle batch (a dict of b'data', b'labels')")
        data, batch_labels = np.asarray(batch[b"data"], np.uint8), np.asarray(batch[b"labels"], np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(batch_labels):
            raise ValueError(
                f"{path}: data has shape {data.shape} for {len(batch_labels)} labels, expected (N, 3072)"
            )
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(batch_labels)
    all_images, all_labels = np.concatenate(images), np.concatenate(labels)
    indices = _subset(len(all_labels), limit, seed)
    return torch.from_numpy(all_images[indices]), torch.from_numpy(all_labels[indices])


def _subdirs(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def load_image_folder(
    root: str | Path, split: str = "train", limit: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load 32x32 images from ``root/<split>/<class_name>/*.png|jpg|jpeg``.

    Label ids are the class folder names sorted alphabetically, taken over all
    split folders so that both splits agree even if one lacks a class. When
    ``root`` has neither a ``train`` nor a ``test`` folder, it is read as
    ``root/<class_name>/...`` and *every* split returns those same images (so
    train and test coincide: use it for evaluation or smoke tests only).
    Images are converted to RGB and must be 32x32 (``ValueError`` naming the
    file otherwise). Order is by class, then file name; ``limit`` draws a
    seeded random subset as in :func:`load_cifar10_npz`, decoding only it.
    """
    root = Path(root)
    _check_split(split, root)
    _check_limit(limit)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    split_dirs = [s for s in SPLITS if (root / s).is_dir()]
    if split_dirs:
        if split not in split_dirs:
            raise FileNotFoundError(f"image folder has no {split!r} split: {root / split} not found")
        base, classes = root / split, sorted({c for s in split_dirs for c in _subdirs(root / s)})
    else:
        base, classes = root, _subdirs(root)

    files, labels = [], []
    for label, name in enumerate(classes):  # a class missing from this split has no folder: no files
        found = sorted(
            f for f in (base / name).glob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()
        )
        files, labels = files + found, labels + [label] * len(found)
    if not files:
        raise ValueError(f"no {'/'.join(IMAGE_SUFFIXES)} images found in class folders under {base}")

    indices, images = _subset(len(files), limit, seed), []
    for i in indices:
        with Image.open(files[i]) as img:
            if img.size != (32, 32):
                raise ValueError(f"{files[i]}: image is {img.size[0]}x{img.size[1]}, expected 32x32")
            images.append(np.asarray(img.convert("RGB"), dtype=np.uint8))
    pixels = np.stack(images) if images else np.zeros((0, 32, 32, 3), np.uint8)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)[indices]


def load_cifar10(
    source: str | os.PathLike, split: str = "train", limit: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a CIFAR-10-like split from ``source``, choosing the loader from what it is.

    ``"bundled"``: the bundled subset; a ``.npz`` file: :func:`load_cifar10_npz`;
    a folder containing ``cifar-10-batches-py`` or ``data_batch_1``:
    :func:`load_cifar10_pickle`; another folder with subfolders:
    :func:`load_image_folder`. Raises ``FileNotFoundError`` for a missing path
    and ``ValueError`` for anything else. Returns what those loaders return.
    """
    if source == "bundled":
        return load_bundled_cifar10(split, limit=limit, seed=seed)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"CIFAR-10 source not found: {path}")
    if path.is_file() and path.suffix.lower() == ".npz":
        return load_cifar10_npz(path, split, limit=limit, seed=seed)
    if path.is_dir():
        if (path / "cifar-10-batches-py").is_dir() or (path / "data_batch_1").is_file():
            return load_cifar10_pickle(path, split, limit=limit, seed=seed)
        if _subdirs(path):
            return load_image_folder(path, split, limit=limit, seed=seed)
    raise ValueError(f"unrecognized CIFAR-10 source {path}; supported: {SUPPORTED_LAYOUTS}")


def _augment_draw(b: int, generator: torch.Generator, padding: int = 4):
    """The random crop offsets and flips of ``b`` images: ``(dy, dx, flip)``."""
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    return dy, dx, flip


def _augment_apply(images: torch.Tensor, dy, dx, flip, padding: int = 4) -> torch.Tensor:
    """Crop after zero padding by ``padding`` pixels at ``(dy, dx)``, then flip where ``flip``."""
    b, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # (B, 1, 1, W)
    crops = padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    return torch.where(flip[:, None, None, None], crops.flip(-1), crops)


def _augment(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop after zero padding by ``padding`` pixels, then random horizontal flip."""
    return _augment_apply(images, *_augment_draw(len(images), generator, padding), padding)


def _check_shard(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard rank {rank} of world size {world_size}: need 0 <= rank < world_size")


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


@dataclass
class ClassificationData:
    """Image classification data for a training loop: uint8 images, int64 labels.

    ``batches(epoch)`` yields ``steps_per_epoch`` training batches of exactly
    ``batch_size`` (the last partial batch is dropped) of normalized float
    images and labels, shuffled, and augmented when ``augment`` is set. The
    epoch's order is drawn from ``(seed, epoch)`` and batch ``k``'s augmentation
    from ``(seed, epoch, k)``, so the same epoch always yields identical batches
    and ``batches(e, start=k)`` resumes at batch ``k`` of epoch ``e`` exactly.
    ``rank`` / ``world_size`` (set by :meth:`shard`) select one process's rows of each global
    batch of ``world_size * batch_size`` (see the module docstring).
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    batch_size: int = 128
    augment: bool = True
    seed: int = 0
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        _check_shard(self.rank, self.world_size)
        for name in ("train", "test"):
            images, labels = getattr(self, f"{name}_images"), getattr(self, f"{name}_labels")
            if len(images) != len(labels):
                raise ValueError(f"{len(images)} {name} images but {len(labels)} labels")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"batch_size {self.batch_size} x {self.world_size} process(es) "
                f"exceeds the {len(self.train_labels)} training images"
            )

    @classmethod
    def from_source(
        cls,
        source: str | os.PathLike,
        batch_size: int = 128,
        train_limit: int | None = None,
        test_limit: int | None = None,
        augment: bool = True,
        seed: int = 0,
    ) -> "ClassificationData":
        """Load both splits of ``source`` with :func:`load_cifar10` (limits drawn with ``seed``)."""
        train = load_cifar10(source, "train", limit=train_limit, seed=seed)
        test = load_cifar10(source, "test", limit=test_limit, seed=seed)
        return cls(*train, *test, batch_size=batch_size, augment=augment, seed=seed)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_labels) // (self.batch_size * self.world_size)

    def shard(self, rank: int, world_size: int) -> "ClassificationData":
        """This data as process ``rank`` of ``world_size`` sees it (same tensors, not copied)."""
        return replace(self, rank=rank, world_size=world_size)

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the training batches ``start, ..., steps_per_epoch - 1`` of ``epoch`` (this
        process's rows of them)."""
        order = torch.randperm(len(self.train_labels), generator=_generator(_ORDER, self.seed, epoch, 0))
        size = self.batch_size * self.world_size  # the global batch
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        for k in range(start, self.steps_per_epoch):
            idx = order[k * size : (k + 1) * size][mine]
            x = self.train_images[idx]
            if self.augment:  # drawn for the global batch, so any sharding sees the same crops
                draw = _augment_draw(size, _generator(_AUGMENT, self.seed, epoch, k))
                x = _augment_apply(x, *(d[mine] for d in draw))
            yield normalize(x), self.train_labels[idx]

    def test_batches(self, batch_size: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield all test images in order, normalized, without augmentation (last batch may be short)."""
        size = self.batch_size if batch_size is None else batch_size
        return batches(self.test_images, self.test_labels, size, shuffle=False)


class CharDataset:
    """Character-level language-modelling data (e.g. Tiny Shakespeare).

    ``vocab`` is the sorted unique characters of ``text``; token ids index it.
    The first ``split_fraction`` of the text (by position) is for training, the
    rest for validation. ``batches(epoch)`` yields ``steps_per_epoch`` pairs
    ``(x, y)`` of int64 ``(batch_size, block_size)``: training windows at random
    offsets drawn from ``(seed, epoch, k)`` for batch ``k``, ``y`` being ``x``
    shifted by one character. ``test_batches()`` is always the same windows. :meth:`shard`
    gives process ``rank``'s rows of each global batch of ``world_size * batch_size`` windows.
    """

    rank: int = 0
    world_size: int = 1

    def __init__(
        self,
        text: str,
        block_size: int = 64,
        batch_size: int = 32,
        steps_per_epoch: int = 100,
        split_fraction: float = 0.9,
        seed: int = 0,
    ) -> None:
        if block_size <= 0 or batch_size <= 0 or steps_per_epoch <= 0:
            raise ValueError(
                "block_size, batch_size and steps_per_epoch must be positive, got "
                f"{block_size}, {batch_size}, {steps_per_epoch}"
            )
        if not 0.0 < split_fraction <= 1.0:
            raise ValueError(f"split_fraction must be in (0, 1], got {split_fraction}")
        self.vocab: tuple[str, ...] = tuple(sorted(set(text)))
        self._codes = np.array([ord(c) for c in self.vocab], dtype=np.uint32)
        self.block_size, self.batch_size, self.steps_per_epoch = block_size, batch_size, steps_per_epoch
        self.seed = seed
        self.max_test_windows: int | None = None  # cap for test_batches() (None: every window)
        data = self.encode(text)
        n_train = int(len(data) * split_fraction)
        self.train_data, self.val_data = data[:n_train], data[n_train:]
        if len(self.train_data) < block_size + 1:
            raise ValueError(
                f"training text has {len(self.train_data)} characters, "
                f"need at least block_size + 1 = {block_size + 1}"
            )

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        block_size: int = 64,
        split_fraction: float = 0.9,
        *,
        batch_size: int = 32,
        steps_per_epoch: int = 100,
        seed: int = 0,
        encoding: str = "utf-8",
    ) -> "CharDataset":
        """Read the text file ``path`` (e.g. ``shared/data/tinyshakespeare.txt``)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"text file not found: {path}")
        return cls(
            path.read_text(encoding=encoding), block_size, batch_size, steps_per_epoch, split_fraction, seed
        )

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> torch.Tensor:
        """Token ids (int64, 1-D) of ``text``; ``ValueError`` for characters outside the vocabulary."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        ids = np.searchsorted(self._codes, codes)
        known = ids < len(self._codes)
        known[known] = self._codes[ids[known]] == codes[known]
        if not known.all():
            raise ValueError(f"character {chr(codes[~known][0])!r} is not in the vocabulary")
        return torch.from_numpy(ids.astype(np.int64))

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """The text of 1-D token ids."""
        ids = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64)
        if ids.ndim != 1:
            raise ValueError(f"decode expects 1-D ids, got shape {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got {ids.min()}..{ids.max()}")
        return self._codes[ids].astype("<u4").tobytes().decode("utf-32-le")

    def _windows(self, data: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = data[offsets[:, None] + torch.arange(self.block_size + 1)]
        return chunk[:, :-1], chunk[:, 1:]

    def shard(self, rank: int, world_size: int) -> "CharDataset":
        """This data as process ``rank`` of ``world_size`` sees it (the text is shared)."""
        _check_shard(rank, world_size)
        view = copy.copy(self)
        view.rank, view.world_size = rank, world_size
        return view

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the training batches ``start, ..., steps_per_epoch - 1`` of ``epoch`` (this
        process's rows of them)."""
        high = len(self.train_data) - self.block_size  # offsets 0 .. high - 1 leave room for y
        size = self.batch_size * self.world_size
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        for k in range(start, self.steps_per_epoch):
            g = _generator(_TEXT, self.seed, epoch, k)
            offsets = torch.randint(0, high, (size,), generator=g)[mine]
            yield self._windows(self.train_data, offsets)

    def test_batches(
        self, batch_size: int | None = None, max_windows: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the validation windows at offsets ``0, block_size, 2 * block_size, ...`` in order.

        At most ``max_windows`` windows (default ``self.max_test_windows``, None = all that fit);
        the last batch may be short.
        """
        offsets = torch.arange(0, max(len(self.val_data) - self.block_size, 0), self.block_size)
        offsets = offsets[: max_windows if max_windows is not None else self.max_test_windows]
        size = self.batch_size if batch_size is None else batch_size
        for i in range(0, len(offsets), size):
            yield self._windows(self.val_data, offsets[i : i + size])
