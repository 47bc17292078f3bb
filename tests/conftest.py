"""Shared test helpers: tiny learners on synthetic data (fast, no dataset needed)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from edgecl.config import build_config
from edgecl.learners import Learner, LearnerSpec, build_learner


def make_learner(method: str = "finetune", head: str = "shared", input_shape=(1, 4, 4),
                 n_classes: int = 3, max_tasks: int = 3, params: dict[str, Any] | None = None,
                 **overrides: Any) -> Learner:
    """A tiny CPU learner; `params` are the method's own, `overrides` other config sections."""
    data = {"seed": 0, "device": "cpu", "net": {"name": "mlp", "hidden": [16, 16]},
            "optimizer": {"name": "sgd", "lr": 0.1}, "memory": {"per_task": 8},
            "method": {"name": method, **(params or {})}}
    for key, value in overrides.items():
        data[key] = {**data[key], **value} if isinstance(data.get(key), dict) else value
    spec = LearnerSpec(build_config(data), tuple(input_shape), n_classes, head, max_tasks)
    return build_learner(spec)


def task_batches(task: int, n_batches: int = 5, batch: int = 8, input_shape=(1, 4, 4),
                 n_classes: int = 3, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A separable synthetic task: the label is where a task-specific template is brightest."""
    g = torch.Generator().manual_seed(1000 * task + seed)
    templates = (torch.rand(n_classes, *input_shape, generator=g) > 0.5).float()
    out = []
    for _ in range(n_batches):
        y = torch.randint(0, n_classes, (batch,), generator=g)
        x = templates[y] + 0.05 * torch.rand(batch, *input_shape, generator=g)
        out.append((x, y))
    return out


@pytest.fixture
def learner_factory():
    return make_learner
