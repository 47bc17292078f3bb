"""Memory Aware Synapses (Aljundi et al., ECCV 2018).

    on each batch of task t:   store its inputs in t's episodic memory
                               step on CE(f(x), y) + λ/2 Σ Ω (θ - θ*)²   (λΩ ≤ 1/lr: penalty.py)
    at the switch from task t: Ω_t = (1/N) Σ_n |∂ ||f(x_n)||² / ∂θ|   over t's memory inputs
                               Ω   = Ω + Ω_t   (accumulated; `merge`/`gamma` as in EWC)
                               θ*  = θ

Unsupervised: the importance reads the inputs only, never the labels. f is the task's head
output (logits), so Ω measures how sensitive the learned function is to each weight. Defaults
tuned on pmnist: see models/mas.yaml.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import NonNegativeFloat

from edgecl.learners.penalty import (
    PenaltyParams,
    QuadraticPenaltyLearner,
    mean_per_sample_gradient,
)


class MASParams(PenaltyParams):
    strength: NonNegativeFloat = 0.1  # λ


def squared_output_norm(logits: torch.Tensor) -> torch.Tensor:
    return logits.square().sum()


class MAS(QuadraticPenaltyLearner):
    name = "mas"
    Params = MASParams
    # Chosen on the validation split, seeds 0-2 (benchmarks/sweep.py --config models/mas.yaml
    # --test --set benchmark.name rotmnist --set optimizer.lr 0.003 0.01 0.03 --set
    # method.strength ...): over λ 0.03-3, lr 0.01 and λ 1 scored 0.627;
    # their test ACC: 0.612 ± 0.008.
    # japanesevowels: lr 0.03, 16 steps per batch scored 0.803 on validation (best with
    # 1 step: 0.457); `edgecl tune`'s grid in docs/results.md
    tuned: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {
        "rotmnist": {"optimizer": {"lr": 0.01}, "method": {"strength": 1.0}},
        "japanesevowels": {"optimizer": {"lr": 0.03, "steps_per_batch": 16}}}

    def importance(self, slot: int, finite_only: bool = False) -> torch.Tensor:
        x, _ = self.memory.get(slot)
        return mean_per_sample_gradient(self.net, slot, squared_output_norm, torch.abs, x,
                                       finite_only=finite_only)
