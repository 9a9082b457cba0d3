"""Datasets, per-rank shards, batch order and CIFAR augmentation: all in torch, no torchvision.

Readers (each returns a :class:`Dataset` holding the whole train and test split in memory):

* ``digits``: scikit-learn's 8×8 handwritten digits (1,797 images, ships with the package, so
  the default job needs no download). A fixed 80/20 split (seed 0, whatever ``--seed`` says) so
  test accuracy is comparable across runs.
* ``synthetic[:samples=N,features=F,classes=K,seed=S]``: a Gaussian mixture of K classes in F
  dimensions (linearly separable-ish), any size, generated from its own seed.
* ``cifar10`` / ``cifar100``: the published "python version" pickles,
  ``cifar-10-batches-py/data_batch_1..5`` + ``test_batch`` and ``cifar-100-python/train`` +
  ``test`` (fine labels); ``--data-dir`` may point at the folder or at its parent.
* ``tinyimagenet``: the published folder layout ``tiny-imagenet-200/{wnids.txt,
  train/<wnid>/images/*.JPEG, val/images/*.JPEG, val/val_annotations.txt}`` read with PIL
  (optional dependency), 64×64 RGB, 200 classes.

Images stay ``uint8`` in memory (CIFAR's 50,000 training images are 150 MB, not 600 MB as
float32) and are normalised per batch.

Sharding: rank r of N owns a fixed, disjoint subset of the training set, drawn once from the seed
(IID: a seeded permutation dealt round-robin; non-IID: a Dirichlet(α) split of every class,
Hsu et al. 2019, as in MoNNA's experiments). Every rank takes the same number of steps per epoch,
``(n_train // N) // batch_size``, so collectives always pair up; a rank whose shard is smaller than
that (non-IID) cycles through it. The order within an epoch and the augmentation of each batch are
drawn from generators seeded by (seed, rank, epoch[, step]): a resumed run sees the same batches as
an uninterrupted one without saving any generator state.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ..errors import UserError


class DataError(UserError, ValueError):
    """A dataset that cannot be read; the message names the expected files."""


@dataclass
class Dataset:
    name: str
    train_x: torch.Tensor  # uint8 (N, C, H, W) images or float32 (N, F) features
    train_y: torch.Tensor  # int64 (N,)
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    #: per-channel (images) or per-feature mean and std used to normalise batches
    mean: torch.Tensor
    std: torch.Tensor
    #: images with a spatial layout (augmentation applies)
    is_image: bool

    @property
    def input_shape(self) -> Tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    def batch(self, split: str, indices: torch.Tensor, augment_generator: Optional[torch.Generator]
              = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Float32 inputs (normalised, augmented when a generator is given) and labels."""
        xs, ys = (self.train_x, self.train_y) if split == "train" else (self.test_x, self.test_y)
        x = xs[indices]
        if self.is_image:
            x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
            if augment_generator is not None:
                x = random_crop_flip(x, padding=4, generator=augment_generator)
            x = (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)
        else:
            x = (x.float() - self.mean) / self.std
        return x, ys[indices]


DATASETS = ("digits", "synthetic", "cifar10", "cifar100", "tinyimagenet")


def check_dataset(spec: str, data_dir: Optional[str]) -> None:
    """Validate a dataset spec and its directory without loading it (cheap: runs before
    hvd.init). Raises DataError."""
    name, options = parse_dataset_spec(spec)
    if name in ("cifar10", "cifar100", "tinyimagenet"):
        if options:
            raise DataError(f"dataset {name!r} takes no options, got {options}")
        _dataset_files(name, data_dir)
    elif name == "digits":
        if options:
            raise DataError(f"dataset 'digits' takes no options, got {options}")
        try:
            import sklearn.datasets  # noqa: F401
        except ImportError:
            raise DataError("dataset 'digits' needs scikit-learn: "
                            "pip install scikit-learn") from None
    elif name == "synthetic":
        _synthetic_options(options)


def parse_dataset_spec(spec: str) -> Tuple[str, Dict[str, str]]:
    name, _, rest = spec.strip().lower().partition(":")
    name = {"cifar-10": "cifar10", "cifar-100": "cifar100", "tiny-imagenet": "tinyimagenet",
            "tiny_imagenet": "tinyimagenet"}.get(name, name)
    if name not in DATASETS:
        raise DataError(f"unknown dataset {spec!r}; choose one of: {', '.join(DATASETS)}")
    options = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise DataError(f"dataset spec {spec!r}: expected key=value, got {item!r}")
        options[key.strip()] = value.strip()
    return name, options


def load_dataset(spec: str, data_dir: Optional[str] = None) -> Dataset:
    name, options = parse_dataset_spec(spec)
    if name == "digits":
        return load_digits()
    if name == "synthetic":
        return make_synthetic(**_synthetic_options(options))
    if name in ("cifar10", "cifar100"):
        return load_cifar(name, data_dir)
    return load_tiny_imagenet(data_dir)


# --- digits and synthetic ----------------------------------------------------------------------
def load_digits() -> Dataset:
    from sklearn.datasets import load_digits as sk_digits
    bunch = sk_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)  # (N,1,8,8)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    n_test = len(labels) // 5
    test, train = order[:n_test], order[n_test:]
    pixels = images[train]
    return Dataset("digits", images[train], labels[train], images[test], labels[test], 10,
                   mean=pixels.mean().reshape(1), std=pixels.std().reshape(1), is_image=True)


_SYNTHETIC_DEFAULTS = {"samples": 4096, "features": 32, "classes": 10, "seed": 0}


def _synthetic_options(options: Dict[str, str]) -> Dict[str, int]:
    out = dict(_SYNTHETIC_DEFAULTS)
    for key, value in options.items():
        if key not in out:
            raise DataError(f"synthetic dataset: unknown option {key!r}; "
                            f"options: {', '.join(_SYNTHETIC_DEFAULTS)}")
        try:
            out[key] = int(value)
        except ValueError:
            raise DataError(f"synthetic dataset: {key}={value!r} is not an integer") from None
    if out["samples"] < 2 or out["features"] < 1 or out["classes"] < 2:
        raise DataError("synthetic dataset needs samples >= 2, features >= 1, classes >= 2")
    return out


def make_synthetic(samples: int = 4096, features: int = 32, classes: int = 10,
                   seed: int = 0) -> Dataset:
    """Gaussian mixture: class k's mean is a random unit vector ×2, unit-variance noise; 80/20."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, features, generator=g)
    centers = 2.0 * centers / centers.norm(dim=1, keepdim=True)
    total = samples + max(1, samples // 4)
    y = torch.randint(0, classes, (total,), generator=g)
    x = centers[y] + torch.randn(total, features, generator=g)
    x_train, y_train, x_test, y_test = x[:samples], y[:samples], x[samples:], y[samples:]
    return Dataset("synthetic", x_train, y_train, x_test, y_test, classes,
                   mean=x_train.mean(0), std=x_train.std(0).clamp_min(1e-6), is_image=False)


# --- CIFAR ---------------------------------------------------------------------------------------
CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]),
    "cifar100": ("cifar-100-python", ["train"], ["test"]),
}
# LIEC-SGD's normalisation constants (CIFAR-10 channel statistics), used for both CIFARs.
CIFAR_MEAN = torch.tensor([0.4914, 0.4822, 0.4465])
CIFAR_STD = torch.tensor([0.2470, 0.2435, 0.2616])


def _dataset_files(name: str, data_dir: Optional[str]) -> Path:
    """The dataset's folder after checking that every expected file is there."""
    if name == "tinyimagenet":
        folder, required = "tiny-imagenet-200", ["wnids.txt", "train", "val/val_annotations.txt",
                                                 "val/images"]
    else:
        folder, train, test = CIFAR_LAYOUT[name]
        required = train + test
    expected = f"{folder}/{{{','.join(required)}}}"
    if not data_dir:
        raise DataError(f"dataset {name!r} needs --data-dir: a directory holding {expected} "
                        "(nothing is downloaded)")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"--data-dir {root} is not a directory; it must hold {expected} "
                        "(nothing is downloaded)")
    candidates = [root, root / folder]
    for base in candidates:
        if all((base / item).exists() for item in required):
            return base
    missing = [item for item in required if not (root / folder / item).exists()
               and not (root / item).exists()]
    raise DataError(f"{root} is not a {name} directory: expected {expected} "
                    f"(in it or in {root / folder}); missing: {', '.join(missing)}")


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a malformed file
        raise DataError(f"{path}: not a CIFAR python pickle "
                        f"({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    # The published files are Python 2 pickles with bytes keys; accept str keys too.
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _read_cifar_file(path: Path, label_key: str) -> Tuple[torch.Tensor, torch.Tensor]:
    entry = _read_pickle(path)
    if "data" not in entry or label_key not in entry:
        raise DataError(f"{path}: expected keys 'data' and {label_key!r}, found {sorted(entry)}")
    data = np.asarray(entry["data"], dtype=np.uint8)
    labels = np.asarray(entry[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise DataError(f"{path}: 'data' must be N×3072 uint8 rows with N labels, got "
                        f"{data.shape} and {labels.shape}")
    # Each row holds the 1024 red, then green, then blue values of a 32×32 image, row-major.
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


def load_cifar(name: str, data_dir: Optional[str]) -> Dataset:
    base = _dataset_files(name, data_dir)
    _, train_files, test_files = CIFAR_LAYOUT[name]
    label_key = "labels" if name == "cifar10" else "fine_labels"
    num_classes = 10 if name == "cifar10" else 100

    def read(files: List[str]):
        parts = [_read_cifar_file(base / f, label_key) for f in files]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    train_x, train_y = read(train_files)
    test_x, test_y = read(test_files)
    for labels, split in ((train_y, "train"), (test_y, "test")):
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise DataError(f"{base}: {split} labels outside 0..{num_classes - 1}")
    return Dataset(name, train_x, train_y, test_x, test_y, num_classes, CIFAR_MEAN.clone(),
                   CIFAR_STD.clone(), is_image=True)


# --- Tiny ImageNet -------------------------------------------------------------------------------
def load_tiny_imagenet(data_dir: Optional[str]) -> Dataset:
    """Tiny ImageNet (200 classes, 500 train and 50 val images each, 64×64); the labelled ``val``
    split serves as test set (the published ``test`` split has no labels)."""
    base = _dataset_files("tinyimagenet", data_dir)
    try:
        from PIL import Image
    except ImportError:
        raise DataError("dataset 'tinyimagenet' needs Pillow to read JPEGs: pip install pillow") \
            from None
    wnids = [w.strip() for w in (base / "wnids.txt").read_text().split() if w.strip()]
    if not wnids:
        raise DataError(f"{base / 'wnids.txt'} lists no class ids")
    label_of = {w: i for i, w in enumerate(wnids)}
    train_files = _tiny_imagenet_train_files(base, wnids, label_of)
    test_files = _tiny_imagenet_val_files(base, label_of)
    if not train_files or not test_files:
        raise DataError(f"{base}: found {len(train_files)} training and {len(test_files)} "
                        "validation images; expected train/<wnid>/images/*.JPEG and "
                        "val/val_annotations.txt")
    train_x, train_y = _stack_tiny_imagenet(Image, train_files)
    test_x, test_y = _stack_tiny_imagenet(Image, test_files)
    # ImageNet channel statistics, the usual choice for Tiny ImageNet.
    return Dataset("tinyimagenet", train_x, train_y, test_x, test_y, len(wnids),
                   torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225]),
                   is_image=True)


def _tiny_imagenet_train_files(base: Path, wnids: List[str],
                               label_of: Dict[str, int]) -> List[Tuple[Path, int]]:
    files: List[Tuple[Path, int]] = []
    for wnid in wnids:
        folder = base / "train" / wnid / "images"
        if not folder.is_dir():
            raise DataError(f"{base}: expected train/{wnid}/images/*.JPEG for class {wnid}")
        files += [(p, label_of[wnid]) for p in sorted(folder.glob("*.JPEG"))]
    return files


def _tiny_imagenet_val_files(base: Path, label_of: Dict[str, int]) -> List[Tuple[Path, int]]:
    files: List[Tuple[Path, int]] = []
    for line in (base / "val" / "val_annotations.txt").read_text().splitlines():
        fields = line.split("\t")
        if len(fields) < 2:
            continue
        if fields[1] not in label_of:
            raise DataError(f"val_annotations.txt names class {fields[1]!r}, not in wnids.txt")
        files.append((base / "val" / "images" / fields[0], label_of[fields[1]]))
    return files


def _read_rgb_image(image_module, path: Path) -> np.ndarray:
    try:
        with image_module.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{path}: cannot read image ({exc})") from None


def _stack_tiny_imagenet(image_module, files: List[Tuple[Path, int]]):
    """(N, 3, 64, 64) uint8 images and int64 labels; ``image_module`` is PIL.Image."""
    images = np.stack([_read_rgb_image(image_module, p) for p, _ in files])  # (N, H, W, 3)
    if images.shape[1:] != (64, 64, 3):
        raise DataError(f"Tiny ImageNet images must be 64×64 RGB, got {images.shape[1:]}")
    return (torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
            torch.tensor([label for _, label in files], dtype=torch.int64))

# --- augmentation --------------------------------------------------------------------------------
def random_crop_flip(images: torch.Tensor, padding: int,
                     generator: torch.Generator) -> torch.Tensor:
    """Standard CIFAR augmentation in torch ops: zero-pad by ``padding``, crop a random window of
    the original size, flip horizontally with probability 1/2 (per image)."""
    n, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h))  # (n, h)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w))  # (n, w)
    cols = torch.where(flip.view(n, 1), cols.flip(1), cols)
    batch = torch.arange(n).view(n, 1, 1)
    # gather (n, h, w) windows for every channel at once
    out = padded.permute(0, 2, 3, 1)[batch, rows.view(n, h, 1), cols.view(n, 1, w)]
    return out.permute(0, 3, 1, 2).contiguous()


# --- shards and order ----------------------------------------------------------------------------
def shard_indices(labels: torch.Tensor, world_size: int, seed: int,
                  non_iid_alpha: Optional[float] = None) -> List[torch.Tensor]:
    """Disjoint training-set shards, one per rank, deterministic from ``seed``.

    IID: a seeded permutation dealt round-robin (shard sizes differ by at most one).
    Non-IID: for every class, Dirichlet(α·1) proportions decide how its samples are split among
    ranks (small α: each rank sees few classes; α → ∞: IID)."""
    n = len(labels)
    if n < world_size:
        raise DataError(f"{n} training samples cannot be split over {world_size} ranks")
    g = torch.Generator().manual_seed(seed)
    if non_iid_alpha is None:
        order = torch.randperm(n, generator=g)
        return [order[r::world_size].sort().values for r in range(world_size)]
    rng = np.random.default_rng(seed)
    shards: List[List[np.ndarray]] = [[] for _ in range(world_size)]
    labels_np = labels.numpy()
    for cls in np.unique(labels_np):
        members = np.flatnonzero(labels_np == cls)
        rng.shuffle(members)
        proportions = rng.dirichlet(np.full(world_size, non_iid_alpha))
        cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(int)
        for r, part in enumerate(np.split(members, cuts)):
            shards[r].append(part)
    out = [torch.from_numpy(np.sort(np.concatenate(parts))).long() for parts in shards]
    empty = [r for r, s in enumerate(out) if len(s) == 0]
    if empty:
        raise DataError(f"the Dirichlet(alpha={non_iid_alpha}) split left ranks {empty} without "
                        "data; use a larger --non-iid alpha or fewer ranks")
    return out


def steps_per_epoch(n_train: int, world_size: int, batch_size: int) -> int:
    steps = (n_train // world_size) // batch_size
    if steps < 1:
        raise DataError(f"{n_train} training samples over {world_size} ranks do not fill one "
                        f"batch of {batch_size} per rank; lower --batch-size")
    return steps


def _generator(*keys: int) -> torch.Generator:
    # A fixed mixing of the keys into one 63-bit seed (no Python hash(): it is salted per process).
    seed = 0x9E3779B97F4A7C15
    for k in keys:
        seed = (seed * 6364136223846793005 + int(k) + 1442695040888963407) % (1 << 63)
    return torch.Generator().manual_seed(seed)


def epoch_order(shard: torch.Tensor, needed: int, seed: int, rank: int, epoch: int) -> torch.Tensor:
    """The first ``needed`` sample indices this rank visits in ``epoch``: its shard in a fresh
    seeded order, repeated (each time reshuffled) when the shard is smaller than ``needed``."""
    g = _generator(seed, rank, epoch)
    parts, have = [], 0
    while have < needed:
        parts.append(shard[torch.randperm(len(shard), generator=g)])
        have += len(shard)
    return torch.cat(parts)[:needed]


def augment_generator(seed: int, rank: int, epoch: int, step: int) -> torch.Generator:
    return _generator(seed, rank, epoch, step, 0xA06)


def eval_indices(n_test: int, rank: int, world_size: int) -> torch.Tensor:
    """Rank r evaluates test samples r, r+N, r+2N, ...; the sums over ranks cover the set once."""
    return torch.arange(rank, n_test, world_size)
