"""Learning without Forgetting (Li & Hoiem, TPAMI 2017).

    at the switch from task t: teacher = a frozen copy of the net
    on each batch (x, y) of a later task:
        loss = CE(f_new(x), y) + λ_o · Σ_{old heads h} T² · CE(softmax(teacher_h(x) / T),
                                                             softmax(f_h(x) / T))

The old heads are the heads of the tasks learned before (per_task mode), or the one shared head
(shared mode, where the current task's own outputs are distilled too). No episodic memory: the
teacher's outputs on the current batch stand in for the old data. The T² factor (Hinton et al.,
2015) keeps the distillation gradient's scale independent of T.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, NonNegativeFloat, PositiveFloat

from edgecl.learners.base import Learner, LearnerSpec, StepStats, zero_grad
from edgecl.nets import TaskNet


class LwFParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    strength: NonNegativeFloat = 0.5  # λ_o, tuned on pmnist (models/lwf.yaml)
    temperature: PositiveFloat = 2.0  # T


def distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    """T² · cross-entropy from the softened teacher to the softened student, batch mean."""
    soft_targets = F.softmax(teacher_logits / temperature, dim=1)
    return temperature**2 * F.cross_entropy(student_logits / temperature, soft_targets)


class LwF(Learner):
    name = "lwf"
    Params = LwFParams
    # Chosen on the validation split, seeds 0-2 (benchmarks/sweep.py --config models/lwf.yaml
    # --test --set benchmark.name rotmnist --set optimizer.lr 0.003 0.01 0.03 --set
    # method.strength ...): over λ_o 0.1-64 (T=2), lr 0.01 and λ_o 16 scored
    # 0.601; their test ACC: 0.603 ± 0.013.
    # japanesevowels: lr 0.03, 16 steps per batch scored 0.741 on validation (best with
    # 1 step: 0.444); `edgecl tune`'s grid in docs/results.md
    tuned: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {
        "rotmnist": {"optimizer": {"lr": 0.01}, "method": {"strength": 16.0}},
        "japanesevowels": {"optimizer": {"lr": 0.03, "steps_per_batch": 16}}}

    def __init__(self, spec: LearnerSpec) -> None:
        super().__init__(spec)
        self.teacher: TaskNet | None = None
        self.old_slots: list[int] = []  # tasks learned before, in order

    def frozen_copy(self) -> TaskNet:
        teacher = copy.deepcopy(self.net).eval()
        return teacher.requires_grad_(False)

    def old_heads(self, slot: int) -> list[int]:
        """Indices of the heads to distil while learning task `slot`."""
        heads = {self.net.head_index(s) for s in self.old_slots if s != slot}
        return sorted(heads)

    def learn(self, x: torch.Tensor, y: torch.Tensor, slot: int) -> StepStats:
        net = self.net
        zero_grad(self.optimizer)
        features = net.body(x)
        own = net.head_index(slot)
        logits = net.heads[own](features)  # in shared mode also the one distilled head
        loss = F.cross_entropy(logits, y)
        heads = self.old_heads(slot)
        if heads:
            with torch.no_grad():
                teacher_features = self.teacher.body(x)
            loss = loss + self.params.strength * sum(
                distillation(logits if h == own else net.heads[h](features),
                             self.teacher.heads[h](teacher_features), self.params.temperature)
                for h in heads)
        loss.backward()
        self.step(loss)
        return StepStats(loss.detach())

    def consolidate(self, slot: int) -> None:
        self.teacher = self.frozen_copy()
        if slot not in self.old_slots:
            self.old_slots.append(slot)

    def method_state(self) -> dict[str, Any]:
        teacher = self.teacher.state_dict() if self.teacher is not None else None
        return {"teacher": teacher, "old_slots": list(self.old_slots)}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.old_slots = [int(s) for s in state["old_slots"]]
        self.teacher = None
        if state["teacher"] is not None:
            self.teacher = self.frozen_copy()
            self.teacher.load_state_dict(state["teacher"])
