"""Fleet learning, measured with real processes: devices alone, federated, and the central bound.

`--devices` `edgecl learn --fleet` daemons (each with its Flower SuperNode) are each streamed
`--tasks-per-device` tasks of a benchmark (device d: tasks d*k .. d*k+k-1), then `edgecl fleet`
runs `--rounds` rounds. Reported, on every task's test split:

- alone: each device's accuracy over the union of all devices' tasks before any round (a task
  it never met goes through its one shared head, or is at chance with a head per task);
- federated: the same after the rounds, per device, with the matrix device x task;
- central: one learner of the same config streamed every task in order (what a single device
  seeing all the data learns), and the offline bound (the same net trained jointly for 5
  epochs on all tasks at once);
- bytes each device uploaded per round (its share) and the aggregate it received;
- a device that joins late: started empty after the rounds, it takes part in one more round
  (`--late`), and is measured after it on every task, none of which it ever saw.

    .venv/bin/python benchmarks/fleet.py                       # 4 devices x 2 pmnist tasks
    .venv/bin/python benchmarks/fleet.py --benchmark rotmnist --rounds 8

Needs `pip install -e '.[fleet]'`. Prints a markdown table; --json writes every number.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from conftest import free_port  # noqa: E402
from learn_helpers import DaemonProcess  # noqa: E402  (the tests' process runner)
from results import joint_lr, with_lr  # noqa: E402

from edgecl.cli import use_threads  # noqa: E402
from edgecl.daemon.checkpoints import CheckpointStore  # noqa: E402
from edgecl.daemon.client import LearnClient  # noqa: E402
from edgecl.joint import joint_training  # noqa: E402
from edgecl.learners import Learner  # noqa: E402
from edgecl.protocol import run_protocol  # noqa: E402
from edgecl.setup import benchmark_for, build_config  # noqa: E402

EDGECL = Path(sys.executable).parent / "edgecl"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--benchmark", default="pmnist")
    p.add_argument("--method", default="er")
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--tasks-per-device", type=int, default=2)
    p.add_argument("--samples-per-task", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--rehearse-steps", type=int, default=100,
                   help="learn.fleet_rehearse_steps: memory steps after each aggregate")
    p.add_argument("--round-timeout", type=float, default=60.0)
    p.add_argument("--late", action=argparse.BooleanOptionalAction, default=True,
                   help="then start an empty device and run one more round with it")
    p.add_argument("--json", type=Path, help="write every number here")
    p.add_argument("--keep", action="store_true", help="keep the state dirs (printed)")
    return p.parse_args()


def config(args: argparse.Namespace) -> dict:
    return {"seed": 0, "device": "cpu", "method": {"name": args.method},
            "benchmark": {"name": args.benchmark,
                          "n_tasks": args.devices * args.tasks_per_device,
                          "samples_per_task": args.samples_per_task},
            "learn": {"holdout": 0.05, "checkpoint_seconds": 3600,
                      "checkpoint_every": 10_000_000,
                      "fleet_rehearse_steps": args.rehearse_steps}}



def task_accuracies(learner: Learner, tasks) -> list[float]:
    """Test accuracy per task; a task the learner never met: through its one shared head, or
    chance with a head per task (it has no head for it)."""
    accs = []
    for task in tasks:
        if task.name not in learner.task_ids:
            if len(learner.net.heads) > 1:
                accs.append(1.0 / len(task.classes))
                continue
            learner.register_task(task.name)
        predicted = learner.predict(task.x_test, task.name).argmax(1)
        accs.append(float((predicted == task.y_test).float().mean()))
    return accs


def snapshot(url: str, state: Path) -> Learner:
    """The device's learner now: checkpointed on request, then read back."""
    with LearnClient(url) as client:
        client.checkpoint()
    restored = CheckpointStore(state / "checkpoints", 3).restore("cpu")
    assert restored is not None
    return restored.learner


def run_fleet(args: argparse.Namespace, root: Path, tasks) -> dict:
    (root / "learn.yaml").write_text(yaml.safe_dump(config(args)))
    superlink = f"127.0.0.1:{free_port()}"
    k = args.tasks_per_device
    devices = [DaemonProcess([str(EDGECL), "learn", "--state-dir", str(root / f"dev{d}"),
                              "--config", str(root / "learn.yaml"), "--port", "0",
                              "--fleet", superlink, "--fleet-insecure"], dict(os.environ))
               for d in range(args.devices)]
    fleet = None
    late = None
    try:
        alone = []
        for d, device in enumerate(devices):
            mine = ",".join(str(i) for i in range(d * k, d * k + k))
            subprocess.run([str(EDGECL), "replay", f"embedded:{args.benchmark}",
                            "--samples-per-task", str(args.samples_per_task), "--tasks", mine,
                            "--to", device.wait_url()], check=True, capture_output=True)
            alone.append(task_accuracies(snapshot(device.url, root / f"dev{d}"), tasks))
            print(f"device {d} alone: {sum(alone[-1]) / len(tasks):.3f}", flush=True)
        t0 = time.perf_counter()
        fleet = fleet_session(args, root / "fleet", superlink, args.rounds, args.devices)
        fleet_s = time.perf_counter() - t0
        federated = [measure(device, root / f"dev{d}", tasks) for d, device in enumerate(devices)]
        joined_late = None
        if args.late:
            late = DaemonProcess([str(EDGECL), "learn", "--state-dir", str(root / "late"),
                                  "--config", str(root / "learn.yaml"), "--port", "0",
                                  "--fleet", superlink, "--fleet-insecure"], dict(os.environ))
            late.wait_url()
            fleet_session(args, root / "fleet-late", superlink, 1, args.devices + 1)
            joined_late = measure(late, root / "late", tasks)
    finally:
        for device in [*devices, late]:
            if device is not None:
                device.stop()
        if fleet is not None:
            fleet.stop()
    status = json.loads((root / "fleet" / "status.json").read_text())
    return {"alone": alone, "federated": federated, "fleet_s": fleet_s,
            "rounds": status["rounds"], "late": joined_late}


def fleet_session(args: argparse.Namespace, state: Path, superlink: str, rounds: int,
                  devices: int) -> DaemonProcess:
    """`edgecl fleet`, run to its end: `rounds` rounds with `devices` devices."""
    fleet = DaemonProcess([str(EDGECL), "fleet", "--state-dir", str(state),
                           "--port", superlink.split(":")[1], "--insecure",
                           "--rounds", str(rounds), "--min-nodes", str(devices),
                           "--round-timeout", str(args.round_timeout)], dict(os.environ))
    if fleet.proc.wait() != 0:
        raise SystemExit("edgecl fleet failed:\n" + "".join(fleet.lines))
    return fleet


def measure(device: DaemonProcess, state: Path, tasks) -> list[float]:
    """The device's accuracy per task, once the last aggregate it journaled is taken."""
    with LearnClient(device.url) as client:
        client.wait_learned(300)
    return task_accuracies(snapshot(device.url, state), tasks)


def central(args: argparse.Namespace) -> dict:
    cfg = build_config(config(args))
    bench = benchmark_for(cfg)
    result, _ = run_protocol(cfg, bench)
    finetune = build_config({**config(args), "method": {"name": "finetune"}})
    lr = joint_lr(finetune, 5)  # chosen on the validation split, as for the results tables
    joint = joint_training(with_lr(finetune, lr), bench, 5)
    return {"stream": result["acc"], "joint": joint["acc"]}


def report(args: argparse.Namespace, runs: dict, bound: dict) -> str:
    n = len(runs["alone"][0])
    mean = [sum(a) / n for a in runs["alone"]]
    fed = [sum(a) / n for a in runs["federated"]]
    up = [max(r["bytes_received"].values(), default=0) for r in runs["rounds"]]
    down = [r["aggregate_bytes"] for r in runs["rounds"]]
    lines = [f"{args.devices} devices x {args.tasks_per_device} {args.benchmark} tasks "
             f"({args.samples_per_task} samples each), {args.method}, {args.rounds} rounds, "
             f"{args.rehearse_steps} rehearsal steps after each aggregate; ACC over all "
             f"{n} tasks' test splits:", "",
             "| | ACC over all tasks |", "|---|---|"]
    lines += [f"| device {d} alone | {m:.3f} |" for d, m in enumerate(mean)]
    lines += [f"| device {d} federated | {f:.3f} |" for d, f in enumerate(fed)]
    if runs["late"] is not None:
        lines += [f"| a device joining late (no sample), after 1 round | "
                  f"{sum(runs['late']) / n:.3f} |"]
    lines += [f"| one device streamed every task ({args.method}) | {bound['stream']:.3f} |",
              f"| offline bound (joint, 5 epochs) | {bound['joint']:.3f} |", ""]
    lines += [f"Federated / offline bound: {min(fed) / bound['joint']:.2f} (worst device); "
              f"best device alone {max(mean):.3f}. Per round, each device uploaded at most "
              f"{max(up):,} bytes and received {max(down):,} bytes; the {args.rounds} rounds "
              f"took {runs['fleet_s']:.0f} s."]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    use_threads(1)
    root = Path(tempfile.mkdtemp(prefix="edgecl-fleet-"))
    try:
        tasks = benchmark_for(build_config(config(args))).tasks
        runs = run_fleet(args, root, tasks)
        bound = central(args)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"state dirs kept in {root}")
    text = report(args, runs, bound)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         **runs, **bound}, indent=1, default=str))


if __name__ == "__main__":
    main()
