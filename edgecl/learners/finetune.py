"""Fine-tuning: plain SGD on the stream. The lower bound: it forgets."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from edgecl.learners.base import Learner, StepStats


class FineTune(Learner):
    name = "finetune"
    # the GEM paper's rotated-MNIST lr for "single" (run_experiments.sh)
    # japanesevowels: lr 0.03, 16 steps per batch scored 0.79 on validation (best with
    # 1 step: 0.457); `edgecl tune`'s grid in docs/results.md
    tuned: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {
        "rotmnist": {"optimizer": {"lr": 0.003}},
        "japanesevowels": {"optimizer": {"lr": 0.03, "steps_per_batch": 16}}}

    def learn(self, x: torch.Tensor, y: torch.Tensor, slot: int) -> StepStats:
        return self.sgd_step(x, y, slot)
