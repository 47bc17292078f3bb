import pytest
import torch
from conftest import make_learner, task_batches, train

from edgecl.checkpoint import load_learner, save_checkpoint
from edgecl.learners import LEARNERS


def params(learner) -> list[torch.Tensor]:
    return [p.detach().clone() for p in learner.net.parameters()]


@pytest.mark.parametrize("method", sorted(LEARNERS))
@pytest.mark.parametrize("head", ["shared", "per_task"])
def test_every_learner_learns_a_task(method, head):
    learner = make_learner(method, head)
    x, y = task_batches(0, n_batches=1, batch=64)[0]
    learner.register_task("t0")
    before = (learner.predict(x, "t0").argmax(1) == y).float().mean()
    train(learner, 0, n_batches=40)
    after = (learner.predict(x, "t0").argmax(1) == y).float().mean()
    assert after > max(before, 0.8)


@pytest.mark.parametrize("method", sorted(LEARNERS))
@pytest.mark.parametrize("steps_per_batch", [1, 2])
def test_restored_learner_takes_exactly_the_same_next_step(tmp_path, method, steps_per_batch):
    learner = make_learner(method, optimizer={"momentum": 0.9, "steps_per_batch": steps_per_batch})
    train(learner, 0)
    x, y = task_batches(1, n_batches=1)[0]
    learner.observe(x, y, "t1")  # leave a task open: the checkpoint must capture that too
    save_checkpoint(tmp_path / "c.pt", learner)
    restored = load_learner(tmp_path / "c.pt")
    assert restored.task_ids == ["t0", "t1"] and restored.open_task == "t1"
    for lrn in (learner, restored):
        lrn.observe(x, y, "t1")
        lrn.observe(*task_batches(2, n_batches=1)[0], "t2")
    for a, b in zip(params(learner), params(restored), strict=True):
        assert torch.equal(a, b)


def spy_on_steps(learner, skip_call: int | None = None) -> list[bool]:
    """Record whether each optimiser step of `learner` was applied; with `skip_call`, that
    call (1-based) is skipped as a non-finite one would be."""
    applied: list[bool] = []
    step = learner.step

    def spied(loss, apply=None):
        if len(applied) + 1 == skip_call:
            learner._skip_reason = "loss was"
            applied.append(False)
        else:
            applied.append(step(loss, apply))
        return applied[-1]

    learner.step = spied
    return applied


@pytest.mark.parametrize("method", sorted(LEARNERS))
def test_several_steps_per_batch_each_step_and_the_batch_is_stored_once(method):
    # room for 4 batches a task: a batch stored three times would show
    learner = make_learner(method, optimizer={"steps_per_batch": 3}, memory={"per_task": 32})
    train(learner, 0)
    applied = spy_on_steps(learner)
    before = params(learner)
    x, y = task_batches(1, n_batches=1)[0]
    learner.observe(x, y, "t1")
    assert applied == [True] * 3
    if learner.memory is not None:
        assert learner.memory.filled(learner.slot("t1")) == len(y)
    one_step = make_learner(method, memory={"per_task": 32})
    train(one_step, 0)
    one_step.observe(x, y, "t1")  # the first of the three steps is the whole of a 1-step batch
    assert any(not torch.equal(a, b) for a, b in zip(before, params(learner), strict=True))
    assert any(not torch.equal(a, b)
               for a, b in zip(params(one_step), params(learner), strict=True))


def test_a_skipped_later_step_of_a_batch_is_counted_and_ends_its_steps():
    learner = make_learner("finetune", optimizer={"steps_per_batch": 3})
    applied = spy_on_steps(learner, skip_call=2)
    x, y = task_batches(0, n_batches=1)[0]
    stats = learner.observe(x, y, "t0")
    assert applied == [True, False]  # the third step is not taken
    assert not stats.skipped  # the batch's first step stands
    assert learner.stats()["nonfinite_steps"] == 1 and learner.stats()["nonfinite_streak"] == 1
    learner.observe(x, y, "t0")
    assert applied[2:] == [True] * 3 and "nonfinite_streak" not in learner.stats()


def test_finetune_forgets_and_independent_does_not():
    outputs = {}
    for method in ("finetune", "independent"):
        learner = make_learner(method, head="per_task")
        train(learner, 0)
        x, _ = task_batches(0, n_batches=1)[0]
        first = learner.predict(x, "t0")
        train(learner, 1)
        outputs[method] = torch.equal(first, learner.predict(x, "t0"))
    assert outputs == {"finetune": False, "independent": True}


def test_task_switch_consolidates_and_task_ids_are_strings():
    learner = make_learner()
    ended = []
    learner.consolidate = ended.append
    train_batches = task_batches(0, n_batches=2)
    learner.observe(*train_batches[0], "site-A")
    learner.observe(*train_batches[1], "site-B")  # a switch ends site-A
    assert ended == [0] and learner.open_task == "site-B"
    learner.end_task("site-B")
    assert ended == [0, 1] and learner.open_task is None
    with pytest.raises(KeyError, match="unknown task 'site-C'"):
        learner.predict(train_batches[0][0], "site-C")


def test_too_many_tasks_is_a_clear_error_that_leaves_the_learner_working():
    learner = make_learner(max_tasks=2)
    batch = task_batches(0, n_batches=1)[0]
    learner.observe(*batch, "a")
    learner.observe(*batch, "b")
    with pytest.raises(ValueError, match="beyond max_tasks=2"):
        learner.observe(*batch, "c")
    assert learner.task_ids == ["a", "b"] and learner.open_task == "b"
    learner.observe(*batch, "a")  # the stream goes on with known tasks
    assert learner.open_task == "a"


@pytest.mark.parametrize("method", ["finetune", "ewc", "gem"])
def test_a_bad_batch_is_a_clear_error_that_changes_nothing(method):
    learner = make_learner(method)
    x, y = task_batches(0, n_batches=1)[0]
    learner.observe(x, y, "a")
    before = learner.state_dict()
    bad_batches = {
        "with b >= 1": (x[:0], y[:0]),
        "x \\[b, 1, 4, 4\\]": (x.flatten(1), y),
        "y \\[b\\]": (x, y[:-1]),
        "must be integers": (x, y.float()),
        "must lie in 0..2; got 3..3": (x, torch.full_like(y, 3)),
        "must lie in 0..2; got -1..-1": (x, torch.full_like(y, -1)),
    }
    for message, (bx, by) in bad_batches.items():
        with pytest.raises(ValueError, match=message):
            learner.observe(bx, by, "b")
    after = learner.state_dict()
    assert learner.task_ids == ["a"] and learner.open_task == "a"
    for key, value in before["net"].items():
        assert torch.equal(after["net"][key], value)
    if learner.memory is not None:
        assert len(learner.memory) == len(y)


def test_ending_an_unknown_task_is_an_error_and_a_closed_one_is_left_alone():
    learner = make_learner()
    ended = []
    learner.consolidate = ended.append
    learner.observe(*task_batches(0, n_batches=1)[0], "a")
    learner.end_task("a")
    learner.end_task("a")
    assert ended == [0]
    with pytest.raises(KeyError, match="unknown task 'typo'"):
        learner.end_task("typo")


@pytest.mark.parametrize("method", sorted(LEARNERS))
@pytest.mark.parametrize("head", ["shared", "per_task"])
def test_task_module_matches_predict(method, head):
    learner = make_learner(method, head)
    train(learner, 0)
    train(learner, 1)
    x, _ = task_batches(1, n_batches=1)[0]
    for task in ("t0", "t1"):
        module = learner.task_module(task)
        assert torch.allclose(module(x), learner.predict(x, task), atol=1e-6)


def test_independent_nets_are_narrower_and_footprint_counts_them():
    learner = make_learner("independent", max_tasks=4)
    widths = {m.out_features for m in learner.net.nets[0].body if isinstance(m, torch.nn.Linear)}
    assert widths == {4}  # 16 / max_tasks
    fp = learner.footprint()
    assert fp.params_bytes == 4 * sum(p.numel() for p in learner.net.nets[0].parameters()) * 4


def test_independent_warm_start_copies_the_previous_trained_net():
    learner = make_learner("independent", params={"warm_start": True})
    for t in ("t0", "t1"):
        learner.register_task(t)  # as the benchmark does: registration alone copies nothing
    train(learner, 0)
    trained = learner.net.nets[0].state_dict()
    learner.observe(*task_batches(1, n_batches=1)[0], "t1")
    # one step from t0's weights: close to them, unlike t1's own random initialisation
    for name, w in learner.net.nets[1].state_dict().items():
        assert (w - trained[name]).abs().max() < 0.05


@pytest.mark.parametrize("method", ["finetune", "ewc"])
@pytest.mark.parametrize("optimizer", [{}, {"momentum": 0.9}, {"weight_decay": 0.01},
                                       {"name": "adam", "lr": 0.01}])
def test_optimizer_shortcut_steps_exactly_as_torch_does(monkeypatch, method, optimizer):
    """base.optimizer_step's plain-SGD shortcut (and its fallback for anything else) leaves the
    weights bit-identical to torch's own `optimizer.step()`, per-task heads without a gradient
    included."""
    from edgecl.learners import base
    learners = [make_learner(method, "per_task", optimizer=optimizer) for _ in range(2)]
    for i, learner in enumerate(learners):
        if i:  # the second learns through torch's step
            monkeypatch.setattr(base, "optimizer_step", lambda opt: opt.step())
        train(learner, 0)
        train(learner, 1)
    for a, b in zip(params(learners[0]), params(learners[1]), strict=True):
        assert torch.equal(a, b)


def test_optimizer_shortcut_is_taken_for_plain_sgd_only():
    from edgecl.learners.base import is_plain_sgd
    assert is_plain_sgd(make_learner().optimizer)
    for optimizer in ({"momentum": 0.9}, {"weight_decay": 0.01}, {"name": "adam"}):
        assert not is_plain_sgd(make_learner(optimizer=optimizer).optimizer)
