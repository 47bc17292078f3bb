"""`edgecl bench` end to end through the command line."""

import json

import pytest
from typer.testing import CliRunner

from edgecl.checkpoint import load_learner
from edgecl.cli import app
from edgecl.learners import LEARNERS

RESULT_KEYS = {"benchmark", "method", "seed", "n_tasks", "acc", "bwt", "fwt", "R", "b", "wall_s",
               "train_s", "samples_per_s", "footprint", "config"}
TINY = ["--tasks", "3", "--samples-per-task", "30", "--device", "cpu"]


def bench(*args: str):
    return CliRunner().invoke(app, ["bench", *args])


def test_bench_writes_result_heatmap_and_a_loadable_checkpoint(tmp_path):
    r = bench("--benchmark", "pmnist", "--method", "finetune", *TINY, "--out", str(tmp_path))
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "result.json").read_text())
    assert result.keys() >= RESULT_KEYS
    assert result["n_tasks"] == 3 and len(result["R"]) == 3 and len(result["b"]) == 3
    assert result["config"]["benchmark"]["samples_per_task"] == 30
    assert (tmp_path / "R.png").read_bytes()[:4] == b"\x89PNG"
    learner = load_learner(tmp_path / "checkpoint.pt")
    assert learner.task_ids == result["tasks"]
    assert "ACC" in r.output and "finetune" in r.output


def test_same_seed_same_result(tmp_path):
    for name in ("a", "b"):
        assert bench("--seed", "3", *TINY, "--out", str(tmp_path / name)).exit_code == 0
    a, b = (json.loads((tmp_path / n / "result.json").read_text()) for n in ("a", "b"))
    assert a["R"] == b["R"] and a["seed"] == 3


@pytest.mark.parametrize(("args", "message"), [
    (["--benchmark", "nope"], "unknown benchmark 'nope'; valid: pmnist"),
    (["--method", "nope"], "unknown method 'nope'; valid: finetune"),
    (["--tasks", "0"], "n_tasks"),
    (["--config", "/nonexistent.yaml"], "no such config file"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, args, message):
    r = bench(*args, "--out", str(tmp_path))
    assert r.exit_code == 2
    assert message in r.output
    assert not (tmp_path / "result.json").exists()


def test_method_all_compares_every_method(tmp_path):
    r = bench("--method", "all", "--tasks", "2", "--samples-per-task", "20", "--device", "cpu",
              "--out", str(tmp_path))
    assert r.exit_code == 0, r.output
    table = (tmp_path / "comparison.md").read_text()
    for name in LEARNERS:
        assert f"| {name} |" in table
        assert (tmp_path / name / "result.json").exists()
    assert (tmp_path / "comparison.png").exists()
    assert len(json.loads((tmp_path / "comparison.json").read_text())) == len(LEARNERS)
