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
from edgecl.config import Config, ConfigError, load_config
from edgecl.data import Benchmark, load_benchmark
from edgecl.learners import LEARNERS, Learner, LearnerSpec, build_learner
from edgecl.metrics import summarize
from edgecl.nets import check_input_shape
from edgecl.report import plot_accuracy_matrix

EVAL_BATCH = 1000
Progress = Callable[[int, str], None]  # (samples just learned, task id)


def load_config_benchmark(cfg: Config) -> Benchmark:
    b = cfg.benchmark
    return load_benchmark(b.name, n_tasks=b.n_tasks, samples_per_task=b.samples_per_task,
                          seed=cfg.seed, data_dir=b.data_dir,
                          validation=b.evaluate_on == "validation")


def method_configs(config: Path | None, overrides: dict[str, Any]) -> list[Config]:
    """The config of `config` + `overrides`, or with method "all" one per registered method:
    each keeps the preset's benchmark and net, and a method other than the preset's runs with
    its own tuned settings (see `edgecl.config.load_config`)."""
    if overrides.get("method", {}).get("name") != "all":
        return [load_config(config, overrides)]
    return [load_config(config, {**overrides, "method": {"name": name}}) for name in LEARNERS]


def learner_spec(cfg: Config, bench: Benchmark) -> LearnerSpec:
    n_tasks = len(bench.tasks)
    max_tasks = cfg.max_tasks or n_tasks
    if max_tasks < n_tasks:
        raise ConfigError(f"max_tasks: {max_tasks} is fewer than the benchmark's {n_tasks} tasks")
    check_input_shape(cfg.net, bench.input_shape)
    head = bench.head if cfg.head == "auto" else cfg.head
    return LearnerSpec(cfg, bench.input_shape, bench.n_classes, head, max_tasks)


class Evaluator:
    """Test accuracy of every task; test sets are moved to the learner's device once."""

    def __init__(self, bench: Benchmark, device: torch.device) -> None:
        self.tasks = [(t.name, t.x_test.to(device), t.y_test.to(device)) for t in bench.tasks]
        self.seconds = 0.0

    def __call__(self, learner: Learner) -> np.ndarray:
        t0 = time.perf_counter()
        correct = [  # counts stay on the device: one sync for the whole evaluation
            sum((learner.predict(x[i:i + EVAL_BATCH], name).argmax(1) == y[i:i + EVAL_BATCH]).sum()
                for i in range(0, len(y), EVAL_BATCH))
            for name, x, y in self.tasks]
        accs = torch.stack(correct).cpu().numpy() / np.asarray([len(y) for _, _, y in self.tasks])
        self.seconds += time.perf_counter() - t0
        return accs


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_protocol(cfg: Config, bench: Benchmark, progress: Progress | None = None
                 ) -> tuple[dict[str, Any], Learner]:
    """Learn `bench` in one pass with the method of `cfg`; returns (result, final learner).

    Times: `wall_s` runs from the first evaluation (learner built) to the last; `train_s` is the
    time inside `observe` and `end_task` (GPU work included: the device is synchronised at the
    end of every task); `eval_s` the time computing R and b. The rest of `wall_s`, its share
    reported as `overhead_share`, is the harness: the stream's batches and the progress bar.
    """
    learner = build_learner(learner_spec(cfg, bench))
    for task in bench.tasks:
        learner.register_task(task.name)
    evaluate = Evaluator(bench, learner.device)
    t_start = time.perf_counter()
    b = evaluate(learner)
    R = np.zeros((len(bench.tasks), len(bench.tasks)))
    train_s = 0.0
    for i, task in enumerate(bench.tasks):
        for batch in bench.task_stream(i, cfg.benchmark.batch_size):
            t0 = time.perf_counter()
            learner.observe(batch.x, batch.y, batch.task)
            train_s += time.perf_counter() - t0
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
    result = {
        "benchmark": bench.name, "method": cfg.method.name, "seed": cfg.seed,
        "n_tasks": len(bench.tasks), "tasks": [t.name for t in bench.tasks],
        "acc": metrics.acc, "bwt": metrics.bwt, "fwt": metrics.fwt,
        "R": R.tolist(), "b": b.tolist(),
        "wall_s": wall_s, "train_s": train_s, "eval_s": eval_s,
        "overhead_share": (wall_s - train_s - eval_s) / wall_s,
        "samples_per_s": bench.n_train / train_s, "n_train": bench.n_train,
        "footprint": learner.footprint().to_dict(), "stats": learner.stats(),
        "config": cfg.model_dump(mode="json"), "source": bench.source,
        "device": str(learner.device), "torch": torch.__version__, "host": platform.node(),
    }
    return result, learner


def write_run(out_dir: Path, result: dict[str, Any], learner: Learner) -> None:
    """DIR/result.json, DIR/R.png and DIR/checkpoint.pt."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "result.json", json.dumps(result, indent=1) + "\n")
    title = f"{result['benchmark']} / {result['method']}: ACC {result['acc']:.3f}"
    plot_accuracy_matrix(np.asarray(result["R"]), out_dir / "R.png", title)
    save_checkpoint(out_dir / "checkpoint.pt", learner,
                    {"benchmark": result["benchmark"], "acc": result["acc"]})
