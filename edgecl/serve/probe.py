"""The probe a model version passes before it serves, and the process it runs in.

The probe: the graph's signature matches the manifest (names, FP32, shapes, a batch axis that
is not fixed), and the graph reproduces the export-time probe logits, finite, at the manifest's
probe batch and at `BATCHES` (1 and 3): a model that takes only one batch size would otherwise
pass and then fail every request of another.

A graph can loop forever (an ONNX `Loop` with a huge trip count) or crash onnxruntime, and a
hung onnxruntime run cannot be interrupted in a thread; so before a version is loaded in the
server, `edgecl.serve.runtime.Prober` runs this file as a script in a fresh Python process
(`python -I probe.py`, CPU provider, one thread), killed at a time limit. This module imports
only numpy and onnxruntime, so that the process starts fast.

One process probes the versions of a refresh one after another (its start, mostly importing
onnxruntime, is most of a probe's cost). Each request on its stdin is one JSON line {"spec",
"expected", "x_bytes", "model_bytes", "batches", "rtol"}, the probe input (float32, C order) and
the model's bytes; each is answered by one JSON line: {"ok": true} or {"reason", "message"}.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnxruntime as ort

# The probe re-run at load guards against a runtime computing something else (a wrong graph, a
# broken provider); it leaves room for TF32 / TensorRT kernels, which round differently from CPU.
PROBE_RTOL = 1e-2
BATCHES = (1, 3)  # batch sizes a model must take besides the manifest's probe batch


class ProbeFailed(Exception):
    """The version must not serve; `reason` is load or verify."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def session_options(threads: int = 1) -> ort.SessionOptions:
    """Sequential graph, `threads` intra-op threads, no spin-waiting.

    One thread is the default: at batch 1 a thread pool only adds hand-over cost (for the MLP
    benchmarks/onnx_vs_torch.py measures 8.0-8.3 us on 1 thread, 9.8-11.9 us on 2), and
    spinning workers would steal the cores the server's event loop and the learner need on a
    2-core device.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only
    return options


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def check(session: ort.InferenceSession, spec: dict[str, Any], x: np.ndarray,
          expected: np.ndarray, batches: Sequence[int] = BATCHES,
          rtol: float = PROBE_RTOL) -> None:
    """Raise `ProbeFailed` unless `session` matches `spec` ({"input": {"name", "shape"},
    "output": {...}}, shapes with -1 for the batch) and maps the probe input `x` to `expected`
    at its own batch size and at each of `batches` (rows of `x` taken in turn)."""
    io = [(session.get_inputs(), spec["input"]), (session.get_outputs(), spec["output"])]
    for (actual, *extra), want in io:
        if (extra or actual.name != want["name"] or actual.type != "tensor(float)"
                or list(actual.shape[1:]) != want["shape"][1:]):
            raise ProbeFailed("verify", f"the graph's {actual.name} ({actual.type}, shape "
                                        f"{actual.shape}) does not match the manifest's "
                                        f"{want['name']} (shape {want['shape']})")
    fixed = session.get_inputs()[0].shape[0]
    if isinstance(fixed, int) and fixed > 0:
        raise ProbeFailed("verify", f"the graph's batch axis is fixed at {fixed}: every request "
                                    "of another batch size would fail; export it with a dynamic "
                                    "batch axis")
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    for batch in dict.fromkeys((len(x), *batches)):
        rows = np.arange(batch) % len(x)
        try:
            logits = session.run([spec["output"]["name"]], {spec["input"]["name"]: x[rows]})[0]
        except Exception as e:  # onnxruntime raises its own types
            raise ProbeFailed("verify", f"the graph cannot take a batch of {batch} "
                                        f"({_first_line(e)}); its batch axis may be fixed: "
                                        "export it with a dynamic batch axis") from None
        want = expected[rows]
        if logits.shape != want.shape:
            raise ProbeFailed("verify", f"at a batch of {batch} the graph's logits have shape "
                                        f"{list(logits.shape)}, not {list(want.shape)}")
        bad = logits.size - int(np.isfinite(logits).sum())
        if bad:
            raise ProbeFailed("verify", f"the probe gives {bad} non-finite logit(s) (NaN or "
                                        f"infinity) at a batch of {batch}: the model computes "
                                        "non-finite outputs")
        diff = float(np.abs(logits - want).max())
        if not diff <= rtol * scale:
            raise ProbeFailed("verify", f"probe logits differ from the export's by {diff:.3g} "
                                        f"(allowed {rtol * scale:.3g}) at a batch of {batch}")


def _child() -> int:
    """The probe process: requests on stdin, one after another, each answered by one JSON line
    on stdout once the previous answer was read; ends at the end of stdin."""
    stdin = sys.stdin.buffer
    while line := stdin.readline():
        header = json.loads(line)
        spec = header["spec"]
        x = np.frombuffer(stdin.read(header["x_bytes"]), dtype=np.float32)
        x = x.reshape(-1, *spec["input"]["shape"][1:])
        expected = np.asarray(header["expected"], dtype=np.float32)
        model = stdin.read(header["model_bytes"])
        session = None
        try:
            try:
                session = ort.InferenceSession(model, session_options(1),
                                               providers=["CPUExecutionProvider"])
            except Exception as e:
                raise ProbeFailed("load", f"onnxruntime cannot load it ({_first_line(e)})"
                                  ) from None
            check(session, spec, x, expected, header["batches"], header["rtol"])
            verdict: dict[str, Any] = {"ok": True}
        except ProbeFailed as e:
            verdict = {"reason": e.reason, "message": str(e)}
        session = model = None  # their memory goes before the next model's comes
        sys.stdout.write(json.dumps(verdict) + "\n")
        sys.stdout.flush()
    return 0


def request(spec: dict[str, Any], x: np.ndarray, expected: np.ndarray, model: bytes,
            batches: Sequence[int] = BATCHES, rtol: float = PROBE_RTOL) -> bytes:
    """One request for the probe process."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    header = {"spec": spec, "x_bytes": x.nbytes, "model_bytes": len(model),
              "batches": list(batches), "rtol": rtol,
              "expected": np.asarray(expected, dtype=np.float64).tolist()}
    return json.dumps(header).encode() + b"\n" + x.tobytes() + model


if __name__ == "__main__":
    sys.exit(_child())
