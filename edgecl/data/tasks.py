"""Data containers shared by every benchmark: tasks, batches and the benchmark itself."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch


class BenchmarkError(ValueError):
    """A benchmark cannot be loaded; the message is one user-facing line."""


# Training samples per task: a count, "all" of them, or None for the benchmark's default.
SampleCount = int | Literal["all"] | None


# eq=False: the fields hold tensors, so instances compare (and hash) by identity.
@dataclass(frozen=True, eq=False)
class TaskData:
    """One task: its training stream and test set; labels index into ``classes``."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: tuple[str, ...]
    # the fixed transform that makes raw data this task's inputs, which a client of the task's
    # model applies too (e.g. pmnist's pixel permutation); "" when there is none
    transform: str = ""


@dataclass(frozen=True, eq=False)
class Batch:
    """A slice of one task's training data (views, never copies)."""

    x: torch.Tensor
    y: torch.Tensor
    task: str


@dataclass(frozen=True, eq=False)
class Benchmark:
    """An ordered sequence of tasks sharing one input shape."""

    name: str
    tasks: tuple[TaskData, ...]
    input_shape: tuple[int, ...]
    n_classes: int
    head: Literal["shared", "per_task"]
    source: str

    def stream(self, batch_size: int) -> Iterator[Batch]:
        """Yield every training sample exactly once, task by task, in stored order."""
        _check_batch_size(batch_size)
        return _batches(self.tasks, batch_size)

    def task_stream(self, index: int, batch_size: int) -> Iterator[Batch]:
        """The part of `stream` that belongs to task number `index`."""
        _check_batch_size(batch_size)
        return _batches(self.tasks[index:index + 1], batch_size)

    @property
    def n_train(self) -> int:
        """Total number of training samples over all tasks."""
        return sum(len(t.y_train) for t in self.tasks)


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise BenchmarkError(f"batch_size must be a positive integer, got {batch_size!r}")


def _batches(tasks: tuple[TaskData, ...], batch_size: int) -> Iterator[Batch]:
    for task in tasks:
        for start in range(0, len(task.y_train), batch_size):
            end = start + batch_size
            yield Batch(task.x_train[start:end], task.y_train[start:end], task.name)
