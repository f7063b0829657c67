"""Tests of fraccompile.data on the bundled CIFAR-10 subset."""

from pathlib import Path

import numpy as np
import pytest
import torch

from fraccompile import data

FULL_CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.npz"


@pytest.fixture(scope="module")
def train():
    return data.load_bundled_cifar10("train")


def test_bundled_file_is_small_and_present():
    path = data.bundled_cifar10_path()
    assert path.is_file()
    assert path.stat().st_size < 3 * 1024 * 1024
    with np.load(path) as npz:
        assert set(npz.files) == {
            "classes", "train_jpeg", "train_offsets", "train_labels", "test_jpeg", "test_offsets", "test_labels",
        }
        assert list(npz["classes"])[:2] == ["airplane", "automobile"] and len(npz["classes"]) == 10


def test_bundled_shapes_dtypes_and_balance(train):
    images, labels = train
    assert images.shape == (1000, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.shape == (1000,) and labels.dtype == torch.int64
    assert torch.bincount(labels, minlength=10).tolist() == [100] * 10
    assert 50 < images.float().mean() < 200  # real pixels, not blank

    test_images, test_labels = data.load_bundled_cifar10("test")
    assert test_images.shape == (500, 3, 32, 32)
    assert torch.bincount(test_labels, minlength=10).tolist() == [50] * 10


def test_limit_is_seeded_random_subset(train):
    images, labels = train
    a_img, a_lab = data.load_bundled_cifar10("train", limit=64, seed=1)
    b_img, b_lab = data.load_bundled_cifar10("train", limit=64, seed=1)
    c_img, c_lab = data.load_bundled_cifar10("train", limit=64, seed=2)
    assert a_img.shape == (64, 3, 32, 32) and a_lab.shape == (64,)
    assert torch.equal(a_img, b_img) and torch.equal(a_lab, b_lab)
    assert not torch.equal(a_img, c_img)
    assert len(a_lab.unique()) > 5  # not a class-sorted prefix
    # the subset consists of images of the full split, with their labels
    idx = np.random.default_rng(1).permutation(1000)[:64]
    assert torch.equal(a_img, images[idx]) and torch.equal(a_lab, labels[idx])
    # limits above the split size return the whole split
    assert len(data.load_bundled_cifar10("test", limit=10_000)[1]) == 500


def test_errors_name_the_problem(tmp_path):
    missing = tmp_path / "nope.npz"
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        data.load_cifar10_npz(missing)
    with pytest.raises(ValueError, match="valid"):
        data.load_cifar10_npz(data.bundled_cifar10_path(), split="valid")
    bad = tmp_path / "bad.npz"
    np.savez(bad, something=np.zeros(3))
    with pytest.raises(ValueError, match="train_jpeg"):
        data.load_cifar10_npz(bad)
    with pytest.raises(ValueError):
        data.load_bundled_cifar10(limit=-1)


def test_normalize(train):
    images = train[0][:200]
    x = data.normalize(images)
    assert x.dtype == torch.float32 and x.shape == images.shape
    mean = torch.tensor(data.CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(data.CIFAR10_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(x * std + mean, images.float() / 255)
    assert abs(x.mean()) < 0.5 and 0.5 < x.std() < 1.5
    with pytest.raises(TypeError):
        data.normalize(images.float())


def test_batches_cover_the_data_once(train):
    images, labels = train
    seen = []
    for x, y in data.batches(images, labels, 128, seed=0):
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32) and y.dtype == torch.int64
        seen.append(y)
    assert [len(y) for y in seen] == [128] * 7 + [104]
    assert torch.equal(torch.cat(seen).sort().values, labels.sort().values)
    assert not torch.equal(torch.cat(seen), labels)  # shuffled
    assert len(list(data.batches(images, labels, 128, drop_last=True))) == 7
    x, y = next(data.batches(images, labels, 16, shuffle=False))
    torch.testing.assert_close(x, data.normalize(images[:16]))
    assert torch.equal(y, labels[:16])


def test_batches_are_seeded(train):
    images, labels = train
    sub_images, sub_labels = images[:256], labels[:256]

    def run(seed, augment):
        return [(x, y) for x, y in data.batches(sub_images, sub_labels, 64, seed=seed, augment=augment)]

    for augment in (False, True):
        a, b, c = run(0, augment), run(0, augment), run(1, augment)
        assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
        assert not torch.equal(a[0][1], c[0][1])


def test_augmentation_crops_and_flips(train):
    images, labels = train
    sub_images, sub_labels = images[:64], labels[:64]
    plain = next(data.batches(sub_images, sub_labels, 64, shuffle=False))[0]
    aug, y = next(data.batches(sub_images, sub_labels, 64, shuffle=False, augment=True, seed=3))
    assert aug.shape == plain.shape == (64, 3, 32, 32) and torch.equal(y, sub_labels)
    assert not torch.equal(aug, plain)
    # each augmented image is a shifted (and maybe mirrored) window of the zero-padded original
    padded = torch.nn.functional.pad(sub_images, (4, 4, 4, 4))
    for i in range(8):
        candidates = []
        for dy in range(9):
            for dx in range(9):
                window = data.normalize(padded[i, :, dy : dy + 32, dx : dx + 32])
                candidates += [window, window.flip(-1)]
        assert any(torch.equal(aug[i], c) for c in candidates), f"image {i} is not a crop/flip of its source"


@pytest.mark.skipif(not FULL_CIFAR.is_file(), reason="full CIFAR-10 npz not available")
def test_full_dataset_limit():
    images, labels = data.load_cifar10_npz(FULL_CIFAR, "test", limit=100, seed=0)
    assert images.shape == (100, 3, 32, 32) and labels.dtype == torch.int64
    assert len(labels.unique()) == 10
