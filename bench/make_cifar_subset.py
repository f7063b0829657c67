"""Write the small CIFAR-10 subset bundled with fraccompile.

Picks a seeded, class-balanced subset of the full CIFAR-10 JPEG npz (format in
``shared/data/README.md``) and writes it in the same format, copying the JPEG
bytes unchanged: by default 100 train and 50 test images per class (1,000 and
500 images, about 1.4 MB). Within each split the images stay in source order
(sorted by class).

    python bench/make_cifar_subset.py                      # defaults below
    python bench/make_cifar_subset.py --src PATH --out PATH --seed 0

Defaults: ``--src ../shared/data/cifar10-jpeg.npz`` and
``--out fraccompile/assets/cifar10_subset.npz``, both relative to the repository.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SRC = REPO.parent / "shared" / "data" / "cifar10-jpeg.npz"
DEFAULT_OUT = REPO / "fraccompile" / "assets" / "cifar10_subset.npz"


def select(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``per_class`` randomly chosen images of each class."""
    picked = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            raise ValueError(f"class {c} has only {len(members)} images, need {per_class}")
        picked.append(rng.choice(members, size=per_class, replace=False))
    return np.sort(np.concatenate(picked))


def subset_split(src, split: str, per_class: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    blob, offsets, labels = src[f"{split}_jpeg"], src[f"{split}_offsets"], src[f"{split}_labels"]
    idx = select(labels, per_class, rng)
    chunks = [blob[offsets[i] : offsets[i + 1]] for i in idx]
    new_offsets = np.zeros(len(idx) + 1, dtype=np.int64)
    new_offsets[1:] = np.cumsum([len(ch) for ch in chunks])
    return {
        f"{split}_jpeg": np.concatenate(chunks).astype(np.uint8),
        f"{split}_offsets": new_offsets,
        f"{split}_labels": labels[idx].astype(labels.dtype),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=DEFAULT_SRC, help="full CIFAR-10 JPEG npz")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="subset npz to write")
    parser.add_argument("--train-per-class", type=int, default=100)
    parser.add_argument("--test-per-class", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if not args.src.is_file():
        raise SystemExit(f"source npz not found: {args.src}")
    rng = np.random.default_rng(args.seed)
    with np.load(args.src) as src:
        arrays = {"classes": src["classes"]}
        arrays.update(subset_split(src, "train", args.train_per_class, rng))
        arrays.update(subset_split(src, "test", args.test_per_class, rng))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, **arrays)  # JPEG bytes do not compress further
    n_train, n_test = len(arrays["train_labels"]), len(arrays["test_labels"])
    print(f"wrote {args.out}: {n_train} train + {n_test} test images, {args.out.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
