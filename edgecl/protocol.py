"""The GEM benchmark protocol: one pass over the task stream, R after every task, metrics."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgecl.atomic import atomic_write_text
from edgecl.checkpoint import save_checkpoint
from edgecl.config import Config
from edgecl.data import Benchmark
from edgecl.learners import Learner
from edgecl.metrics import Evaluator, summarize
from edgecl.report import plot_accuracy_matrix
from edgecl.setup import learner_spec, new_learner

Progress = Callable[[int, str], None]  # (samples just learned, task id)

# A run is at chance when its final ACC is at most chance level + AT_CHANCE_MARGIN (see `chance`).
AT_CHANCE_MARGIN = 0.02


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def chance(bench: Benchmark) -> float:
    """The ACC of guessing: the mean over tasks of 1 / the task's number of classes (a shared
    head: the benchmark's classes; per-task heads: each task's own)."""
    if bench.head == "shared" or not bench.tasks:
        return 1.0 / bench.n_classes
    return float(np.mean([1.0 / (len(t.classes) or bench.n_classes) for t in bench.tasks]))


def run_protocol(cfg: Config, bench: Benchmark, progress: Progress | None = None,
                 learner: Learner | None = None) -> tuple[dict[str, Any], Learner]:
    """Learn `bench` in one pass with the method of `cfg`, on `learner` if one was built for
    them (`edgecl.setup.new_learner`); returns (result, final learner).

    Times: `wall_s` runs from the first evaluation (learner built) to the last; `train_s` is the
    time inside `observe` and `end_task` (GPU work included: the device is synchronised at the
    end of every task); `eval_s` the time computing R and b. The rest of `wall_s`, its share
    reported as `overhead_share`, is the harness: the stream's batches and the progress bar.

    Health (`run_warnings` words it): `nonfinite_steps`, the steps the learner skipped because
    their loss, gradients or new weights were not finite; `finite`, whether every weight and
    buffer is finite at the end (`nonfinite_weight` names the first that is not); `at_chance`,
    whether ACC is at most `chance` + AT_CHANCE_MARGIN. A learner that diverged beyond recovery
    raises `edgecl.learners.LearnerDiverged` (a RuntimeError) from here.
    """
    if learner is None:
        learner = new_learner(learner_spec(cfg, bench))
    for task in bench.tasks:
        learner.register_task(task.name)
    evaluate = Evaluator(((t.name, t.x_test, t.y_test) for t in bench.tasks), learner.device)
    t_start = time.perf_counter()
    b = evaluate(learner)
    R = np.zeros((len(bench.tasks), len(bench.tasks)))
    train_s, steps = 0.0, 0
    for i, task in enumerate(bench.tasks):
        for batch in bench.task_stream(i, cfg.benchmark.batch_size):
            t0 = time.perf_counter()
            learner.observe(batch.x, batch.y, batch.task)
            train_s += time.perf_counter() - t0
            steps += 1
            if progress:
                progress(len(batch.y), batch.task)
        t0 = time.perf_counter()
        learner.end_task(task.name)
        sync_device(learner.device)
        train_s += time.perf_counter() - t0
        R[i] = evaluate(learner)
    wall_s = time.perf_counter() - t_start
    eval_s = evaluate.seconds
    metrics = summarize(R, b)
    stats = learner.stats()
    bad_weight = learner.nonfinite_weight()
    guess = chance(bench)
    result = {
        "benchmark": bench.name, "method": cfg.method.name, "seed": cfg.seed,
        "n_tasks": len(bench.tasks), "tasks": [t.name for t in bench.tasks],
        "acc": metrics.acc, "bwt": metrics.bwt, "fwt": metrics.fwt,
        "R": R.tolist(), "b": b.tolist(),
        "wall_s": wall_s, "train_s": train_s, "eval_s": eval_s,
        "overhead_share": (wall_s - train_s - eval_s) / wall_s,
        "samples_per_s": bench.n_train / train_s, "n_train": bench.n_train,
        "steps": steps, "nonfinite_steps": int(stats.get("nonfinite_steps", 0)),
        "finite": bad_weight is None, "nonfinite_weight": bad_weight,
        "chance": guess, "at_chance": bool(metrics.acc <= guess + AT_CHANCE_MARGIN),
        "footprint": learner.footprint().to_dict(), "stats": stats,
        "config": cfg.model_dump(mode="json"), "source": bench.source,
        "device": str(learner.device), "torch": torch.__version__, "host": platform.node(),
    }
    return result, learner


def run_warnings(result: dict[str, Any]) -> list[str]:
    """One line per problem of a `run_protocol` result, for the user; empty for a healthy run.

    The problems: steps skipped as non-finite (`nonfinite_steps` > 0: the learner diverged
    there and those batches were not learned), a final ACC at chance (`at_chance`), and a model
    with non-finite weights (`finite` false). Print every line; a non-finite model is unusable
    (export refuses it), so `edgecl bench` should exit non-zero when `result["finite"]` is
    false. Results written before these keys existed give no lines.
    """
    lines = []
    skipped = result.get("nonfinite_steps", 0)
    if skipped:
        lines.append(f"{skipped} of {result['steps']} training steps were skipped: their loss, "
                     "gradients or new weights were not finite (the learner diverged there); "
                     "lower the learning rate, or standardise the inputs (normalize: channel)")
    if result.get("at_chance"):
        lines.append(f"final ACC {result['acc']:.3f} is at chance ({result['chance']:.3f} by "
                     f"guessing, margin {AT_CHANCE_MARGIN}): the model learned nothing usable")
    if result.get("finite") is False:
        lines.append(f"the final model is not finite ({result.get('nonfinite_weight')} holds NaN "
                     "or Inf): it is unusable, and edgecl export refuses it")
    return lines


def write_run(out_dir: Path, result: dict[str, Any], learner: Learner) -> None:
    """DIR/result.json, DIR/R.png and DIR/checkpoint.pt."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "result.json", json.dumps(result, indent=1) + "\n")
    title = f"{result['benchmark']} / {result['method']}: ACC {result['acc']:.3f}"
    plot_accuracy_matrix(np.asarray(result["R"]), out_dir / "R.png", title)
    save_checkpoint(out_dir / "checkpoint.pt", learner,
                    {"benchmark": result["benchmark"], "acc": result["acc"]})
