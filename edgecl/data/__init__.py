"""Continual-learning benchmarks in GEM's protocol (Lopez-Paz & Ranzato, 2017).

``load_benchmark(name, ...)`` returns a :class:`Benchmark`: an ordered tuple of
:class:`TaskData` whose training samples are streamed once, task by task, with
:meth:`Benchmark.stream`. Nothing is ever downloaded.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from pathlib import Path

from edgecl.data import cifar100, mnist1d, npzfile, pmnist, rotmnist, sensors, splitmnist
from edgecl.data.core import Batch, Benchmark, BenchmarkError, SampleCount, TaskData

__all__ = ["BENCHMARKS", "Batch", "Benchmark", "BenchmarkError", "TaskData", "load_benchmark"]

# (n_tasks, samples_per_task, seed, data_dir, validation) -> the benchmark
Loader = Callable[[int | None, SampleCount, int, str | Path | None, bool], Benchmark]
_LOADERS: dict[str, Loader] = {
    "pmnist": pmnist.load,
    "rotmnist": rotmnist.load,
    "splitmnist": splitmnist.load,
    "mnist1d": mnist1d.load,
    "cifar100": cifar100.load,
    "basicmotions": sensors.load_basicmotions,
    "basicmotions-classes": sensors.load_basicmotions_classes,
    "japanesevowels": sensors.load_japanesevowels,
}
BENCHMARKS: tuple[str, ...] = tuple(_LOADERS)


def load_benchmark(name: str, *, n_tasks: int | None = None,
                   samples_per_task: SampleCount = None, seed: int = 0,
                   data_dir: str | Path | None = None, validation: bool = False) -> Benchmark:
    """Build a benchmark by name (one of ``BENCHMARKS``, or ``file:PATH`` for an .npz).

    ``n_tasks`` / ``samples_per_task`` of None mean the benchmark's default; ``samples_per_task``
    ``"all"`` keeps every training sample of each task. ``seed`` picks the
    task transforms and sample orders; equal arguments give bit-identical tensors. ``data_dir``
    is required by cifar100, switches pmnist/rotmnist/splitmnist from the embedded 5,000 digits
    to full MNIST, and is ignored by mnist1d, the aeon sensor sets and file:PATH.
    ``validation=True`` holds out the validation part of the training split (see
    ``Split.validation``): the tasks train on the rest and are evaluated on it, never on the
    test split; hyper-parameters are chosen this way.
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise BenchmarkError(f"seed must be a non-negative integer, got {seed!r}")
    if name.startswith("file:"):
        if validation:
            raise BenchmarkError("file: benchmarks have no validation split; write one as the "
                                 "test split of a second file (the tasks' held-out samples)")
        return npzfile.load(name, n_tasks, samples_per_task)
    if name not in _LOADERS:
        raise BenchmarkError(f"unknown benchmark {name!r}; valid: {', '.join(BENCHMARKS)}, "
                             "file:PATH")
    return _LOADERS[name](n_tasks, samples_per_task, int(seed), data_dir, validation)
