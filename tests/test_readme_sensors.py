"""The "Your sensor data" walkthrough (docs/sensors.md), run as written, so it cannot go stale.

In a temporary folder that looks like the repository root (`.venv` and `models/` linked in),
the page's `sh` blocks run in order as bash scripts (`-e`: a failing command fails the test;
a run of them up to a `console` block is one script, so a server started in one block is still
up in the next), and every `$ command` of a `console` block must exit with status 2 and print
the lines shown under it. The server's port 8080 is replaced by a free one. At the end the
class names the server answered must be `learner.predict`'s on the same raw windows.
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
from contextlib import suppress
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import free_port

from edgecl.checkpoint import load_learner

ROOT = Path(__file__).resolve().parents[1]
WALKTHROUGH = ROOT / "docs" / "sensors.md"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
TIMEOUT_S = 300  # generous: a busy 2-core machine; about 30 s on a quiet one


def section_blocks() -> list[tuple[str, str]]:
    """(language, code) of each fenced block of the walkthrough page, in order."""
    return FENCE.findall(WALKTHROUGH.read_text(encoding="utf-8"))


def steps(blocks: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """("script", bash) for each run of sh blocks and ("console", text) for each console one."""
    out: list[tuple[str, str]] = []
    for language, code in blocks:
        assert language in ("sh", "console"), f"a {language} block: the test runs sh and console"
        if language == "sh" and out and out[-1][0] == "script":
            out[-1] = ("script", out[-1][1] + code)
        else:
            out.append(("script" if language == "sh" else "console", code))
    return out


def run(command: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """bash -e in its own process group, killed whole afterwards (a server left running)."""
    proc = subprocess.Popen(["bash", "-e", "-o", "pipefail", "-c", command], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    finally:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(command, proc.returncode, out)


def check_console(text: str, cwd: Path, env: dict[str, str]) -> None:
    """Each `$ command` exits with status 2 and prints the lines shown after it."""
    for chunk in re.split(r"^\$ ", text, flags=re.MULTILINE)[1:]:
        command, *shown = chunk.strip("\n").split("\n")
        result = run(command, cwd, env)
        assert result.returncode == 2, f"{command}: exit {result.returncode}\n{result.stdout}"
        for line in shown:
            assert line in result.stdout.splitlines(), f"{command}: no line {line!r} in\n" \
                                                       f"{result.stdout}"


def test_the_sensor_walkthrough_serves_what_the_learner_predicts(tmp_path):
    pytest.importorskip("aeon")
    venv = Path(sys.prefix)
    if not (venv / "bin" / "edgecl").exists():
        pytest.skip("needs a venv with edgecl installed (the README's .venv)")
    (tmp_path / ".venv").symlink_to(venv)
    (tmp_path / "models").symlink_to(ROOT / "models")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    port = str(free_port())
    output = ""
    for kind, code in steps(section_blocks()):
        code = code.replace("8080", port)
        if kind == "console":
            check_console(code, tmp_path, env)
            continue
        result = run(code, tmp_path, env)
        assert result.returncode == 0, result.stdout[-4000:]
        output += result.stdout

    served = re.search(r"^served: (\[.*\])$", output, re.MULTILINE)
    assert served, output[-4000:]
    x = np.load(tmp_path / "my_sensors.npz")["task1_x_test"][:8]
    manifest = json.loads((tmp_path / "my-models/wrist-turned/1/manifest.json").read_text())
    learner = load_learner(tmp_path / "runs/my-sensors/checkpoint.pt")
    predicted = learner.predict(torch.from_numpy(x), "wrist-turned").argmax(1).tolist()
    assert ast.literal_eval(served[1]) == [manifest["classes"][k] for k in predicted]
