"""Split CIFAR-100 (GEM): 20 tasks of 5 consecutive classes, a 5-way head per task.

Read through torchvision from ``data_dir`` (``data_dir/cifar-100-python``); nothing is downloaded.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from edgecl.data.builders import (
    VISION_HINT,
    Split,
    class_split_benchmark,
    data_root,
    read_vision_splits,
)
from edgecl.data.tasks import Benchmark, BenchmarkError, SampleCount

_FETCH = "torchvision.datasets.CIFAR100({root!r}, download=True)"


def load(n_tasks: int | None, samples_per_task: SampleCount, seed: int,
         data_dir: str | Path | None, validation: bool) -> Benchmark:
    """Default 20 tasks x 2,500 images (all), input_shape (3, 32, 32) in [0, 1]."""
    return class_split_benchmark("cifar100", functools.partial(_split, data_dir), max_tasks=20,
                                 classes_per_task=5, n_tasks=n_tasks,
                                 samples_per_task=samples_per_task, seed=seed,
                                 validation=validation)


def _split(data_dir: str | Path | None) -> Split:
    if data_dir is None:
        raise BenchmarkError("cifar100 needs data_dir: a folder holding cifar-100-python/ "
                             f"(fetch it once with {_FETCH.format(root='DIR')}; {VISION_HINT})")
    return _cifar(data_root(data_dir, "cifar100"))


@functools.cache
def _cifar(root: Path) -> Split:
    train, test = read_vision_splits(
        "cifar100", "CIFAR100", root,
        f"CIFAR-100 not found: expected torchvision's files in {root / 'cifar-100-python'} "
        f"(train, test, meta); fetch them once with {_FETCH.format(root=str(root))}")
    x_train, x_test = (np.ascontiguousarray(d.data.transpose(0, 3, 1, 2)) for d in (train, test))
    y_train, y_test = (np.asarray(d.targets, dtype=np.int64) for d in (train, test))
    return Split(x_train, y_train, x_test, y_test, scale=255.0, classes=tuple(train.classes),
                 source=f"torchvision CIFAR-100 at {root} (50,000 train / 10,000 test)")
