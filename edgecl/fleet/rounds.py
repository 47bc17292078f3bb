"""The pure parts of a fleet round: averaging shares, and the status a fleet server writes.

Nothing here imports Flower or torch, so the unit tests (and anything reading a status file)
run without the `fleet` extra. `server` feeds it what the Flower messages carried.

Node ids are written as strings: Flower's are 64-bit, beyond what a JSON reader that parses
numbers as doubles (jq, JavaScript) keeps exact.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgecl.atomic import atomic_write_text
from edgecl.fleet.wire import Share


def aggregate(shares: list[Share]) -> Share:
    """Per array name, the weighted mean over the shares that learned something for it.

    Weights are per array, not per device, because a device that never met task `t` has a
    `head/t/...` it did not train: it must not drag the fleet's head for `t` towards its
    initial values. A name whose weights sum to 0 is left out (nobody learned it), and the
    aggregate's weight for a name is the sum, so a device can tell how much fleet learning an
    array holds. Shapes must agree on every device that has the name, weight 0 or not: a
    mismatch means two devices run different nets, which no averaging can repair.
    """
    names = sorted({name for share in shares for name in share.arrays})
    arrays: dict[str, np.ndarray] = {}
    weights: dict[str, float] = {}
    for name in names:
        held = [(s.arrays[name], s.weights[name]) for s in shares if name in s.arrays]
        _check_shapes(name, [a for a, _ in held])
        taking_part = [(a, w) for a, w in held if w > 0]
        total = float(sum(w for _, w in taking_part))
        if total <= 0:
            continue
        acc = np.zeros(held[0][0].shape, dtype=np.float64)
        for a, w in taking_part:
            acc += np.asarray(a, dtype=np.float64) * w
        arrays[name] = (acc / total).astype(np.float32)
        weights[name] = total
    return Share(arrays, weights)


def _check_shapes(name: str, held: list[np.ndarray]) -> None:
    shapes = sorted({tuple(a.shape) for a in held})
    if len(shapes) > 1:
        listed = ", ".join(str(s) for s in shapes)
        raise ValueError(f"array {name!r} has different shapes on different devices ({listed}); "
                         "every device in a fleet must run the same net (model settings)")


@dataclass
class RoundRecord:
    """What one round did, as the status file and the metrics report it."""

    round: int
    started: float  # unix time
    duration_s: float = 0.0
    nodes_connected: int = 0
    sampled: list[str] = field(default_factory=list)
    replied: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # sampled, no good reply by the timeout
    errors: dict[str, str] = field(default_factory=dict)  # node -> why, where Flower said
    bytes_received: dict[str, int] = field(default_factory=dict)  # node -> share array bytes
    aggregate_bytes: int = 0
    aggregate_arrays: int = 0
    acks: dict[str, dict] = field(default_factory=dict)  # node -> {"seq", "sha256"}
    ack_failed: list[str] = field(default_factory=list)
    note: str = ""  # why a round did less than usual (no nodes, no replies)


@dataclass
class FleetStatus:
    """A run's rounds so far; `write` publishes it as JSON plus Prometheus text beside it."""

    path: str | None
    num_rounds: int
    started: float = field(default_factory=time.time)
    nodes_connected: int = 0
    rounds: list[RoundRecord] = field(default_factory=list)
    finished: bool = False
    error: str = ""

    def to_dict(self) -> dict:
        return {"num_rounds": self.num_rounds, "started": self.started, "updated": time.time(),
                "finished": self.finished, "error": self.error,
                "nodes_connected": self.nodes_connected, "totals": self.totals(),
                "last_round": asdict(self.rounds[-1]) if self.rounds else None,
                "rounds": [asdict(r) for r in self.rounds]}

    def totals(self) -> dict[str, float]:
        return {"rounds_completed": len(self.rounds),
                "node_replies": sum(len(r.replied) for r in self.rounds),
                "node_failures": sum(len(r.failed) for r in self.rounds),
                "bytes_received": sum(sum(r.bytes_received.values()) for r in self.rounds),
                "last_round_duration_seconds": self.rounds[-1].duration_s if self.rounds else 0.0,
                "nodes_connected": self.nodes_connected}

    def write(self) -> None:
        """Replace the status file and its `.prom` sibling; a no-op without a status path."""
        if not self.path:
            return
        path = Path(self.path)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")
        atomic_write_text(prom_path(path), prom_text(self.totals()))


def prom_path(status_path: str | Path) -> Path:
    """`status.json` → `status.prom`: the name node_exporter's textfile collector picks up."""
    p = Path(status_path)
    return p.with_name(p.stem + ".prom") if p.suffix != ".prom" else p.with_name(p.name + ".prom")


_METRICS = (  # (key in totals, metric name, type, help)
    ("rounds_completed", "edgecl_fleet_rounds_completed_total", "counter",
     "Fleet learning rounds this run has finished."),
    ("node_replies", "edgecl_fleet_node_replies_total", "counter",
     "Shares received from devices, over all rounds."),
    ("node_failures", "edgecl_fleet_node_failures_total", "counter",
     "Devices asked for a share that gave none by the round timeout, over all rounds."),
    ("bytes_received", "edgecl_fleet_bytes_received_total", "counter",
     "Array bytes of the shares received, over all rounds."),
    ("last_round_duration_seconds", "edgecl_fleet_last_round_duration_seconds", "gauge",
     "Wall time of the last finished round."),
    ("nodes_connected", "edgecl_fleet_nodes_connected", "gauge",
     "Devices connected to the SuperLink when last counted."),
)


def prom_text(totals: dict[str, float]) -> str:
    """Prometheus text exposition of `FleetStatus.totals()` (no client library needed)."""
    lines = []
    for key, name, kind, help_text in _METRICS:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}",
                  f"{name} {_number(totals.get(key, 0))}"]
    return "\n".join(lines) + "\n"


def _number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))
