"""The offline upper bound of a benchmark: the same net trained on every task's data at once.

Single-pass continual learning sees each task once, in order. Its ceiling is a net that sees all
tasks' training samples together, shuffled, for several epochs, as if the whole stream had been
stored: what `joint_training` measures. It uses the config's net, optimiser, batch size, head
mode and normalisation (`normalize: channel` fitted over all training samples, since offline
training has them all); each mini-batch holds one task's samples (per-task heads pick the head
by task), and the batches of all tasks are shuffled together every epoch.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from edgecl.config import Config
from edgecl.data import Benchmark
from edgecl.learners.base import make_optimizer, resolve_device
from edgecl.metrics import Evaluator
from edgecl.nets import build_task_net
from edgecl.nets.norm import InputNorm
from edgecl.setup import learner_spec


def joint_training(cfg: Config, bench: Benchmark, epochs: int = 5) -> dict[str, float | list]:
    """Train `cfg`'s net jointly on all of `bench`'s tasks for `epochs` epochs; returns each
    task's test accuracy (`accs`), their mean (`acc`) and `train_s`."""
    spec = learner_spec(cfg, bench)
    device = resolve_device(cfg.device)
    n_heads = spec.max_tasks if spec.head == "per_task" else 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = build_task_net(cfg.net, spec.input_shape, spec.n_classes, n_heads,
                             normalize=spec.config.normalize).to(device)
    for norm in (m for m in net.modules() if isinstance(m, InputNorm)):
        for task in bench.tasks:
            norm.update(task.x_train.to(device))
        norm.freeze()
    optimizer = make_optimizer(net.parameters(), cfg.optimizer)
    batch = cfg.benchmark.batch_size
    chunks = [(slot, start) for slot, task in enumerate(bench.tasks)
              for start in range(0, len(task.y_train), batch)]
    rng = np.random.default_rng(cfg.seed)
    t0 = time.perf_counter()
    for _ in range(epochs):
        for k in rng.permutation(len(chunks)):
            slot, start = chunks[k]
            task = bench.tasks[slot]
            x = task.x_train[start:start + batch].to(device)
            y = task.y_train[start:start + batch].to(device)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(net(x, slot), y).backward()
            optimizer.step()
    train_s = time.perf_counter() - t0
    net.eval()
    slots = {task.name: slot for slot, task in enumerate(bench.tasks)}
    with torch.no_grad():  # Evaluator asks only for `predict(x, task)` of what it evaluates
        test_sets = ((t.name, t.x_test, t.y_test) for t in bench.tasks)
        accs = Evaluator(test_sets, device)(SimpleNamespace(predict=lambda x, t: net(x, slots[t])))
    return {"accs": accs.tolist(), "acc": float(np.mean(accs)), "train_s": train_s,
            "epochs": epochs}
