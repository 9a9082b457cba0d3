"""Dataset readers on small fake directories in the published formats, shards, order,
augmentation."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from hvdcomp.train import data
from hvdcomp.train.data import DataError


# --- fake datasets in the published formats ------------------------------------------------------
def _write_cifar_pickle(path: Path, rows: np.ndarray, labels, label_key: bytes) -> None:
    # The published files are Python 2 pickles whose keys are bytes.
    entry = {b"batch_label": b"fake", label_key: list(labels), b"data": rows,
             b"filenames": [b"x.png"] * len(labels)}
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


@pytest.fixture
def fake_cifar10(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    written = {}
    for name, n in [(f"data_batch_{i}", 3) for i in range(1, 6)] + [("test_batch", 4)]:
        rows = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n)
        _write_cifar_pickle(folder / name, rows, labels, b"labels")
        written[name] = (rows, labels)
    return tmp_path, written


def test_cifar10_reader_keeps_pixels_labels_and_file_order(fake_cifar10):
    root, written = fake_cifar10
    ds = data.load_cifar("cifar10", str(root))
    assert ds.train_x.shape == (15, 3, 32, 32) and ds.train_x.dtype == torch.uint8
    assert ds.test_x.shape == (4, 3, 32, 32)
    assert ds.num_classes == 10 and ds.is_image
    # Published layout: each row is 1024 red, 1024 green, 1024 blue values, row-major 32×32.
    for file_index in range(5):
        rows, labels = written[f"data_batch_{file_index + 1}"]
        for j in range(len(labels)):
            i = 3 * file_index + j
            assert int(ds.train_y[i]) == labels[j]
            for c, h, w in [(0, 0, 0), (1, 5, 17), (2, 31, 31), (2, 0, 31)]:
                assert int(ds.train_x[i, c, h, w]) == rows[j, c * 1024 + h * 32 + w]
    test_rows, test_labels = written["test_batch"]
    assert ds.test_y.tolist() == list(test_labels)
    assert int(ds.test_x[3, 1, 2, 3]) == test_rows[3, 1024 + 2 * 32 + 3]


def test_cifar10_accepts_the_folder_itself_and_its_parent(fake_cifar10):
    root, _ = fake_cifar10
    a = data.load_dataset("cifar10", str(root))
    b = data.load_dataset("cifar10", str(root / "cifar-10-batches-py"))
    assert torch.equal(a.train_x, b.train_x)


def test_cifar100_reader_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for name, n in (("train", 5), ("test", 2)):
        rows = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        entry = {b"data": rows, b"fine_labels": [99, 0, 42, 7, 63][:n], b"coarse_labels": [1] * n}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    ds = data.load_dataset("cifar100", str(tmp_path))
    assert ds.num_classes == 100
    assert ds.train_y.tolist() == [99, 0, 42, 7, 63]
    assert ds.test_y.tolist() == [99, 0]


def test_missing_cifar_directory_names_the_expected_files(tmp_path):
    with pytest.raises(DataError, match="data_batch_1.*test_batch"):
        data.check_dataset("cifar10", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="--data-dir"):
        data.check_dataset("cifar10", None)
    (tmp_path / "cifar-10-batches-py").mkdir()
    for i in range(1, 5):  # data_batch_5 and test_batch missing
        (tmp_path / "cifar-10-batches-py" / f"data_batch_{i}").write_bytes(b"")
    with pytest.raises(DataError, match="missing: data_batch_5, test_batch"):
        data.check_dataset("cifar10", str(tmp_path))


def test_malformed_cifar_files_are_refused_with_the_file_named(fake_cifar10):
    root, _ = fake_cifar10
    bad = root / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(b"this is not a pickle")
    with pytest.raises(DataError, match="data_batch_3.*not a CIFAR python pickle"):
        data.load_dataset("cifar10", str(root))
    _write_cifar_pickle(bad, np.zeros((2, 100), dtype=np.uint8), [0, 1], b"labels")
    with pytest.raises(DataError, match="N×3072"):
        data.load_dataset("cifar10", str(root))


def test_tiny_imagenet_reader_on_the_published_layout(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    base = tmp_path / "tiny-imagenet-200"
    wnids = ["n01443537", "n01629819"]
    colours = {"n01443537": (200, 30, 30), "n01629819": (20, 40, 220)}
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for wnid in wnids:
        folder = base / "train" / wnid / "images"
        folder.mkdir(parents=True)
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for k in range(2):
            Image.new("RGB", (64, 64), colours[wnid]).save(folder / f"{wnid}_{k}.JPEG", "JPEG")
    annotations = []
    for k, wnid in enumerate(reversed(wnids)):
        Image.new("RGB", (64, 64), colours[wnid]).save(base / "val" / "images" / f"val_{k}.JPEG",
                                                       "JPEG")
        annotations.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")

    ds = data.load_dataset("tinyimagenet", str(tmp_path))
    assert ds.num_classes == 2
    assert ds.train_x.shape == (4, 3, 64, 64) and ds.test_x.shape == (2, 3, 64, 64)
    assert ds.train_y.tolist() == [0, 0, 1, 1]
    assert ds.test_y.tolist() == [1, 0]
    # Solid colours survive JPEG up to a few levels.
    for images, labels in ((ds.train_x, ds.train_y), (ds.test_x, ds.test_y)):
        for image, label in zip(images, labels):
            expected = torch.tensor(colours[wnids[int(label)]], dtype=torch.float32)
            assert (image.float().mean(dim=(1, 2)) - expected).abs().max() < 4


def test_missing_tiny_imagenet_names_the_layout(tmp_path):
    with pytest.raises(DataError, match="val_annotations.txt"):
        data.check_dataset("tinyimagenet", str(tmp_path))


# --- digits and synthetic -------------------------------------------------------------------------
def test_digits_ships_with_scikit_learn_and_has_a_fixed_split():
    pytest.importorskip("sklearn")
    ds = data.load_dataset("digits")
    assert len(ds.train_y) + len(ds.test_y) == 1797
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10
    assert len(ds.test_y) == 1797 // 5
    assert torch.equal(data.load_digits().test_y, ds.test_y)  # independent of any run seed
    x, y = ds.batch("train", torch.arange(len(ds.train_y)))
    # normalised with the training set's own statistics
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3


def test_synthetic_dataset_of_any_size():
    ds = data.load_dataset("synthetic:samples=300,features=7,classes=3,seed=5")
    assert ds.train_x.shape == (300, 7) and ds.num_classes == 3 and not ds.is_image
    assert len(ds.test_y) == 75
    again = data.load_dataset("synthetic:samples=300,features=7,classes=3,seed=5")
    assert torch.equal(ds.train_x, again.train_x)
    with pytest.raises(DataError, match="unknown option 'size'"):
        data.check_dataset("synthetic:size=3", None)
    with pytest.raises(DataError, match="unknown dataset 'mnist'"):
        data.check_dataset("mnist", None)


# --- shards and order ---------------------------------------------------------------------------
def test_iid_shards_are_disjoint_cover_everything_and_depend_only_on_the_seed():
    labels = torch.arange(103) % 10
    shards = data.shard_indices(labels, 4, seed=3)
    joined = torch.cat(shards)
    assert sorted(joined.tolist()) == list(range(103))
    assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1
    again = data.shard_indices(labels, 4, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(shards, again))
    other = data.shard_indices(labels, 4, seed=4)
    assert not all(torch.equal(a, b) for a, b in zip(shards, other))


def test_dirichlet_shards_are_disjoint_and_skewed_for_small_alpha():
    labels = torch.arange(2000) % 10

    def dominant_fraction(shards):
        # average over ranks of the share of the rank's most frequent class
        return np.mean([np.bincount(labels[s].numpy(), minlength=10).max() / len(s)
                        for s in shards])

    skewed = data.shard_indices(labels, 4, seed=0, non_iid_alpha=0.1)
    assert sorted(torch.cat(skewed).tolist()) == list(range(2000))
    iid = data.shard_indices(labels, 4, seed=0)
    # IID shards hold each class at ~1/10; Dirichlet(0.1) concentrates classes on few ranks.
    assert dominant_fraction(iid) < 0.15
    assert dominant_fraction(skewed) > 0.3


def test_epoch_order_is_a_reshuffle_of_the_shard_and_wraps_when_short():
    shard = torch.tensor([4, 9, 13, 20, 21])
    order = data.epoch_order(shard, 5, seed=0, rank=1, epoch=2)
    assert sorted(order.tolist()) == shard.tolist()
    assert torch.equal(order, data.epoch_order(shard, 5, seed=0, rank=1, epoch=2))
    orders = {tuple(data.epoch_order(shard, 5, seed=0, rank=1, epoch=e).tolist()) for e in range(6)}
    assert len(orders) > 1  # a new order each epoch
    long = data.epoch_order(shard, 12, seed=0, rank=0, epoch=0)
    counts = np.bincount(long.numpy(), minlength=22)[shard.numpy()]
    assert len(long) == 12 and counts.min() >= 2 and counts.max() <= 3


def test_steps_per_epoch_is_the_same_for_every_rank_and_refuses_empty_epochs():
    assert data.steps_per_epoch(1438, 2, 32) == 22
    with pytest.raises(DataError, match="lower --batch-size"):
        data.steps_per_epoch(10, 2, 32)


def test_eval_indices_cover_the_test_set_once():
    parts = [data.eval_indices(11, r, 3) for r in range(3)]
    assert sorted(torch.cat(parts).tolist()) == list(range(11))


# --- augmentation ---------------------------------------------------------------------------------
def test_random_crop_flip_gives_a_padded_crop_of_each_image_maybe_mirrored():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(24, 3, 6, 5)
    out = data.random_crop_flip(images, padding=2, generator=g)
    assert out.shape == images.shape
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    flips = 0
    for i in range(len(images)):
        matches = []
        for dy in range(5):
            for dx in range(5):
                window = padded[i, :, dy:dy + 6, dx:dx + 5]
                if torch.equal(out[i], window):
                    matches.append("plain")
                if torch.equal(out[i], window.flip(-1)):
                    matches.append("flip")
        assert matches, f"image {i} is no crop of its padded input"
        flips += matches == ["flip"]
    assert 0 < flips < len(images)  # both cases occur among 24 images
    again = data.random_crop_flip(images, 2, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_augmentation_is_seeded_by_rank_epoch_and_step():
    a = data.augment_generator(0, 0, 1, 2)
    b = data.augment_generator(0, 0, 1, 2)
    c = data.augment_generator(0, 1, 1, 2)
    x, y, z = (torch.rand(4, generator=g) for g in (a, b, c))
    assert torch.equal(x, y) and not torch.equal(x, z)
