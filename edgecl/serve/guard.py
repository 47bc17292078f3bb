"""The input-range guard: request values far outside what the model saw in training are a
client's mistake (0-255 pixels sent to a model trained on pixels / 255, volts sent for mV), and
the logits it would get back are meaningless.

A manifest's `input_range` is the [min, max] of the task's real inputs at export. A request is
out of range when any value lies beyond it by more than `tolerance` times its span (default
0.5: a [0, 1] model takes [-0.5, 1.5], so pixels up to 255 are caught while sensor jitter a
little past the training extremes is not). Modes: `off`; `warn`: answer, count it in
`edgecl_input_out_of_range_total` and log (at most once a minute per task); `reject` (the
default): answer 400 naming the range. A manifest without `input_range` is not checked.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np

from edgecl.repository import Manifest

log = logging.getLogger("edgecl.serve")
MODES = ("off", "warn", "reject")
DEFAULT_MODE = "reject"
DEFAULT_TOLERANCE = 0.5
WARN_EVERY_S = 60.0


@dataclass
class RangeGuard:
    mode: str = DEFAULT_MODE
    tolerance: float = DEFAULT_TOLERANCE
    _warned: dict[str, float] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"input range mode {self.mode!r}: use one of {', '.join(MODES)}")
        if not (math.isfinite(self.tolerance) and self.tolerance >= 0):
            raise ValueError(f"input range tolerance {self.tolerance!r}: use a number >= 0 "
                             "(a share of the training range's span)")

    def problem(self, manifest: Manifest, x: np.ndarray) -> str | None:
        """What is wrong with `x`'s values for `manifest`'s model, or None."""
        if self.mode == "off" or manifest.input_range is None or x.size == 0:
            return None
        lo, hi = manifest.input_range
        margin = self.tolerance * (hi - lo)
        low, high = float(x.min()), float(x.max())
        if lo - margin <= low and high <= hi + margin:
            return None
        return (f"input values span [{low:.4g}, {high:.4g}], outside the range task "
                f"{manifest.task!r} was trained on, [{lo:.4g}, {hi:.4g}] (accepted: "
                f"[{lo - margin:.4g}, {hi + margin:.4g}]); send values scaled as in training "
                f"(see the manifest's normalisation)")

    def warn(self, task: str, problem: str) -> None:
        """Log `problem`, at most once every WARN_EVERY_S per task."""
        now = time.monotonic()
        if now - self._warned.get(task, -math.inf) >= WARN_EVERY_S:
            self._warned[task] = now
            log.warning("%s (logged once a minute; counted in edgecl_input_out_of_range_total)",
                        problem)
