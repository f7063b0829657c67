"""Tests of fraccompile.data: the bundled CIFAR-10 subset, other formats, training datasets."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

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
            "classes",
            "train_jpeg",
            "train_offsets",
            "train_labels",
            "test_jpeg",
            "test_offsets",
            "test_labels",
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


# --- other CIFAR-10 formats -------------------------------------------------------------------

TINY_SHAKESPEARE = FULL_CIFAR.parent / "tinyshakespeare.txt"


def _fake_images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


@pytest.fixture
def pickle_root(tmp_path):
    """A fake ``cifar-10-batches-py`` under tmp_path: 5 train batches and a test batch of 20 images each."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    arrays = {}
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        batch = {
            b"data": _fake_images(20, i),
            b"labels": [(i + k) % 10 for k in range(20)],
            b"batch_label": name.encode(),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
        arrays[name] = batch
    return tmp_path, arrays


def test_pickle_loader_decodes_planes_exactly(pickle_root):
    root, arrays = pickle_root
    images, labels = data.load_cifar10_pickle(root)
    assert images.shape == (100, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.shape == (100,) and labels.dtype == torch.int64
    raw = np.concatenate([arrays[f"data_batch_{j}"][b"data"] for j in range(1, 6)])
    assert labels.tolist() == sum((arrays[f"data_batch_{j}"][b"labels"] for j in range(1, 6)), [])
    for n, c, y, x in [(0, 0, 0, 0), (0, 1, 2, 3), (37, 2, 31, 5), (99, 2, 31, 31), (50, 1, 17, 0)]:
        assert images[n, c, y, x].item() == raw[n, c * 1024 + y * 32 + x]
    assert np.array_equal(images.numpy().reshape(100, -1), raw)
    # root may be the batches folder itself; test split; seeded limit like the npz loader
    test_images, test_labels = data.load_cifar10_pickle(root / "cifar-10-batches-py", "test")
    assert np.array_equal(test_images.numpy().reshape(20, -1), arrays["test_batch"][b"data"])
    sub_images, sub_labels = data.load_cifar10_pickle(root, limit=7, seed=3)
    idx = np.random.default_rng(3).permutation(100)[:7]
    assert torch.equal(sub_images, images[idx]) and torch.equal(sub_labels, labels[idx])


def test_pickle_loader_errors(pickle_root, tmp_path):
    root, _ = pickle_root
    (root / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_4"):
        data.load_cifar10_pickle(root)
    with pytest.raises(ValueError, match="valid"):
        data.load_cifar10_pickle(root, "valid")
    with open(root / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match="3072"):
        data.load_cifar10_pickle(root, "test")


def _write_png(path, value, size=(32, 32), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((size[1], size[0], 3), value, dtype=np.uint8)
    pixels[0, 1] = (1, 2, 3)  # a marker pixel at row 0, column 1
    Image.fromarray(pixels).convert(mode).save(path)


@pytest.fixture
def folder_root(tmp_path):
    """root/{train,test}/{cat,dog}/*.png with a distinct colour per image; test has no 'dog'."""
    root = tmp_path / "imgs"
    for name, value in [
        ("train/dog/a.png", (10, 20, 30)),
        ("train/cat/b.png", (40, 50, 60)),
        ("train/cat/a.png", (70, 80, 90)),
        ("test/cat/z.png", (5, 6, 7)),
    ]:
        _write_png(root / name, value)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_with_splits(folder_root):
    images, labels = data.load_image_folder(folder_root)
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.tolist() == [0, 0, 1]  # classes sorted: cat=0, dog=1; files sorted within a class
    assert images[:, :, 5, 5].tolist() == [[70, 80, 90], [40, 50, 60], [10, 20, 30]]
    assert images[0, :, 0, 1].tolist() == [1, 2, 3]  # (c, y, x) layout
    test_images, test_labels = data.load_image_folder(folder_root, "test")
    assert test_labels.tolist() == [0] and test_images[0, :, 9, 9].tolist() == [5, 6, 7]
    sub_images, sub_labels = data.load_image_folder(folder_root, limit=2, seed=1)
    idx = np.random.default_rng(1).permutation(3)[:2]
    assert torch.equal(sub_images, images[idx]) and torch.equal(sub_labels, labels[idx])


def test_image_folder_without_splits_and_errors(tmp_path):
    root = tmp_path / "flat"
    _write_png(root / "b_class" / "x.jpg", (100, 100, 100))
    _write_png(root / "a_class" / "y.PNG", (200, 0, 0), mode="L")  # grayscale: converted to RGB
    for split in ("train", "test"):
        images, labels = data.load_image_folder(root, split)
        assert labels.tolist() == [0, 1] and images.shape == (2, 3, 32, 32)
        assert images[0, :, 4, 4].tolist() == [images[0, 0, 4, 4].item()] * 3
        assert abs(int(images[1, 0, 8, 8]) - 100) < 12  # lossy JPEG
    _write_png(root / "a_class" / "big.png", (1, 1, 1), size=(33, 32))
    with pytest.raises(ValueError, match="big.png.*33x32"):
        data.load_image_folder(root)
    with pytest.raises(FileNotFoundError, match="missing"):
        data.load_image_folder(tmp_path / "missing")
    only_train = tmp_path / "only_train"
    _write_png(only_train / "train" / "c" / "x.png", (0, 0, 0))
    with pytest.raises(FileNotFoundError, match="test"):
        data.load_image_folder(only_train, "test")
    (tmp_path / "empty" / "c").mkdir(parents=True)
    with pytest.raises(ValueError, match="no .* images"):
        data.load_image_folder(tmp_path / "empty")


def test_load_cifar10_dispatch(pickle_root, folder_root, tmp_path):
    root, _ = pickle_root
    bundled = data.load_cifar10("bundled", "test", limit=5, seed=2)
    assert torch.equal(bundled[0], data.load_bundled_cifar10("test", limit=5, seed=2)[0])
    npz = data.load_cifar10(str(data.bundled_cifar10_path()), "test", limit=5, seed=2)
    assert torch.equal(npz[0], bundled[0])
    by_parent = data.load_cifar10(root, limit=4)
    assert torch.equal(by_parent[0], data.load_cifar10_pickle(root, limit=4)[0])
    by_folder = data.load_cifar10(root / "cifar-10-batches-py", "test")
    assert torch.equal(by_folder[0], data.load_cifar10_pickle(root, "test")[0])
    assert data.load_cifar10(folder_root)[1].tolist() == [0, 0, 1]

    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.load_cifar10(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere.npz"):
        data.load_cifar10(str(tmp_path / "nowhere.npz"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="supported.*npz.*cifar-10-batches-py.*image folder"):
        data.load_cifar10(tmp_path / "file.txt")
    (tmp_path / "no_subdirs").mkdir()
    with pytest.raises(ValueError, match="supported"):
        data.load_cifar10(tmp_path / "no_subdirs")


# --- training-loop datasets -------------------------------------------------------------------


def _as_list(it):
    return [tuple(t.clone() for t in batch) for batch in it]


def _same(a, b):
    return len(a) == len(b) and all(all(torch.equal(s, t) for s, t in zip(x, y)) for x, y in zip(a, b))


def test_classification_data_is_deterministic_per_epoch(train):
    images, labels = train
    cd = data.ClassificationData(
        images[:300], labels[:300], images[300:350], labels[300:350], batch_size=64, augment=True, seed=5
    )
    assert cd.steps_per_epoch == 4  # 300 // 64, last partial batch dropped
    e0, e0_again, e1 = _as_list(cd.batches(0)), _as_list(cd.batches(0)), _as_list(cd.batches(1))
    assert len(e0) == 4 and all(x.shape == (64, 3, 32, 32) and x.dtype == torch.float32 for x, _ in e0)
    assert _same(e0, e0_again) and not torch.equal(e0[0][1], e1[0][1])
    assert _same(_as_list(cd.batches(0, start=2)), e0[2:])  # resume at batch 2
    other_seed = data.ClassificationData(
        images[:300], labels[:300], images[300:350], labels[300:350], batch_size=64, seed=6
    )
    assert not torch.equal(next(other_seed.batches(0))[1], e0[0][1])
    # batches of one epoch are disjoint draws of the training set
    plain = data.ClassificationData(
        images[:300], labels[:300], images[:1], labels[:1], batch_size=64, augment=False
    )
    xs = torch.cat([x for x, _ in plain.batches(3)])
    assert len({tuple(x.flatten()[:40].tolist()) for x in xs}) == 256
    test = _as_list(cd.test_batches(batch_size=20))
    assert [len(y) for _, y in test] == [20, 20, 10]
    torch.testing.assert_close(torch.cat([x for x, _ in test]), data.normalize(images[300:350]))
    assert torch.equal(torch.cat([y for _, y in test]), labels[300:350])
    with pytest.raises(ValueError, match="exceeds"):
        data.ClassificationData(images[:10], labels[:10], images[:1], labels[:1], batch_size=64)
    with pytest.raises(ValueError, match="labels"):
        data.ClassificationData(images[:10], labels[:9], images[:1], labels[:1], batch_size=4)


def test_shards_are_rows_of_the_global_batch(train, text_file):
    """Process r of N sees rows r*B..(r+1)*B-1 of the batch one process with batch N*B sees,
    augmentation included, and resumes at any batch the same way."""
    images, labels = train
    one = data.ClassificationData(images[:300], labels[:300], images[:1], labels[:1], batch_size=64, seed=5)
    half = data.ClassificationData(images[:300], labels[:300], images[:1], labels[:1], batch_size=32, seed=5)
    shards = [half.shard(r, 2) for r in range(2)]
    assert half.steps_per_epoch == 9 and shards[0].steps_per_epoch == one.steps_per_epoch == 4
    for epoch in (0, 3):
        whole = _as_list(one.batches(epoch))
        parts = [_as_list(s.batches(epoch)) for s in shards]
        assert not torch.equal(parts[0][0][1], parts[1][0][1])
        for k, (x, y) in enumerate(whole):
            assert torch.equal(torch.cat([parts[0][k][0], parts[1][k][0]]), x)
            assert torch.equal(torch.cat([parts[0][k][1], parts[1][k][1]]), y)
        assert _same(_as_list(shards[1].batches(epoch, start=2)), parts[1][2:])
    assert one.shard(0, 1) == one  # one process: the data itself
    with pytest.raises(ValueError, match="rank 2 of world size 2"):
        half.shard(2, 2)
    with pytest.raises(ValueError, match="x 16 process"):
        half.shard(0, 16)

    text = data.CharDataset.from_file(text_file, block_size=16, batch_size=8, steps_per_epoch=3, seed=3)
    small = data.CharDataset.from_file(text_file, block_size=16, batch_size=4, steps_per_epoch=3, seed=3)
    whole, parts = _as_list(text.batches(1)), [_as_list(small.shard(r, 2).batches(1)) for r in (0, 1)]
    assert small.world_size == 1  # shard() returns a view, the original is unchanged
    for k, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([parts[0][k][0], parts[1][k][0]]), x)
        assert torch.equal(torch.cat([parts[0][k][1], parts[1][k][1]]), y)


def test_classification_data_from_source(pickle_root):
    root, _ = pickle_root
    cd = data.ClassificationData.from_source(root, batch_size=16, train_limit=50, test_limit=8, seed=1)
    assert cd.train_images.shape == (50, 3, 32, 32) and len(cd.test_labels) == 8
    assert cd.steps_per_epoch == 3 and cd.augment and cd.seed == 1
    assert torch.equal(cd.train_images, data.load_cifar10_pickle(root, limit=50, seed=1)[0])
    bundled = data.ClassificationData.from_source("bundled", batch_size=100, augment=False)
    assert len(bundled.train_labels) == 1000 and bundled.steps_per_epoch == 10


LINES = [
    ("First Citizen", "Before we proceed any further, hear me speak."),
    ("All", "Speak, speak."),
    ("Second Citizen", "You are all resolved?"),
]
SAMPLE_TEXT = "".join(f"{who}: {line}\n" for who, line in LINES) * 20 + "Zounds! the end.\n"


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text(SAMPLE_TEXT, encoding="utf-8")
    return path


def test_char_dataset_vocab_and_round_trip(text_file):
    ds = data.CharDataset.from_file(text_file, block_size=16, split_fraction=0.8, batch_size=4)
    assert ds.vocab == tuple(sorted(set(SAMPLE_TEXT))) and ds.vocab_size == len(set(SAMPLE_TEXT))
    ids = ds.encode("Speak, speak.\n")
    assert ids.dtype == torch.int64 and ids.tolist() == [ds.vocab.index(c) for c in "Speak, speak.\n"]
    assert ds.decode(ids) == "Speak, speak.\n" and ds.decode(ids.tolist()) == "Speak, speak.\n"
    assert ds.decode(torch.tensor([], dtype=torch.int64)) == ""
    # position split: train is the first 80 % of the text, val the rest
    n_train = int(len(SAMPLE_TEXT) * 0.8)
    assert ds.decode(ds.train_data) == SAMPLE_TEXT[:n_train]
    assert ds.decode(ds.val_data) == SAMPLE_TEXT[n_train:]
    assert ds.decode(ds.val_data).endswith("Zounds! the end.\n") and "Z" not in ds.decode(ds.train_data)
    with pytest.raises(ValueError, match="'q'"):
        ds.encode("quick")
    with pytest.raises(ValueError):
        ds.decode(torch.tensor([ds.vocab_size]))
    with pytest.raises(FileNotFoundError, match="absent.txt"):
        data.CharDataset.from_file(text_file.parent / "absent.txt")
    with pytest.raises(ValueError, match="block_size"):
        data.CharDataset("abc", block_size=8)
    unicode = data.CharDataset("héllo wörld → ünïcode " * 3, block_size=4)
    assert unicode.decode(unicode.encode("wörld →")) == "wörld →"


def test_char_dataset_batches(text_file):
    ds = data.CharDataset.from_file(text_file, block_size=16, batch_size=4, steps_per_epoch=7, seed=3)
    e0, e0_again, e1 = _as_list(ds.batches(0)), _as_list(ds.batches(0)), _as_list(ds.batches(1))
    assert len(e0) == ds.steps_per_epoch == 7
    train_text = ds.decode(ds.train_data)
    for x, y in e0:
        assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x, y):  # windows of the training text, y one character ahead
            window = ds.decode(row_x) + ds.decode(row_y)[-1]
            assert window in train_text
    assert _same(e0, e0_again) and not _same(e0, e1)
    assert _same(_as_list(ds.batches(0, start=5)), e0[5:])
    starts = {ds.decode(x[0])[:16] for x, _ in e0}
    assert len(starts) > 1  # random offsets

    val = _as_list(ds.test_batches())
    n_windows = (len(ds.val_data) - 1) // 16
    assert sum(len(x) for x, _ in val) == n_windows and _same(val, _as_list(ds.test_batches()))
    x_all = torch.cat([x for x, _ in val])
    y_all = torch.cat([y for _, y in val])
    assert torch.equal(x_all.flatten(), ds.val_data[: n_windows * 16])  # consecutive windows from the start
    assert torch.equal(y_all.flatten(), ds.val_data[1 : n_windows * 16 + 1])
    assert [len(x) for x, _ in ds.test_batches(batch_size=2, max_windows=5)] == [2, 2, 1]


@pytest.mark.skipif(not TINY_SHAKESPEARE.is_file(), reason="tinyshakespeare.txt not available")
def test_tiny_shakespeare():
    ds = data.CharDataset.from_file(TINY_SHAKESPEARE, block_size=64, batch_size=8, steps_per_epoch=2)
    assert ds.vocab_size == 65 and len(ds.train_data) + len(ds.val_data) > 1_000_000
    x, y = next(ds.batches(0))
    assert x.shape == (8, 64) and torch.equal(x[:, 1:], y[:, :-1])
    assert ds.decode(ds.train_data[:14]) == "First Citizen:"
