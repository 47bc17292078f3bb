"""Continual-learning benchmarks in GEM's protocol (Lopez-Paz & Ranzato, 2017).

``load_benchmark(name, ...)`` returns a :class:`Benchmark`: an ordered tuple of
:class:`TaskData` whose training samples are streamed once, task by task, with
:meth:`Benchmark.stream`. Nothing is ever downloaded.
"""

from __future__ import annotations

import numbers
from pathlib import Path

from edgecl.data.tasks import Batch, Benchmark, BenchmarkError, SampleCount, TaskData
from edgecl.registry import BENCHMARK_LOADERS, BENCHMARKS, resolve

__all__ = ["BENCHMARKS", "Batch", "Benchmark", "BenchmarkError", "TaskData", "load_benchmark"]


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
    ``Split.validation``; a file: benchmark holds out a ``seed``-drawn 1/8 of each task's
    training groups, see ``edgecl.data.npzfile``): the tasks train on the rest and are
    evaluated on it, never on the test split; hyper-parameters are chosen this way.
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise BenchmarkError(f"seed must be a non-negative integer, got {seed!r}")
    if name.startswith("file:"):
        from edgecl.data import npzfile

        return npzfile.load(name, n_tasks, samples_per_task, int(seed), validation)
    if name not in BENCHMARK_LOADERS:
        raise BenchmarkError(f"unknown benchmark {name!r}; valid: {', '.join(BENCHMARKS)}, "
                             "file:PATH")
    load = resolve(BENCHMARK_LOADERS[name])
    return load(n_tasks, samples_per_task, int(seed), data_dir, validation)
