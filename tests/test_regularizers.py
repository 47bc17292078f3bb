"""EWC, MAS and LwF: the quadratic penalty, the importances, the distillation term."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_learner, task_batches, train
from torch.nn.utils import parameters_to_vector

from edgecl.learners.lwf import distillation
from edgecl.learners.penalty import QuadraticPenalty, merge_importance


def by_name(learner, vector: torch.Tensor) -> dict[str, torch.Tensor]:
    """Split a flat per-weight vector into the learner's named parameters."""
    names, params = zip(*learner.net.named_parameters(), strict=True)
    return dict(zip(names, vector.split([p.numel() for p in params]), strict=True))


def anchored_penalty(strength: float = 3.0) -> tuple[QuadraticPenalty, list[torch.nn.Parameter]]:
    """A penalty over two parameters, anchored where they are, with random importance."""
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3, generator=g)),
              torch.nn.Parameter(torch.randn(5, generator=g))]
    penalty = QuadraticPenalty(params, strength, "decay", 1.0)
    penalty.consolidate(torch.rand(17, generator=g) + 0.1)
    return penalty, params


def perturb(params: list[torch.nn.Parameter], seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g))


def test_penalty_is_zero_at_the_anchor():
    penalty, params = anchored_penalty()
    assert penalty.value().item() == 0.0
    assert penalty.backward().item() == 0.0
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in params)


def test_penalty_gradient_matches_autograd_and_its_value():
    penalty, params = anchored_penalty(strength=3.0)
    perturb(params)
    value = penalty.value()
    expected = torch.autograd.grad(value, params)
    drift = parameters_to_vector(params).detach() - penalty.anchor
    assert value.item() == pytest.approx(1.5 * (penalty.importance * drift**2).sum().item())
    assert penalty.backward().item() == pytest.approx(value.item())
    for p, e in zip(params, expected, strict=True):
        assert torch.allclose(p.grad, e)
    penalty.backward()  # accumulates into .grad like loss.backward()
    for p, e in zip(params, expected, strict=True):
        assert torch.allclose(p.grad, 2 * e)


def test_a_penalty_step_pulls_every_weight_back_toward_the_anchor():
    penalty, params = anchored_penalty(strength=3.0)
    perturb(params)
    before = (parameters_to_vector(params) - penalty.anchor).abs().detach()
    penalty.backward()
    torch.optim.SGD(params, lr=0.1).step()  # lr·λ·Ω < 2: stable
    after = (parameters_to_vector(params) - penalty.anchor).abs().detach()
    assert bool((after < before).all())


@pytest.mark.parametrize(("max_stiffness", "converges"), [(10.0, True), (math.inf, False)])
def test_the_stiffness_cap_keeps_sgd_on_a_stiff_penalty_stable(max_stiffness, converges):
    weight = torch.nn.Parameter(torch.zeros(1))
    penalty = QuadraticPenalty([weight], 100.0, "decay", 1.0, max_stiffness)
    penalty.consolidate(torch.ones(1))  # λΩ = 100: lr·λΩ = 10 > 2
    with torch.no_grad():
        weight.fill_(1.0)
    sgd = torch.optim.SGD([weight], lr=0.1)
    for _ in range(5):
        sgd.zero_grad()
        penalty.backward()
        sgd.step()
    assert (weight.abs().item() < 1e-6) == converges  # capped: λΩ·lr = 1 lands on θ* = 0
    assert (weight.abs().item() > 1e3) != converges


def test_merge_average_is_the_running_mean_and_decay_the_discounted_sum():
    old, new = torch.tensor([2.0, 4.0]), torch.tensor([4.0, 0.0])
    assert torch.equal(merge_importance(None, new, 0, "average", 1.0), new)
    assert torch.equal(merge_importance(old, new, 3, "average", 0.5), torch.tensor([2.5, 3.0]))
    assert torch.equal(merge_importance(old, new, 3, "decay", 0.5), torch.tensor([5.0, 2.0]))
    assert torch.equal(merge_importance(old, new, 3, "decay", 1.0), torch.tensor([6.0, 4.0]))


def alternating(a: float, b: float, n: int) -> torch.Tensor:
    return torch.where(torch.arange(n) % 2 == 0, a, b)


@pytest.mark.parametrize(("merge", "gamma", "expected"),
                         [("average", 1.0, (3.0, 2.0)), ("decay", 0.5, (5.0, 2.0))])
def test_learner_merges_importance_as_configured(merge, gamma, expected):
    learner = make_learner("ewc", params=dict(merge=merge, gamma=gamma))
    n = sum(p.numel() for p in learner.net.parameters())
    hand_made = iter([alternating(2.0, 4.0, n), alternating(4.0, 0.0, n)])
    learner.importance = lambda slot: next(hand_made)
    train(learner, 0, n_batches=1)
    train(learner, 1, n_batches=1)
    assert torch.equal(learner.penalty.importance, alternating(*expected, n))
    assert learner.penalty.n_tasks == 2


def reference_importance(learner, objective, reduce, x, *targets) -> torch.Tensor:
    """Mean of reduce(per-sample gradient), one backward per sample."""
    total = 0
    for n in range(len(x)):
        learner.net.zero_grad()
        out = learner.net(x[n:n + 1], 0).squeeze(0)
        objective(out, *(t[n] for t in targets)).backward()
        total = total + reduce(parameters_to_vector([p.grad for p in learner.net.parameters()]))
    return total / len(x)


def test_ewc_fisher_is_the_mean_squared_per_sample_log_likelihood_gradient():
    learner = make_learner("ewc")
    for x, y in task_batches(0, n_batches=3):
        learner.observe(x, y, "t0")
    x, y = learner.memory.get(0)
    expected = reference_importance(
        learner, lambda out, label: F.log_softmax(out, 0)[label], torch.square, x, y)
    fisher = learner.importance(0)
    assert fisher.shape == (sum(p.numel() for p in learner.net.parameters()),)
    assert bool((fisher >= 0).all()) and fisher.sum() > 0
    assert torch.allclose(fisher, expected, rtol=1e-4, atol=1e-7)


def test_mas_importance_is_the_mean_abs_gradient_of_the_squared_output_norm_and_ignores_labels():
    learner = make_learner("mas")
    for x, y in task_batches(0, n_batches=3):
        learner.observe(x, y, "t0")
    x, _ = learner.memory.get(0)
    expected = reference_importance(learner, lambda out: out.square().sum(), torch.abs, x)
    omega = learner.importance(0)
    assert bool((omega >= 0).all()) and omega.sum() > 0
    assert torch.allclose(omega, expected, rtol=1e-4, atol=1e-6)
    learner.memory.add(x, torch.randint(0, 3, (len(x),)), 0)  # same inputs, new labels
    assert torch.equal(learner.importance(0), omega)


@pytest.mark.parametrize("method", ["ewc", "mas"])
def test_per_task_importance_covers_the_body_and_the_tasks_own_head(method):
    learner = make_learner(method, head="per_task")
    train(learner, 0)
    omega = by_name(learner, learner.penalty.importance)
    assert omega["body.1.weight"].sum() > 0 and omega["heads.0.weight"].sum() > 0
    assert not omega["heads.1.weight"].any() and not omega["heads.2.weight"].any()
    train(learner, 1)
    omega = by_name(learner, learner.penalty.importance)
    assert omega["heads.0.weight"].sum() > 0 and omega["heads.1.weight"].sum() > 0


def test_the_memory_holds_only_the_current_tasks_samples():
    learner = make_learner("ewc")
    train(learner, 0)
    x, y = task_batches(1, n_batches=1)[0]
    learner.observe(x, y, "t1")
    assert learner.memory.tasks == [1] and torch.equal(learner.memory.get(1)[0], x)


@pytest.mark.parametrize("method", ["ewc", "mas"])
def test_without_strength_the_penalty_learner_takes_fine_tunings_steps(method):
    learners = [make_learner(method, params=dict(strength=0.0)), make_learner("finetune")]
    for learner in learners:
        train(learner, 0)
        train(learner, 1)
    for a, b in zip(learners[0].net.parameters(), learners[1].net.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def learn_t0_then_t1_without_consolidating(learner) -> torch.Tensor:
    """Learn t0, then 10 batches of t1; returns t1's inputs."""
    train(learner, 0)
    batches = task_batches(1, n_batches=10)
    for x, y in batches:
        learner.observe(x, y, "t1")
    return torch.cat([x for x, _ in batches])


# per_task: only the body drifts and its importance is small, so it takes a larger λ to matter;
# shared: λ·Ω·lr must stay below 2 for the head's most important weights, or SGD diverges.
@pytest.mark.parametrize(("method", "head", "strength"), [
    ("ewc", "shared", 20.0), ("mas", "shared", 10.0),
    ("ewc", "per_task", 300.0), ("mas", "per_task", 100.0)])
def test_the_penalty_keeps_important_weights_near_the_anchor(method, head, strength):
    weighted_drift = {}
    for s in (strength, 0.0):  # both see the same t0, so the same importance and anchor
        learner = make_learner(method, head, params=dict(strength=s))
        learn_t0_then_t1_without_consolidating(learner)
        penalty = learner.penalty
        drift = parameters_to_vector(penalty.params).detach() - penalty.anchor
        weighted_drift[s] = (penalty.importance * drift**2).sum().item()
    assert weighted_drift[strength] < 0.5 * weighted_drift[0.0]


@pytest.mark.parametrize("head", ["shared", "per_task"])
def test_lwf_keeps_the_old_head_close_to_the_teacher_on_new_data(head):
    divergence = {}
    for strength in (5.0, 0.0):  # both see the same t0, so the same teacher
        learner = make_learner("lwf", head, params=dict(strength=strength))
        x1 = learn_t0_then_t1_without_consolidating(learner)
        teacher = F.log_softmax(learner.teacher(x1, 0), dim=1)
        student = F.log_softmax(learner.predict(x1, "t0"), dim=1)
        kl = F.kl_div(student, teacher, reduction="batchmean", log_target=True)
        divergence[strength] = kl.item()
    assert divergence[5.0] < 0.5 * divergence[0.0]


def test_footprint_counts_importance_anchor_and_teacher():
    for method, copies in (("ewc", 2), ("mas", 2), ("lwf", 1)):
        learner = make_learner(method)
        assert learner.footprint().method_state_bytes == 0
        train(learner, 0, n_batches=1)
        params_bytes = sum(p.numel() * 4 for p in learner.net.parameters())
        assert learner.footprint().method_state_bytes == copies * params_bytes


def test_distillation_is_minimal_when_the_student_equals_the_teacher():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(8, 5, generator=g)
    student = teacher.clone().requires_grad_(True)
    at_teacher = distillation(student, teacher, 2.0)
    (gradient,) = torch.autograd.grad(at_teacher, student)
    assert torch.allclose(gradient, torch.zeros_like(gradient), atol=1e-7)
    for _ in range(20):
        perturbed = teacher + 0.1 * torch.randn(8, 5, generator=g)
        assert distillation(perturbed, teacher, 2.0) > at_teacher
    shifted = teacher + 3.0  # same softmax: the same (minimal) value
    assert distillation(shifted, teacher, 2.0).item() == pytest.approx(at_teacher.item())


@pytest.mark.parametrize("head", ["shared", "per_task"])
def test_lwf_distils_the_old_heads_from_a_frozen_teacher(head):
    learner = make_learner("lwf", head=head)
    train(learner, 0)
    train(learner, 1)
    assert learner.old_heads(2) == ([0] if head == "shared" else [0, 1])
    assert learner.old_heads(1) == [0]
    teacher = learner.teacher
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    for a, b in zip(teacher.parameters(), learner.net.parameters(), strict=True):
        assert torch.equal(a, b)  # the teacher is the net at the last switch
    x, y = task_batches(2, n_batches=1)[0]
    learner.observe(x, y, "t2")
    assert not all(torch.equal(a, b) for a, b in zip(teacher.parameters(),
                                                     learner.net.parameters(), strict=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["ewc", "mas", "lwf"])
def test_state_lives_on_cuda(method):
    learner = make_learner(method, device="cuda")
    train(learner, 0)
    train(learner, 1)
    state = learner.method_state()
    tensors = [state["teacher"]["body.1.weight"]] if method == "lwf" else [
        state["importance"], state["anchor"]]
    assert all(t.is_cuda for t in tensors)


@pytest.mark.parametrize(("optimizer", "cap"), [("sgd", 1 / 0.1), ("adam", math.inf)])
def test_the_stiffness_cap_follows_the_learning_rate_under_sgd_only(optimizer, cap):
    learner = make_learner("ewc", optimizer={"name": optimizer, "lr": 0.1})
    assert learner.penalty.max_stiffness == cap
