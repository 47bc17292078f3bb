"""`edgecl bench` end to end through the command line."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.table import Table
from typer.testing import CliRunner

from edgecl import __version__, protocol, setup
from edgecl.checkpoint import load_learner
from edgecl.cli import app, print_table
from edgecl.learners import learner_class
from edgecl.registry import BENCHMARKS, LEARNERS, NEEDS_DATA_DIR

RESULT_KEYS = {"benchmark", "method", "seed", "n_tasks", "acc", "bwt", "fwt", "R", "b", "wall_s",
               "train_s", "samples_per_s", "footprint", "config"}
TINY = ["--tasks", "3", "--samples-per-task", "30", "--device", "cpu"]


def bench(*args: str):
    return CliRunner().invoke(app, ["bench", *args])


def test_bench_writes_result_heatmap_and_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "run[/]"  # rich markup would take "[/]" for a closing tag
    r = bench("--benchmark", "pmnist", "--method", "finetune", *TINY, "--out", str(out))
    assert r.exit_code == 0, r.output
    assert f"results in {out}/" in r.output
    tmp_path = out
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
    (["--config", "{tmp}"], "{tmp}: cannot read the config file (Is a directory)"),
    (["--config", "{tmp}/latin1.yaml"], "{tmp}/latin1.yaml: not UTF-8 text"),
    (["--config", "{tmp}/max2.yaml", "--tasks", "3"],
     "max_tasks: 2 is fewer than the benchmark's 3 tasks"),
    (["--out", "{tmp}/file"], "{tmp}/file: exists and is not a folder"),
    (["--method", "all", "--out", "{tmp}/with-file"],
     "{tmp}/with-file/finetune: exists and is not a folder"),
    (["--config", "{tmp}/small-budget.yaml"],
     "memory.budget_bytes: 100000 bytes cannot hold one sample per task for 20 tasks"),
    (["--benchmark", "file:{tmp}/steps-channels.npz", "--config", "{tmp}/conv1d.yaml"],
     "more channels (64) than steps (6)"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, monkeypatch, args, message):
    (tmp_path / "latin1.yaml").write_bytes("seed: 1  # réglé\n".encode("latin-1"))
    (tmp_path / "max2.yaml").write_text("max_tasks: 2\n")
    (tmp_path / "small-budget.yaml").write_text(
        "memory: {budget_bytes: 100000, dtype: uint8}\nmethod: {name: gem}\n")
    (tmp_path / "conv1d.yaml").write_text("net: {name: conv1d}\n")
    windows = np.zeros((4, 64, 6), np.float32)  # [n, steps, channels]: the wrong layout
    np.savez(tmp_path / "steps-channels.npz", task0_x_train=windows, task0_x_test=windows,
             task0_y_train=np.arange(4) % 2, task0_y_test=np.arange(4) % 2)
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "with-file").mkdir()
    (tmp_path / "with-file" / "finetune").write_text("not a folder")

    def no_training(*_):
        raise AssertionError("bad input must be refused before any training")

    monkeypatch.setattr(protocol, "run_protocol", no_training)
    r = bench("--out", str(tmp_path / "out"), *(a.format(tmp=tmp_path) for a in args))
    assert r.exit_code == 2
    [line] = r.output.splitlines()  # one line, nothing else
    assert line.startswith("error: ") and message.format(tmp=tmp_path) in line


@pytest.mark.parametrize(("args", "message"), [
    (["--benchmark", "cifar100"], "install it with: pip install 'edgecl[vision]')"),
    (["--config", "cfg[test].yaml"], "cfg[test].yaml: optimiser: unknown key; "
                                     "did you mean 'optimizer'?"),
    (["--config", "cfg[/].yaml"], "cfg[/].yaml: no such config file"),
], ids=["pip-extra", "brackets", "closing-tag"])
def test_error_lines_reach_the_user_as_written(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg[test].yaml").write_text("optimiser: {lr: 0.1}\n")
    r = bench(*args)
    assert r.exit_code == 2, r.output
    [line] = r.output.splitlines()  # one line: no MarkupError traceback
    assert line.startswith("error: ") and message in line  # no "[...]" eaten as markup


@pytest.fixture
def no_cuda(monkeypatch):
    """A machine where torch sees no CUDA device (this one, or a GPU machine made to look so)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def no_data(*_):
        raise AssertionError("an unusable device must be refused before the data is loaded")

    monkeypatch.setattr(setup, "benchmark_for", no_data)


def test_bench_refuses_cuda_without_cuda_naming_the_option_or_the_config_key(tmp_path, no_cuda):
    r = bench("--device", "cuda", "--out", str(tmp_path / "out"))
    assert r.exit_code == 2
    assert r.output == ("error: --device cuda, but torch sees no CUDA device on this machine; "
                        "use --device auto or --device cpu\n")
    gpu = tmp_path / "gpu.yaml"
    gpu.write_text("device: cuda\n")
    for args in (["--config", str(gpu)], ["--config", str(gpu), "--method", "all"]):
        r = bench(*args, "--out", str(tmp_path / "out"))
        assert r.exit_code == 2
        assert r.output == (f"error: {gpu}: device: cuda, but torch sees no CUDA device on this "
                            "machine; use device: auto or device: cpu\n")
    assert not (tmp_path / "out").exists()


def test_learn_refuses_a_cuda_config_without_cuda_before_taking_its_state_dir(tmp_path, no_cuda):
    gpu = tmp_path / "gpu.yaml"
    gpu.write_text("device: cuda\n")
    r = CliRunner().invoke(app, ["learn", "--state-dir", str(tmp_path / "s"), "--config", str(gpu)])
    assert r.exit_code == 2
    assert r.output == (f"error: {gpu}: device: cuda, but torch sees no CUDA device on this "
                        "machine; use device: auto or device: cpu\n")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(("options", "error"), [
    (["--fleet", "127.0.0.1:9092"],
     "--fleet needs --fleet-ca CA.pem (the SuperLink's TLS) or --fleet-insecure"),
    (["--fleet-insecure"], "--fleet-ca and --fleet-insecure go with --fleet HOST:PORT"),
    (["--fleet", "127.0.0.1:9092", "--fleet-ca", "missing.pem"],
     "--fleet-ca: missing.pem is not a file"),
])
def test_learn_refuses_a_fleet_it_cannot_trust_before_taking_its_state_dir(tmp_path, options,
                                                                           error):
    r = CliRunner().invoke(app, ["learn", "--state-dir", str(tmp_path / "s"), *options])
    assert r.exit_code == 2 and r.output == f"error: {error}\n"
    assert not (tmp_path / "s").exists()


def test_fleet_needs_tls_or_an_explicit_insecure(tmp_path):
    r = CliRunner().invoke(app, ["fleet", "--state-dir", str(tmp_path / "f")])
    assert r.exit_code == 2
    assert r.output == ("error: the fleet server needs --tls-cert, --tls-key and --tls-ca, "
                        "or --insecure\n")
    r = CliRunner().invoke(app, ["fleet", "--state-dir", str(tmp_path / "f"), "--show"])
    assert r.exit_code == 2 and "not a fleet status file" in r.output


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


def test_help_says_the_configs_values_win_and_names_only_existing_commands():
    r = CliRunner().invoke(app, ["bench", "--help"], env={"COLUMNS": "200"})
    for option in ("Mini-batch size", "Seed of data, init and sampling", "auto | cpu | cuda"):
        assert f"{option} (default: the config's, else " in r.output
    r = CliRunner().invoke(app, ["export", "--help"], env={"COLUMNS": "200"})
    assert "A checkpoint.pt written by `edgecl bench`." in r.output and "learn" not in r.output


def test_version_is_the_package_version():
    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output == f"edgecl {__version__}\n"


@pytest.mark.parametrize(("command", "listed"), [
    ("bench", [*BENCHMARKS, *LEARNERS]),
    ("replay", [f"embedded:NAME ({', '.join(n for n in BENCHMARKS if n not in NEEDS_DATA_DIR)})"]),
])
def test_help_lists_what_the_registries_hold(command, listed):
    r = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "2000"})
    assert r.exit_code == 0
    for name in listed:
        assert name in r.output


def test_a_table_is_never_cut_when_the_output_is_not_a_terminal(capsys):
    long_id = "wrist-tremor-left-hand-after-recalibration-" * 3  # wider than 80 columns
    table = Table(title="status")
    table.add_column("task", overflow="fold")
    table.add_column("accuracy")
    table.add_row(long_id, "0.875")
    print_table(table)  # capsys: stdout is no terminal
    assert long_id in capsys.readouterr().out


def test_method_all_on_a_preset_names_the_methods_running_untuned_settings():
    preset = Path(__file__).parent.parent / "models" / "basicmotions-conv1d.yaml"
    configs = setup.method_configs(preset, {"method": {"name": "all"}})
    untuned = setup.untuned_methods(configs, "gem")  # the preset states gem's settings
    assert "gem" not in untuned and set(untuned) < set(LEARNERS)
    for name in LEARNERS:
        tuned_here = "basicmotions" in learner_class(name).tuned
        assert (name in untuned) == (name != "gem" and not tuned_here)
    on_pmnist = setup.method_configs(None, {"method": {"name": "all"}})
    assert setup.untuned_methods(on_pmnist, None) == []  # the defaults were chosen there


def test_bench_says_which_methods_run_untuned_settings(tmp_path):
    preset = tmp_path / "rot.yaml"
    preset.write_text("benchmark: {name: rotmnist, n_tasks: 2, samples_per_task: 20}\n"
                      "method: {name: er}\n")
    r = bench("--config", str(preset), "--method", "all", "--device", "cpu", "--out",
              str(tmp_path / "runs"))
    assert r.exit_code == 0, r.output
    said = " ".join(r.output.split())
    assert "which nobody tuned for it" in said and "edgecl tune --benchmark rotmnist" in said
    assert "note: er," not in said and ", er," not in said  # the preset's own method
