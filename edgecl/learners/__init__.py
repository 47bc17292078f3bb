"""Continual-learning methods, one file each, registered by name.

Methods are imported on first use, so the CLI starts fast and a method's dependencies load only
when it runs.
"""

from __future__ import annotations

from pydantic import BaseModel

from edgecl.config import MethodConfig
from edgecl.learners.base import (
    MAX_NONFINITE_STREAK,
    Footprint,
    Learner,
    LearnerDiverged,
    LearnerSpec,
    StepStats,
    first_nonfinite,
)
from edgecl.registry import LEARNER_CLASSES, LEARNERS, resolve


def learner_class(name: str) -> type[Learner]:
    try:
        path = LEARNER_CLASSES[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; valid: {', '.join(LEARNERS)}") from None
    return resolve(path)


def method_params(method: MethodConfig) -> BaseModel:
    """Validate a method section's hyper-parameters against that method's `Params`."""
    return learner_class(method.name).Params.model_validate(method.params)


def build_learner(spec: LearnerSpec) -> Learner:
    return learner_class(spec.config.method.name)(spec)


__all__ = ["LEARNERS", "MAX_NONFINITE_STREAK", "Footprint", "Learner", "LearnerDiverged",
           "LearnerSpec", "StepStats", "build_learner", "first_nonfinite", "learner_class",
           "method_params"]
