"""edgecl against the GEM reference code (facebookresearch/GradientEpisodicMemory), same data.

    git clone https://github.com/facebookresearch/GradientEpisodicMemory /tmp/gemref
    .venv/bin/python benchmarks/reference_speed.py --reference /tmp/gemref [--repeats 3]

Both learn edgecl's embedded pmnist (20 tasks x 1,000 training digits, 1,000 test digits each),
written once as the reference's own task file ([tasks_tr, tasks_te], each task
[name, x [n, 784], y [n]]) and read back by the reference's `load_datasets`. Both take batches of
10 and one thread (`torch.set_num_threads(1)`; OpenMP, MKL and OpenBLAS for numpy: 1), and
evaluate every task's whole test set before training and after each task (the reference's
schedule with `--log_every 100`: 100 batches per task). Each run is its own process, timed
from the first evaluation to the last (the reference's own `life_experience` time; edgecl's
`wall_s`); runs alternate reference, edgecl, reference, ... and the median of `--repeats` runs
counts.

Pairs (reference model and its run_experiments.sh settings for pmnist / edgecl preset):
fine-tuning: `single` lr 0.03 / models/finetune.yaml; EWC: `ewc` lr 0.1, 10 memories, strength 3
/ models/ewc.yaml; GEM: `gem` lr 0.1, 256 memories, margin 0.5 / models/gem.yaml. The reference
has no LwF: models/lwf.yaml is compared with the reference's `single`, the floor any method
there costs. The reference runs unmodified under torch 2.x (its code needs no shim on the CPU);
it shuffles each task's samples with its own seeds, and its ACC counts 999 of each task's 1,000
test digits over 1,000 (its `eval_tasks`), at most 0.001 low.

Printed per run: wall time, the process's CPU time over the same span (steadier on a shared
machine), evaluation time, ACC; then per pair the medians and reference/edgecl ratios (above 1:
edgecl is faster), and the load average before and after.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from threads import burners  # benchmarks/threads.py: busy-looping processes

ROOT = Path(__file__).resolve().parent.parent
DATA_FILE = "pmnist_edgecl.pt"
# name: (reference model, its settings, edgecl preset)
PAIRS: dict[str, tuple[str, dict[str, Any], str]] = {
    "finetune": ("single", {"lr": 0.03}, "finetune.yaml"),
    "ewc": ("ewc", {"lr": 0.1, "n_memories": 10, "memory_strength": 3.0}, "ewc.yaml"),
    "lwf": ("single", {"lr": 0.03}, "lwf.yaml"),
    "gem": ("gem", {"lr": 0.1, "n_memories": 256, "memory_strength": 0.5}, "gem.yaml"),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--reference", type=Path, required=True,
                   help="a checkout of facebookresearch/GradientEpisodicMemory")
    p.add_argument("--methods", nargs="+", choices=list(PAIRS), default=list(PAIRS),
                   help="pairs to run [all]")
    p.add_argument("--repeats", type=int, default=3, help="runs of each side per pair [3]")
    p.add_argument("--tasks", type=int, default=20, help="[20]")
    p.add_argument("--seed", type=int, default=0, help="[0]")
    p.add_argument("--burners", type=int, default=0,
                   help="busy-looping processes beside both sides, as a device's other work [0]")
    p.add_argument("--one", nargs=3, metavar=("SIDE", "METHOD", "DATA_DIR"),
                   help=argparse.SUPPRESS)  # one run in this process, JSON on stdout
    args = p.parse_args()
    if not (args.reference / "main.py").is_file():
        p.error(f"--reference: no main.py in {args.reference}; give a checkout of "
                "facebookresearch/GradientEpisodicMemory")
    if args.repeats < 1 or args.tasks < 1:
        p.error("--repeats and --tasks must be at least 1")
    return args


def edgecl_config(method: str, tasks: int, seed: int) -> Any:
    from edgecl.setup import load_config
    return load_config(ROOT / "models" / PAIRS[method][2], {
        "device": "cpu", "seed": seed, "threads": 1,
        "benchmark": {"name": "pmnist", "n_tasks": tasks, "samples_per_task": 1000,
                      "batch_size": 10}})


def write_task_file(path: Path, tasks: int, seed: int) -> None:
    """edgecl's pmnist tensors in the layout of the reference's data/mnist_permutations.py."""
    from edgecl.setup import benchmark_for
    bench = benchmark_for(edgecl_config("finetune", tasks, seed))
    tr = [[t.name, t.x_train.reshape(len(t.x_train), -1).clone(), t.y_train.clone()]
          for t in bench.tasks]
    te = [[t.name, t.x_test.reshape(len(t.x_test), -1).clone(), t.y_test.clone()]
          for t in bench.tasks]
    torch.save([tr, te], path)


def run_reference(reference: Path, method: str, data_dir: Path, seed: int) -> dict[str, Any]:
    """The reference's `main.py` with its run_experiments.sh settings for pmnist."""
    sys.path.insert(0, str(reference))
    main = importlib.import_module("main")
    model_name, settings, _ = PAIRS[method]
    args = SimpleNamespace(
        model=model_name, n_hiddens=100, n_layers=2, n_memories=0, memory_strength=0.0,
        finetune=False, n_epochs=1, batch_size=10, lr=1e-3, cuda=False, seed=seed,
        log_every=100, data_path=str(data_dir), data_file=DATA_FILE, samples_per_task=1000,
        shuffle_tasks="no")
    vars(args).update(settings)
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    x_tr, x_te, n_inputs, n_outputs, n_tasks = main.load_datasets(args)
    continuum = main.Continuum(x_tr, args)
    model = importlib.import_module("model." + model_name).Net(n_inputs, n_outputs, n_tasks, args)
    evaluate, eval_s = main.eval_tasks, [0.0]

    def timed_eval(*a: Any) -> Any:  # the reference's own evaluation, timed
        t0 = time.perf_counter()
        out = evaluate(*a)
        eval_s[0] += time.perf_counter() - t0
        return out

    main.eval_tasks = timed_eval
    t0, cpu0 = time.perf_counter(), time.process_time()
    _, result_a, _ = main.life_experience(model, continuum, x_te, args)
    wall_s, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    return {"wall_s": wall_s, "cpu_s": cpu_s, "train_s": wall_s - eval_s[0], "eval_s": eval_s[0],
            "acc": float(result_a[-1].mean())}


def run_edgecl(method: str, tasks: int, seed: int) -> dict[str, Any]:
    from edgecl.learners import build_learner
    from edgecl.protocol import run_protocol
    from edgecl.setup import benchmark_for, learner_spec
    cfg = edgecl_config(method, tasks, seed)
    bench = benchmark_for(cfg)
    build_learner(learner_spec(cfg, bench))  # its lazy imports (1 s): cpu_s times the run alone
    cpu0 = time.process_time()
    result, _ = run_protocol(cfg, bench)
    return {"cpu_s": time.process_time() - cpu0,
            **{k: result[k] for k in ("wall_s", "train_s", "eval_s", "acc")}}


def one_run(args: argparse.Namespace, side: str, method: str, data_dir: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--reference", str(args.reference), "--tasks",
           str(args.tasks), "--seed", str(args.seed), "--one", side, method, str(data_dir)]
    # numpy's BLAS (the reference's GEM solves its QP with numpy) takes one thread too
    env = {**os.environ, **{k: "1" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                             "OPENBLAS_NUM_THREADS")}}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.splitlines()[-1])


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    if args.one:
        side, method, data_dir = args.one
        result = (run_reference(args.reference, method, Path(data_dir), args.seed)
                  if side == "reference" else run_edgecl(method, args.tasks, args.seed))
        print(json.dumps(result))
        return
    load_before = os.getloadavg()
    print(f"pmnist {args.tasks} tasks x 1000, batch 10, 1 thread, torch {torch.__version__}, "
          f"{args.repeats} alternating runs per side, {args.burners} busy process(es) beside")
    rows = []
    with tempfile.TemporaryDirectory() as tmp, burners(args.burners):
        write_task_file(Path(tmp) / DATA_FILE, args.tasks, args.seed)
        for method in args.methods:
            runs: dict[str, list[dict[str, Any]]] = {"reference": [], "edgecl": []}
            for _ in range(args.repeats):
                for side in runs:
                    runs[side].append(one_run(args, side, method, Path(tmp)))
                    r = runs[side][-1]
                    print(f"  {method:8s} {side:9s} wall {r['wall_s']:6.2f} s  cpu "
                          f"{r['cpu_s']:6.2f} s  eval {r['eval_s']:5.2f} s  ACC {r['acc']:.4f}",
                          flush=True)
            rows.append((method, runs))
    print(f"\n{'method':8s} {'vs':>6s} {'ref wall':>9s} {'edgecl':>7s} {'ratio':>6s} "
          f"{'ref cpu':>8s} {'edgecl':>7s} {'ratio':>6s} {'ACC ref':>8s} {'edgecl':>7s}")
    for method, runs in rows:
        ref, ours = ({k: statistics.median(r[k] for r in runs[side]) for k in ("wall_s", "cpu_s")}
                     for side in ("reference", "edgecl"))
        print(f"{method:8s} {PAIRS[method][0]:>6s} {ref['wall_s']:8.2f}s {ours['wall_s']:6.2f}s "
              f"{ref['wall_s'] / ours['wall_s']:6.2f} {ref['cpu_s']:7.2f}s {ours['cpu_s']:6.2f}s "
              f"{ref['cpu_s'] / ours['cpu_s']:6.2f} {runs['reference'][0]['acc']:8.4f} "
              f"{runs['edgecl'][0]['acc']:7.4f}")
    load = ", ".join(f"{a:.2f}/{b:.2f}" for a, b in zip(load_before, os.getloadavg(), strict=True))
    print(f"load average (1, 5, 15 min), before/after: {load}")


if __name__ == "__main__":
    main()
