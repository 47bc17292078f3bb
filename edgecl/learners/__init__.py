"""Continual-learning methods, one file each, registered by name.

Methods are imported on first use, so the CLI starts fast and a method's dependencies load only
when it runs.
"""

from __future__ import annotations

import dataclasses
import importlib

from pydantic import BaseModel

from edgecl.config import ConfigError, MethodConfig
from edgecl.learners.base import Footprint, Learner, LearnerSpec, StepStats

# name -> "module:Class", in the order comparisons list them.
_REGISTRY: dict[str, str] = {
    "finetune": "edgecl.learners.finetune:FineTune",
    "independent": "edgecl.learners.independent:Independent",
    "ewc": "edgecl.learners.ewc:EWC",
    "mas": "edgecl.learners.mas:MAS",
    "lwf": "edgecl.learners.lwf:LwF",
    "agem": "edgecl.learners.gem:AGEM",
    "gem": "edgecl.learners.gem:GEM",
    "wsn": "edgecl.learners.wsn:WSN",
}
LEARNERS: tuple[str, ...] = tuple(_REGISTRY)


def learner_class(name: str) -> type[Learner]:
    try:
        module, cls = _REGISTRY[name].split(":")
    except KeyError:
        raise KeyError(f"unknown method {name!r}; valid: {', '.join(LEARNERS)}") from None
    return getattr(importlib.import_module(module), cls)


def method_params(method: MethodConfig) -> BaseModel:
    """Validate a method section's hyper-parameters against that method's `Params`."""
    return learner_class(method.name).Params.model_validate(method.params)


def build_learner(spec: LearnerSpec) -> Learner:
    return learner_class(spec.config.method.name)(spec)


def check_learner(spec: LearnerSpec) -> None:
    """Build `spec`'s learner on the CPU and drop it, so that whatever the method refuses (a
    memory budget too small for max_tasks beside its decode buffer, WSN capacities that do not
    fit the net) is refused before any training, as a one-line ConfigError."""
    cpu = dataclasses.replace(spec, config=spec.config.model_copy(update={"device": "cpu"}))
    try:
        build_learner(cpu)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"{spec.config.method.name}: {e}") from None


__all__ = ["LEARNERS", "Footprint", "Learner", "LearnerSpec", "StepStats", "build_learner",
           "check_learner", "learner_class", "method_params"]
