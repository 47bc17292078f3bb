"""WSN: Winning SubNetworks (Kang et al., ICML 2022), forget-free by construction.

All tasks share one set of weights W. Task t learns, besides its own head, a score per weight; its
mask m_t is the top-c fraction of scores per layer (straight-through, see `edgecl.nets.masked`):

    for each batch of task t:
        loss = CE(head_t(f(x; W ⊙ m_t)), y)            # m_t = top-c(|scores|), per layer
        grad W[M_{t-1}] = 0                            # weights of earlier tasks stay frozen
        step (scores, free weights, head_t)
    at the end of task t:  store m_t bit-packed;  M_t = M_{t-1} ∪ m_t

A finished task is evaluated with its stored mask, its head and its BatchNorm, none of which any
later task can move, so its outputs never change (BWT = 0). Frozen weights are also restored after
every optimiser step, so momentum and weight decay cannot move them either. Heads are per task
even on shared-head benchmarks; a new task's head starts from the last finished task's head.
Hidden-layer biases are shared and frozen once the first task is finished; BatchNorm is per task.
A task that returns after its mask is fixed keeps its subnetwork: only its head and its
BatchNorm learn.

CAP, the fraction of maskable weights in M, is reported after every task (`stats()`); when a layer
has no free weight left, a warning is logged and `tasks_without_free_weights` counts the tasks
that could only reuse frozen weights there.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat
from torch import nn

from edgecl.learners.base import Footprint, Learner, StepStats, make_optimizer, tensor_bytes
from edgecl.memory.masks import TaskMasks
from edgecl.nets import build_body
from edgecl.nets.masked import MaskedTaskNet

log = logging.getLogger(__name__)

Fraction = Annotated[float, Field(gt=0, le=1)]
# A score's straight-through gradient is its weight times the mask's gradient, far smaller than a
# weight's own: plain SGD needs a large score learning rate, Adam (which normalises steps) does not.
DEFAULT_SCORE_LR = {"sgd": 10.0, "adam": 1e-3}


class WSNParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # fraction of each maskable layer's weights in a task's mask: one value, or one per layer
    capacity: Fraction | list[Fraction] = 0.5
    score_lr: PositiveFloat | None = None  # None: DEFAULT_SCORE_LR of the configured optimiser
    head_warm_start: bool = True


class WSN(Learner):
    name = "wsn"
    can_federate = False  # each task's subnetwork is its own: no average of them is sound
    Params = WSNParams
    optimizer_defaults: ClassVar[dict[str, Any]] = {"name": "adam", "lr": 0.003}
    # japanesevowels: lr 0.001, 16 steps per batch scored 0.975 on validation (best with
    # 1 step: 0.543); `edgecl tune`'s grid in docs/results.md
    tuned: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {
        "japanesevowels": {"optimizer": {"lr": 0.001, "steps_per_batch": 16}}}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.masks = TaskMasks(self.net.n_weights)
        self.used = torch.zeros(self.net.n_weights, dtype=torch.bool, device=self.device)
        self.finished: list[int] = []  # slots, in the order their masks were fixed
        self.capacity_used: list[float] = []  # CAP = |M_t| / N after each of them
        self.frozen = self.frozen_entries()  # changes only when a mask is fixed or loaded

    def build_net(self) -> nn.Module:
        s = self.spec
        body, features = build_body(s.config.net, s.input_shape, normalize=s.config.normalize)
        return MaskedTaskNet(body, features, s.n_classes, n_heads=s.max_tasks,
                             capacity=self.params.capacity, n_tasks=s.max_tasks)

    def build_optimizer(self) -> torch.optim.Optimizer:
        scores = [layer.scores for layer in self.net.masked_layers]
        score_ids = {id(p) for p in scores}
        rest = [p for p in self.net.parameters() if id(p) not in score_ids]
        cfg = self.spec.config.optimizer
        score_lr = self.params.score_lr or DEFAULT_SCORE_LR[cfg.name]
        return make_optimizer([{"params": rest},
                               {"params": scores, "lr": score_lr, "weight_decay": 0.0}], cfg)

    # --- the algorithm -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        return self.net(x, slot, self.fixed_mask(slot))

    def fixed_mask(self, slot: int) -> torch.Tensor | None:
        """Task `slot`'s stored mask (flat booleans), or None while it still learns one."""
        return self.masks.mask(slot).to(self.device) if slot in self.masks else None

    def task_module(self, task: str) -> nn.Module:
        slot = self.slot(task)
        return self.net.task_module(slot, self.fixed_mask(slot)).cpu().eval()

    def learn(self, x: torch.Tensor, y: torch.Tensor, slot: int) -> StepStats:
        self.optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.forward(x, slot), y)
        loss.backward()
        with self.frozen_weights_kept():
            self.step(loss, self.optimizer.step)
        return StepStats(loss.detach())

    def begin_task(self, slot: int) -> None:
        if slot in self.masks:  # a returning task keeps its subnetwork and its head
            return
        if self.params.head_warm_start and self.finished:
            heads = self.net.heads
            heads[slot].load_state_dict(heads[self.finished[-1]].state_dict())
        full = [i for i, used in enumerate(self.net.split(self.used)) if used.all()]
        if full:
            self.count("tasks_without_free_weights")
            log.warning("WSN: free capacity exhausted in maskable layer(s) %s: task slot %d can "
                        "only reuse frozen weights there", full, slot)

    def consolidate(self, slot: int) -> None:
        if slot in self.masks:  # a returning task: its subnetwork is already fixed
            return
        mask = self.net.learned_mask()
        self.masks.store(slot, mask)
        self.used |= mask
        self.finished.append(slot)
        self.capacity_used.append(self.used.float().mean().item())
        self.frozen = self.frozen_entries()
        log.info("WSN: task slot %d fixed; %.1f%% of maskable weights used", slot,
                 100 * self.capacity_used[-1])

    # --- frozen weights ------------------------------------------------------------------------
    def frozen_entries(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """(parameter, boolean where-frozen) pairs: weights in M, and the shared biases once any
        task is finished (they belong to every task)."""
        layers = self.net.masked_layers
        frozen = list(zip((layer.weight for layer in layers), self.net.split(self.used),
                          strict=True))
        if self.finished:
            frozen += [(layer.layer.bias, torch.ones_like(layer.layer.bias, dtype=torch.bool))
                       for layer in layers if layer.layer.bias is not None]
        return [(p, where) for p, where in frozen if where.any()]

    @contextmanager
    def frozen_weights_kept(self) -> Iterator[None]:
        """Around an optimiser step: zero the frozen entries' gradient, then restore their values
        (momentum or weight decay would otherwise still move them)."""
        frozen = self.frozen
        for p, where in frozen:
            if p.grad is not None:
                p.grad.masked_fill_(where, 0.0)
        before = [p.detach().clone() for p, _ in frozen]
        yield
        with torch.no_grad():
            for (p, where), old in zip(frozen, before, strict=True):
                p.copy_(torch.where(where, old, p))

    # --- reporting and checkpoints -------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        return {"tasks_without_free_weights": 0, **super().stats(),
                "capacity_used_after_task": list(self.capacity_used)}

    def footprint(self) -> Footprint:
        """Training state: besides the net's weights, its scores (and their Adam moments) and
        every task's head, the packed masks, the map of used weights with its frozen views and
        the unpacked mask of the task last run. Deployable: weights, heads, BatchNorms and the
        packed masks, not the scores."""
        fp = super().footprint()
        layers = self.net.masked_layers
        kept = [self.method_state(), self.used, [where for _, where in self.frozen],
                [layer.task_mask for layer in layers if layer.task_mask is not None]]
        fp.method_state_bytes = tensor_bytes(kept)
        scores = {id(layer.scores) for layer in layers}
        served = [p for p in self.net.parameters() if id(p) not in scores]
        fp.deployable_bytes = tensor_bytes([*served, *self.net.buffers(), self.method_state()])
        fp.details.update(self.masks.footprint())
        fp.details["capacity_used"] = self.capacity_used[-1] if self.capacity_used else 0.0
        return fp

    def method_state(self) -> dict[str, Any]:
        return {"masks": self.masks.state_dict(), "finished": list(self.finished),
                "capacity_used": list(self.capacity_used)}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.masks.load_state_dict(state["masks"])
        self.used = self.masks.union().to(self.device)
        self.finished = list(state["finished"])
        self.capacity_used = list(state["capacity_used"])
        self.frozen = self.frozen_entries()

