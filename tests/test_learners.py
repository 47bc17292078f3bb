import pytest
import torch
from conftest import make_learner, task_batches

from edgecl.checkpoint import load_learner, save_checkpoint
from edgecl.learners import LEARNERS


def train(learner, task: int, name: str | None = None, **kw) -> None:
    for x, y in task_batches(task, **kw):
        learner.observe(x, y, name or f"t{task}")
    learner.end_task(name or f"t{task}")


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
def test_restored_learner_takes_exactly_the_same_next_step(tmp_path, method):
    learner = make_learner(method, optimizer={"momentum": 0.9})
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


def test_too_many_tasks_is_a_clear_error():
    learner = make_learner(max_tasks=2)
    learner.register_task("a")
    learner.register_task("b")
    with pytest.raises(ValueError, match="beyond max_tasks=2"):
        learner.observe(*task_batches(0, n_batches=1)[0], "c")


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
    assert fp.total_bytes >= fp.params_bytes


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
