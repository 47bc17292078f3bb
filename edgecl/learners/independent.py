"""Independent: one small net per task (the GEM paper's reference), so no task can interfere.

As in the GEM paper each task's net is `width_scale` times as wide as the configured one (default
1/max_tasks: the same total parameter budget as one shared net); `warm_start` (the paper's
`--finetune yes`, the default) initialises a new task's net, when it starts learning, from the net
of the task learned before it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from edgecl.learners.base import Learner, StepStats
from edgecl.nets import build_task_net


class IndependentParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    width_scale: float | None = Field(default=None, gt=0, le=1)  # None: 1 / max_tasks
    warm_start: bool = True


class TaskNets(nn.Module):
    """One single-head net per task slot."""

    def __init__(self, nets: list[nn.Module]) -> None:
        super().__init__()
        self.nets = nn.ModuleList(nets)

    def forward(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        return self.nets[slot](x)

    def task_module(self, slot: int) -> nn.Module:
        return self.nets[slot].task_module(0)


class Independent(Learner):
    name = "independent"
    can_federate = False  # one net per task, nothing shared between tasks to average
    Params = IndependentParams
    # the GEM paper's rotated-MNIST lr for "independent" (run_experiments.sh)
    # japanesevowels: lr 0.1, 16 steps per batch scored 0.914 on validation (best with
    # 1 step: 0.395); `edgecl tune`'s grid in docs/results.md
    tuned: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {
        "rotmnist": {"optimizer": {"lr": 0.1}},
        "japanesevowels": {"optimizer": {"lr": 0.1, "steps_per_batch": 16}}}

    def build_net(self) -> nn.Module:
        s = self.spec
        scale = self.params.width_scale or 1.0 / s.max_tasks
        return TaskNets([build_task_net(s.config.net, s.input_shape, s.n_classes, 1, scale,
                                        s.config.normalize)
                         for _ in range(s.max_tasks)])

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.started: list[int] = []  # slots that have begun learning, in order

    def begin_task(self, slot: int) -> None:
        if slot in self.started:
            return
        if self.params.warm_start and self.started:
            self.net.nets[slot].load_state_dict(self.net.nets[self.started[-1]].state_dict())
        self.started.append(slot)

    def method_state(self) -> dict[str, Any]:
        return {"started": list(self.started)}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.started = list(state["started"])

    def learn(self, x: torch.Tensor, y: torch.Tensor, slot: int) -> StepStats:
        return self.sgd_step(x, y, slot)
