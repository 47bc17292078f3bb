"""Divergence is never silent: a step whose loss, gradients or new weights are not finite is not
applied (every method), it is counted and logged, a learner that cannot recover says so
(LearnerDiverged), bench marks the run, and export publishes no non-finite model.

The poison is a batch of finite but huge inputs (float32's largest value): the forward pass
overflows, so the loss and the gradients are NaN or infinite. WSN runs with its own optimiser,
Adam: under plain SGD its masked net keeps that batch's loss finite (about 1e37) and the step it
takes is finite too, so there is nothing to skip; under Adam the squared gradient overflows the
second-moment state, so it is the step's new state that is not finite and is rolled back.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import make_learner, task_batches, train

from edgecl import export
from edgecl.checkpoint import save_checkpoint
from edgecl.data.tasks import Benchmark, TaskData
from edgecl.export import Exporter, ExportError, VerificationError, export_module
from edgecl.learners import LEARNERS, LearnerDiverged, base
from edgecl.protocol import AT_CHANCE_MARGIN, chance, run_protocol, run_warnings
from edgecl.setup import learner_spec, load_config, new_learner

HUGE = torch.finfo(torch.float32).max  # finite
OWN_OPTIMIZER = {"wsn": {"optimizer": {"name": "adam", "lr": 0.003}}}
MEMORY_METHODS = {"ewc", "mas", "agem", "er", "der", "gem"}


def learner_for(method: str, **overrides):
    return make_learner(method, **{**OWN_OPTIMIZER.get(method, {}), **overrides})


def poisoned(x: torch.Tensor) -> torch.Tensor:
    return torch.full_like(x, HUGE)


def snapshot(learner) -> dict:
    """What a skipped step must leave alone: the net's weights and buffers, the optimiser."""
    return copy.deepcopy({"net": learner.net.state_dict(),
                          "optimizer": learner.optimizer.state_dict()["state"]})


def assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    else:
        assert a == b


def poisoned_stream(learner) -> list:
    """t0 learned and ended, then t1 with its third batch poisoned: the StepStats of t1."""
    train(learner, 0)
    steps = []
    for i, (x, y) in enumerate(task_batches(1, n_batches=5)):
        steps.append(learner.observe(poisoned(x) if i == 2 else x, y, "t1"))
    learner.end_task("t1")
    return steps


# --- (a) the learner: a non-finite step is not applied ----------------------------------------
@pytest.mark.parametrize("method", LEARNERS)
def test_a_poisoned_batch_changes_no_weight_and_is_counted_and_logged(method, caplog):
    """Every method: the poisoned step leaves the net's weights and buffers and the optimiser's
    state exactly as they were (GEM, A-GEM, EWC and MAS keep the batch in their episodic
    memory: the samples are finite, and each method leaves a non-finite memory gradient out);
    it is counted, logged once with its task, and the next batch is learned as usual."""
    learner = learner_for(method)
    train(learner, 0)
    batches = task_batches(1, n_batches=4)
    for x, y in batches[:2]:
        learner.observe(x, y, "t1")
    before = snapshot(learner)
    stored = len(learner.memory) if learner.memory is not None else None
    with caplog.at_level(logging.WARNING, logger="edgecl.learners"):
        stats = learner.observe(poisoned(batches[2][0]), batches[2][1], "t1")
        again = learner.observe(poisoned(batches[2][0]), batches[2][1], "t1")
    assert stats.skipped and again.skipped
    assert_same(snapshot(learner), before)
    assert learner.stats()["nonfinite_steps"] == 2
    [record] = [r for r in caplog.records if r.name == "edgecl.learners" and "skipped" in
                r.getMessage()]  # once per task
    assert "'t1'" in record.getMessage()
    if method in MEMORY_METHODS:
        assert len(learner.memory) >= stored  # the batch is kept (the memory's choice)
    after = learner.observe(*batches[3], "t1")
    assert not after.skipped and "nonfinite_streak" not in learner.stats()
    assert learner.nonfinite_weight() is None
    assert any(not torch.equal(p, before["net"][n]) for n, p in learner.net.state_dict().items())


@pytest.mark.parametrize("method", LEARNERS)
def test_the_same_stream_gives_the_same_skips_and_bit_identical_weights(method):
    runs = []
    for _ in range(2):
        learner = learner_for(method)
        skipped = [s.skipped for s in poisoned_stream(learner)]
        runs.append((skipped, learner.state_dict()))
    (skips_a, state_a), (skips_b, state_b) = runs
    assert skips_a == skips_b == [False, False, True, False, False]
    assert state_a["counters"]["nonfinite_steps"] == 1
    assert_same(state_a["net"], state_b["net"])
    assert_same(state_a["optimizer"], state_b["optimizer"])
    assert state_a["counters"] == state_b["counters"]


@pytest.mark.parametrize("method", LEARNERS)
def test_a_poisoned_batch_left_in_memory_does_not_stop_later_learning(method):
    """The poisoned batch is t0's last, so the memory of t0 (GEM, A-GEM, ER, DER++) and EWC's
    and MAS's importance samples hold it when t1 learns: each leaves the non-finite part out,
    counted, and t1 learns every step."""
    learner = learner_for(method)
    batches = task_batches(0, n_batches=4)
    for x, y in batches[:3]:
        learner.observe(x, y, "t0")
    assert learner.observe(poisoned(batches[3][0]), batches[3][1], "t0").skipped
    learner.end_task("t0")
    assert not any(learner.observe(x, y, "t1").skipped for x, y in task_batches(1))
    learner.end_task("t1")
    assert learner.nonfinite_weight() is None
    stats = learner.stats()
    assert stats["nonfinite_steps"] == 1
    expected = {"ewc": "nonfinite_importance", "mas": "nonfinite_importance",
                "gem": "gem_nonfinite_constraints", "agem": "agem_nonfinite_references",
                "er": "replay_nonfinite_samples", "der": "replay_nonfinite_samples"}
    if method in expected:
        assert stats[expected[method]] > 0


@pytest.mark.parametrize("optimizer", [{}, {"momentum": 0.9}])
def test_a_step_whose_new_weights_overflow_is_rolled_back_with_the_input_statistics(optimizer):
    """A NaN learning rate: the loss and gradients are finite, the new weights are not. The step
    is rolled back: weights, momentum, and the input standardisation still fitting on the first
    task (sensor windows [channels, steps] are standardised inside the model)."""
    learner = make_learner(input_shape=(2, 8), optimizer=optimizer)
    [norm] = learner.input_norms
    batches = task_batches(0, n_batches=3, input_shape=(2, 8))
    learner.observe(*batches[0], "t0")
    learner.observe(*batches[1], "t0")
    before = snapshot(learner)
    fitted = [b.clone() for b in norm.buffers()]
    learner.optimizer.param_groups[0]["lr"] = float("nan")
    assert learner.observe(*batches[2], "t0").skipped
    assert_same(snapshot(learner), before)
    assert all(torch.equal(a, b) for a, b in zip(norm.buffers(), fitted, strict=True))
    learner.optimizer.param_groups[0]["lr"] = 0.1
    assert not learner.observe(*batches[2], "t0").skipped
    assert not torch.equal(norm.count, fitted[0])  # this time the batch is taken


def test_a_learner_that_skips_every_step_raises_learner_diverged(monkeypatch):
    monkeypatch.setattr(base, "MAX_NONFINITE_STREAK", 3)
    learner = make_learner()
    x, y = task_batches(0, n_batches=1)[0]
    for _ in range(2):  # a streak broken by a learned step starts again
        learner.observe(poisoned(x), y, "t0")
    learner.observe(x, y, "t0")
    for _ in range(2):
        learner.observe(poisoned(x), y, "t0")
    with pytest.raises(LearnerDiverged, match=r"diverged on task 't0': its last 3 steps were all "
                                              r"skipped.*5 skipped in all") as caught:
        learner.observe(poisoned(x), y, "t0")
    assert (caught.value.task, caught.value.skipped) == ("t0", 5)
    assert isinstance(caught.value, RuntimeError) and learner.nonfinite_weight() is None


def test_non_finite_weights_at_a_task_end_raise_learner_diverged():
    learner = make_learner()
    x, y = task_batches(0, n_batches=1)[0]
    learner.observe(x, y, "t0")
    with torch.no_grad():
        learner.net.heads[0].bias[1] = float("nan")  # as a damaged checkpoint could hold
    with pytest.raises(LearnerDiverged, match=r"task 't0': its weight heads\.0\.bias is not "
                                              r"finite at the end of the task"):
        learner.end_task("t0")
    assert learner.open_task == "t0"  # nothing consolidated


@pytest.mark.parametrize("optimizer", [{}, {"momentum": 0.9, "weight_decay": 0.01},
                                       {"name": "adam", "lr": 0.01}])
def test_the_checked_path_steps_exactly_as_the_fast_path(monkeypatch, optimizer):
    """A step that might overflow is taken with a copy to roll back to; when it does not
    overflow it lands on the same bits as the usual step."""
    learners = [make_learner("ewc", optimizer=optimizer) for _ in range(2)]
    for i, learner in enumerate(learners):
        if i:
            monkeypatch.setattr(base, "SAFE_MAGNITUDE", 0.0)  # every step takes the checked path
        train(learner, 0)
        train(learner, 1)
    a, b = (lrn.state_dict() for lrn in learners)
    assert_same(a["net"], b["net"])
    assert_same(a["optimizer"], b["optimizer"])


def test_a_weight_written_between_steps_is_noticed(monkeypatch):
    """Under plain SGD the weights' norm is carried from step to step; a weight written from
    outside (here huge) is seen, and that step is checked tensor by tensor."""
    learner = make_learner()
    checked = []
    real = base.Learner._checked_step

    def spy(self, *args):
        checked.append(True)
        return real(self, *args)

    monkeypatch.setattr(base.Learner, "_checked_step", spy)
    batches = task_batches(0, n_batches=3)
    learner.observe(*batches[0], "t0")
    learner.observe(*batches[1], "t0")
    assert not checked
    with torch.no_grad():
        learner.net.heads[0].bias[0] = 1e20
    learner.observe(*batches[2], "t0")
    assert checked


# --- (b) bench marks bad runs ------------------------------------------------------------------
def tiny_bench(poison_task: int | None = None) -> Benchmark:
    tasks = []
    for t in range(2):
        (x, y), (xt, yt) = task_batches(t, n_batches=2, batch=24)
        if t == poison_task:
            x = torch.cat([poisoned(x[:8]), x[8:]])  # the task's first batch of 8
        tasks.append(TaskData(f"t{t}", x, y, xt, yt, ("a", "b", "c")))
    return Benchmark("tiny", tuple(tasks), (1, 4, 4), 3, "shared", "test")


def tiny_config(**overrides):
    return load_config(overrides={
        "device": "cpu", "benchmark": {"batch_size": 8},
        "net": {"name": "mlp", "hidden": [16, 16]}, "optimizer": {"lr": 0.1}, **overrides})


def test_run_protocol_reports_skipped_steps_and_run_warnings_says_so():
    result, _ = run_protocol(tiny_config(), tiny_bench(poison_task=1))
    assert result["nonfinite_steps"] == 1 and result["steps"] == 6
    assert result["finite"] is True and result["nonfinite_weight"] is None
    assert result["stats"]["nonfinite_steps"] == 1
    [line] = [w for w in run_warnings(result) if "skipped" in w]
    assert line.startswith("1 of 6 training steps were skipped")


def test_a_healthy_run_has_no_warnings():
    result, _ = run_protocol(tiny_config(), tiny_bench())
    assert result["nonfinite_steps"] == 0 and result["finite"] and not result["at_chance"]
    assert run_warnings(result) == []


def test_a_model_that_learned_nothing_is_at_chance():
    """All-zero weights and a learning rate too small to move them: every logit ties, so every
    answer is class 0, a third of each balanced test set."""
    bench = tiny_bench()
    balanced = tuple(TaskData(t.name, t.x_train, t.y_train, t.x_test,
                              torch.arange(len(t.y_test)) % 3, t.classes) for t in bench.tasks)
    bench = Benchmark("tiny", balanced, (1, 4, 4), 3, "shared", "test")
    cfg = tiny_config(optimizer={"lr": 1e-30})
    learner = new_learner(learner_spec(cfg, bench))
    with torch.no_grad():
        for p in learner.net.parameters():
            p.zero_()
    result, _ = run_protocol(cfg, bench, learner=learner)
    assert result["chance"] == pytest.approx(1 / 3) and result["at_chance"]
    [line] = run_warnings(result)
    assert "at chance" in line and "0.333" in line


def test_chance_is_per_head():
    shared = tiny_bench()
    assert chance(shared) == pytest.approx(1 / 3)
    two = TaskData("t2", *([torch.zeros(1)] * 4), ("yes", "no"))
    per_task = Benchmark("p", (*shared.tasks, two), (1, 4, 4), 3, "per_task", "test")
    assert chance(per_task) == pytest.approx((1 / 3 + 1 / 3 + 1 / 2) / 3)
    assert AT_CHANCE_MARGIN == 0.02


def test_run_warnings_names_a_non_finite_model():
    result = {"nonfinite_steps": 0, "at_chance": False, "finite": False,
              "nonfinite_weight": "heads.0.weight", "acc": 0.5, "chance": 0.1}
    [line] = run_warnings(result)
    assert "heads.0.weight" in line and "not finite" in line


def test_a_learner_that_diverges_ends_the_run_with_learner_diverged(monkeypatch):
    monkeypatch.setattr(base, "MAX_NONFINITE_STREAK", 2)
    bench = tiny_bench()
    t0 = bench.tasks[0]
    bad = TaskData("t0", poisoned(t0.x_train), t0.y_train, t0.x_test, t0.y_test, t0.classes)
    with pytest.raises(LearnerDiverged, match="diverged on task 't0'"):
        run_protocol(tiny_config(), Benchmark("tiny", (bad, bench.tasks[1]), (1, 4, 4), 3,
                                              "shared", "test"))


# --- (c) export publishes no non-finite model ---------------------------------------------------
def exportable():
    learner = make_learner("finetune", "per_task")
    train(learner, 0)
    return learner, learner.task_module("t0")


def export_to(tmp_path, learner, module):
    return export_module(module, tmp_path / "repo", "t0", learner.spec, ["a", "b", "c"], None,
                         "random inputs only", "c.pt", "0" * 64)


def test_a_module_with_a_nan_weight_is_refused_naming_it(tmp_path):
    learner, module = exportable()
    with torch.no_grad():
        module[-1].weight[2, 3] = float("nan")
    with pytest.raises(ExportError, match=r"task t0: the model's parameter 1\.weight is not "
                                          r"finite.*diverged; not exported"):
        export_to(tmp_path, learner, module)
    assert not (tmp_path / "repo").exists()


def test_a_checkpoint_with_a_nan_weight_exports_nothing(tmp_path):
    learner, _ = exportable()
    with torch.no_grad():
        learner.net.body[1].weight[0, 0] = float("inf")
    save_checkpoint(tmp_path / "c.pt", learner)
    with pytest.raises(ExportError, match=r"parameter 0\.1\.weight is not finite"):
        Exporter(tmp_path / "c.pt").export("t0", tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_outputs_that_overflow_fail_verification_and_publish_nothing(tmp_path):
    """Finite weights of 1e38 scale: every logit overflows to infinity (the old check read the
    NaN difference inf - inf as 0.0 and published the model)."""
    learner, module = exportable()
    with torch.no_grad():
        module[-1].weight.fill_(3e38)
        module[-1].bias.fill_(3e38)
    assert export.first_nonfinite(module.named_parameters()) is None
    with pytest.raises(VerificationError, match=r"outputs are not finite .*torch on 65 of the 65 "
                                                r"random inputs.*the learner diverged"):
        export_to(tmp_path, learner, module)
    assert not (tmp_path / "repo").exists()


def test_onnxruntime_logits_that_are_not_finite_fail_verification(tmp_path, monkeypatch):
    learner, module = exportable()
    real_to_onnx = export.to_onnx

    def nan_graph(module, input_shape):
        wrong = copy.deepcopy(module)
        with torch.no_grad():
            wrong[-1].bias[0] = float("nan")
        return real_to_onnx(wrong, input_shape)

    monkeypatch.setattr(export, "to_onnx", nan_graph)
    with pytest.raises(VerificationError, match="onnxruntime on 65 of the 65 random inputs"):
        export_to(tmp_path, learner, module)
    assert not (tmp_path / "repo").exists()


def test_a_nan_difference_never_reads_as_zero(tmp_path):
    _, module = exportable()
    wrong = copy.deepcopy(module)
    with torch.no_grad():
        wrong[-1].bias[0] = float("nan")
    session = ort.InferenceSession(export.to_onnx(wrong, (1, 4, 4)).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    x = torch.rand(5, 1, 4, 4)
    run = export.compare(session, module, [x, x[:1]])
    assert np.isnan(run.diff) and run.onnx_nonfinite == 6 and run.torch_nonfinite == 0
