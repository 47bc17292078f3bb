"""Continual-learning methods, one file each, registered by name."""

from __future__ import annotations

from pydantic import BaseModel

from edgecl.config import MethodConfig
from edgecl.learners.base import Footprint, Learner, LearnerSpec, StepStats
from edgecl.learners.finetune import FineTune
from edgecl.learners.independent import Independent

LEARNERS: dict[str, type[Learner]] = {cls.name: cls for cls in (FineTune, Independent)}


def learner_class(name: str) -> type[Learner]:
    try:
        return LEARNERS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; valid: {', '.join(LEARNERS)}") from None


def method_params(method: MethodConfig) -> BaseModel:
    """Validate a method section's hyper-parameters against that method's `Params`."""
    return learner_class(method.name).Params.model_validate(method.params)


def build_learner(spec: LearnerSpec) -> Learner:
    return learner_class(spec.config.method.name)(spec)


__all__ = ["LEARNERS", "Footprint", "Learner", "LearnerSpec", "StepStats", "build_learner",
           "learner_class", "method_params"]
