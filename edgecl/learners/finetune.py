"""Fine-tuning: plain SGD on the stream. The lower bound: it forgets."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from edgecl.learners.base import Learner, StepStats


class FineTune(Learner):
    name = "finetune"
    # the GEM paper's rotated-MNIST lr for "single" (run_experiments.sh)
    tuned: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {
        "rotmnist": {"optimizer": {"lr": 0.003}}}

    def learn(self, x: torch.Tensor, y: torch.Tensor, slot: int) -> StepStats:
        return self.sgd_step(x, y, slot)
