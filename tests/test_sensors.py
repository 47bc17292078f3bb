"""The aeon sensor benchmarks: shapes, classes, determinism, the sensor conditions, errors.

Skipped where aeon is not installed (``pip install 'edgecl[sensors]'``), except the tests of
the error that says so.
"""

from __future__ import annotations

import builtins
import functools
import sys

import numpy as np
import pytest
import torch

from edgecl.data import BENCHMARKS, Benchmark, BenchmarkError, load_benchmark, sensors
from edgecl.data.sensors import AEON_BENCHMARKS as SENSOR_SETS
from edgecl.data.sensors import CONDITIONS, WINDOW, condition, rotation_matrix

ACTIVITIES = ("standing", "running", "walking", "badminton")
SMALL = {"n_tasks": 6, "samples_per_task": 50}


@functools.cache
def _load(name: str, seed: int = 0, **kwargs: int) -> Benchmark:
    return load_benchmark(name, seed=seed, **kwargs)


def load(name: str, seed: int = 0, **kwargs: int) -> Benchmark:
    pytest.importorskip("aeon")
    return _load(name, seed, **kwargs)


def clean_windows(split: str) -> torch.Tensor:
    """aeon's own BasicMotions recordings, cut here into every 64-step window."""
    from aeon.datasets import load_basic_motions

    x, _ = load_basic_motions(split=split)
    windows = [x[i, :, k:k + WINDOW] for i in range(len(x)) for k in range(100 - WINDOW + 1)]
    return torch.from_numpy(np.stack(windows).astype(np.float32))


def test_the_sensor_sets_are_registered():
    assert set(SENSOR_SETS) <= set(BENCHMARKS)


def test_basicmotions_defaults_shapes_classes_and_raw_units():
    b = load("basicmotions")
    assert (b.name, b.head, b.n_classes, b.input_shape) == ("basicmotions", "shared", 4, (6, 64))
    assert "aeon" in b.source and "clean, drift, rotation, dead, noise, warp" in b.source
    assert [t.name for t in b.tasks] == [f"task{i:02d}" for i in range(6)]
    assert b.n_train == 6 * 1000
    for t in b.tasks:
        assert t.classes == ACTIVITIES
        assert t.x_train.shape == (1000, 6, 64) and t.x_test.shape == (1480, 6, 64)
        assert t.x_train.dtype == torch.float32 and t.y_train.dtype == torch.int64
        assert t.x_train.is_contiguous() and t.x_test.is_contiguous()
        assert torch.bincount(t.y_test).tolist() == [370] * 4  # 10 recordings x 37 windows
        assert set(t.y_train.tolist()) == {0, 1, 2, 3}
    # task 0 is clean: aeon's recordings cut into windows, in raw units (no standardisation)
    clean = b.tasks[0]
    assert torch.equal(clean.x_test, clean_windows("test"))
    assert clean.x_test.abs().max() > 20
    pool = {w.numpy().tobytes() for w in clean_windows("train")}
    assert len(pool) == 1480
    assert all(w.numpy().tobytes() in pool for w in clean.x_train)  # drawn from the windows
    assert len({w.numpy().tobytes() for w in clean.x_train}) == 1000  # without replacement


def test_same_seed_is_bit_identical_and_other_seed_differs():
    a = load("basicmotions", **SMALL)
    b = load_benchmark("basicmotions", seed=0, **SMALL)
    for p, q in zip(a.tasks, b.tasks, strict=True):
        for key in ("x_train", "y_train", "x_test", "y_test"):
            assert torch.equal(getattr(p, key), getattr(q, key))
    c = load("basicmotions", seed=1, **SMALL)
    assert torch.equal(a.tasks[0].x_test, c.tasks[0].x_test)  # clean test windows: no seed
    assert not torch.equal(a.tasks[0].x_train, c.tasks[0].x_train)  # another order
    for t in (1, 2, 4, 5):  # other condition parameters (the dead channel may coincide)
        assert not torch.equal(a.tasks[t].x_test, c.tasks[t].x_test)


def test_a_task_depends_only_on_seed_and_index():
    a = load("basicmotions", **SMALL)
    b = load("basicmotions", n_tasks=5, samples_per_task=50)
    c = load("basicmotions")  # other samples_per_task: the test windows stay the same
    for t in range(5):
        assert torch.equal(a.tasks[t].x_train, b.tasks[t].x_train)
        assert torch.equal(a.tasks[t].x_test, c.tasks[t].x_test)


def test_conditions_cycle_after_the_clean_task():
    assert [condition(t) for t in range(12)] == [*CONDITIONS, *CONDITIONS[1:], "drift"]
    b = load("basicmotions", n_tasks=7, samples_per_task=50)
    assert b.source.endswith("clean, drift, rotation, dead, noise, warp, drift")


def test_every_task_transforms_the_windows_differently():
    tests = [t.x_test for t in load("basicmotions", **SMALL).tasks]
    for i in range(len(tests)):
        for j in range(i + 1, len(tests)):
            assert not torch.equal(tests[i], tests[j]), (i, j)
    # the labels do not change: the same windows under another condition
    assert all(torch.equal(t.y_test, load("basicmotions", **SMALL).tasks[0].y_test)
               for t in load("basicmotions", **SMALL).tasks)


def test_drift_is_a_gain_and_an_offset_per_channel():
    b = load("basicmotions", **SMALL)
    clean, drift = b.tasks[0].x_test.double(), b.tasks[1].x_test.double()
    for ch in range(6):
        x, y = clean[:, ch].flatten(), drift[:, ch].flatten()
        a = torch.stack([x, torch.ones_like(x)], 1)
        gain, offset = torch.linalg.lstsq(a, y[:, None]).solution.flatten().tolist()
        assert 0.7 <= gain <= 1.3 and abs(offset) <= 1.5
        assert torch.allclose(a @ torch.tensor([gain, offset], dtype=torch.float64), y,
                              atol=1e-4)


def test_rotated_mount_turns_both_triads_and_keeps_their_norms():
    b = load("basicmotions", **SMALL)
    clean, turned = b.tasks[0].x_test.double(), b.tasks[2].x_test.double()
    for triad in (slice(0, 3), slice(3, 6)):
        assert torch.allclose(turned[:, triad].norm(dim=1), clean[:, triad].norm(dim=1),
                              atol=1e-4)
        assert not torch.allclose(turned[:, triad], clean[:, triad], atol=1e-2)
    # one matrix for both triads: solve it from the accelerometer, apply it to the gyroscope
    acc = clean[:, 0:3].permute(0, 2, 1).reshape(-1, 3)
    rot = torch.linalg.lstsq(acc, turned[:, 0:3].permute(0, 2, 1).reshape(-1, 3)).solution
    gyro = clean[:, 3:6].permute(0, 2, 1).reshape(-1, 3) @ rot
    assert torch.allclose(gyro, turned[:, 3:6].permute(0, 2, 1).reshape(-1, 3), atol=1e-3)


def test_rotation_matrix_is_a_proper_rotation():
    rot = rotation_matrix(np.array([1.0, 2.0, -0.5]), 120.0)
    assert np.allclose(rot @ rot.T, np.eye(3)) and np.isclose(np.linalg.det(rot), 1.0)
    assert np.isclose(np.trace(rot), 1 + 2 * np.cos(np.radians(120.0)))
    assert np.allclose(rotation_matrix(np.array([0.0, 0.0, 1.0]), 90.0) @ [1.0, 0.0, 0.0],
                       [0.0, 1.0, 0.0])


def test_the_dead_channel_task_has_exactly_one_zero_channel():
    b = load("basicmotions", **SMALL)
    assert condition(3) == "dead"
    for t, task in enumerate(b.tasks):
        for x in (task.x_train, task.x_test):
            dead = [ch for ch in range(6) if not x[:, ch].any()]
            assert len(dead) == (1 if t == 3 else 0), t
    dead = next(ch for ch in range(6) if not b.tasks[3].x_test[:, ch].any())
    alive = [ch for ch in range(6) if ch != dead]
    assert torch.equal(b.tasks[3].x_test[:, alive], b.tasks[0].x_test[:, alive])


def test_noise_and_warp_change_every_window():
    b = load("basicmotions", **SMALL)
    clean = b.tasks[0].x_test
    noise = b.tasks[4].x_test - clean
    assert (noise != 0).all() and 0.05 < noise.std() < 1.0
    warp = b.tasks[5].x_test
    assert warp.shape == clean.shape and not torch.equal(warp, clean)
    # a stretched part of the window, linearly interpolated: it stays inside the window's range
    # and travels no further (total variation) than the clean window does
    assert (warp.amax(-1) <= clean.amax(-1) + 1e-5).all()
    assert (warp.amin(-1) >= clean.amin(-1) - 1e-5).all()
    assert (warp.diff(dim=-1).abs().sum(-1) <= clean.diff(dim=-1).abs().sum(-1) + 1e-4).all()
    assert warp.diff(dim=-1).abs().sum() < 0.9 * clean.diff(dim=-1).abs().sum()


def test_basicmotions_refuses_more_windows_than_the_split_has():
    pytest.importorskip("aeon")
    with pytest.raises(BenchmarkError, match=r"samples_per_task=1481 is more than basicmotions's "
                                             r"training split offers \(1,480\)"):
        load_benchmark("basicmotions", samples_per_task=1481)
    with pytest.raises(BenchmarkError, match="n_tasks must be a positive integer"):
        load_benchmark("basicmotions", n_tasks=0)


def test_basicmotions_classes_splits_the_activities_into_two_tasks():
    b = load("basicmotions-classes")
    assert (b.head, b.n_classes, b.input_shape, len(b.tasks)) == ("per_task", 2, (6, 64), 2)
    assert [t.classes for t in b.tasks] == [("standing", "running"), ("walking", "badminton")]
    for t in b.tasks:
        assert t.x_train.shape == (740, 6, 64) and t.x_test.shape == (740, 6, 64)
        assert torch.bincount(t.y_train).tolist() == [370, 370]
        assert torch.bincount(t.y_test).tolist() == [370, 370]
    assert torch.equal(load("basicmotions-classes").tasks[0].x_test,
                       load("basicmotions-classes", seed=1).tasks[0].x_test)
    small = load("basicmotions-classes", n_tasks=1, samples_per_task=30)
    assert small.tasks[0].x_train.shape == (30, 6, 64)
    with pytest.raises(BenchmarkError, match="n_tasks=3 is more than basicmotions-classes offers"):
        load_benchmark("basicmotions-classes", n_tasks=3)


def test_japanesevowels_enrolls_three_speakers_per_task():
    b = load("japanesevowels")
    assert (b.head, b.n_classes, b.input_shape, len(b.tasks)) == ("per_task", 3, (12, 29), 3)
    assert [t.classes for t in b.tasks] == [
        ("speaker1", "speaker2", "speaker3"), ("speaker4", "speaker5", "speaker6"),
        ("speaker7", "speaker8", "speaker9")]
    assert [len(t.y_test) for t in b.tasks] == [154, 97, 119]  # aeon's uneven test split
    for t in b.tasks:
        assert t.x_train.shape == (90, 12, 29) and t.x_train.dtype == torch.float32
        assert torch.bincount(t.y_train).tolist() == [30, 30, 30]
    # utterances of 7-29 frames, zero-padded at the end
    x = torch.cat([t.x_test for t in b.tasks])
    lengths = (x.abs().sum(1) > 0).sum(1)
    assert lengths.min() == 7 and lengths.max() == 29
    assert all(not x[i, :, n:].any() and x[i, :, :n].abs().sum(0).all()
               for i, n in enumerate(lengths.tolist()))
    same = load_benchmark("japanesevowels", seed=0)
    assert all(torch.equal(p.x_train, q.x_train) for p, q in zip(b.tasks, same.tasks,
                                                                   strict=True))


@pytest.mark.parametrize("name", SENSOR_SETS)
def test_without_aeon_the_error_says_how_to_install_it(monkeypatch, name):
    monkeypatch.setitem(sys.modules, "aeon", None)  # import fails even where installed
    monkeypatch.setitem(sys.modules, "aeon.datasets", None)
    sensors.basic_motions.cache_clear()
    sensors.japanese_vowels.cache_clear()
    with pytest.raises(BenchmarkError) as err:
        load_benchmark(name)
    owner = "japanesevowels" if name == "japanesevowels" else "basicmotions"
    assert str(err.value) == f"{owner} needs aeon: pip install 'edgecl[sensors]'"


def test_a_broken_aeon_install_is_one_line_too(monkeypatch):
    real_import = builtins.__import__

    def failing(name, *args, **kwargs):
        if name.split(".")[0] == "aeon":
            raise OSError("libllvmlite.so: cannot open\nshared object file")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", failing)
    sensors.basic_motions.cache_clear()
    with pytest.raises(BenchmarkError) as err:
        load_benchmark("basicmotions")
    assert str(err.value) == ("basicmotions needs aeon, which failed to import (OSError: "
                              "libllvmlite.so: cannot open shared object file); "
                              "pip install 'edgecl[sensors]'")
