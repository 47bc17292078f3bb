"""ER and DER++: the replay batch comes from past tasks' memory only, DER++'s stored logits are the
net's outputs at storage time and live inside the memory's byte budget, and a run resumed from
checkpoints (the learner's, or the daemon's) is bit-identical to an uninterrupted one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_learner, task_batches, train
from held import held_bytes
from learn_helpers import (
    assert_same_state,
    call,
    records,
    running,
    stream_config,
    task_samples,
    wait_learned,
)

from edgecl.checkpoint import load_learner, save_checkpoint
from edgecl.daemon.daemon import Daemon
from edgecl.memory import EpisodicMemory

METHODS = ["er", "der"]


def spy_on_draws(learner) -> list[list[tuple[int, int]]]:
    """Record every read of the learner's memory: (task slot, position) of each sample read."""
    draws = []
    gather = learner.memory.gather

    def spy(slots, task, position):
        draws.append([(slots[i], p) for i, p in zip(task.tolist(), position.tolist(),
                                                     strict=True)])
        return gather(slots, task, position)

    learner.memory.gather = spy
    return draws


def stream(tasks: list[int], n_batches: int = 4) -> list[tuple[torch.Tensor, torch.Tensor, str]]:
    """Batches of synthetic tasks in order, inputs in [0, 1] (as uint8 memory needs)."""
    return [(x / 2, y, f"t{t}") for t in tasks for x, y in task_batches(t, n_batches=n_batches)]


# --- replay comes from past tasks only ----------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("head", ["shared", "per_task"])
def test_replay_is_drawn_from_the_memory_of_other_tasks_only(method, head):
    learner = make_learner(method, head, max_tasks=3,
                           params={"replay_batch": 6},
                           optimizer={"steps_per_batch": 1})
    draws = spy_on_draws(learner)
    for x, y, task in stream([0]):
        learner.observe(x, y, task)
    assert draws == []  # the first task replays nothing
    for x, y, task in stream([1]):
        learner.observe(x, y, task)
    assert len(draws) == 4 and all(len(set(d)) == 6 and {s for s, _ in d} == {0} for d in draws)
    draws.clear()
    for x, y, task in stream([2, 0]):  # task 0 comes back: it replays tasks 1 and 2
        learner.observe(x, y, task)
    assert all(len(set(d)) == 6 for d in draws)  # drawn without replacement
    assert {s for d in draws[:4] for s, _ in d} == {0, 1}
    assert {s for d in draws[4:] for s, _ in d} == {1, 2}


@pytest.mark.parametrize("head", ["shared", "per_task"])
def test_a_shared_head_replays_a_rare_class_as_often_as_a_common_one(head):
    """Task t0's memory holds 44 samples of class 0 and 8 each of classes 1 and 2; with a
    shared head the replay draws each class about a third of the time; per-task heads (and
    `class_balanced: false`) draw the samples uniformly, class 0 about 73% of the time."""
    shares = {}
    for balanced in (True, False):
        learner = make_learner("er", head, memory={"per_task": 60},
                               params={"replay_batch": 10, "class_balanced": balanced})
        generator = torch.Generator().manual_seed(1)
        y = torch.tensor([1, 2] * 8 + [0] * 44)[torch.randperm(60, generator=generator)]
        x = torch.rand(60, 1, 4, 4, generator=generator)
        for i in range(0, 60, 10):
            learner.observe(x[i:i + 10], y[i:i + 10], "t0")
        replayed = []
        draw = learner.draw_replay

        def spied(slot, draw=draw, replayed=replayed):
            batch = draw(slot)
            replayed.append(batch.y.clone())
            return batch

        learner.draw_replay = spied
        for _ in range(60):
            learner.observe(x[:10], y[:10], "t1")
        counts = torch.bincount(torch.cat(replayed), minlength=3)
        shares[balanced] = (counts / counts.sum()).tolist()
    if head == "shared":
        assert all(0.25 < share < 0.42 for share in shares[True]), shares
    else:
        assert shares[True] == shares[False]
    assert shares[False][0] > 0.65, shares


@pytest.mark.parametrize("method", METHODS)
def test_each_of_several_steps_per_batch_draws_afresh_and_the_batch_is_stored_once(method):
    # room for 4 batches a task: a batch stored three times would show
    learner = make_learner(method, params={"replay_batch": 4}, optimizer={"steps_per_batch": 3},
                           memory={"per_task": 32})
    train(learner, 0)
    draws = spy_on_draws(learner)
    applied = []
    step = learner.step

    def counted(loss):
        applied.append(step(loss))
        return applied[-1]

    learner.step = counted
    stored = len(learner.memory)
    x, y = task_batches(1, n_batches=1)[0]
    learner.observe(x, y, "t1")
    assert applied == [True] * 3 and len(draws) == 3
    assert draws[0] != draws[1] != draws[2] and all({s for s, _ in d} == {0} for d in draws)
    assert len(learner.memory) == stored + len(y)


@pytest.mark.parametrize("method", METHODS)
def test_a_rehearsal_step_that_is_not_finite_is_counted_as_a_skipped_step(method):
    learner = make_learner(method)
    train(learner, 0)

    def not_finite(loss, apply=None):
        learner._skip_reason = "loss was"
        return False

    learner.step = not_finite
    learner.rehearse(3)
    counters = learner.stats()
    assert counters["nonfinite_steps"] == counters["nonfinite_streak"] == 3
    assert "rehearsal_steps" not in counters and learner._skip_reason is None


def test_a_replayed_sample_goes_through_its_own_head_and_unused_heads_get_no_gradient():
    learner = make_learner("er", "per_task", max_tasks=4, params={"replay_batch": 100})
    train(learner, 0)
    train(learner, 1)
    learner.observe(*task_batches(2, n_batches=1)[0], "t2")
    heads = learner.net.heads
    assert all(heads[h].weight.grad is not None for h in (0, 1, 2))  # t2's own and both replayed
    assert heads[3].weight.grad is None  # a slot not yet used: left alone by the optimiser


# --- the losses ------------------------------------------------------------------------------
@pytest.mark.parametrize("head", ["shared", "per_task"])
def test_der_loss_is_the_batch_ce_plus_alpha_mse_to_stored_logits_plus_beta_replayed_ce(head):
    learner = make_learner("der", head, params={"alpha": 0.3, "beta": 0.7, "replay_batch": 5})
    train(learner, 0)
    x, y = task_batches(1, n_batches=1)[0]
    twin = make_learner("der", head, params={"alpha": 0.3, "beta": 0.7, "replay_batch": 5})
    twin.load_state_dict(learner.state_dict())
    replay = twin.draw_replay(1)  # the draw the learner is about to make, from the same rng state
    with torch.no_grad():
        replayed = twin.net(replay.x, 0)
        expected = (F.cross_entropy(twin.net(x, 1), y)
                    + 0.3 * F.mse_loss(replayed, replay.logits)
                    + 0.7 * F.cross_entropy(replayed, replay.y))
    torch.testing.assert_close(learner.observe(x, y, "t1").loss, expected)


def test_der_stores_the_logits_the_net_gave_each_sample_before_its_step():
    learner = make_learner("der", "per_task")
    train(learner, 0)
    x, y = task_batches(1, n_batches=1)[0]
    with torch.no_grad():
        before = learner.net(x, 1)
    learner.observe(x, y, "t1")
    n = len(y)
    stored_x, stored_y = (t.clone() for t in learner.memory.gather([1], torch.zeros(
        n, dtype=torch.long), torch.arange(n)))
    stored = learner.memory.gather_logits([1], torch.zeros(n, dtype=torch.long), torch.arange(n))
    assert torch.equal(stored_x, x) and torch.equal(stored_y, y)
    torch.testing.assert_close(stored, before)  # one pass with the replayed rows: not bitwise
    with torch.no_grad():
        assert not torch.equal(learner.net(x, 1), before)  # the step moved the net since


def test_der_with_alpha_0_and_beta_1_steps_exactly_as_er():
    learners = [make_learner("er"), make_learner("der", params={"alpha": 0.0, "beta": 1.0})]
    for learner in learners:
        for t in range(3):
            train(learner, t)
    for a, b in zip(*(lrn.net.parameters() for lrn in learners), strict=True):
        assert torch.equal(a, b)


# --- memory: DER++'s logits inside the byte budget -------------------------------------------
BUDGET = 3000  # bytes: every memory below shrinks its quota from 32 per task


@pytest.mark.parametrize("dtype", ["float32", "float16", "uint8"])
@pytest.mark.parametrize("method", METHODS)
def test_the_memory_budget_covers_every_buffer_er_and_der_keep(method, dtype):
    learner = make_learner(method, max_tasks=4, params={"replay_batch": 5},
                           memory={"per_task": 32, "budget_bytes": BUDGET, "dtype": dtype})
    beyond_the_net = []
    for x, y, task in stream([0, 1, 2, 3], n_batches=6):
        learner.observe(x, y, task)
        beyond_the_net.append(held_bytes(learner, without=[learner.net, learner.optimizer]))
    assert max(beyond_the_net) <= BUDGET
    assert learner.memory.quota < 32  # the budget did bind
    assert learner.footprint().memory_bytes == held_bytes(learner.memory)


def test_der_logits_are_budgeted_with_their_samples():
    """3 classes of float32 logits: 12 more bytes per stored sample and decoded row than ER's,
    so the same budget holds fewer DER++ samples per task."""
    memory = {"per_task": 32, "budget_bytes": BUDGET, "dtype": "uint8"}
    er, der = (make_learner(m, max_tasks=4, memory=memory, params={"replay_batch": 10})
               for m in METHODS)
    assert der.memory.bytes_per_sample == er.memory.bytes_per_sample + 3 * 4
    assert der.memory.decode_bytes == er.memory.decode_bytes + 10 * 3 * 4
    for learner in (er, der):
        for x, y, task in stream([0, 1, 2, 3]):
            learner.observe(x, y, task)
    assert der.memory.quota < er.memory.quota


def test_stored_logits_stay_with_their_samples_through_a_shrink_and_a_state_round_trip():
    def fresh() -> EpisodicMemory:
        # [1] float32 + label + 2 logits: 20 bytes a sample; 2 decode rows of 20: 40 bytes
        return EpisodicMemory((1,), per_task=6, max_tasks=3, budget_bytes=40 + 20 * 12,
                              decode_rows=2, logits=2)

    mem = fresh()
    for slot in range(3):  # quota 6, then 6, then 4: the first two tasks shrink in place
        ids = torch.arange(10 * slot, 10 * slot + 6)
        mem.add(ids.float().unsqueeze(1), ids, slot, torch.stack([ids, -ids], 1).float())
    assert mem.quota == 4
    restored = fresh()
    restored.load_state_dict(mem.state_dict())
    for memory in (mem, restored):
        for slot in range(3):
            for position in range(0, 4, 2):
                where = (torch.zeros(2, dtype=torch.long), torch.arange(position, position + 2))
                _, y = memory.gather([slot], *where)
                assert torch.equal(memory.gather_logits([slot], *where),
                                   torch.stack([y, -y], 1).float())
    with pytest.raises(ValueError, match=r"takes logits \[b, 2\] with the batch; got none"):
        mem.add(torch.zeros(1, 1), torch.zeros(1, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="memory state has logits=2; this memory has 0"):
        EpisodicMemory((1,), 6, 3, 40 + 20 * 12, decode_rows=2).load_state_dict(mem.state_dict())


# --- checkpoints -------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("head", ["shared", "per_task"])
def test_a_run_resumed_from_checkpoints_is_bit_identical_to_an_uninterrupted_one(
        tmp_path, method, head):
    """Checkpoints in the middle of a task, at a task switch and after a task returned; a tight
    uint8 memory whose quota shrinks on the way; momentum; two steps per batch."""
    settings = {"method": method, "head": head,
                "optimizer": {"momentum": 0.9, "steps_per_batch": 2}, "params": {"replay_batch": 5},
                "memory": {"per_task": 8, "budget_bytes": 800, "dtype": "uint8"}}
    batches = stream([0, 1, 2, 0])
    uninterrupted = make_learner(**settings)
    for x, y, task in batches:
        uninterrupted.observe(x, y, task)
    assert uninterrupted.memory.quota < 8

    resumed = make_learner(**settings)
    for i, (x, y, task) in enumerate(batches):
        if i in (2, 4, 9, 13):
            save_checkpoint(tmp_path / f"{i}.pt", resumed)
            resumed = load_learner(tmp_path / f"{i}.pt")
        resumed.observe(x, y, task)
    assert_same_state(resumed.state_dict(), uninterrupted.state_dict())
    assert resumed.stats() == uninterrupted.stats()


@pytest.mark.parametrize("method", METHODS)
def test_the_daemon_learns_with_replay_and_a_restart_restores_it_exactly(tmp_path, method):
    cfg = stream_config(method)
    daemon = Daemon(cfg, tmp_path / "state")
    with running(daemon) as server:
        for i, task in enumerate(("a", "b")):
            x, y = task_samples(i, 40)
            assert call(server, "POST", "/v1/samples", {"samples": records(task, x, y)})[0] == 202
            assert call(server, "POST", f"/v1/tasks/{task}/end")[0] == 202
        wait_learned(daemon, 80)
    learner = daemon.learning.learner
    assert learner.memory.tasks == [0, 1] and "nonfinite_steps" not in learner.stats()
    again = Daemon(cfg, tmp_path / "state")  # stop() checkpointed
    try:
        assert_same_state(again.learning.learner.state_dict(), learner.state_dict())
    finally:
        again.stop()
