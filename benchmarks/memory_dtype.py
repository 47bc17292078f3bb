"""Compact episodic memory: what float16 and uint8 storage save, and what they cost.

GEM and A-GEM (presets models/gem.yaml, models/agem.yaml) on permuted MNIST, each with
`memory.dtype` float32, float16 and uint8, in this one process. For each run: the training state
at the end (`footprint.training_bytes`: net, gradients, optimiser state, episodic memory with its
decode buffer) and the memory alone, both also as a ratio to the same method's float32 run; the
training time (`train_s`: observe and end_task) as a ratio to float32's; and ACC.

Whole runs take minutes and drift with the machine's load, so the cost of decoding is also
timed on its own: at the end, with 19 past tasks stored, the part of a step that reads the
memory (exact GEM: the past-task gradients G; A-GEM: the reference gradient) is timed for the
three dtypes interleaved, `--step-repeats` times, fastest counts.

Float32 memory is read in place; compact memory is decoded into a buffer inside the memory's
bytes: A-GEM's reference batch of 512 samples, exact GEM's one task of 256 at a time. The state
ratio depends on the number of tasks (the decode buffer does not grow with them): run 20 tasks
for pmnist's numbers. Timings on a shared machine are noisy: runs are interleaved `--repeats`
times and the fastest of each counts (the learning itself is deterministic).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/memory_dtype.py [--tasks 20]
        [--samples-per-task 1000] [--methods gem agem] [--repeats 1] [--step-repeats 30]
        [--threads 1]
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from pathlib import Path
from typing import Any

import torch

from edgecl.config import Config
from edgecl.learners import Learner
from edgecl.protocol import run_protocol
from edgecl.setup import benchmark_for, load_config

MODELS = Path(__file__).resolve().parent.parent / "models"
DTYPES = ("float32", "float16", "uint8")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--tasks", type=int, default=20, help="number of tasks [20]")
    p.add_argument("--samples-per-task", type=int, default=1000, help="[1000]")
    p.add_argument("--methods", nargs="+", default=["gem", "agem"], choices=["gem", "agem"])
    p.add_argument("--seed", type=int, default=0, help="[0]")
    p.add_argument("--repeats", type=int, default=1, help="runs of each setup, interleaved [1]")
    p.add_argument("--step-repeats", type=int, default=30,
                   help="timings of the memory-reading part of a step, interleaved [30]")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch [1]")
    return p.parse_args()


def configs(args: argparse.Namespace) -> dict[tuple[str, str], Config]:
    bench = {"n_tasks": args.tasks, "samples_per_task": args.samples_per_task}
    return {(method, dtype): load_config(MODELS / f"{method}.yaml", {
        "device": "cpu", "seed": args.seed, "benchmark": bench, "memory": {"dtype": dtype}})
        for method in args.methods for dtype in DTYPES}


Key = tuple[str, str]  # (method, memory dtype)


def run_all(cfgs: dict[Key, Config], repeats: int) -> tuple[dict[Key, Any], dict[Key, Learner]]:
    bench = benchmark_for(next(iter(cfgs.values())))
    best: dict[Key, dict[str, Any]] = {}
    learners: dict[Key, Learner] = {}
    for _ in range(repeats):
        for key, cfg in cfgs.items():
            result, learners[key] = run_protocol(cfg, bench)
            print(f"  ran {key[0]} {key[1]}: train {result['train_s']:.1f} s")
            if key not in best or result["train_s"] < best[key]["train_s"]:
                best[key] = result
    return best, learners


def memory_read_seconds(learners: dict[Key, Learner], repeats: int) -> dict[Key, float]:
    """Fastest time of the part of a step that reads the memory, every past task but the last
    one stored; the setups interleaved."""
    reads = {}
    for key, learner in learners.items():
        past = learner.past_memory(learner.memory.tasks[-1])
        reads[key] = functools.partial(
            learner.past_task_gradients if key[0] == "gem" else learner.reference_gradient, past)
    best = dict.fromkeys(reads, math.inf)
    for _ in range(repeats):
        for key, read in reads.items():
            t0 = time.perf_counter()
            read()
            best[key] = min(best[key], time.perf_counter() - t0)
    return best


def report(results: dict[Key, dict[str, Any]], reads: dict[Key, float]) -> None:
    print("\n| method | memory | training state MB | x float32 | memory MB | x float32 "
          "| train s | x float32 | memory read ms | x float32 | ACC |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (method, dtype), r in results.items():
        base = results[(method, "float32")]
        fp, fp0 = r["footprint"], base["footprint"]
        print(f"| {method} | {dtype} | {fp['training_bytes'] / 1e6:.2f} "
              f"| {fp['training_bytes'] / fp0['training_bytes']:.3f} "
              f"| {fp['memory_bytes'] / 1e6:.2f} | {fp['memory_bytes'] / fp0['memory_bytes']:.3f} "
              f"| {r['train_s']:.1f} | {r['train_s'] / base['train_s']:.2f} "
              f"| {reads[(method, dtype)] * 1e3:.1f} "
              f"| {reads[(method, dtype)] / reads[(method, 'float32')]:.2f} | {r['acc']:.4f} |")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    cfgs = configs(args)
    print(f"pmnist: {args.tasks} tasks x {args.samples_per_task}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads, {args.repeats} run(s) each")
    results, learners = run_all(cfgs, args.repeats)
    report(results, memory_read_seconds(learners, args.step_repeats))


if __name__ == "__main__":
    main()
