"""File benchmarks' validation split, and `edgecl tune`, which never reads the test split."""

from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from edgecl import tune as tune_module
from edgecl.cli import app
from edgecl.data import BenchmarkError, load_benchmark
from edgecl.learners import LearnerDiverged
from edgecl.setup import load_config

TRAIN, TEST = 96, 40  # samples per task; 32 recordings of 3 windows each per training split


def write_tasks(path: Path, poison_test: bool = False) -> Path:
    """Two tasks of 8-feature samples, 2 classes each; every training sample's recording id is
    its index // 3. `poison_test` fills every test input with NaN and shuffles the test labels."""
    rng = np.random.default_rng(0)
    arrays = {}
    for t in range(2):
        for split, n in (("train", TRAIN), ("test", TEST)):
            y = rng.integers(0, 2, n) + 2 * t
            x = (rng.normal(size=(n, 8)) + y[:, None]).astype(np.float32)
            if poison_test and split == "test":
                x[:] = np.nan
                y = np.random.default_rng(1).permutation(y)
            arrays[f"task{t}_x_{split}"], arrays[f"task{t}_y_{split}"] = x, y
        arrays[f"task{t}_group_train"] = np.arange(TRAIN) // 3
    np.savez(path, **arrays)
    return path


@pytest.fixture
def tasks(tmp_path: Path) -> Path:
    return write_tasks(tmp_path / "tasks.npz")


def rows(x) -> set[tuple[float, ...]]:
    return {tuple(r) for r in x.tolist()}


def test_the_validation_split_is_held_out_training_data_drawn_by_the_seed(tasks):
    spec = f"file:{tasks}"
    test = load_benchmark(spec)
    val = load_benchmark(spec, seed=1, validation=True)
    assert "validation run" in val.source
    for t, v in zip(test.tasks, val.tasks, strict=True):
        held = rows(v.x_test)
        assert held and held <= rows(t.x_train)
        assert not held & rows(t.x_test) and not held & rows(v.x_train)
        assert len(v.y_train) + len(v.y_test) == TRAIN
        assert v.x_train.tolist() == [r for r in t.x_train.tolist() if tuple(r) not in held]
    again = load_benchmark(spec, seed=1, validation=True)
    other = load_benchmark(spec, seed=2, validation=True)
    assert again.tasks[0].x_test.tolist() == val.tasks[0].x_test.tolist()
    assert other.tasks[0].x_test.tolist() != val.tasks[0].x_test.tolist()


def test_group_ids_keep_each_recording_on_one_side(tasks):
    train = load_benchmark(f"file:{tasks}").tasks[0].x_train.tolist()
    recording = {tuple(r): i // 3 for i, r in enumerate(train)}
    for seed in range(3):
        task = load_benchmark(f"file:{tasks}", seed=seed, validation=True).tasks[0]
        held = {recording[r] for r in rows(task.x_test)}
        kept = {recording[r] for r in rows(task.x_train)}
        assert held and not held & kept
        assert len(task.y_test) == 3 * len(held)  # whole recordings: 3 windows each


def test_a_group_array_of_the_wrong_length_is_a_clear_error(tmp_path):
    path = write_tasks(tmp_path / "t.npz")
    arrays = dict(np.load(path))
    arrays["task1_group_train"] = arrays["task1_group_train"][:-1]
    np.savez(path, **arrays)
    with pytest.raises(BenchmarkError, match=r"task1_group_train' has 95 group ids but its x "
                                             r"array has 96 samples"):
        load_benchmark(f"file:{path}", validation=True)


def tune(tmp_path: Path, data: Path, lrs: str = "0.01,0.1", seeds: str = "0,1"):
    """`edgecl tune` of a 16-unit MLP on `data`: learning rates `lrs` x `seeds`."""
    base, out = tmp_path / "tiny.yaml", tmp_path / "preset.yaml"
    base.write_text("net: {name: mlp, hidden: [16]}\n")
    r = CliRunner().invoke(app, [
        "tune", "--config", str(base), "--benchmark", f"file:{data}", "--method", "finetune",
        "--seeds", seeds, "--grid", f"optimizer.lr={lrs}", "--out", str(out)],
        env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    return r.output, out.read_text()


def chosen_lines(preset: str) -> list[str]:
    return [line for line in preset.splitlines() if line.startswith("#   ")]


def test_tune_never_reads_the_test_split(tmp_path):
    clean = write_tasks(tmp_path / "clean.npz")
    poisoned = write_tasks(tmp_path / "poisoned.npz", poison_test=True)
    with pytest.raises(BenchmarkError, match="non-finite"):
        load_benchmark(f"file:{poisoned}")  # the poison is real: the test split is unusable
    _, clean_preset = tune(tmp_path, clean)
    _, poisoned_preset = tune(tmp_path, poisoned)
    assert chosen_lines(clean_preset) == chosen_lines(poisoned_preset)
    assert sum("<- chosen" in line for line in chosen_lines(clean_preset)) == 1


def test_the_preset_loads_and_runs_bench(tmp_path, tasks):
    output, preset = tune(tmp_path, tasks)
    assert "validation ACC" in output and "offline bound (joint training" in output
    assert "chosen" in output
    cfg = load_config(tmp_path / "preset.yaml")
    assert cfg.benchmark.evaluate_on == "test" and cfg.net.hidden == [16]
    assert cfg.optimizer.lr in (0.01, 0.1)
    assert yaml.safe_load(preset)["method"] == {"name": "finetune"}
    r = CliRunner().invoke(app, ["bench", "--config", str(tmp_path / "preset.yaml"),
                                 "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "result.json").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--grid", "optimizer.lr"], "--grid optimizer.lr: give each key once as KEY=V1,V2"),
    (["--grid", "optimizer.lrr=0.1"], "did you mean 'lr'?"),
    (["--seeds", "0,x"], "--seeds 0,x: give comma-separated non-negative integers"),
    (["--method", "all"], "--method all: tune one method at a time"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, tasks, args, message):
    r = CliRunner().invoke(app, ["tune", "--benchmark", f"file:{tasks}", "--method", "finetune",
                                 "--out", str(tmp_path / "p.yaml"), *args],
                           env={"COLUMNS": "200"})
    assert r.exit_code == 2 and message in r.output, r.output
    assert not (tmp_path / "p.yaml").exists()


def test_help_explains_the_validation_split():
    r = CliRunner().invoke(app, ["tune", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "never the test split" in r.output


def test_a_setting_that_diverges_is_reported_and_never_chosen(tmp_path, tasks, monkeypatch):
    run_protocol = tune_module.run_protocol

    def diverging_at_high_lr(cfg, *args, **kwargs):
        if cfg.optimizer.lr > 1:
            raise LearnerDiverged("its last 100 steps were all skipped", "task01", 100)
        return run_protocol(cfg, *args, **kwargs)

    monkeypatch.setattr(tune_module, "run_protocol", diverging_at_high_lr)
    output, preset = tune(tmp_path, tasks, lrs="0.01,10", seeds="0")
    assert "diverged on all 1 seed(s)" in output
    (chosen,) = [line for line in chosen_lines(preset) if "<- chosen" in line]
    assert "optimizer.lr=0.01" in chosen
