"""Permuted MNIST (GEM): every task applies its own fixed random pixel permutation."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from edgecl.data.builders import task_rng, transformed_benchmark
from edgecl.data.digits import digits
from edgecl.data.tasks import Benchmark, SampleCount


def permutation(_task: int, _n_tasks: int, input_shape: tuple[int, ...],
                rng: np.random.Generator) -> Callable[[torch.Tensor], torch.Tensor]:
    """A seeded permutation of all input positions (every task is permuted, as in GEM)."""
    perm = torch.from_numpy(rng.permutation(math.prod(input_shape)))
    return lambda x: x.flatten(1)[:, perm].reshape(x.shape)


def task_permutation(seed: int, task: int, input_shape: tuple[int, ...]) -> torch.Tensor:
    """Task ``task``'s permutation of the flattened input positions, as the benchmark applies
    it: input position i of the task's samples holds position ``perm[i]`` of the raw sample."""
    return torch.from_numpy(task_rng(seed, task).permutation(math.prod(input_shape)))


def describe_permutation(name: str) -> Callable[[int, int], str]:
    """The client-facing statement of ``name``'s per-task permutation."""
    def describe(seed: int, task: int) -> str:
        return (f"{name} task {task} (seed {seed}): every input is permuted; the client sends "
                f"x.flatten()[perm].reshape(x.shape) with perm = "
                f"edgecl.data.pmnist.task_permutation({seed}, {task}, x.shape)")
    return describe


def load(n_tasks: int | None, samples_per_task: SampleCount, seed: int,
         data_dir: str | Path | None, validation: bool) -> Benchmark:
    """Default 20 tasks x 1,000 digits; each task's test set is the whole permuted test split."""
    load_split = functools.partial(digits, data_dir)
    return transformed_benchmark("pmnist", load_split, permutation, n_tasks, samples_per_task, seed,
                                 validation, describe_permutation("pmnist"))
