"""The import layers of pyproject.toml's import-linter contract hold, and breaking one fails."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports` on the `edgecl` package under `root`, with `root`'s contract."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def copy_of_the_package(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "edgecl", tmp_path / "edgecl",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def test_the_layers_hold() -> None:
    run = lint_imports(ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout


def test_an_import_up_the_layers_breaks_the_contract(tmp_path: Path) -> None:
    root = copy_of_the_package(tmp_path)
    assert lint_imports(root).returncode == 0  # the copy holds, as the checkout does
    config = root / "edgecl" / "config.py"
    config.write_text(config.read_text() + "\nfrom edgecl.learners import LEARNERS  # noqa\n")
    run = lint_imports(root)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "edgecl.config -> edgecl.learners" in run.stdout


def test_an_import_between_siblings_breaks_the_contract(tmp_path: Path) -> None:
    root = copy_of_the_package(tmp_path)
    serve = root / "edgecl" / "serve" / "guard.py"
    serve.write_text(serve.read_text() + "\nfrom edgecl.daemon import journal  # noqa\n")
    run = lint_imports(root)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "edgecl.serve.guard -> edgecl.daemon.journal" in run.stdout
