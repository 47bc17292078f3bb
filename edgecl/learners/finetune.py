"""Fine-tuning: plain SGD on the stream. The lower bound: it forgets."""

from __future__ import annotations

import torch

from edgecl.learners.base import Learner, StepStats


class FineTune(Learner):
    name = "finetune"

    def learn(self, x: torch.Tensor, y: torch.Tensor, slot: int) -> StepStats:
        return self.sgd_step(x, y, slot)
