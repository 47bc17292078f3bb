"""Rotated MNIST (GEM): task t rotates every digit by 180 * t / n_tasks degrees."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgecl.data.builders import transformed_benchmark
from edgecl.data.digits import digits
from edgecl.data.tasks import Benchmark, SampleCount


def rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate square images [n, c, h, w] counter-clockwise as displayed (bilinear, zero fill).

    Computed in float64 so that angle 0 (and multiples of 90) reproduce the pixels exactly
    up to float32 rounding.
    """
    rad = math.radians(degrees)
    cos, sin = math.cos(rad), math.sin(rad)
    # affine_grid maps each output position to the input position it samples from.
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=torch.float64)
    grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
    out = F.grid_sample(x.double(), grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    return out.to(x.dtype)


def rotation(task: int, n_tasks: int, _input_shape: tuple[int, ...],
             _rng: np.random.Generator) -> Callable[[torch.Tensor], torch.Tensor]:
    """The task's rotation: angles 0, 180/n_tasks, ... (< 180)."""
    degrees = 180.0 * task / n_tasks
    return lambda x: rotate(x, degrees)


def load(n_tasks: int | None, samples_per_task: SampleCount, seed: int,
         data_dir: str | Path | None, validation: bool) -> Benchmark:
    """Default 20 tasks x 1,000 digits; each task's test set is the whole rotated test split."""
    load_split = functools.partial(digits, data_dir)
    return transformed_benchmark("rotmnist", load_split, rotation, n_tasks, samples_per_task, seed,
                                 validation)
