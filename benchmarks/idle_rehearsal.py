"""Idle rehearsal: test accuracy of a daemon's learner after an idle period, with and without.

    .venv/bin/python benchmarks/idle_rehearsal.py [--benchmark japanesevowels] [--method er]
        [--steps 0 100 300 1000] [--seeds 0 1 2]

The benchmark's tasks stream through the daemon's own `Learning` (the code `edgecl learn` runs
on its journal: each task's training samples in order, then its end), with the method's
preset settings and the daemon's defaults (`learn.holdout` 0.05). That journal is then followed
by an idle period in which the daemon rehearses `steps` memory steps (REHEARSE markers of
10, as `learn.rehearse_steps` journals them), `0` being no rehearsal. The learner is then
scored on every task's test split (mean accuracy over tasks, as ACC). The same journal, seed
for seed: only the idle period differs.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np

from edgecl.daemon.daemon import REHEARSE_CHUNK
from edgecl.daemon.journal import END, REHEARSE, SAMPLE, Chunk
from edgecl.daemon.loop import Learning
from edgecl.metrics import Evaluator
from edgecl.setup import (
    benchmark_for,
    load_config,
    new_learner,
    stream_learner_spec,
    stream_schema,
)


def journal_of(bench) -> list[Chunk]:
    """Each task's training samples (one chunk each), then its END."""
    chunks, seq = [], 0
    for task in bench.tasks:
        n = len(task.y_train)
        x = task.x_train.reshape(n, -1).numpy().astype(np.float32)
        chunks.append(Chunk(seq + 1, n, SAMPLE, task.name, task.y_train.numpy(), x))
        chunks.append(Chunk(seq + n + 1, 1, END, task.name))
        seq += n + 1
    return chunks


def idle(steps: int, after: int) -> list[Chunk]:
    """The REHEARSE markers an idle period of `steps` steps journals, after seq `after`."""
    sizes = [REHEARSE_CHUNK] * (steps // REHEARSE_CHUNK) + [steps % REHEARSE_CHUNK] * bool(
        steps % REHEARSE_CHUNK)
    return [Chunk(after + i + 1, 1, REHEARSE, "", np.int64([s])) for i, s in enumerate(sizes)]


def acc_after(benchmark: str, method: str, seed: int, steps: int) -> float:
    cfg = load_config(None, {"benchmark": {"name": benchmark}, "method": {"name": method},
                             "seed": seed, "device": "cpu"})
    bench = benchmark_for(cfg)
    schema = stream_schema(cfg)
    learning = Learning(new_learner(stream_learner_spec(cfg, schema)), schema, cfg.learn)
    chunks = journal_of(bench)
    for chunk in chunks + idle(steps, chunks[-1].last):
        learning.take(chunk)
    sets = [(t.name, t.x_test, t.y_test) for t in bench.tasks]
    return float(np.mean(Evaluator(sets, learning.learner.device)(learning.learner)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--benchmark", default="japanesevowels")
    parser.add_argument("--method", default="er")
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 100, 300, 1000])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    print(f"{args.method} on {args.benchmark}, test ACC after an idle period of n rehearsal "
          f"steps (seeds {' '.join(map(str, args.seeds))})")
    for steps in args.steps:
        accs = [acc_after(args.benchmark, args.method, seed, steps) for seed in args.seeds]
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"  {steps:>5} steps: {statistics.mean(accs):.3f} ± {spread:.3f}  "
              f"({', '.join(f'{a:.3f}' for a in accs)})", flush=True)


if __name__ == "__main__":
    main()
