"""The GEM protocol's order in `edgecl.protocol.run_protocol`: b is measured before any training,
row i of R after `end_task(i)` and before any sample of task i+1 is observed.

A recording learner stands in for a real one, through the real loop: it logs every call and
answers each test set with the accuracy SCRIPT gives for the number of tasks ended so far, so
where each evaluation happened shows in R and b themselves.
"""

import pytest
import torch

from edgecl.data.tasks import Benchmark, TaskData
from edgecl.protocol import run_protocol
from edgecl.setup import load_config

TASKS = ("t0", "t1", "t2")
N_TEST, N_TRAIN, BATCH = 4, 6, 2  # 4 test samples: accuracies are quarters
# SCRIPT[k][j]: accuracy on task j once k tasks have ended (k = 0: the untrained net)
SCRIPT = [[0.25, 0.50, 0.00],
          [1.00, 0.75, 0.25],
          [0.75, 1.00, 0.50],
          [0.50, 0.75, 1.00]]


def task(j: int) -> TaskData:
    g = torch.Generator().manual_seed(j)
    x_train, x_test = torch.rand(N_TRAIN, 2, generator=g), torch.rand(N_TEST, 2, generator=g)
    y_train, y_test = (torch.randint(0, 2, (n,), generator=g) for n in (N_TRAIN, N_TEST))
    return TaskData(TASKS[j], x_train, y_train, x_test, y_test, ("a", "b"))


class Footprint:
    def to_dict(self) -> dict:
        return {}


class RecordingLearner:
    device = torch.device("cpu")

    def __init__(self, bench: Benchmark) -> None:
        self.test = {t.name: t.y_test for t in bench.tasks}
        self.events: list[tuple[str, str]] = []
        self.ended = 0

    def register_task(self, name: str) -> None:
        pass

    def observe(self, x: torch.Tensor, y: torch.Tensor, task: str) -> None:
        self.events.append(("observe", task))

    def end_task(self, task: str) -> None:
        self.events.append(("end_task", task))
        self.ended += 1

    def predict(self, x: torch.Tensor, task: str) -> torch.Tensor:
        """Logits right on the first SCRIPT[ended][task] share of the task's test set."""
        self.events.append(("predict", task))
        y = self.test[task]
        assert len(x) == len(y), "the whole (small) test set in one call"
        n_right = round(SCRIPT[self.ended][TASKS.index(task)] * len(y))
        answer = torch.cat([y[:n_right], 1 - y[n_right:]])
        return torch.nn.functional.one_hot(answer, 2).float()

    def footprint(self) -> Footprint:
        return Footprint()

    def stats(self) -> dict:
        return {}

    def nonfinite_weight(self) -> None:
        return None


@pytest.fixture
def recorded():
    bench = Benchmark("three", tuple(task(j) for j in range(3)), (2,), 2, "shared", "test")
    learner = RecordingLearner(bench)
    cfg = load_config(overrides={"device": "cpu", "benchmark": {"batch_size": BATCH}})
    result, _ = run_protocol(cfg, bench, learner=learner)
    return result, learner.events


def test_b_is_measured_before_any_training_and_each_row_after_its_task_ends(recorded):
    _, events = recorded
    evaluate = [("predict", t) for t in TASKS]
    expected = list(evaluate)  # b
    for name in TASKS:
        expected += [("observe", name)] * (N_TRAIN // BATCH) + [("end_task", name)] + evaluate
    assert events == expected


def test_r_row_i_and_b_hold_what_the_learner_scored_at_their_moment(recorded):
    result, _ = recorded
    assert result["b"] == SCRIPT[0]
    assert result["R"] == SCRIPT[1:]
    # by hand: ACC = mean(0.5, 0.75, 1); BWT = ((0.5 - 1) + (0.75 - 1)) / 2;
    # FWT = ((R[0][1] - b[1]) + (R[1][2] - b[2])) / 2 = ((0.75 - 0.5) + (0.5 - 0)) / 2
    assert (result["acc"], result["bwt"], result["fwt"]) == pytest.approx((0.75, -0.375, 0.375))
