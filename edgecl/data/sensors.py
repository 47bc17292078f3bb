"""Real multichannel sensor recordings shipped inside the ``aeon`` wheel, as CL benchmarks.

Nothing is downloaded: the recordings are the ``.ts`` files under ``aeon/datasets/data/`` of the
installed aeon (``pip install 'edgecl[sensors]'``), read with aeon's own ``.ts`` parser; aeon is
imported only when one of these benchmarks is loaded. Values stay in the sensors' raw units (no
standardisation: normalisation travels with the model); inputs are ``[channels, steps]`` float32.

``basicmotions``: domain-incremental, one shared 4-way head.
    BasicMotions: a smartwatch's 3-axis accelerometer (channels 0-2; gravity removed, values
    look like m/s²) and 3-axis gyroscope (channels 3-5; values look like rad/s) at 10 Hz,
    10 s per recording, four students doing four activities (standing, running, walking,
    badminton); aeon's fixed split, 40 train / 40 test recordings, 10 per activity in each.
    A device classifies a sliding window, so each recording is cut into all its 64-step
    windows (stride 1, 37 per recording): 1,480 overlapping training windows and 1,480 test
    windows. That cut is the only augmentation, and the windows are not independent samples:
    40 recordings underlie each split. Every task holds the same activities under another
    sensor condition, one seeded transform of the windows: task 0 ``clean``, then, cycling,
    ``drift`` (per-channel gain in [0.7, 1.3] and offset up to ±1.5 m/s² or ±0.3 rad/s),
    ``rotation`` (the watch worn turned: one rotation by 45-180 degrees about a random axis,
    applied to the accelerometer and the gyroscope triads alike), ``dead`` (one channel reads
    0), ``noise`` (white noise, σ in [0.3, 1] m/s² and a third of that in rad/s) and ``warp``
    (a slower wearer: time stretched by 1/f, f in [0.6, 0.85], about the window's centre,
    linear interpolation, amplitudes unchanged). Task t's condition is ``condition(t)``, its
    parameters are drawn from (seed, t) only. Default 6 tasks (each condition once) x 1,000
    windows in seeded random order (at most 1,480); a task's test set is all 1,480 test
    windows under its condition.

``basicmotions-classes``: new activities arriving as new tasks, one 2-way head per task.
    The same clean windows, split by activity in the file's class order: task 0 (standing,
    running), task 1 (walking, badminton). Default all 740 training windows of a task in seeded
    order; its test set is its 740 test windows.

``japanesevowels``: new speakers enrolled as new tasks, one 3-way head per task.
    JapaneseVowels (UCI): nine male speakers saying the vowels /ae/, as 12 LPC cepstrum
    coefficients per frame (25.6 ms frames, 6.4 ms shift: microphone features as a device
    computes them), 7-29 frames per utterance, zero-padded at the end to 29 steps (so the
    utterance's length stays visible); aeon's split, 270 train (30 per speaker) / 370 test
    (24-88 per speaker). Task t enrolls speakers 3t+1..3t+3 (class names ``speaker1`` ...);
    default all 3 tasks x all 90 training utterances in seeded order.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from edgecl.data.builders import (
    Split,
    check_count,
    class_split_benchmark,
    one_line,
    transformed_benchmark,
)
from edgecl.data.tasks import Benchmark, BenchmarkError, SampleCount

SENSORS_HINT = "pip install 'edgecl[sensors]'"
AEON_BENCHMARKS = ("basicmotions", "basicmotions-classes", "japanesevowels")  # need aeon
WINDOW = 64  # steps per BasicMotions window (6.4 s at 10 Hz)
CONDITIONS = ("clean", "drift", "rotation", "dead", "noise", "warp")
ACC, GYRO = slice(0, 3), slice(3, 6)
JV_STEPS = 29  # the longest JapaneseVowels utterance


def _aeon_datasets(what: str) -> Path:
    """The folder of datasets shipped in the installed aeon wheel (aeon imported lazily)."""
    try:
        import aeon.datasets
    except ImportError as err:
        if (err.name or "").split(".")[0] == "aeon":
            raise BenchmarkError(f"{what} needs aeon: {SENSORS_HINT}") from err
        raise BenchmarkError(f"{what} needs aeon, which failed to import ({one_line(err)}); "
                             f"{SENSORS_HINT}") from err
    except Exception as err:  # a broken install (numba, llvmlite) failing at import
        raise BenchmarkError(f"{what} needs aeon, which failed to import ({one_line(err)}); "
                             f"{SENSORS_HINT}") from err
    return Path(aeon.datasets.__file__).parent / "data"


def _read_ts(what: str, problem: str, split: str) -> tuple[list[np.ndarray], np.ndarray,
                                                            tuple[str, ...]]:
    """One split of a ``.ts`` problem shipped with aeon: series [channels, steps], string
    labels, and the class names in the file's header order. Never downloads."""
    path = _aeon_datasets(what) / problem / f"{problem}_{split}.ts"
    if not path.is_file():
        import aeon

        raise BenchmarkError(f"{what}: aeon {aeon.__version__} does not ship {path}; "
                             "install aeon>=1.0 with its bundled datasets")
    from aeon.datasets import load_from_ts_file

    x, y, meta = load_from_ts_file(str(path), return_meta_data=True, return_type="np-list")
    return ([np.asarray(s, dtype=np.float64) for s in x], np.asarray(y).astype(str),
            tuple(str(c) for c in meta["class_values"]))


def _labels(y: np.ndarray, classes: tuple[str, ...]) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[v] for v in y], dtype=np.int64)


def _windows(series: list[np.ndarray], labels: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every ``WINDOW``-step window of each recording (stride 1), recording by recording:
    windows, their labels and the index of the recording each came from."""
    x = np.stack(series)  # [n, channels, steps]
    offsets = x.shape[-1] - WINDOW + 1
    win = np.lib.stride_tricks.sliding_window_view(x, WINDOW, axis=-1)  # [n, c, offsets, W]
    win = win.transpose(0, 2, 1, 3).reshape(-1, x.shape[1], WINDOW)
    return (np.ascontiguousarray(win, dtype=np.float32), np.repeat(labels, offsets),
            np.repeat(np.arange(len(x)), offsets))


@functools.cache
def basic_motions() -> Split:
    """BasicMotions cut into 64-step windows (raw units); classes in the file's header order."""
    train_x, train_y, classes = _read_ts("basicmotions", "BasicMotions", "TRAIN")
    test_x, test_y, _ = _read_ts("basicmotions", "BasicMotions", "TEST")
    x_train, y_train, recordings = _windows(train_x, _labels(train_y, classes))
    x_test, y_test, _ = _windows(test_x, _labels(test_y, classes))
    return Split(x_train, y_train, x_test, y_test, scale=1.0, classes=classes, groups=recordings,
                 source=f"BasicMotions shipped with aeon (40 train / 40 test recordings of "
                        f"6 x 100 steps at 10 Hz, cut into {WINDOW}-step windows: "
                        f"{len(y_train):,} / {len(y_test):,})")


@functools.cache
def japanese_vowels() -> Split:
    """JapaneseVowels, utterances zero-padded at the end to 29 frames; labels speaker1..9."""
    train_x, train_y, classes = _read_ts("japanesevowels", "JapaneseVowels", "TRAIN")
    test_x, test_y, _ = _read_ts("japanesevowels", "JapaneseVowels", "TEST")

    def pad(series: list[np.ndarray]) -> np.ndarray:
        out = np.zeros((len(series), series[0].shape[0], JV_STEPS), dtype=np.float32)
        for i, s in enumerate(series):
            out[i, :, :s.shape[1]] = s
        return out

    return Split(pad(train_x), _labels(train_y, classes), pad(test_x), _labels(test_y, classes),
                 scale=1.0, classes=tuple(f"speaker{c}" for c in classes),
                 source="JapaneseVowels shipped with aeon (270 train / 370 test utterances, "
                        "12 LPC cepstra x 7-29 frames, zero-padded to 29)")


def condition(task: int) -> str:
    """The sensor condition of basicmotions task ``task``."""
    return CONDITIONS[0] if task == 0 else CONDITIONS[1 + (task - 1) % (len(CONDITIONS) - 1)]


def rotation_matrix(axis: np.ndarray, degrees: float) -> np.ndarray:
    """Rodrigues' rotation by ``degrees`` about ``axis`` (normalised here), float64 [3, 3]."""
    k = axis / np.linalg.norm(axis)
    cross = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    rad = math.radians(degrees)
    return np.eye(3) + math.sin(rad) * cross + (1 - math.cos(rad)) * cross @ cross


Apply = Callable[[np.ndarray], np.ndarray]


def _drift(rng: np.random.Generator) -> Apply:
    gain = rng.uniform(0.7, 1.3, size=6)
    offset = np.concatenate([rng.uniform(-1.5, 1.5, size=3), rng.uniform(-0.3, 0.3, size=3)])
    return lambda x: x * gain[:, None] + offset[:, None]


def _rotation(rng: np.random.Generator) -> Apply:
    rot = rotation_matrix(rng.normal(size=3), rng.uniform(45.0, 180.0))

    def apply(x: np.ndarray) -> np.ndarray:
        out = x.copy()
        out[:, ACC] = np.einsum("ij,njt->nit", rot, x[:, ACC])
        out[:, GYRO] = np.einsum("ij,njt->nit", rot, x[:, GYRO])
        return out

    return apply


def _dead(rng: np.random.Generator) -> Apply:
    channel = int(rng.integers(6))

    def apply(x: np.ndarray) -> np.ndarray:
        out = x.copy()
        out[:, channel] = 0.0
        return out

    return apply


def _noise(rng: np.random.Generator) -> Apply:
    acc = rng.uniform(0.3, 1.0)
    sigma = np.array([acc] * 3 + [acc / 3] * 3)[:, None]
    noise_seed = int(rng.integers(2**63))
    calls = iter(range(2**62))  # call 0: the training windows, call 1: the test windows

    def apply(x: np.ndarray) -> np.ndarray:
        draw = np.random.default_rng([noise_seed, next(calls)])
        return x + draw.standard_normal(x.shape) * sigma

    return apply


def _warp(rng: np.random.Generator) -> Apply:
    factor = rng.uniform(0.6, 0.85)
    centre = (WINDOW - 1) / 2
    source = centre + (np.arange(WINDOW) - centre) * factor  # where each output step reads
    left = np.floor(source).astype(np.int64)
    frac = source - left

    def apply(x: np.ndarray) -> np.ndarray:
        return x[..., left] * (1 - frac) + x[..., left + 1] * frac

    return apply


_MAKERS: dict[str, Callable[[np.random.Generator], Apply]] = {
    "clean": lambda _rng: lambda x: x, "drift": _drift, "rotation": _rotation, "dead": _dead,
    "noise": _noise, "warp": _warp,
}


def sensor_condition(task: int, _n_tasks: int, _input_shape: tuple[int, ...],
                     rng: np.random.Generator) -> Callable[[torch.Tensor], torch.Tensor]:
    """Task ``task``'s condition as a transform of float32 windows [n, 6, WINDOW] (in float64)."""
    apply = _MAKERS[condition(task)](rng)
    return lambda x: torch.from_numpy(apply(x.double().numpy()).astype(np.float32))


def load_basicmotions(n_tasks: int | None, samples_per_task: SampleCount, seed: int,
                      data_dir: str | Path | None, validation: bool) -> Benchmark:
    """Default 6 tasks (clean, drift, rotation, dead, noise, warp) x 1,000 windows, input
    (6, 64), shared 4-way head; ``data_dir`` is not used."""
    n_tasks = check_count(n_tasks, len(CONDITIONS), None, "n_tasks", "basicmotions")
    per_task = 1000 if samples_per_task is None else samples_per_task  # checked against 1,480
    bench = transformed_benchmark("basicmotions", basic_motions, sensor_condition, n_tasks,
                                  per_task, seed, validation)
    conditions = ", ".join(condition(t) for t in range(n_tasks))
    return Benchmark(bench.name, bench.tasks, bench.input_shape, bench.n_classes, bench.head,
                     f"{bench.source}; task conditions: {conditions}")


def load_basicmotions_classes(n_tasks: int | None, samples_per_task: SampleCount, seed: int,
                              data_dir: str | Path | None, validation: bool) -> Benchmark:
    """Default 2 tasks x 2 activities x all 740 windows, input (6, 64), a 2-way head per task."""
    return class_split_benchmark("basicmotions-classes", basic_motions, max_tasks=2,
                                 classes_per_task=2, n_tasks=n_tasks,
                                 samples_per_task=samples_per_task, seed=seed,
                                 validation=validation)


def load_japanesevowels(n_tasks: int | None, samples_per_task: SampleCount, seed: int,
                        data_dir: str | Path | None, validation: bool) -> Benchmark:
    """Default 3 tasks x 3 speakers x 90 utterances, input (12, 29), a 3-way head per task."""
    return class_split_benchmark("japanesevowels", japanese_vowels, max_tasks=3,
                                 classes_per_task=3, n_tasks=n_tasks,
                                 samples_per_task=samples_per_task, seed=seed,
                                 validation=validation)
