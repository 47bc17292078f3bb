"""How fast are GEM and A-GEM? Fine-tuning, exact GEM, fast GEM and A-GEM on permuted MNIST.

All run the benchmark protocol in this one process (presets models/finetune.yaml, gem.yaml,
gem.yaml with `fast: true`, agem.yaml, and agem.yaml with the usual reference batch of 256).
For each: training wall time (the protocol's `train_s`: stream, observe, end_task), its ratio
to fine-tuning, the whole run's wall time (evaluations included) and ACC.

For exact GEM also its compute floor: the FLOPs of its past-task gradients, counted per step as
the forward and backward GEMMs of every past task's memory through the MLP (forward x·Wᵀ, weight
gradient per task, input gradient below the first layer; elementwise work and the current batch
are left out), divided by the GEMM rate measured now, on GEMMs of exactly those shapes. GEM's
time over its floor says how much of GEM is overhead on top of the arithmetic it cannot avoid.

For each A-GEM likewise: fine-tuning's time plus the GEMMs of its reference gradient (forward
and backward of `ref_batch` memory samples, every step with a past task) is the least it can take.

Targets: exact GEM <= 1.5x its floor, fast GEM <= 1/4 of exact GEM's time (ACC within 0.01),
A-GEM <= 3x fine-tuning. Timings on a shared machine are noisy: every method runs `--repeats`
times, interleaved, and its fastest run counts (the learning itself is deterministic).

    .venv/bin/python benchmarks/gem_speed.py [--device cuda] [--tasks 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from threads import burners  # benchmarks/threads.py: busy-looping processes
from torch import nn

from edgecl.config import Config
from edgecl.data import Benchmark
from edgecl.learners import Learner
from edgecl.protocol import run_protocol, sync_device
from edgecl.setup import benchmark_for, load_config

MODELS = Path(__file__).resolve().parent.parent / "models"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--tasks", type=int, default=20, help="number of tasks [20]")
    p.add_argument("--samples-per-task", type=int, default=1000, help="[1000]")
    p.add_argument("--seed", type=int, default=0, help="[0]")
    p.add_argument("--burners", type=int, default=0,
                   help="busy-looping processes beside the runs, as a device's other work [0]")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch [torch's default]")
    p.add_argument("--repeats", type=int, default=2,
                   help="runs of each method, interleaved; the fastest counts [2]")
    p.add_argument("--gemm-repeats", type=int, default=7,
                   help="timings per GEMM shape set; the median counts [7]")
    return p.parse_args()


def configs(args: argparse.Namespace) -> dict[str, Config]:
    overrides: dict[str, Any] = {
        "device": args.device, "seed": args.seed,
        "benchmark": {"name": "pmnist", "n_tasks": args.tasks,
                      "samples_per_task": args.samples_per_task}}
    gem, agem = MODELS / "gem.yaml", MODELS / "agem.yaml"
    return {
        "finetune": load_config(MODELS / "finetune.yaml", overrides),
        "gem": load_config(gem, overrides),
        "fast gem": load_config(gem, {**overrides, "method": {"name": "gem", "fast": True}}),
        "agem": load_config(agem, overrides),
        "agem 256": load_config(agem, {**overrides, "method": {"name": "agem", "ref_batch": 256}}),
    }


def linear_layers(net: nn.Module) -> list[nn.Linear]:
    """The MLP's layers in forward order: body, then the (shared) head."""
    return [m for m in net.body.modules() if isinstance(m, nn.Linear)] + [net.heads[0]]


def past_task_steps(cfg: Config, bench: Benchmark) -> dict[tuple[int, ...], int]:
    """How many GEM steps see each list of past-task memory sizes (the protocol's schedule)."""
    steps: dict[tuple[int, ...], int] = {}
    per_task, batch = cfg.memory.per_task, cfg.benchmark.batch_size
    for i, task in enumerate(bench.tasks):
        counts = tuple(min(len(t.y_train), per_task) for t in bench.tasks[:i])
        if counts:
            steps[counts] = steps.get(counts, 0) + math.ceil(len(task.y_train) / batch)
    return steps


def gemm_flops(layers: list[nn.Linear], rows: int) -> int:
    """Forward, per-task weight gradient and input gradient (not of the input itself)."""
    return sum(2 * rows * layer.in_features * layer.out_features * (3 if i else 2)
               for i, layer in enumerate(layers))


def gemm_seconds(layers: list[nn.Linear], counts: tuple[int, ...], device: torch.device,
                 repeats: int) -> float:
    """Median time of one step's past-task GEMMs, on operands of the shapes GEM's pass has."""
    k, m = len(counts), counts[0]
    assert all(c == m for c in counts), "the floor assumes full, equal memories"
    n = k * m
    operands = []
    for i, layer in enumerate(layers):
        w = layer.weight.detach()
        a = torch.rand(n, layer.in_features, device=device)
        d = torch.rand(n, layer.out_features, device=device)
        operands.append((i, w, a, d))

    def one_step() -> None:
        for i, w, a, d in operands:
            a @ w.T  # forward
            torch.bmm(d.view(k, m, -1).transpose(1, 2), a.view(k, m, -1))  # per-task dW
            if i:
                d @ w  # gradient to the layer below
        sync_device(device)

    one_step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        one_step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gem_floor(gem: Learner, bench: Benchmark, repeats: int) -> tuple[float, float]:
    """(FLOPs, seconds) of exact GEM's past-task gradients over the whole run."""
    layers = linear_layers(gem.net)
    flops = seconds = 0.0
    for counts, steps in past_task_steps(gem.spec.config, bench).items():
        flops += steps * gemm_flops(layers, sum(counts))
        seconds += steps * gemm_seconds(layers, counts, gem.device, repeats)
    return flops, seconds


def agem_reference_seconds(agem: Learner, bench: Benchmark, repeats: int) -> float:
    """Seconds of A-GEM's reference-gradient GEMMs over the whole run (one batch per step)."""
    steps = sum(past_task_steps(agem.spec.config, bench).values())
    batch = (agem.params.ref_batch,)
    return steps * gemm_seconds(linear_layers(agem.net), batch, agem.device, repeats)


@dataclass
class Timings:
    """Each method's fastest run, and the floors measured next to them."""

    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    gem_flops: float = 0.0
    gem_floor_s: float = math.inf
    agem_reference_s: dict[str, float] = field(default_factory=dict)  # per A-GEM setup


def run_all(cfgs: dict[str, Config], bench: Benchmark, repeats: int, gemm_repeats: int
            ) -> Timings:
    timings = Timings()
    for _ in range(repeats):
        for name, cfg in cfgs.items():
            result, learner = run_protocol(cfg, bench)
            print(f"  ran {name:9s} on {result['device']}: train {result['train_s']:.2f} s")
            best = timings.results.get(name)
            if best is None or result["train_s"] < best["train_s"]:
                timings.results[name] = result
            if name == "gem":
                timings.gem_flops, seconds = gem_floor(learner, bench, gemm_repeats)
                timings.gem_floor_s = min(timings.gem_floor_s, seconds)
            if learner.name == "agem":
                seconds = agem_reference_seconds(learner, bench, gemm_repeats)
                timings.agem_reference_s[name] = min(
                    timings.agem_reference_s.get(name, math.inf), seconds)
    return timings


def report(t: Timings) -> None:
    r = t.results
    base = r["finetune"]["train_s"]
    print(f"\n{'method':10s} {'train s':>9s} {'x finetune':>11s} {'wall s':>8s} {'ACC':>7s} "
          f"{'BWT':>7s}")
    for name, res in r.items():
        print(f"{name:10s} {res['train_s']:9.2f} {res['train_s'] / base:11.2f} "
              f"{res['wall_s']:8.2f} {res['acc']:7.4f} {res['bwt']:+7.4f}")
    gem_s, fast_s = r["gem"]["train_s"], r["fast gem"]["train_s"]
    print(f"\nexact GEM compute floor: {t.gem_flops / 1e12:.3f} TFLOP of past-task GEMMs at "
          f"{t.gem_flops / t.gem_floor_s / 1e9:.1f} GFLOP/s = {t.gem_floor_s:.2f} s; "
          f"GEM / floor = {gem_s / t.gem_floor_s:.2f} (target <= 1.5)")
    print(f"fast GEM / exact GEM time = {fast_s / gem_s:.3f} (target <= 0.25); ACC difference "
          f"{r['fast gem']['acc'] - r['gem']['acc']:+.4f} (target within 0.01)")
    # pmnist's tasks are equal-sized: every task but the first steps with a past task
    steps = r["finetune"]["n_train"] / r["finetune"]["config"]["benchmark"]["batch_size"]
    past_steps = steps * (r["finetune"]["n_tasks"] - 1) / r["finetune"]["n_tasks"]
    print(f"one fine-tuning step: {base / steps * 1e3:.3f} ms")
    for name, reference_s in t.agem_reference_s.items():
        print(f"{name} / fine-tuning time = {r[name]['train_s'] / base:.2f} (target <= 3); its "
              f"floor, fine-tuning + {reference_s:.2f} s of reference-gradient GEMMs "
              f"({reference_s / past_steps * 1e3:.3f} ms per step), is "
              f"{(base + reference_s) / base:.2f}x fine-tuning")


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfgs = configs(args)
    bench = benchmark_for(cfgs["gem"])
    print(f"pmnist: {len(bench.tasks)} tasks x {args.samples_per_task}, torch {torch.__version__},"
          f" {torch.get_num_threads()} CPU threads, {args.repeats} runs each, {args.burners} busy"
          " process(es) beside")
    with burners(args.burners):
        results = run_all(cfgs, bench, args.repeats, args.gemm_repeats)
    report(results)


if __name__ == "__main__":
    main()
