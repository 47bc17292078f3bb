"""Split MNIST: 5 tasks of two digits each, (0, 1), (2, 3), ..., with a 2-way head per task."""

from __future__ import annotations

import functools
from pathlib import Path

from edgecl.data.builders import class_split_benchmark
from edgecl.data.digits import digits
from edgecl.data.tasks import Benchmark, SampleCount


def load(n_tasks: int | None, samples_per_task: SampleCount, seed: int,
         data_dir: str | Path | None, validation: bool) -> Benchmark:
    """Default: all 5 tasks, all of each task's training digits (800 embedded) in seeded order."""
    return class_split_benchmark("splitmnist", functools.partial(digits, data_dir), max_tasks=5,
                                 classes_per_task=2, n_tasks=n_tasks,
                                 samples_per_task=samples_per_task, seed=seed,
                                 validation=validation)
