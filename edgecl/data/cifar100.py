"""Split CIFAR-100 (GEM): 20 tasks of 5 consecutive classes, a 5-way head per task.

Read through torchvision from ``data_dir`` (``data_dir/cifar-100-python``); nothing is downloaded.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from edgecl.data.common import (
    VISION_HINT,
    Split,
    class_split_benchmark,
    data_root,
    import_vision_datasets,
)
from edgecl.data.core import Benchmark, BenchmarkError

_FETCH = "torchvision.datasets.CIFAR100({root!r}, download=True)"


def load(n_tasks: int | None, samples_per_task: int | None, seed: int,
         data_dir: str | Path | None) -> Benchmark:
    """Default 20 tasks x 2,500 images (all), input_shape (3, 32, 32) in [0, 1]."""
    return class_split_benchmark("cifar100", functools.partial(_split, data_dir), max_tasks=20,
                                 classes_per_task=5, n_tasks=n_tasks,
                                 samples_per_task=samples_per_task, seed=seed)


def _split(data_dir: str | Path | None) -> Split:
    if data_dir is None:
        raise BenchmarkError("cifar100 needs data_dir: a folder holding cifar-100-python/ "
                             f"(fetch it once with {_FETCH.format(root='DIR')}; {VISION_HINT})")
    return _cifar(data_root(data_dir, "cifar100"))


@functools.cache
def _cifar(root: Path) -> Split:
    datasets = import_vision_datasets("cifar100")
    arrays = []
    for train in (True, False):
        try:
            cifar = datasets.CIFAR100(str(root), train=train, download=False)
        except RuntimeError as err:
            raise BenchmarkError(
                f"CIFAR-100 not found: expected torchvision's files in "
                f"{root / 'cifar-100-python'} (train, test, meta); fetch them once with "
                f"{_FETCH.format(root=str(root))}") from err
        images = np.ascontiguousarray(cifar.data.transpose(0, 3, 1, 2))  # NHWC -> NCHW
        arrays += [images, np.asarray(cifar.targets, dtype=np.int64)]
    x_train, y_train, x_test, y_test = arrays
    return Split(x_train, y_train, x_test, y_test, scale=255.0, classes=tuple(cifar.classes),
                 source=f"torchvision CIFAR-100 at {root} (50,000 train / 10,000 test)")
