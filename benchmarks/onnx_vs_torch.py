"""onnxruntime vs torch eager: latency of one task's module at batch 1 and batch 64.

    .venv/bin/python benchmarks/onnx_vs_torch.py                      # GEM's MLP 2x100, pmnist
    .venv/bin/python benchmarks/onnx_vs_torch.py --checkpoint runs/x/checkpoint.pt --task task00

Both engines run in this one process, in alternating rounds, so load from other processes hits
both alike; each figure is the median over rounds of the mean time per call. Each engine runs
with 1 thread and with one per core: onnxruntime with the server's session settings, torch
under inference_mode. Ratios are torch / onnxruntime with 1 thread (the server's setting).
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from edgecl.checkpoint import load_learner
from edgecl.export import INPUT_NAME, OUTPUT_NAME, to_onnx
from edgecl.learners import LearnerSpec, build_learner
from edgecl.serve.runtime import session_options
from edgecl.setup import load_config

PMNIST_SHAPE, PMNIST_CLASSES = (1, 28, 28), 10


def task_module(checkpoint: str | None, task: str | None) -> tuple[nn.Module, tuple[int, ...]]:
    """The checkpoint's task module, or an untrained one of models/finetune.yaml (same cost)."""
    if checkpoint:
        learner = load_learner(checkpoint, device="cpu")
        task = task or learner.task_ids[0]
    else:
        cfg = load_config("models/finetune.yaml", {"device": "cpu"})
        learner = build_learner(LearnerSpec(cfg, PMNIST_SHAPE, PMNIST_CLASSES, "shared", 1))
        task = "task00"
        learner.register_task(task)
    return learner.task_module(task), learner.spec.input_shape


@dataclass(frozen=True)
class Engine:
    call: Callable[[], object]
    torch_threads: int  # set before each round (torch's own setting; onnxruntime has its own)


def per_call_s(engine: Engine, calls: int) -> float:
    torch.set_num_threads(engine.torch_threads)
    t0 = time.perf_counter()
    for _ in range(calls):
        engine.call()
    return (time.perf_counter() - t0) / calls


def race(engines: dict[str, Engine], seconds: float) -> dict[str, float]:
    """Median seconds per call of each engine, measured in alternating rounds of ~10 ms."""
    for engine in engines.values():  # warm up
        per_call_s(engine, 20)
    calls = {k: max(1, int(0.01 / per_call_s(e, 50))) for k, e in engines.items()}
    samples: dict[str, list[float]] = {k: [] for k in engines}
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for name, engine in engines.items():
            samples[name].append(per_call_s(engine, calls[name]))
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint")
    parser.add_argument("--task")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--seconds", type=float, default=3.0, help="per batch size")
    args = parser.parse_args()

    module, input_shape = task_module(args.checkpoint, args.task)
    graph = to_onnx(module, input_shape).SerializeToString()
    n = torch.get_num_threads()  # torch's default: one per core
    sessions = {t: ort.InferenceSession(graph, session_options(t),
                                        providers=["CPUExecutionProvider"]) for t in (1, n)}
    rows = []
    for batch in args.batches:
        x = torch.rand(batch, *input_shape)
        x_np = x.numpy()

        def eager(x: torch.Tensor = x) -> object:
            with torch.inference_mode():
                return module(x)

        def onnx(threads: int, x: np.ndarray = x_np) -> Engine:
            session = sessions[threads]
            return Engine(lambda: session.run([OUTPUT_NAME], {INPUT_NAME: x}), n)

        times = race({"ort_1thread": onnx(1), f"ort_{n}threads": onnx(n),
                      "torch_1thread": Engine(eager, 1), f"torch_{n}threads": Engine(eager, n)},
                     args.seconds)
        served = times["ort_1thread"]  # the server's setting
        rows.append({"batch": batch, **{f"{k}_us": round(v * 1e6, 1) for k, v in times.items()},
                     "torch_1thread/ort": round(times["torch_1thread"] / served, 2),
                     f"torch_{n}threads/ort": round(times[f"torch_{n}threads"] / served, 2)})
    torch.set_num_threads(n)
    print(" ".join(f"{k:>18}" for k in rows[0]))
    for r in rows:
        print(" ".join(f"{v:>18}" for v in r.values()))
    print(json.dumps({"input_shape": list(input_shape), "onnxruntime": ort.__version__,
                      "torch": torch.__version__, "rows": rows}))


if __name__ == "__main__":
    main()
