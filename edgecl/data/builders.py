"""Helpers shared by the benchmark modules: splits, argument checks, task builders."""

from __future__ import annotations

import numbers
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from edgecl.data.tasks import Benchmark, BenchmarkError, SampleCount, TaskData

DIGIT_CLASSES = tuple(str(k) for k in range(10))
VALIDATION_EVERY = 8  # every 8th group of each class is validation: 1/8 of the training split
VISION_HINT = "install it with: pip install 'edgecl[vision]'"

# (task index, n_tasks, input_shape, task rng) -> the task's input transform
TaskTransform = Callable[
    [int, int, tuple[int, ...], np.random.Generator], Callable[[torch.Tensor], torch.Tensor]
]


@dataclass(frozen=True, eq=False)
class Split:
    """A fixed, read-only train/test split; inputs become float32 ``x / scale``."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    scale: float
    classes: tuple[str, ...]  # name of each global label
    source: str
    groups: np.ndarray | None = None  # the recording each training sample comes from, if shared

    def __post_init__(self) -> None:
        for array in (self.x_train, self.y_train, self.x_test, self.y_test):
            array.setflags(write=False)

    def validation(self) -> Split:
        """Training on 7/8 of the training split, "testing" on the held-out 1/8: for each class,
        every 8th of its groups (recordings; one sample each if there are none), so windows cut
        from one recording never sit on both sides. The test split is not used."""
        groups = np.arange(len(self.y_train)) if self.groups is None else self.groups
        held = np.zeros(len(groups), dtype=bool)
        for c in np.unique(self.y_train):
            ids = np.unique(groups[self.y_train == c])
            held |= np.isin(groups, ids[VALIDATION_EVERY - 1::VALIDATION_EVERY])
        kept = ~held
        return Split(self.x_train[kept], self.y_train[kept], self.x_train[held],
                     self.y_train[held], self.scale, self.classes,
                     f"{self.source}; validation run: {held.sum():,} of the training samples "
                     "held out and evaluated, the test split unused", groups[kept])

    def inputs(self, x: np.ndarray) -> torch.Tensor:
        """A fresh contiguous float32 tensor of ``x / scale``."""
        return torch.from_numpy(x.astype(np.float32, order="C") / np.float32(self.scale))


def check_count(value: object, default: int, limit: int | None, what: str, where: str) -> int:
    """Resolve an optional positive count, refusing anything above ``limit``; ``"all"`` is
    ``limit`` (or ``default`` when there is no limit)."""
    if value is None:
        return default
    if value == "all":
        return default if limit is None else limit
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise BenchmarkError(f"{what} must be a positive integer, got {value!r}")
    if limit is not None and value > limit:
        raise BenchmarkError(f"{what}={value} is more than {where} ({limit:,})")
    return int(value)


def natural_order(names: Iterable[str]) -> tuple[str, ...]:
    """The distinct ``names``, sorted as people number things: numbers by value ("2" < "10",
    "walk2" < "walk10"), text by code point; ties ("01" and "1") by the names themselves."""
    def key(name: str) -> tuple[list[str | int], str]:
        parts = re.split(r"([0-9]+)", name)  # text, digits, text, ...: digits at odd places
        return [int(p) if i % 2 else p for i, p in enumerate(parts)], name

    return tuple(sorted(set(names), key=key))


def task_rng(seed: int, task: int) -> np.random.Generator:
    """Independent generator for one task, so a task does not depend on n_tasks."""
    return np.random.default_rng([seed, task])


def task_name(task: int) -> str:
    """The canonical task id."""
    return f"task{task:02d}"


def data_root(data_dir: str | Path, what: str) -> Path:
    """``data_dir`` as a resolved path; it must be an existing directory."""
    root = Path(data_dir).expanduser().resolve()
    if not root.is_dir():
        raise BenchmarkError(f"{what}: data_dir {str(root)!r} is not an existing directory")
    return root


def one_line(err: BaseException) -> str:
    """``Type: message`` with all whitespace runs folded to single spaces."""
    return " ".join(f"{type(err).__name__}: {err}".split())


def import_vision_datasets(what: str) -> ModuleType:
    """``torchvision.datasets``, imported lazily; any import failure becomes a BenchmarkError."""
    try:
        from torchvision import datasets
    except Exception as err:  # ImportError, or a broken install failing on its C ops
        raise BenchmarkError(f"{what} needs torchvision, which failed to import "
                             f"({one_line(err)}); {VISION_HINT}") from err
    return datasets


def read_vision_splits(what: str, dataset: str, root: Path, missing: str) -> tuple[Any, Any]:
    """Train and test split of ``torchvision.datasets.<dataset>`` from the files under ``root``
    (never downloaded); when torchvision cannot find them, BenchmarkError(``missing``)."""
    reader = getattr(import_vision_datasets(what), dataset)
    try:
        return (reader(str(root), train=True, download=False),
                reader(str(root), train=False, download=False))
    except RuntimeError as err:
        raise BenchmarkError(missing) from err


def transformed_benchmark(name: str, load_split: Callable[[], Split], transform: TaskTransform,
                          n_tasks: int | None, samples_per_task: SampleCount,
                          seed: int, validation: bool = False,
                          describe: Callable[[int, int], str] | None = None) -> Benchmark:
    """GEM's transformed-input protocol (one shared head), e.g. permuted or rotated MNIST.

    Task t draws ``samples_per_task`` training samples in random order from the whole training
    split; its test set is the whole test split; both pass through the task's transform, which
    ``describe(seed, t)`` states for the task's model's clients.
    """
    n_tasks = check_count(n_tasks, 20, None, "n_tasks", name)
    split = load_split().validation() if validation else load_split()
    per_task = check_count(samples_per_task, 1000, len(split.y_train), "samples_per_task",
                           f"{name}'s training split offers")
    input_shape = tuple(split.x_train.shape[1:])
    x_test = split.inputs(split.x_test)
    tasks = []
    for t in range(n_tasks):
        rng = task_rng(seed, t)
        apply = transform(t, n_tasks, input_shape, rng)
        order = rng.permutation(len(split.y_train))[:per_task]
        tasks.append(TaskData(
            name=task_name(t),
            x_train=apply(split.inputs(split.x_train[order])).contiguous(),
            y_train=torch.from_numpy(split.y_train[order]),
            x_test=apply(x_test).contiguous(),
            y_test=torch.from_numpy(split.y_test.copy()),
            classes=split.classes,
            transform=describe(seed, t) if describe else "",
        ))
    return Benchmark(name, tuple(tasks), input_shape, len(split.classes), "shared", split.source)


def class_split_benchmark(name: str, load_split: Callable[[], Split], *, max_tasks: int,
                          classes_per_task: int, n_tasks: int | None,
                          samples_per_task: SampleCount, seed: int,
                          validation: bool = False) -> Benchmark:
    """GEM's split protocol: task t owns consecutive classes and a per-task head with local labels.

    Each task's training samples are all of its classes' samples in seeded random order (or the
    first ``samples_per_task`` of them); its test set is all of its classes' test samples.
    """
    n_tasks = check_count(n_tasks, max_tasks, max_tasks, "n_tasks", f"{name} offers")
    split = load_split().validation() if validation else load_split()
    groups = [range(t * classes_per_task, (t + 1) * classes_per_task) for t in range(n_tasks)]
    train_idx = [np.flatnonzero(np.isin(split.y_train, g)) for g in groups]
    smallest = min(len(i) for i in train_idx)
    per_task = None if samples_per_task in (None, "all") else check_count(
        samples_per_task, smallest, smallest, "samples_per_task",
        f"the smallest {name} task offers")
    tasks = []
    for t, (group, idx) in enumerate(zip(groups, train_idx, strict=True)):
        order = task_rng(seed, t).permutation(idx)[:per_task]
        test = np.flatnonzero(np.isin(split.y_test, group))
        tasks.append(TaskData(
            name=task_name(t),
            x_train=split.inputs(split.x_train[order]),
            y_train=torch.from_numpy(split.y_train[order] - group.start),
            x_test=split.inputs(split.x_test[test]),
            y_test=torch.from_numpy(split.y_test[test] - group.start),
            classes=split.classes[group.start:group.stop],
        ))
    input_shape = tuple(split.x_train.shape[1:])
    return Benchmark(name, tuple(tasks), input_shape, classes_per_task, "per_task", split.source)
