"""The names edgecl accepts for benchmarks and methods, and where each lives.

Only names and "module:attribute" paths: reading them imports nothing (no torch, no data), so
the command line lists them in its help at no cost. `edgecl.data.load_benchmark` and
`edgecl.learners.learner_class` import what a name points to on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

# benchmark name -> its loader, (n_tasks, samples_per_task, seed, data_dir, validation) -> Benchmark
BENCHMARK_LOADERS: dict[str, str] = {
    "pmnist": "edgecl.data.pmnist:load",
    "rotmnist": "edgecl.data.rotmnist:load",
    "splitmnist": "edgecl.data.splitmnist:load",
    "mnist1d": "edgecl.data.mnist1d:load",
    "cifar100": "edgecl.data.cifar100:load",
    "basicmotions": "edgecl.data.sensors:load_basicmotions",
    "basicmotions-classes": "edgecl.data.sensors:load_basicmotions_classes",
    "japanesevowels": "edgecl.data.sensors:load_japanesevowels",
}
BENCHMARKS: tuple[str, ...] = tuple(BENCHMARK_LOADERS)
# those whose data a user brings (`data_dir`): every other one ships in a package
NEEDS_DATA_DIR: frozenset[str] = frozenset({"cifar100"})

# method name -> its Learner class, in the order comparisons list them
LEARNER_CLASSES: dict[str, str] = {
    "finetune": "edgecl.learners.finetune:FineTune",
    "independent": "edgecl.learners.independent:Independent",
    "ewc": "edgecl.learners.ewc:EWC",
    "mas": "edgecl.learners.mas:MAS",
    "lwf": "edgecl.learners.lwf:LwF",
    "agem": "edgecl.learners.gem:AGEM",
    "er": "edgecl.learners.replay:ER",
    "der": "edgecl.learners.replay:DER",
    "gem": "edgecl.learners.gem:GEM",
    "wsn": "edgecl.learners.wsn:WSN",
}
LEARNERS: tuple[str, ...] = tuple(LEARNER_CLASSES)


def resolve(path: str) -> Any:
    """The attribute a "module:attribute" path names, its module imported."""
    module, attribute = path.split(":")
    return getattr(importlib.import_module(module), attribute)
