"""`edgecl learn`, `replay` and `status` through the command line: errors are one line and exit
2 before anything starts; a running daemon exits 0 on SIGTERM after a checkpoint."""

import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from learn_helpers import stream_config
from typer.testing import CliRunner

from edgecl.cli import app
from edgecl.daemon.checkpoints import CheckpointStore
from edgecl.daemon.client import LearnClient
from edgecl.daemon.daemon import Daemon
from edgecl.data import load_benchmark

EDGECL = Path(sys.executable).parent / "edgecl"


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def one_line_error(r, *words: str) -> None:
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    for word in words:
        assert word in lines[0], r.output


def test_help_explains_the_daemon():
    r = cli("learn", "--help")
    assert r.exit_code == 0
    for word in ("--state-dir", "--repo", "--socket", "--mqtt", "--token-file", "--threads",
                 "exactly once"):
        assert word in " ".join(r.output.split()), word


def test_bad_invocations_are_one_line_and_exit_2(tmp_path):
    one_line_error(cli("learn", "--state-dir", str(tmp_path / "s"), "--config",
                       str(tmp_path / "missing.yaml")), "no such config file")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stream: {input_shape: [0]}\n")
    one_line_error(cli("learn", "--state-dir", str(tmp_path / "s"), "--config", str(bad)),
                   "stream.input_shape")
    one_line_error(cli("learn", "--state-dir", str(tmp_path / "s"), "--mqtt", "mqtt://x"),
                   "--name")
    one_line_error(cli("learn", "--state-dir", str(tmp_path / "s"), "--device", "tpu"),
                   "device")
    refused = tmp_path / "refused.yaml"  # a setting the method itself refuses: no traceback
    data = stream_config().model_dump(mode="json")
    refused.write_text(json.dumps({**data, "method": {"name": "wsn", "capacity": [0.5] * 5}}))
    one_line_error(cli("learn", "--state-dir", str(tmp_path / "s"), "--config", str(refused)),
                   "wsn: 5 capacities given for")
    taken = Daemon(stream_config(), tmp_path / "held")
    try:
        one_line_error(cli("learn", "--state-dir", str(tmp_path / "held")),
                       "another edgecl learn")
    finally:
        taken.stop()
    one_line_error(cli("replay", "embedded:nope"), "unknown benchmark 'nope'")
    one_line_error(cli("replay", "pmnist", "--tasks", "task99", "--samples-per-task", "5"),
                   "no task 'task99'")


def test_replay_and_status_say_when_no_daemon_answers(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"  # nobody listens once closed
    r = cli("status", "--to", url)
    assert r.exit_code == 1 and "refused" in r.output.lower()
    r = cli("replay", "pmnist", "--samples-per-task", "5", "--tasks", "0", "--to", url,
            "--wait-s", "0.5")
    assert r.exit_code == 1 and "not ready after 0.5 s" in r.output


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_checkpoints_and_exits_0(tmp_path, sig):
    proc = subprocess.Popen([str(EDGECL), "learn", "--config", "models/finetune.yaml",
                             "--state-dir", str(tmp_path / "state"), "--port", "0"],
                            stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    try:
        for line in proc.stderr:  # the daemon says where it listens once it is up
            if "listening on" in line:
                url = re.search(r"http://[0-9.:]+", line)[0]
                break
        bench = load_benchmark("pmnist", n_tasks=1, samples_per_task=25)
        with LearnClient(url) as client:
            client.send_many("task00", bench.tasks[0].x_train.numpy(), bench.tasks[0].y_train)
            client.flush()
            while client.status()["learned"] < 20:  # two batches learned, the rest pending
                time.sleep(0.05)
        proc.send_signal(sig)
        assert proc.wait(60) == 0
    finally:
        proc.kill()  # a failed test leaves no daemon behind (a no-op after exit)
        proc.wait(30)
    newest = CheckpointStore(tmp_path / "state" / "checkpoints", 10).paths()[-1]
    assert 20 <= int(newest.name.split("-")[1]) < 25  # the shutdown checkpoint, after 2 batches


def test_systemd_hears_ready_once_the_daemon_is_ready(tmp_path):
    """Type=notify: READY=1 on $NOTIFY_SOCKET once restore and replay are done, STOPPING=1 at
    SIGTERM."""
    import os
    import socket

    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(60)
        proc = subprocess.Popen([str(EDGECL), "learn", "--config", "models/finetune.yaml",
                                 "--state-dir", str(tmp_path / "state"), "--port", "0"],
                                env={**os.environ, "NOTIFY_SOCKET": str(path)},
                                stderr=subprocess.DEVNULL, cwd=Path(__file__).parents[1])
        try:
            assert sock.recv(100) == b"READY=1"
            proc.send_signal(signal.SIGTERM)
            assert sock.recv(100) == b"STOPPING=1"
            assert proc.wait(60) == 0
        finally:
            proc.kill()


def test_a_daemon_that_cannot_listen_leaves_no_trace_in_its_state_dir(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        one_line_error(cli("learn", "--state-dir", str(tmp_path / "state"), "--port", str(port)),
                       f"cannot listen on 127.0.0.1:{port}")
    assert not (tmp_path / "state").exists()


def test_a_token_file_others_can_read_is_warned_about(tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    token.chmod(0o644)
    r = cli("replay", "embedded:nope", "--token-file", str(token))
    assert "readable by others (mode 644); chmod 600 it" in r.output
    token.chmod(0o600)
    assert "readable by others" not in cli("replay", "embedded:nope", "--token-file",
                                           str(token)).output
