"""torch thread counts on a small device, quiet and loaded: why `threads: 1` is the default.

    .venv/bin/python benchmarks/threads.py [--tasks 5] [--threads 1 2] [--burners 1]

Runs `edgecl bench` (fine-tuning and GEM with the 2x100 MLP on pmnist, fine-tuning with the
1-D conv net on MNIST-1D) for each thread count, first on a quiet machine, then with --burners
busy-looping processes beside it (another job on the device's cores), alternating the thread
counts. Reports `train_s` of each run and each setting's time relative to 1 thread.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EDGECL = ROOT / ".venv" / "bin" / "edgecl"
CASES = {  # name: bench arguments
    "finetune mlp": ["--config", "models/finetune.yaml"],
    "gem mlp": ["--config", "models/gem.yaml"],
    "finetune conv1d": ["--config", "models/mnist1d-conv1d.yaml", "--method", "finetune"],
}


@contextlib.contextmanager
def burners(n: int) -> Iterator[None]:
    """`n` processes spinning on a core each, for as long as the block runs."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(0.5)
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def train_s(args: list[str], threads: int, tasks: int, out: Path) -> float:
    subprocess.run([str(EDGECL), "bench", *args, "--threads", str(threads), "--tasks",
                    str(tasks), "--device", "cpu", "--out", str(out)], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((out / "result.json").read_text())["train_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=5, help="tasks per run (default 5)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="torch thread counts compared (default 1 2)")
    parser.add_argument("--burners", type=int, default=os.cpu_count() or 1,
                        help="busy processes for the loaded runs (default: one per core)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for load in ("quiet", f"{args.burners} busy process(es)"):
            with burners(0 if load == "quiet" else args.burners):
                for case, bench_args in CASES.items():
                    times = {n: train_s(bench_args, n, args.tasks, Path(tmp) / f"{case}-{n}")
                             for n in args.threads}
                    print(f"{load:22} {case:16} " + "  ".join(
                        f"{n} thread(s) {t:6.2f} s ({t / times[args.threads[0]]:.2f}x)"
                        for n, t in times.items()), flush=True)


if __name__ == "__main__":
    main()
