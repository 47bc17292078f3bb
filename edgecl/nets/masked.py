"""Maskable layers for WSN (Kang et al., ICML 2022): one set of weights, one binary mask per task.

Every Linear/Conv1d/Conv2d of a body becomes a `MaskedLayer`: it keeps the dense layer's weight W
and adds a score tensor s of W's shape. While a task learns, its mask m is the top-c fraction of
|s| in that layer (c = capacity) and the layer computes with W ⊙ m; the mask's gradient passes
straight through to |s|, so the scores learn which weights the task uses. A finished task's mask
is fixed and handed back in (`MaskedTaskNet.forward(x, slot, mask)`). Each BatchNorm becomes a
`TaskBatchNorm` (one BatchNorm per task slot), so no task moves another task's statistics or
affine parameters. `task_module(slot, mask)` folds W ⊙ m into plain layers for export.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from edgecl.nets import TaskNet

MASKABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


def top_c_mask(scores: torch.Tensor, capacity: float) -> torch.Tensor:
    """1.0 at the `capacity` fraction of largest |scores|, else 0.0, with a straight-through
    gradient: backward treats the mask as |scores| itself."""
    magnitude = scores.abs()
    k = max(1, round(capacity * scores.numel()))
    hard = torch.zeros(scores.numel(), dtype=scores.dtype, device=scores.device)
    hard[magnitude.detach().flatten().topk(k, sorted=False).indices] = 1.0
    # (magnitude - magnitude.detach()) is exactly 0: the value is the hard mask, bit for bit.
    return hard.view_as(scores) + (magnitude - magnitude.detach())


class MaskedLayer(nn.Module):
    """A dense layer computing with W ⊙ m: m is a finished task's `task_mask`, or top-c(scores)."""

    def __init__(self, layer: nn.Linear | nn.Conv1d | nn.Conv2d, capacity: float) -> None:
        super().__init__()
        if not 0 < capacity <= 1:
            raise ValueError(f"capacity must be in (0, 1]; got {capacity}")
        self.layer = layer
        self.capacity = capacity
        self.scores = nn.Parameter(torch.empty_like(layer.weight))
        nn.init.kaiming_uniform_(self.scores, a=math.sqrt(5))  # the WSN reference's choice
        self.task_mask: torch.Tensor | None = None  # set by MaskedTaskNet.select; not state

    @property
    def weight(self) -> nn.Parameter:
        return self.layer.weight

    def learned_mask(self) -> torch.Tensor:
        """The mask the scores choose now (booleans)."""
        return top_c_mask(self.scores.detach(), self.capacity).bool()

    def mask(self) -> torch.Tensor:
        if self.task_mask is not None:
            return self.task_mask
        return top_c_mask(self.scores, self.capacity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.layer.weight * self.mask()
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, weight, self.layer.bias)
        return self.layer._conv_forward(x, weight, self.layer.bias)

    def dense(self) -> nn.Module:
        """A plain copy of the layer with W ⊙ m folded into its weight."""
        layer = copy.deepcopy(self.layer)
        layer.weight = nn.Parameter((self.layer.weight * self.mask()).detach().clone())
        return layer


class TaskBatchNorm(nn.Module):
    """One BatchNorm (statistics and affine parameters) per task slot; `slot` picks the one used."""

    def __init__(self, norm: nn.modules.batchnorm._BatchNorm, n_tasks: int) -> None:
        super().__init__()
        self.norms = nn.ModuleList(copy.deepcopy(norm) for _ in range(n_tasks))
        self.slot = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norms[self.slot](x)


def _replace(module: nn.Module, convert: Callable[[nn.Module], nn.Module | None]) -> nn.Module:
    """Replace, in place, every descendant for which `convert` returns a module."""
    for name, child in module.named_children():
        new = convert(child)
        if new is None:
            _replace(child, convert)
        else:
            setattr(module, name, new)
    return module


def _fold(module: nn.Module) -> nn.Module | None:
    if isinstance(module, MaskedLayer):
        return module.dense()
    if isinstance(module, TaskBatchNorm):
        return module.norms[module.slot]
    return None


class MaskedTaskNet(TaskNet):
    """A `TaskNet` whose body's layers are masked (one capacity, or one per layer) and whose
    BatchNorms are per task. Masks travel as one flat vector over all maskable weights, in
    `masked_layers` order."""

    def __init__(self, body: nn.Module, features: int, n_classes: int, n_heads: int,
                 capacity: float | Sequence[float], n_tasks: int) -> None:
        n_layers = sum(isinstance(m, MASKABLE) for m in body.modules())
        capacities = [capacity] * n_layers if isinstance(capacity, float | int) else capacity
        if len(capacities) != n_layers:
            raise ValueError(f"{len(capacities)} capacities given for {n_layers} maskable layers")
        per_layer = iter(capacities)

        def convert(m: nn.Module) -> nn.Module | None:
            if isinstance(m, MASKABLE):
                return MaskedLayer(m, float(next(per_layer)))
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                return TaskBatchNorm(m, n_tasks)
            return None

        super().__init__(_replace(body, convert), features, n_classes, n_heads)
        self.masked_layers = [m for m in self.body.modules() if isinstance(m, MaskedLayer)]
        self.task_norms = [m for m in self.body.modules() if isinstance(m, TaskBatchNorm)]

    @property
    def n_weights(self) -> int:
        return sum(layer.weight.numel() for layer in self.masked_layers)

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Per-layer views (weight-shaped) of a flat per-weight vector."""
        sizes = [layer.weight.numel() for layer in self.masked_layers]
        return [part.view_as(layer.weight)
                for part, layer in zip(flat.split(sizes), self.masked_layers, strict=True)]

    def learned_mask(self) -> torch.Tensor:
        """The flat boolean mask the scores choose now."""
        return torch.cat([layer.learned_mask().flatten() for layer in self.masked_layers])

    def select(self, slot: int, mask: torch.Tensor | None) -> None:
        """Route the next passes to task `slot`: its fixed flat `mask`, or None to learn one."""
        parts = self.split(mask) if mask is not None else [None] * len(self.masked_layers)
        for layer, part in zip(self.masked_layers, parts, strict=True):
            layer.task_mask = part
        for norm in self.task_norms:
            norm.slot = slot

    def forward(self, x: torch.Tensor, slot: int = 0, mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        self.select(slot, mask)
        return super().forward(x, slot)

    def task_module(self, slot: int, mask: torch.Tensor | None = None) -> nn.Module:
        """Task `slot`'s dense network (plain layers, W ⊙ m folded in), independent of this net."""
        self.select(slot, mask)
        body = _replace(copy.deepcopy(self.body), _fold)
        return nn.Sequential(body, copy.deepcopy(self.heads[self.head_index(slot)]))
