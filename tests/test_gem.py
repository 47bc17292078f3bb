"""GEM and A-GEM: batched past-task gradients, the QP projection and its fallbacks, A-GEM."""

from __future__ import annotations

import copy
import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import make_learner, task_batches, train

from edgecl.checkpoint import load_learner, save_checkpoint
from edgecl.learners import gem
from edgecl.learners.gem import (
    flatten,
    per_task_gradients,
    project_onto_halfspace,
    solve_gem_dual,
)


def loop_gradients(net, memory, slots) -> torch.Tensor:
    """The GEM paper's way: one forward/backward per past task, on its filled rows only."""
    params = list(net.parameters())
    rows = []
    for slot in slots:
        x, y = memory.get(slot)
        loss = F.cross_entropy(net(x, slot), y)
        rows.append(flatten(torch.autograd.grad(loss, params, allow_unused=True), params))
    return torch.stack(rows)


def past_rows(learner, past) -> tuple[torch.Tensor, torch.Tensor]:
    """A copy of every past task's memory rows, batched: `x [k, quota, ...]`, `y [k, quota]`."""
    runs = [(x.clone(), y.clone()) for _, x, y in learner.memory.task_runs(past.slots)]
    return torch.cat([x for x, _ in runs]), torch.cat([y for _, y in runs])


def fill_memory(learner, sizes: dict[int, int]) -> None:
    """Store `sizes[slot]` samples of synthetic task `slot` in the learner's memory."""
    for slot, n in sizes.items():
        x, y = task_batches(slot, n_batches=1, batch=n)[0]
        learner.memory.add(x, y, slot)


def random_problem(seed: int, k: int = 5, n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """Past-task gradients G [k, n] and a current gradient g violating some of them."""
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(k, n, generator=gen, dtype=torch.float64)
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    g = g - ((g @ G[0]) / (G[0] @ G[0]) + 0.5) * G[0]  # G[0]·g = -½|G[0]|²
    return G, g


# --- past-task gradients -------------------------------------------------------------------
@pytest.mark.parametrize("counts", [(8, 8, 8), (8, 3, 5)])  # full memories; some rows empty
@pytest.mark.parametrize("head", ["shared", "per_task"])
@pytest.mark.parametrize("hidden", [[16, 16], []])  # [] : a linear model, the head alone
def test_batched_gradients_equal_a_per_task_loop_and_ignore_empty_rows(head, counts, hidden):
    learner = make_learner("gem", head, max_tasks=4,  # memory: 8 rows per task
                           net={"name": "mlp", "hidden": hidden})
    fill_memory(learner, dict(enumerate(counts)))
    past = learner.past_memory(3)
    assert past.counts == counts
    x, y = past_rows(learner, past)
    for task, n in enumerate(counts):
        x[task, n:] = 1e3  # garbage where nothing is stored
    G = per_task_gradients(learner.net, x, y, past.counts,
                           past.head_index(learner.device))
    expected = loop_gradients(learner.net, learner.memory, [0, 1, 2])
    assert G.shape == expected.shape
    torch.testing.assert_close(G, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("head", ["shared", "per_task"])
def test_batched_gradients_of_a_batchnorm_body_leave_its_statistics_alone(head):
    learner = make_learner("gem", head, input_shape=(1, 8, 8),
                           net={"name": "resnet18", "nf": 2})
    for slot in range(2):
        x, y = task_batches(slot, n_batches=1, batch=6, input_shape=(1, 8, 8))[0]
        learner.memory.add(x, y, slot)
    stats = copy.deepcopy(learner.net.state_dict())
    past = learner.past_memory(2)
    G = per_task_gradients(learner.net, *past_rows(learner, past), past.counts,
                           past.head_index(learner.device))
    expected = loop_gradients(copy.deepcopy(learner.net), learner.memory, [0, 1])
    torch.testing.assert_close(G, expected, rtol=1e-4, atol=1e-5)
    for name, value in learner.net.state_dict().items():
        assert torch.equal(value, stats[name]), name


@pytest.mark.parametrize("head", ["shared", "per_task"])
def test_agem_reference_gradient_of_a_batchnorm_body_leaves_its_statistics_alone(head):
    learner = make_learner("agem", head, input_shape=(1, 8, 8), net={"name": "resnet18", "nf": 2})
    for slot in range(2):
        learner.memory.add(*task_batches(slot, n_batches=1, batch=6, input_shape=(1, 8, 8))[0],
                           slot)
    stats = copy.deepcopy(learner.net.state_dict())
    ref = learner.reference_gradient(learner.past_memory(1))
    assert ref.abs().sum() > 0
    for name, value in learner.net.state_dict().items():
        assert torch.equal(value, stats[name]), name


# --- GEM's projection ----------------------------------------------------------------------
def test_no_violated_constraint_means_no_projection():
    G, _ = random_problem(0)
    learner = make_learner("gem")
    agreeing = G.T @ torch.linalg.solve(G @ G.T, torch.ones(5, dtype=G.dtype))  # G g = 1
    assert learner.constrain(G, agreeing) is None
    assert learner.constrain(G, -agreeing) is not None
    assert learner.stats() == {"gem_projections": 1}


@pytest.mark.parametrize("margin", [0.0, 0.5])
@pytest.mark.parametrize("seed", range(4))
def test_projected_gradient_satisfies_every_constraint(seed, margin):
    G, g = random_problem(seed)
    eps = 1e-3
    v = solve_gem_dual(G @ G.T, G @ g, margin, eps)
    g_tilde = G.T @ v + g
    # KKT of the dual: G g̃ = λ - eps·v with λ >= 0 and λ = 0 wherever v > margin
    slack = G @ g_tilde + eps * v
    assert (v >= margin - 1e-9).all()
    assert (slack >= -1e-8).all()
    assert (slack[v > margin + 1e-6].abs() <= 1e-8).all()


def test_a_step_without_violation_is_plain_sgd_and_a_violation_is_projected():
    x, y = task_batches(0, n_batches=1)[0]  # 8 samples: the whole memory of a task
    learner, finetune = make_learner("gem"), make_learner("finetune")
    for lrn in (learner, finetune):
        lrn.observe(x, y, "t0")
        lrn.observe(x, y, "t1")  # the same data: its gradient agrees with t0's memory
    assert "gem_projections" not in learner.stats()
    for a, b in zip(learner.net.parameters(), finetune.net.parameters(), strict=True):
        assert torch.equal(a, b)

    G = learner.past_task_gradients(learner.past_memory(2))
    learner.observe(x, (y + 1) % 3, "t2")  # relabelled: pulls against both memories
    assert learner.stats()["gem_projections"] == 1
    assert (G @ learner.flat_grad() >= 0).all()  # the step taken hurts no past task


def test_per_task_projection_leaves_unused_heads_without_gradient():
    learner = make_learner("gem", "per_task", max_tasks=4)
    x, y = task_batches(0, n_batches=1)[0]
    learner.observe(x, y, "t0")
    learner.observe(x, y, "t1")
    learner.observe(x, (y + 1) % 3, "t2")
    heads = learner.net.heads
    assert heads[3].weight.grad is None  # no task there yet
    assert all(heads[i].weight.grad is not None for i in range(3))


# --- quadprog failures -----------------------------------------------------------------------
def failing_solver(monkeypatch, fail_first: int) -> list[float]:
    """Make quadprog fail on its first `fail_first` calls; returns the ridge of every call."""
    real, ridges = gem.quadprog.solve_qp, []

    def solve_qp(P, q, C, b):
        ridges.append(float(P[0, 0]))
        if len(ridges) <= fail_first:
            raise ValueError("matrix G is not positive definite")
        return real(P, q, C, b)

    monkeypatch.setattr(gem.quadprog, "solve_qp", solve_qp)
    return ridges



def test_qp_failure_is_retried_with_a_larger_ridge(monkeypatch):
    G, g = random_problem(0)
    learner = make_learner("gem")
    retry_eps = learner.retry_eps(G @ G.T)
    assert retry_eps > 1e-3
    expected = G.T @ solve_gem_dual(G @ G.T, G @ g, 0.5, retry_eps) + g
    ridges = failing_solver(monkeypatch, fail_first=1)
    g_tilde = learner.constrain(G, g)
    assert learner.stats() == {"gem_projections": 1, "gem_qp_retries": 1}
    assert ridges[1] - ridges[0] == pytest.approx(retry_eps - 1e-3)
    torch.testing.assert_close(g_tilde, expected)


def test_qp_failing_twice_falls_back_to_the_agem_projection(monkeypatch):
    G, g = random_problem(1)
    learner = make_learner("gem")
    failing_solver(monkeypatch, fail_first=2)
    g_tilde = learner.constrain(G, g)
    assert learner.stats() == {"gem_projections": 1, "gem_qp_retries": 1, "gem_qp_fallbacks": 1}
    torch.testing.assert_close(g_tilde, project_onto_halfspace(g, G.mean(0)))
    assert g_tilde @ G.mean(0) >= -1e-9


def test_a_learner_whose_qp_always_fails_keeps_learning(monkeypatch):
    failing_solver(monkeypatch, fail_first=10**9)
    learner = make_learner("gem")
    for t in range(3):
        for x, y in task_batches(t, n_batches=4):
            learner.observe(x, y if t != 2 else (y + 1) % 3, f"t{t}")
    stats = learner.stats()
    assert stats["gem_qp_fallbacks"] == stats["gem_qp_retries"] == stats["gem_projections"] > 0
    assert all(torch.isfinite(p).all() for p in learner.net.parameters())


# --- A-GEM -------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_agem_projection_is_gem_with_one_constraint_and_no_margin(seed):
    G, g = random_problem(seed, k=1)
    gem_solution = G.T @ solve_gem_dual(G @ G.T, G @ g, margin=0.0, eps=1e-12) + g
    agem_solution = project_onto_halfspace(g, G[0])
    torch.testing.assert_close(agem_solution, gem_solution)
    assert agem_solution @ G[0] == pytest.approx(0.0, abs=1e-9)
    assert torch.equal(project_onto_halfspace(-g, G[0]), -g)  # no violation: unchanged


@pytest.mark.parametrize("head", ["shared", "per_task"])
def test_agem_reference_gradient_covers_past_tasks_only(head):
    learner = make_learner("agem", head, max_tasks=4, params={"ref_batch": 1000})
    fill_memory(learner, {0: 8, 1: 3, 2: 5})  # slot 2 plays the current task
    ref = learner.reference_gradient(learner.past_memory(2))
    per_task = loop_gradients(learner.net, learner.memory, [0, 1])
    expected = (8 * per_task[0] + 3 * per_task[1]) / 11  # the mean over all 11 past samples
    torch.testing.assert_close(ref, expected, rtol=1e-4, atol=1e-6)


def test_agem_reference_batch_is_random_and_of_the_configured_size():
    learner = make_learner("agem", params={"ref_batch": 4})
    fill_memory(learner, {0: 8, 1: 8})
    past = learner.past_memory(1)
    refs = [learner.reference_gradient(past) for _ in range(3)]
    assert not torch.equal(refs[0], refs[1]) and not torch.equal(refs[1], refs[2])
    learner.rng.manual_seed(0)
    first = learner.reference_gradient(past)
    learner.rng.manual_seed(0)
    torch.testing.assert_close(learner.reference_gradient(past), first, rtol=0, atol=0)


# --- fast GEM --------------------------------------------------------------------------------
def test_fast_gem_subsamples_past_tasks_and_their_filled_rows():
    learner = make_learner("gem", max_tasks=4,
                           params={"fast": True, "fast_tasks": 2, "fast_samples": 4})
    fill_memory(learner, {0: 8, 1: 2, 2: 8})
    past = learner.past_memory(3)
    draws = []
    for _ in range(8):
        draw = learner.subsample(past, 2, 4)  # its samples last until the next decode
        assert len(set(draw.slots)) == 2 and draw.x.shape[:2] == (2, 4)
        for task, slot in enumerate(draw.slots):
            stored_x, stored_y = learner.memory.get(slot)
            n = draw.counts[task]
            assert n == min(4, len(stored_y))
            picked = draw.x[task, :n].flatten(1)
            same = (picked.unsqueeze(1) == stored_x.flatten(1).unsqueeze(0)).all(-1)
            assert same.any(1).all()  # every picked row is a stored sample of its task...
            assert len(set(same.float().argmax(1).tolist())) == n  # ...picked once
        draws.append(dataclasses.replace(draw, x=draw.x.clone()))
    assert len({d.slots for d in draws}) > 1
    assert len({tuple(d.x[0, :, 0, 0, 0].tolist()) for d in draws}) > 1


def test_restored_fast_gem_takes_exactly_the_same_next_steps(tmp_path):
    learner = make_learner("gem", optimizer={"momentum": 0.9},
                           params={"fast": True, "fast_samples": 3})
    for t in range(2):
        for x, y in task_batches(t):
            learner.observe(x, y, f"t{t}")
    save_checkpoint(tmp_path / "c.pt", learner)
    restored = load_learner(tmp_path / "c.pt")
    for lrn in (learner, restored):
        for x, y in task_batches(2, n_batches=3):
            lrn.observe(x, (y + 1) % 3, "t1")
    assert learner.stats() == restored.stats() and learner.stats()["gem_projections"] > 0
    for a, b in zip(learner.net.parameters(), restored.net.parameters(), strict=True):
        assert torch.equal(a, b)


# --- behaviour -------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["gem", "agem"])
def test_memory_projection_forgets_less_than_finetuning(method):
    """Task 1 relabels task 0's inputs: fine-tuning overwrites task 0, the projection does not."""
    accuracy = {}
    batches = task_batches(0, n_batches=46)
    x0, y0 = batches[45]  # held out
    for name in (method, "finetune"):
        learner = make_learner(name)
        for x, y in batches[:30]:
            learner.observe(x, y, "t0")
        for x, y in batches[30:45]:
            learner.observe(x, (y + 1) % 3, "t1")
        accuracy[name] = (learner.predict(x0, "t0").argmax(1) == y0).float().mean().item()
    assert accuracy[method] > accuracy["finetune"] + 0.2


# --- against the GEM reference ---------------------------------------------------------------
def project2cone2_port(g: torch.Tensor, G: torch.Tensor, margin: float = 0.5,
                       eps: float = 1e-3) -> torch.Tensor:
    """The projection of the GEM reference (facebookresearch/GradientEpisodicMemory,
    model/gem.py, `project2cone2`), ported from its math in float64: the dual

        min_v ½ vᵀ(GGᵀ + eps·I)v + (Gg)ᵀv   s.t.  v >= margin,   then  g̃ = Gᵀv + g.

    The reference hands the dual to quadprog; this port solves it exactly without it: the QP is
    strictly convex, so its one KKT point is found by trying every set of free constraints."""
    G, g = G.double(), g.double()
    P = G @ G.T
    P = 0.5 * (P + P.T) + eps * torch.eye(len(G), dtype=P.dtype)
    q = G @ g
    for free in itertools.product([False, True], repeat=len(G)):
        free = torch.tensor(free)
        v = torch.full((len(G),), margin, dtype=P.dtype)
        if free.any():  # stationary in the free coordinates, the others at the bound
            v[free] = torch.linalg.solve(P[free][:, free], -(q[free] + P[free][:, ~free]
                                                             @ v[~free]))
        multipliers = P @ v + q
        if (v[free] >= margin).all() and (multipliers[~free] >= 0).all():
            return G.T @ v + g
    raise AssertionError("no KKT point: the dual is not strictly convex")


@pytest.mark.parametrize("relabelled", [0, 1, 2])
def test_a_gem_step_is_the_reference_projection(relabelled):
    learner = make_learner("gem", max_tasks=4)
    for t in range(3):
        train(learner, t, n_batches=2)
    x, y = task_batches(relabelled, n_batches=1)[0]
    y = (y + 1) % 3  # an old task's inputs, relabelled: pulls against its memory
    before = copy.deepcopy(learner)
    G = loop_gradients(before.net, before.memory, [0, 1, 2])
    params = list(before.net.parameters())
    loss = F.cross_entropy(before.net(x, 3), y)
    g = flatten(torch.autograd.grad(loss, params), params)
    assert (G @ g < 0).any()  # the step needs a projection
    expected = project2cone2_port(g, G)

    learner.observe(x, y, "t3")
    projections = before.stats().get("gem_projections", 0) + 1
    assert learner.stats() == {**before.stats(), "gem_projections": projections}  # no retry
    torch.testing.assert_close(learner.flat_grad().double(), expected, rtol=1e-4, atol=1e-6)
    stepped = torch.cat([p.detach().flatten() for p in learner.net.parameters()])
    start = torch.cat([p.detach().flatten() for p in params])
    torch.testing.assert_close(stepped.double(), start.double() - 0.1 * expected,
                               rtol=1e-5, atol=1e-6)  # plain SGD along g̃, lr 0.1


@pytest.mark.parametrize("dtype", ["float16", "uint8"])
def test_exact_gem_on_compact_memory_decodes_one_task_at_a_time(dtype):
    learner = make_learner("gem", "per_task", max_tasks=4, memory={"dtype": dtype})
    for slot, n in enumerate((8, 3, 8)):
        x, y = task_batches(slot, n_batches=1, batch=n)[0]
        learner.memory.add(x / 2, y, slot)
    past = learner.past_memory(3)
    assert [len(x) for _, x, _ in learner.memory.task_runs(past.slots)] == [1, 1, 1]
    G = learner.past_task_gradients(past)
    torch.testing.assert_close(G, loop_gradients(learner.net, learner.memory, [0, 1, 2]),
                               rtol=1e-4, atol=1e-6)
