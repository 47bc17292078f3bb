"""`edgecl learn --fleet`: the device's Flower SuperNode, a child process kept running.

The SuperNode registers with the fleet's SuperLink and, for each message of a round, runs
edgecl's ClientApp (edgecl.fleet.client), which calls this daemon's HTTP API: GET
/v1/fleet/share, POST /v1/fleet/aggregate. Flower never runs inside the daemon, so learning on
the device's own stream never waits for the fleet: a round only takes a snapshot between two
steps and journals an aggregate. A SuperNode that exits (the SuperLink restarted, the network
went away) is started again after a pause that doubles up to `MAX_PAUSE_S`; a device that is
offline simply misses rounds. The SuperNode dies with the daemon (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgecl.fleet.launch import die_with_parent, flwr_env, stop_process, supernode_command

log = logging.getLogger("edgecl.learn")

FIRST_PAUSE_S = 1.0
MAX_PAUSE_S = 30.0
STOP_GRACE_S = 10.0


@dataclass(frozen=True)
class FleetLink:
    """Where the fleet's SuperLink is, and how to trust it."""

    superlink: str  # host:port
    root_certificates: Path | None = None  # the CA that signed the SuperLink's certificate
    insecure: bool = False  # plain HTTP (a trusted network, or a try on localhost)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SuperNode:
    """The SuperNode child of a daemon reachable at `daemon_url`; `start()`, `stop()`,
    `status()` (shown under the daemon's status `fleet.node`)."""

    def __init__(self, link: FleetLink, daemon_url: str, token: str | None,
                 state_dir: Path) -> None:
        self.link = link
        self.home = state_dir / "flower"  # FLWR_HOME: Flower's own files, and its log
        self.home.mkdir(mode=0o700, exist_ok=True)
        self.argv = supernode_command(link.superlink, daemon_url, free_port(), link.insecure,
                                      str(link.root_certificates)
                                      if link.root_certificates else None)
        # the ClientApp, a grandchild, calls the daemon with its token
        self.env = os.environ | flwr_env(self.home) | (
            {"EDGECL_LEARN_TOKEN": token} if token else {})
        self.starts = 0
        self.last_exit: int | None = None
        self.last_error: str | None = None  # why the last start failed, if it did
        self._proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="edgecl-supernode")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the SuperNode (SIGTERM, SIGKILL after STOP_GRACE_S) and its supervisor."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def status(self) -> dict[str, Any]:
        proc = self._proc
        return {"superlink": self.link.superlink, "running": proc is not None
                and proc.poll() is None, "starts": self.starts, "last_exit": self.last_exit,
                "last_error": self.last_error, "log": str(self.home / "supernode.log")}

    def _supervise(self) -> None:
        """Keep the SuperNode running until `stop()`; the thread that started a child must
        outlive it (PR_SET_PDEATHSIG follows the thread), so it is this one that waits."""
        pause = FIRST_PAUSE_S
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._run_once()
                self.last_error = None
            except OSError as e:  # its log or its process could not be opened: try again
                self.last_error = f"cannot start the SuperNode: {e}"
            if self._stop.is_set():
                return
            if time.monotonic() - started > MAX_PAUSE_S:  # it ran a while: a fresh failure
                pause = FIRST_PAUSE_S
            log.warning("fleet: the SuperNode exited (%s); starting it again in %.0f s (log: "
                        "%s)", self.last_error or self.last_exit, pause,
                        self.home / "supernode.log")
            self._stop.wait(pause)
            pause = min(2 * pause, MAX_PAUSE_S)

    def _run_once(self) -> None:
        with open(self.home / "supernode.log", "ab") as out:
            self._proc = subprocess.Popen(self.argv, env=self.env, cwd=self.home, stdout=out,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          preexec_fn=die_with_parent())
        self.starts += 1
        log.info("fleet: SuperNode started (pid %d) for the SuperLink at %s",
                 self._proc.pid, self.link.superlink)
        while not self._stop.wait(0.5):
            if self._proc.poll() is not None:
                break
        stop_process(self._proc, STOP_GRACE_S)  # when stopping; a no-op once it exited
        self.last_exit = self._proc.returncode
