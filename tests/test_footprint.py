"""Footprints compare like with like: every method's training state covers every tensor it really
holds, its deployable state is what serving needs, and GEM's and A-GEM's memory budget covers
every buffer they keep. Bytes are measured by walking the learner (tests/held.py), not by
recomputing the code's formulas."""

from __future__ import annotations

import pytest
import torch
from conftest import make_learner, task_batches
from held import held_bytes

from edgecl.config import ConfigError
from edgecl.learners import LEARNERS, LearnerSpec
from edgecl.memory import MemoryBudgetError
from edgecl.setup import build_config, new_learner

OPTIMIZERS = {"momentum": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
              "adam": {"name": "adam", "lr": 0.01}}


def learn(learner, tasks: int, n_batches: int = 3) -> None:
    """Tasks t0..t{tasks-1} (inputs in [0, 1], as uint8 memory needs), each ended, then one
    batch of the next: the state a device holds in the middle of learning."""
    for t in range(tasks + 1):
        for x, y in task_batches(t, n_batches=n_batches if t < tasks else 1):
            learner.observe(x / 2, y, f"t{t}")
        if t < tasks:
            learner.end_task(f"t{t}")
    for t in range(tasks):  # serving leaves its traces too (WSN: the last task's mask)
        learner.predict(task_batches(t, n_batches=1)[0][0], f"t{t}")


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("head", ["shared", "per_task"])
@pytest.mark.parametrize("method", LEARNERS)
def test_training_state_covers_every_tensor_the_learner_holds(method, head, optimizer):
    learner = make_learner(method, head, max_tasks=4, optimizer=OPTIMIZERS[optimizer],
                           memory={"dtype": "uint8"})
    learn(learner, 2)
    unallocated_grads = sum(p.nbytes for p in learner.net.parameters()
                            if p.requires_grad and p.grad is None)  # those of idle heads...
    assert learner.footprint().training_bytes == held_bytes(learner) + unallocated_grads


@pytest.mark.parametrize("method", [m for m in LEARNERS if m != "wsn"])
def test_deployable_state_is_the_net_alone(method):
    learner = make_learner(method, "per_task", max_tasks=4)
    learn(learner, 2)
    fp = learner.footprint()
    assert fp.deployable_bytes == held_bytes(learner.net, grads=False)
    holds_more = method not in ("finetune", "independent")  # memory, Fisher, teacher...
    assert (fp.training_bytes - fp.deployable_bytes > fp.grad_bytes) is holds_more


BUDGET = 3000  # bytes; makes every method below shrink its quota from 32 per task


@pytest.mark.parametrize("dtype", ["float32", "float16", "uint8"])
@pytest.mark.parametrize(("method", "params"), [
    ("gem", {}), ("gem", {"fast": True, "fast_tasks": 2, "fast_samples": 3}),
    ("agem", {"ref_batch": 5})])
def test_the_memory_budget_covers_every_buffer_gem_and_agem_keep(method, params, dtype):
    learner = make_learner(method, max_tasks=4, params=params,
                           memory={"per_task": 32, "budget_bytes": BUDGET, "dtype": dtype})
    beyond_the_net = []
    for t in range(4):
        for x, y in task_batches(t, n_batches=6):
            learner.observe(x / 2, y, f"t{t}")
            beyond_the_net.append(held_bytes(learner, without=[learner.net, learner.optimizer]))
    assert max(beyond_the_net) <= BUDGET
    assert learner.memory.quota < 32  # the budget did bind
    assert learner.footprint().memory_bytes == held_bytes(learner.memory)


def test_compact_memory_is_compact():
    """pmnist's shape, 20 tasks: uint8 memory with its decode buffer holds about 0.3x, float16
    about 0.6x of float32's bytes."""
    held = {}
    for dtype in ("float32", "float16", "uint8"):
        learner = make_learner("gem", input_shape=(784,), n_classes=10, max_tasks=20,
                               net={"name": "mlp", "hidden": [8]},
                               memory={"per_task": 16, "dtype": dtype})
        for slot in range(20):
            learner.memory.add(torch.rand(16, 784), torch.randint(0, 10, (16,)), slot)
        held[dtype] = held_bytes(learner, without=[learner.net, learner.optimizer])
    assert held["uint8"] <= 0.35 * held["float32"]
    assert held["float16"] <= 0.6 * held["float32"]


def spec(method: str, **memory) -> LearnerSpec:
    return make_learner(method, max_tasks=20, memory=memory).spec


def test_a_budget_too_small_for_max_tasks_is_refused_before_training():
    # 20 tasks x 24 bytes (uint8 [1, 4, 4] + label) + 8 decoded rows of 72 bytes = 1,056
    with pytest.raises(MemoryBudgetError, match=r"^memory\.budget_bytes: 1055 bytes cannot hold "
                       r"one sample per task for 20 tasks: .* a decode buffer of 8 float32 rows"):
        new_learner(spec("gem", budget_bytes=1055, dtype="uint8"))
    new_learner(spec("gem", budget_bytes=1056, dtype="uint8"))
    with pytest.raises(ConfigError, match=r"for 20 tasks"):  # the CLI's exit 2
        new_learner(spec("ewc", budget_bytes=1000))


def test_new_learner_turns_a_method_refusal_into_a_config_error():
    cfg = build_config({"device": "cpu", "net": {"name": "mlp", "hidden": [16, 16]},
                        "method": {"name": "wsn", "capacity": [0.5, 0.5, 0.5]}})
    with pytest.raises(ConfigError, match=r"^wsn: 3 capacities given for 2 maskable layers$"):
        new_learner(LearnerSpec(cfg, (1, 4, 4), 3, "shared", 3))
