"""Acceptance: raw sensor units with default settings, no preset, learn without help.

BasicMotions' accelerometer/gyro windows exactly as the sensors give them, in a task file (the
worn wrist, then the same watch turned 90°), `edgecl bench --method all` with no config: the
default `normalize: auto` standardises the [channels, steps] windows inside the model, so GEM
reaches 0.9 of the offline bound and no method is left at chance (on raw values GEM's lr sent
every weight to NaN on 2 of 3 seeds before).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgecl.cli import app
from edgecl.data.windows import windows
from edgecl.joint import joint_training
from edgecl.setup import benchmark_for, load_config

CHANCE = 0.25  # 4 activities


def raw_task_file(path: Path, scale: float = 1.0) -> Path:
    """Two tasks of raw BasicMotions windows [6, 64]: worn as recorded, and turned 90°; the
    values times `scale` (a sensor reporting in other units)."""
    aeon = pytest.importorskip("aeon.datasets")
    rng = np.random.default_rng(0)
    axes, signs = [1, 0, 2, 4, 3, 5], np.float32([-1, 1, 1, -1, 1, 1])[:, None]
    arrays = {"task0_name": "wrist", "task1_name": "wrist-turned"}
    for split in ("train", "test"):
        recordings, labels = aeon.load_classification("BasicMotions", split=split)
        x, source = windows(recordings, length=64, stride=1)
        order = rng.permutation(len(x))
        x, y, source = x[order], labels[source[order]], source[order]
        worn = source % 2 == 0
        x = x * np.float32(scale)
        arrays[f"task0_x_{split}"], arrays[f"task0_y_{split}"] = x[worn], y[worn]
        arrays[f"task1_x_{split}"] = x[~worn][:, axes] * signs
        arrays[f"task1_y_{split}"] = y[~worn]
    np.savez(path, **arrays)
    return path


def test_every_method_learns_raw_sensor_units_with_its_defaults(tmp_path):
    data = raw_task_file(tmp_path / "raw.npz")
    r = CliRunner().invoke(app, ["bench", "--benchmark", f"file:{data}", "--method", "all",
                                 "--device", "cpu", "--out", str(tmp_path / "runs")])
    assert r.exit_code == 0, r.output
    acc = {m["method"]: m["acc"] for m in
           json.loads((tmp_path / "runs" / "comparison.json").read_text())}
    cfg = load_config(None, {"benchmark": {"name": f"file:{data}"}, "method": {"name": "gem"},
                             "device": "cpu"})
    bound = joint_training(cfg, benchmark_for(cfg))["acc"]
    assert acc["gem"] >= 0.9 * bound, (acc, bound)
    assert min(acc.values()) > CHANCE + 0.25, acc  # every method far off chance


def test_a_diverging_run_is_marked_not_silent(tmp_path):
    """normalize: none on raw units ten times larger (readings in other units): GEM's default
    learning rate diverges on most steps; the skipped steps and the chance result are said, and
    the model stays finite (it exits 0: the run itself is usable data)."""
    data = raw_task_file(tmp_path / "raw.npz", scale=10.0)
    config = tmp_path / "raw-none.yaml"
    config.write_text("normalize: none\n")
    r = CliRunner().invoke(app, ["bench", "--config", str(config), "--benchmark", f"file:{data}",
                                 "--method", "gem", "--device", "cpu",
                                 "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    said = " ".join(r.output.split())
    assert "warning: gem:" in said and "training steps were skipped" in said
    assert "is at chance" in said
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["nonfinite_steps"] > 0 and result["finite"] and result["at_chance"]
