"""What EWC and MAS share: a diagonal quadratic penalty that anchors the weights.

After each task the weights θ* are remembered with a per-weight importance Ω (EWC: the Fisher
information, MAS: the sensitivity of the output), merged with the importance of earlier tasks,
and later learning pays

    λ/2 · Σ_i Ω_i (θ_i - θ*_i)²

One anchor θ* (the weights at the latest task switch) and one merged Ω, as in online EWC (Schwarz
et al., 2018), so the state stays two parameter-sized vectors however many tasks were learned.
The penalty covers every parameter: the shared body and, in per_task mode, every head (Ω is zero
where no task has put importance yet).

Stiffness cap: a weight's penalty is a quadratic of curvature λΩ, and SGD with learning rate lr
diverges on it once lr·λΩ > 2. The most important weights cross that line long before the
penalty matters for the rest (on pmnist max Ω is 100-10,000x the median) and the run collapses to
chance. With `stiffness_cap` (default) λΩ is capped at 1/lr: an SGD step on the penalty alone
then lands such a weight on θ* instead of past it, and every other weight is penalised exactly.
The cap applies under SGD only: Adam scales each step to about lr whatever the curvature, so the
argument does not hold there and the penalty is left exact.
"""

from __future__ import annotations

import logging
import math
from abc import abstractmethod
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.utils import parameters_to_vector

from edgecl.learners.base import Learner, LearnerSpec, StepStats, zero_grad

log = logging.getLogger("edgecl.learners")

Merge = Literal["average", "decay"]
PER_SAMPLE_CHUNK = 64  # samples per vmap call: bounds the [chunk, n_params] gradient block


class PenaltyParams(BaseModel):
    """λ (`strength`) and how a new task's importance joins the old (see `merge_importance`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    strength: NonNegativeFloat  # each method sets its tuned default
    merge: Merge = "decay"
    gamma: float = Field(default=1.0, ge=0.0, le=1.0)  # decay only
    stiffness_cap: bool = True  # under SGD, cap λΩ at 1/lr (see the module docstring)


def merge_importance(old: torch.Tensor | None, new: torch.Tensor, n_old: int, merge: Merge,
                     gamma: float) -> torch.Tensor:
    """Importance after one more task, given `old` merged over `n_old` earlier tasks.

    average: the running mean over tasks, (n_old·Ω_old + Ω_new) / (n_old + 1).
    decay:   γ·Ω_old + Ω_new (online EWC's γ; γ = 1 is the plain sum, MAS's accumulation).

    A task that returns after a switch is merged again when it next ends, from the samples of
    its new visit: the count is of task visits, as in online EWC.
    """
    if old is None:
        return new.clone()
    if merge == "average":
        return (old * n_old + new) / (n_old + 1)
    return old * gamma + new


class QuadraticPenalty:
    """λ/2 Σ Ω (θ - θ*)² over `params`, with Ω and θ* set by `consolidate`; λΩ is capped at
    `max_stiffness`."""

    def __init__(self, params: list[nn.Parameter], strength: float, merge: Merge,
                 gamma: float, max_stiffness: float = math.inf) -> None:
        self.params = params
        self.strength = strength
        self.merge = merge
        self.gamma = gamma
        self.max_stiffness = max_stiffness
        self.importance: torch.Tensor | None = None  # Ω, flat
        self.anchor: torch.Tensor | None = None  # θ*, flat
        self.n_tasks = 0  # tasks merged into Ω

    def consolidate(self, importance: torch.Tensor) -> None:
        """Merge one task's importance and anchor the weights where they are now."""
        self.importance = merge_importance(self.importance, importance.detach(), self.n_tasks,
                                           self.merge, self.gamma)
        self.anchor = parameters_to_vector(self.params).detach()
        self.n_tasks += 1

    def stiffness(self) -> torch.Tensor:
        """λΩ per weight, capped at `max_stiffness`: the penalty's curvature, as a new tensor.
        Recomputed per step rather than kept, so the state stays two parameter-sized vectors."""
        return torch.mul(self.importance, self.strength).clamp_(max=self.max_stiffness)

    def value(self) -> torch.Tensor:
        """The penalty, differentiable in the parameters (0 before any task is consolidated)."""
        if self.importance is None:
            return self.params[0].new_zeros(())
        drift = parameters_to_vector(self.params) - self.anchor
        return 0.5 * (self.stiffness() * drift.square()).sum()

    @torch.no_grad()
    def backward(self) -> torch.Tensor:
        """Accumulate the penalty's gradient λΩ·(θ - θ*) into `.grad`, as `value().backward()`
        would, without building a graph; returns the penalty's value."""
        if self.importance is None:
            return self.params[0].new_zeros(())
        # in place on the fresh temporaries: two parameter-sized allocations instead of five
        # (1/5 of this function's time on a CPU)
        drift = parameters_to_vector(self.params).sub_(self.anchor)
        gradient = self.stiffness().mul_(drift)
        for p, g in zip(self.params, gradient.split([p.numel() for p in self.params]),
                        strict=True):
            if p.grad is None:
                p.grad = g.view_as(p).clone()
            else:
                p.grad.add_(g.view_as(p))
        return 0.5 * torch.dot(gradient, drift)

    def state_dict(self) -> dict[str, Any]:
        return {"importance": self.importance, "anchor": self.anchor, "n_tasks": self.n_tasks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.params[0].device
        self.importance, self.anchor = (None if state[k] is None else state[k].to(device)
                                        for k in ("importance", "anchor"))
        self.n_tasks = int(state["n_tasks"])


def mean_per_sample_gradient(
    net: nn.Module, slot: int, objective: Callable[..., torch.Tensor],
    reduce: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *targets: torch.Tensor,
    finite_only: bool = False,
) -> torch.Tensor:
    """(1/N) Σ_n reduce(∂ objective(net(x_n, slot), *targets_n) / ∂θ), flat over the parameters.

    Per-sample gradients come from `vmap(grad(...))`, a chunk of samples per call, with the net in
    eval mode (so batch norm uses its running statistics and nothing is updated). `finite_only`:
    the mean over the samples whose reduced gradient is finite only (zeros if there is none).
    """
    names = [name for name, _ in net.named_parameters()]
    params = {name: p.detach() for name, p in net.named_parameters()}
    buffers = dict(net.named_buffers())

    def sample_objective(p: dict[str, torch.Tensor], x_n: torch.Tensor,
                         *targets_n: torch.Tensor) -> torch.Tensor:
        logits = functional_call(net, (p, buffers), (x_n.unsqueeze(0), slot))
        return objective(logits.squeeze(0), *targets_n)

    per_sample = vmap(grad(sample_objective), in_dims=(None, 0, *[0] * len(targets)))
    total = torch.zeros(sum(p.numel() for p in params.values()), device=x.device)
    n = len(x)
    was_training = net.training
    net.eval()
    try:
        for chunk in zip(x.split(PER_SAMPLE_CHUNK),
                         *(t.split(PER_SAMPLE_CHUNK) for t in targets), strict=True):
            reduced = {name: reduce(g) for name, g in per_sample(params, *chunk).items()}
            if finite_only:
                finite = torch.stack([r.flatten(1).isfinite().all(1)
                                      for r in reduced.values()]).all(0)
                reduced = {name: r[finite] for name, r in reduced.items()}
                n -= int(finite.logical_not().sum())
            total += torch.cat([reduced[name].sum(0).reshape(-1) for name in names])
    finally:
        net.train(was_training)
    return total / max(n, 1)


class QuadraticPenaltyLearner(Learner):
    """Cross-entropy on the stream + the quadratic penalty; at each task switch the task's
    episodic memory gives its importance (`importance`, defined by the method).

    The memory holds the current task's samples only: once a task's importance is merged its
    samples are never read again, so a new task starts from an empty memory.
    """

    Params = PenaltyParams
    uses_memory = True

    def __init__(self, spec: LearnerSpec) -> None:
        super().__init__(spec)
        p = self.params
        optimizer = spec.config.optimizer
        capped = p.stiffness_cap and optimizer.name == "sgd"
        max_stiffness = 1.0 / optimizer.lr if capped else math.inf
        self.penalty = QuadraticPenalty(list(self.net.parameters()), p.strength, p.merge, p.gamma,
                                        max_stiffness)

    @abstractmethod
    def importance(self, slot: int, finite_only: bool = False) -> torch.Tensor:
        """Per-weight importance Ω of task `slot` (flat, non-negative) from its memory
        (`finite_only`: from the samples whose gradient is finite only)."""

    def begin_task(self, slot: int) -> None:
        self.memory.clear()

    def learn(self, x: torch.Tensor, y: torch.Tensor, slot: int) -> StepStats:
        self.memory.add(x, y, slot)
        return self.penalized_step(x, y, slot)

    def glance(self, x: torch.Tensor, y: torch.Tensor, slot: int) -> None:
        self.penalized_step(x, y, slot)

    def penalized_step(self, x: torch.Tensor, y: torch.Tensor, slot: int) -> StepStats:
        """One step on the batch's loss plus the penalty of the tasks before."""
        zero_grad(self.optimizer)
        loss = F.cross_entropy(self.forward(x, slot), y)
        loss.backward()
        penalty = self.penalty.backward()
        self.step(loss)
        return StepStats(loss.detach() + penalty)

    def consolidate(self, slot: int) -> None:
        """Merge task `slot`'s importance. Memory samples whose gradient is not finite (the
        samples of a skipped step are stored too) are left out of it, and counted
        (`nonfinite_importance`): one such sample would otherwise make Ω, and every later step,
        non-finite."""
        importance = self.importance(slot)
        if not bool(importance.isfinite().all()):
            self.count("nonfinite_importance")
            log.warning("task slot %d: memory samples whose gradient is not finite were left out "
                        "of its importance", slot)
            importance = self.importance(slot, finite_only=True)
            importance = torch.where(importance.isfinite(), importance, 0.0)  # a sum's overflow
        self.penalty.consolidate(importance)

    def method_state(self) -> dict[str, Any]:
        return self.penalty.state_dict()

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.penalty.load_state_dict(state)
