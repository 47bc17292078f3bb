"""LwF's teacher: a frozen snapshot of the net as the last task ended, untouched while the
student learns the next task."""

from __future__ import annotations

import copy

import torch
from conftest import make_learner, task_batches, train


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_teacher_stays_fixed_while_the_student_learns_the_next_task():
    learner = make_learner("lwf", "per_task", optimizer={"momentum": 0.9},
                           params={"strength": 1.0})
    train(learner, 0)
    teacher = learner.teacher
    at_switch = copy.deepcopy(learner.net.state_dict())
    assert same_state(teacher.state_dict(), at_switch)  # the net as task 0 ended
    probe = task_batches(0, n_batches=1, batch=16)[0][0]
    with torch.no_grad():
        taught = teacher(probe, 0)

    for x, y in task_batches(1, n_batches=10):
        learner.observe(x, y, "t1")
    assert not same_state(learner.net.state_dict(), at_switch)  # the student learned...
    assert learner.teacher is teacher and same_state(teacher.state_dict(), at_switch)  # ...alone
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    with torch.no_grad():
        assert torch.equal(teacher(probe, 0), taught)
    student = {p.untyped_storage().data_ptr() for p in learner.net.parameters()}
    assert not student & {p.untyped_storage().data_ptr() for p in teacher.parameters()}

    learner.end_task("t1")  # the next teacher: the net as task 1 ends
    assert learner.teacher is not teacher
    assert same_state(learner.teacher.state_dict(), learner.net.state_dict())
