"""``file:PATH`` benchmarks: your own tasks from one ``.npz`` archive.

Format (read with ``np.load(path, allow_pickle=False)``; write it with ``np.savez`` or
``np.savez_compressed``). For every task i = 0, 1, ..., T-1 (no gaps, no leading zeros):

- ``task{i}_x_train``: numeric array [n, *sample_shape] (bool, integer or float; stored as
  float32, values used as given, no scaling). ``sample_shape`` has at least one dimension and
  is the same for every task and split, e.g. (784,), (1, 28, 28) or (3, 32, 32).
- ``task{i}_y_train``: labels [n], either integer class indices >= 0 (below 100,000 unless
  ``classes`` names more) or class names (a string array, e.g. ``"walking"``); every task uses
  the same kind.
- ``task{i}_x_test``, ``task{i}_y_test``: the same for the task's test set.
- ``task{i}_name`` (optional): 0-d string array, the task id (default ``task{i:02d}``, e.g.
  ``task00``); ids must be unique and name a model folder: up to 128 letters, digits, ``.``,
  ``_`` or ``-``, starting with a letter or digit.
- ``task{i}_group_train`` (optional): 1-d integer or string array [n], the group (e.g. the
  recording) each training sample comes from; the validation split holds out whole groups.

Optional keys for the whole file:

- ``head``: 0-d string array, ``"shared"`` (default: one head for all tasks) or ``"per_task"``
  (one head per task; labels are then each task's local labels).
- ``classes``: 1-d string array of label names; label k (or the name ``classes[k]``) means
  output k. Default for integer labels: ``"0"``, ``"1"``, ... up to the largest label, and the
  head width is that label + 1. Default for string labels: the distinct names in natural order
  (numbers by value, so ``"2"`` comes before ``"10"``; then text by code point), over all tasks
  with a shared head, or over each task's own names with per-task heads, so a task of two
  activities gets a 2-way head naming them (every task must then have as many names; give
  ``classes`` otherwise). Either way the mapping depends only on the set of names, never on the
  order samples arrive in.

Every split must hold at least one sample, every x must be finite in float32, and any other key
is an error. Training samples are streamed in stored order. ``n_tasks`` keeps the first tasks;
``samples_per_task`` keeps the first samples of each task's training split (it may not exceed
the smallest task); test sets are always kept whole.

``validation=True`` never reads the test arrays: each task holds out about 1/8 of its training
groups (each sample its own group unless ``task{i}_group_train`` says otherwise), drawn per
class with a generator seeded by (seed, task), evaluates on them and trains on the rest, in
stored order. A class with at least 2 groups gives at least one; class names and the head
width then come from the training arrays alone.
"""

from __future__ import annotations

import re
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from edgecl.data.builders import (
    VALIDATION_EVERY,
    check_count,
    natural_order,
    one_line,
    task_name,
    task_rng,
)
from edgecl.data.tasks import Benchmark, BenchmarkError, SampleCount, TaskData

_TASK_KEY = re.compile(
    r"task(0|[1-9][0-9]*)_(x_train|y_train|x_test|y_test|name|group_train)")
_TEST_KEY = re.compile(r"task[0-9]+_[xy]_test")
_SPLITS = ("train", "test")
MAX_UNNAMED_CLASSES = 100_000  # labels without a `classes` array: a label of 2e9 is a mistake
_EXPECTED = ("task{i}_x_train, task{i}_y_train, task{i}_x_test, task{i}_y_test, task{i}_name, "
             "task{i}_group_train, head, classes")


class _Task(NamedTuple):
    name: str
    x_train: np.ndarray
    y_train: np.ndarray  # int64 indices, or str names until _encode_names maps them
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...] = ()


def load(spec: str, n_tasks: int | None, samples_per_task: SampleCount, seed: int = 0,
         validation: bool = False) -> Benchmark:
    """Load the benchmark named ``file:PATH``; see the module docstring for the format and
    what ``validation`` holds out."""
    if not spec.removeprefix("file:"):
        raise BenchmarkError("file: needs a path, e.g. file:my_tasks.npz")
    path = Path(spec.removeprefix("file:")).expanduser()
    arrays = _read(path, skip=_TEST_KEY if validation else None)
    by_task: dict[int, dict[str, np.ndarray]] = {}
    for key, array in arrays.items():
        match = _TASK_KEY.fullmatch(key)
        if match:
            by_task.setdefault(int(match[1]), {})[match[2]] = array
        elif key not in ("head", "classes"):
            raise _error(path, key, f"is not part of the format (expected {_EXPECTED})")
    if not by_task:
        raise _error(path, None, "holds no tasks (expected keys task0_x_train, task0_y_train, "
                                 "task0_x_test, task0_y_test, task1_x_train, ...)")
    gap = min(set(range(len(by_task))) - set(by_task), default=None)
    if gap is not None:
        raise _error(path, None, f"task indices must run 0..{max(by_task)} without gaps, "
                                 f"but there is no task{gap}_* key")
    head = _head(path, arrays.get("head"))
    names = _classes(path, arrays.get("classes"))
    raw = [_validation_task(path, i, by_task[i], names, seed) if validation
           else _task(path, i, by_task[i], names) for i in range(len(by_task))]
    _check_tasks(path, raw)
    if raw[0].y_train.dtype.kind == "U":
        raw = _encode_names(path, raw, names, head)
    else:
        n_classes = len(names) if names else 1 + max(int(y.max()) for t in raw
                                                     for y in (t.y_train, t.y_test))
        classes = names or tuple(str(k) for k in range(n_classes))
        raw = [t._replace(classes=classes) for t in raw]

    kept = raw[:check_count(n_tasks, len(raw), len(raw), "n_tasks", f"{path} holds")]
    smallest = min(len(t.y_train) for t in kept)
    per_task = None if samples_per_task in (None, "all") else check_count(
        samples_per_task, smallest, smallest, "samples_per_task",
        f"the smallest task in {path} holds")
    tasks = tuple(
        TaskData(t.name, torch.from_numpy(t.x_train[:per_task]),
                 torch.from_numpy(t.y_train[:per_task]), torch.from_numpy(t.x_test),
                 torch.from_numpy(t.y_test), t.classes)
        for t in kept)
    source = f"file {path}"
    if validation:
        held = sum(len(t.y_test) for t in kept)
        source += (f"; validation run: {held:,} of the training samples held out and evaluated, "
                   "the test split unused")
    return Benchmark(spec, tasks, tuple(kept[0].x_train.shape[1:]), len(kept[0].classes), head,
                     source)


def _error(path: Path, key: str | None, problem: str) -> BenchmarkError:
    return BenchmarkError(f"{path}: {problem}" if key is None else f"{path}: key '{key}' {problem}")


def _read(path: Path, skip: re.Pattern[str] | None = None) -> dict[str, np.ndarray]:
    """Every array of the archive except those whose key ``skip`` matches (never read)."""
    if not path.is_file():
        raise _error(path, None, "is not a file" if path.exists() else "file not found")
    try:
        archive = np.load(path, allow_pickle=False)
    except OSError as err:
        raise _error(path, None, f"cannot be read ({one_line(err)})") from err
    except (ValueError, EOFError, zipfile.BadZipFile) as err:
        raise _error(path, None, "is not an .npz archive (write it with np.savez)") from err
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise _error(path, None, "is not an .npz archive but a single .npy array "
                                 "(write it with np.savez)")
    arrays = {}
    with archive:
        for key in archive.files:
            if skip and skip.fullmatch(key):
                continue
            try:
                arrays[key] = archive[key]
            except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
                problem = (f"cannot be read ({one_line(err)}); store plain numeric or string "
                           "arrays, not pickled Python objects")
                raise _error(path, key, problem) from err
    return arrays


def _string(array: np.ndarray) -> str | None:
    """The value of a 0-d string array, else None."""
    return str(array) if array.ndim == 0 and array.dtype.kind == "U" else None


def _head(path: Path, array: np.ndarray | None) -> str:
    if array is None:
        return "shared"
    value = _string(array)
    if value not in ("shared", "per_task"):
        got = repr(value) if value is not None else f"{array.dtype} array of shape {array.shape}"
        raise _error(path, "head", f"must be the 0-d string 'shared' or 'per_task', got {got}")
    return value


def _classes(path: Path, array: np.ndarray | None) -> tuple[str, ...] | None:
    if array is None:
        return None
    if array.ndim != 1 or array.dtype.kind != "U" or len(array) == 0:
        raise _error(path, "classes", "must be a non-empty 1-d string array, got "
                                      f"{array.dtype} array of shape {array.shape}")
    return tuple(str(c) for c in array)


def _task(path: Path, i: int, parts: dict[str, np.ndarray],
          names: tuple[str, ...] | None) -> _Task:
    """Validate one task's arrays; x become float32, y int64."""
    name, x_train, y_train, _ = _training_part(path, i, parts, names)
    x_test, y_test = _split_arrays(path, i, "test", parts, names)
    return _Task(name, x_train, y_train, x_test, y_test)


def _validation_task(path: Path, i: int, parts: dict[str, np.ndarray],
                     names: tuple[str, ...] | None, seed: int) -> _Task:
    """One task's training arrays, split: the held-out groups take the place of the test set."""
    name, x, y, groups = _training_part(path, i, parts, names)
    held = _held_out(y, groups, task_rng(seed, i))
    if held.all() or not held.any():
        raise _error(path, f"task{i}_y_train", "cannot be split into training and validation "
                     f"groups: validation needs a class with 2 or more groups (samples, or ids "
                     f"of task{i}_group_train) and training some samples outside them")
    return _Task(name, x[~held], y[~held], x[held], y[held])


def _training_part(path: Path, i: int, parts: dict[str, np.ndarray],
                   names: tuple[str, ...] | None
                   ) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """The task id, training inputs and labels, and each training sample's group."""
    name = _task_id(path, i, parts.get("name"))
    x, y = _split_arrays(path, i, "train", parts, names)
    return name, x, y, _groups(path, f"task{i}_group_train", parts.get("group_train"), len(y))


def _split_arrays(path: Path, i: int, split: str, parts: dict[str, np.ndarray],
                  names: tuple[str, ...] | None) -> tuple[np.ndarray, np.ndarray]:
    for part in (f"x_{split}", f"y_{split}"):
        if part not in parts:
            raise _error(path, f"task{i}_{part}", "is missing")
    x = _inputs(path, f"task{i}_x_{split}", parts[f"x_{split}"])
    return x, _labels(path, f"task{i}_y_{split}", parts[f"y_{split}"], len(x), names)


def _groups(path: Path, key: str, groups: np.ndarray | None, n: int) -> np.ndarray:
    """The group ids of ``n`` training samples; without any, each sample is its own group."""
    if groups is None:
        return np.arange(n)
    if groups.ndim != 1 or groups.dtype.kind not in "iuU":
        raise _error(path, key, "must be a 1-d integer or string array of group ids, got "
                                f"{groups.dtype} array of shape {groups.shape}")
    if len(groups) != n:
        raise _error(path, key, f"has {len(groups)} group ids but its x array has {n} samples")
    return groups


def _held_out(y: np.ndarray, groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Which samples are validation: for each class, a seeded 1/8 of its groups (at least one
    of a class with 2 or more), so a group never sits on both sides."""
    held = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        ids = np.unique(groups[y == c])
        if len(ids) >= 2:
            chosen = rng.permutation(ids)[:max(1, len(ids) // VALIDATION_EVERY)]
            held |= np.isin(groups, chosen)
    return held


def _task_id(path: Path, i: int, array: np.ndarray | None) -> str:
    if array is None:
        return task_name(i)
    # A task id names its model folder, so the model repository's rule applies (imported here:
    # edgecl.serve loads onnxruntime, which only files that name their tasks need to pay for).
    from edgecl.repository import TASK_ID, TASK_ID_RULE

    value = _string(array)
    if not value:
        raise _error(path, f"task{i}_name", "must be a non-empty 0-d string array, got "
                                            f"{array.dtype} array of shape {array.shape}")
    if not TASK_ID.fullmatch(value):
        raise _error(path, f"task{i}_name", f"is {value!r}, not a task id: use {TASK_ID_RULE}")
    return value


def _inputs(path: Path, key: str, x: np.ndarray) -> np.ndarray:
    if x.ndim < 2:
        raise _error(path, key, f"must have shape [n, *sample_shape], got shape {x.shape}")
    if x.dtype.kind not in "biuf":
        raise _error(path, key, f"must be numeric (bool, int or float), got dtype {x.dtype}")
    if len(x) == 0:
        raise _error(path, key, "is empty")
    with np.errstate(over="ignore"):
        floats = x.astype(np.float32, order="C")
    if not np.isfinite(floats).all():
        raise _error(path, key, "has non-finite values (NaN, inf or beyond float32 range)")
    return floats


def _labels(path: Path, key: str, y: np.ndarray, n: int, names: tuple[str, ...] | None
            ) -> np.ndarray:
    """Integer labels as int64 (range-checked), or string labels as a str array."""
    if y.ndim != 1:
        raise _error(path, key, f"must be a 1-d label array [n], got shape {y.shape}")
    if len(y) != n:
        raise _error(path, key, f"has {len(y)} labels but its x array has {n} samples")
    if y.dtype.kind == "S":
        try:
            return np.char.decode(y, "utf-8")
        except UnicodeDecodeError as err:
            raise _error(path, key, "holds byte strings that are not UTF-8 class names") from err
    if y.dtype.kind == "U":
        return y
    if y.dtype.kind not in "iu":
        raise _error(path, key, f"must hold integer class indices or string class names, got "
                                f"dtype {y.dtype} (whole numbers: y.astype(np.int64); names: "
                                "y.astype(str))")
    if y.min() < 0:  # checked in y's own dtype: uint64 above 2**63 would wrap in int64
        raise _error(path, key, f"has negative label {y.min()} (labels must be >= 0)")
    if names and y.max() >= len(names):
        raise _error(path, key, f"has label {y.max()} but 'classes' names only "
                                f"{len(names)} labels (0..{len(names) - 1})")
    if not names and y.max() >= MAX_UNNAMED_CLASSES:
        raise _error(path, key, f"has label {y.max()}; without a 'classes' array labels must "
                                f"be below {MAX_UNNAMED_CLASSES:,}")
    return y.astype(np.int64)


def _encode_names(path: Path, tasks: list[_Task], names: tuple[str, ...] | None,
                  head: str) -> list[_Task]:
    """String labels -> indices: into ``names`` if given, else into the natural order of the
    names over all tasks (shared head) or of each task's own names (per-task heads)."""
    if names is None and head == "shared":
        names = natural_order(np.concatenate([y for t in tasks for y in (t.y_train, t.y_test)]))
    out = []
    for i, task in enumerate(tasks):
        classes = names or natural_order(np.concatenate([task.y_train, task.y_test]))
        if out and len(classes) != len(out[0].classes):
            raise _error(path, f"task{i}_y_train", f"names {len(classes)} classes but task0 "
                         f"names {len(out[0].classes)}: per-task heads share one width; give a "
                         "'classes' array naming every label (each head then has one output "
                         "per name)")
        index = {c: k for k, c in enumerate(classes)}
        ys = [_indices(path, f"task{i}_y_{split}", y, index)
              for split, y in zip(_SPLITS, (task.y_train, task.y_test), strict=True)]
        out.append(task._replace(y_train=ys[0], y_test=ys[1], classes=classes))
    return out


def _indices(path: Path, key: str, y: np.ndarray, index: dict[str, int]) -> np.ndarray:
    unknown = sorted(set(y.tolist()) - index.keys())
    if unknown:
        raise _error(path, key, f"has label {unknown[0]!r}, which 'classes' does not name "
                                f"(it names {', '.join(map(repr, index))})")
    return np.array([index[v] for v in y.tolist()], dtype=np.int64)


def _check_tasks(path: Path, tasks: list[_Task]) -> None:
    """Every x shares task 0's sample shape, every y task 0's kind of label; ids are unique."""
    shape = tasks[0].x_train.shape[1:]
    first = _label_kind(tasks[0].y_train)
    seen: set[str] = set()
    for i, task in enumerate(tasks):
        for split, y in zip(_SPLITS, (task.y_train, task.y_test), strict=True):
            if _label_kind(y) != first:
                raise _error(path, f"task{i}_y_{split}", f"holds {_label_kind(y)} but "
                                                         f"task0_y_train holds {first}: use one")
        for split, x in zip(_SPLITS, (task.x_train, task.x_test), strict=True):
            if x.shape[1:] != shape:
                raise _error(path, f"task{i}_x_{split}", f"has sample shape {x.shape[1:]} but "
                                                         f"task0_x_train has {shape}")
        if task.name in seen:
            raise _error(path, f"task{i}_name", f"repeats the task id {task.name!r}")
        seen.add(task.name)


def _label_kind(y: np.ndarray) -> str:
    return "class names" if y.dtype.kind == "U" else "integer labels"
