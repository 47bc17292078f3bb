"""systemd's notify protocol (`Type=notify`): READY, STOPPING and the watchdog, no dependency.

Does nothing unless systemd set $NOTIFY_SOCKET (a unix datagram socket; '@' is the abstract
namespace).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1") to systemd; False when not run under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(state.encode())
    return True


def watchdog_interval_s() -> float | None:
    """Half of systemd's WatchdogSec for this process, or None when there is no watchdog."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6


def supervise(stop: threading.Event, alive: Callable[[], bool], ready: Callable[[], bool]
              ) -> None:
    """Until `stop` is set or `alive()` turns false: tell systemd READY=1 once `ready()`, and
    pet its watchdog (if one is set) while `alive()`."""
    watchdog_s = watchdog_interval_s()
    said_ready, last_pet = False, 0.0
    while alive() and not stop.wait(0.2):
        if not said_ready and ready():
            said_ready = notify("READY=1") or True
        if watchdog_s and time.monotonic() - last_pet >= watchdog_s:
            notify("WATCHDOG=1")
            last_pet = time.monotonic()
