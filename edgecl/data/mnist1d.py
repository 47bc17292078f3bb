"""Permuted MNIST-1D: the 40-step MNIST-1D sequences, one seeded position permutation per task.

MNIST-1D (4,000 train / 1,000 test) is generated locally by the ``mnist1d`` package with its
default arguments, then standardised with the training split's scalar mean and std.
"""

from __future__ import annotations

import contextlib
import functools
import io
import random
from pathlib import Path

import numpy as np

from edgecl.data.builders import DIGIT_CLASSES, Split, transformed_benchmark
from edgecl.data.pmnist import describe_permutation, permutation
from edgecl.data.tasks import Benchmark, SampleCount


@functools.cache
def _generated() -> Split:
    # make_dataset reseeds the global `random` and numpy RNGs and may print; contain both.
    state = random.getstate(), np.random.get_state()
    quiet = io.StringIO()
    try:
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            from mnist1d.data import get_dataset_args, make_dataset

            data = make_dataset(get_dataset_args())
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
    mean, std = data["x"].mean(), data["x"].std()

    def standardise(x: np.ndarray) -> np.ndarray:
        return ((x - mean) / std).astype(np.float32)[:, None, :]

    return Split(standardise(data["x"]), data["y"].astype(np.int64),
                 standardise(data["x_test"]), data["y_test"].astype(np.int64), scale=1.0,
                 classes=DIGIT_CLASSES,
                 source="mnist1d, generated locally (4,000 train / 1,000 test)")


def load(n_tasks: int | None, samples_per_task: SampleCount, seed: int,
         data_dir: str | Path | None, validation: bool) -> Benchmark:
    """Default 20 tasks x 1,000 sequences, input_shape (1, 40); ``data_dir`` is not used."""
    return transformed_benchmark("mnist1d", _generated, permutation, n_tasks,
                                 samples_per_task, seed, validation,
                                 describe_permutation("mnist1d"))
