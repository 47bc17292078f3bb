"""Permuted MNIST (GEM): every task applies its own fixed random pixel permutation."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from edgecl.data.common import transformed_benchmark
from edgecl.data.core import Benchmark, SampleCount
from edgecl.data.digits import digits


def permutation(_task: int, _n_tasks: int, input_shape: tuple[int, ...],
                rng: np.random.Generator) -> Callable[[torch.Tensor], torch.Tensor]:
    """A seeded permutation of all input positions (every task is permuted, as in GEM)."""
    perm = torch.from_numpy(rng.permutation(math.prod(input_shape)))
    return lambda x: x.flatten(1)[:, perm].reshape(x.shape)


def load(n_tasks: int | None, samples_per_task: SampleCount, seed: int,
         data_dir: str | Path | None, validation: bool) -> Benchmark:
    """Default 20 tasks x 1,000 digits; each task's test set is the whole permuted test split."""
    load_split = functools.partial(digits, data_dir)
    return transformed_benchmark("pmnist", load_split, permutation, n_tasks, samples_per_task, seed,
                                 validation)
