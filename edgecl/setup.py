"""Setup, resolved once: a config and a cheap description of the data -> what a run needs.

`edgecl bench`, `edgecl learn`, export and the offline bound all take their setup from here, and
nothing else works it out: the validated `Config`, the `LearnerSpec` a learner is built from, and
the `SampleSchema` a daemon's stream must follow. What it needs of the data is a `DataShape`
(input shape, class names, head, task count), never the tensors.

Where a setting comes from, highest first:

1. the config's own keys: the YAML file's, under the command line's options;
2. the method's tuned settings for the config's benchmark (`Learner.tuned`, beside each method);
3. the method's defaults: its `Params` and its `optimizer_defaults`;
4. the defaults of the config schema (`edgecl.config`).

A method's optimiser settings (2 and 3) apply only while the config names the same optimiser as
they do: WSN's Adam learning rate is no default for SGD. Naming another method on the command
line drops the file's `method` and `optimizer` sections, which belong to the file's method; naming
another benchmark drops the file's `n_tasks` and `samples_per_task`, which describe its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from edgecl.config import (
    BenchmarkConfig,
    Config,
    ConfigError,
    MethodConfig,
    OptimizerConfig,
    deep_merge,
    first_error,
    read_yaml,
    section_name,
    validate_config,
)
from edgecl.data import Benchmark, BenchmarkError, load_benchmark
from edgecl.learners import (
    LEARNERS,
    Learner,
    LearnerSpec,
    build_learner,
    learner_class,
    method_params,
)
from edgecl.nets import check_input_shape

HeadMode = Literal["shared", "per_task"]


# --- configs -------------------------------------------------------------------------------
def _method_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """`data` completed with its method's tuned settings and optimiser defaults (2 and 3 above),
    under every key it states itself."""
    method_name = section_name(data, "method", MethodConfig)
    try:
        cls = learner_class(method_name)
    except (KeyError, TypeError):
        return data  # an unknown method is reported by build_config, with the valid names
    tuned = cls.tuned.get(str(section_name(data, "benchmark", BenchmarkConfig)), {})
    defaults = {**cls.optimizer_defaults, **tuned.get("optimizer", {})}
    method = data.get("method")
    if tuned.get("method") and isinstance(method, dict):
        data = {**data, "method": {**tuned["method"], **method}}
    optimizer = data.get("optimizer", {})
    default_name = defaults.get("name", OptimizerConfig.model_fields["name"].default)
    if isinstance(optimizer, dict) and optimizer.get("name", default_name) == default_name:
        data = {**data, "optimizer": {**defaults, **optimizer}}
    return data


def build_config(data: dict[str, Any], source: str = "config") -> Config:
    """Validate a config mapping completed with its method's defaults, including the method's
    own hyper-parameters; a problem is one `ConfigError` line naming the key."""
    cfg = validate_config(_method_defaults(data), source)
    try:
        method_params(cfg.method)
    except ValidationError as e:
        params = learner_class(cfg.method.name).Params
        raise ConfigError(f"{source}: {first_error(e, params, 'method', ['name'])}") from None
    except KeyError as e:
        raise ConfigError(f"{source}: method.name: {e.args[0]}") from None
    return cfg


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read a YAML preset (or the defaults when `path` is None) under the command line's
    `overrides`, as the module's docstring orders them."""
    data = read_yaml(path) if path else {}
    overrides = overrides or {}
    new_method = overrides.get("method", {}).get("name")
    if new_method and new_method != section_name(data, "method", MethodConfig):
        data = {k: v for k, v in data.items() if k not in ("method", "optimizer")}
    new_bench = overrides.get("benchmark", {}).get("name")
    preset_bench = data.get("benchmark")
    if (isinstance(preset_bench, dict) and new_bench
            and new_bench != section_name(data, "benchmark", BenchmarkConfig)):
        counts = ("n_tasks", "samples_per_task")
        data = {**data, "benchmark": {k: v for k, v in preset_bench.items() if k not in counts}}
    return build_config(deep_merge(data, overrides), str(path) if path else "config")


def method_configs(config: Path | None, overrides: dict[str, Any]) -> list[Config]:
    """The config of `config` + `overrides`, or with method "all" one per registered method:
    each keeps the preset's benchmark and net, and a method other than the preset's runs with
    its own settings."""
    if overrides.get("method", {}).get("name") != "all":
        return [load_config(config, overrides)]
    return [load_config(config, {**overrides, "method": {"name": name}}) for name in LEARNERS]


DEFAULTS_TUNED_ON = "pmnist"  # the benchmark every method's defaults were chosen on


def untuned_methods(configs: list[Config], preset_method: str | None) -> list[str]:
    """The methods of `configs` that run settings nobody chose for their benchmark: neither
    the preset's own method (the preset states its settings) nor one with `tuned` settings
    for it; on pmnist, none (the defaults were chosen there)."""
    return [cfg.method.name for cfg in configs
            if cfg.benchmark.name != DEFAULTS_TUNED_ON and cfg.method.name != preset_method
            and cfg.benchmark.name not in learner_class(cfg.method.name).tuned]


# --- the data --------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataShape:
    """What setup needs to know of the data: no tensors."""

    input_shape: tuple[int, ...]
    classes: tuple[str, ...]  # label names in index order (indices as names when tasks differ)
    head: HeadMode
    n_tasks: int
    task_classes: dict[str, tuple[str, ...]] = field(default_factory=dict)  # when tasks differ

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @classmethod
    def of(cls, bench: Benchmark) -> DataShape:
        shared = {t.classes for t in bench.tasks}
        if len(shared) == 1:
            return cls(bench.input_shape, next(iter(shared)), bench.head, len(bench.tasks))
        return cls(bench.input_shape, tuple(str(k) for k in range(bench.n_classes)), bench.head,
                   len(bench.tasks), {t.name: t.classes for t in bench.tasks})


def benchmark_for(cfg: Config) -> Benchmark:
    """The benchmark `cfg.benchmark` describes, with its tensors."""
    b = cfg.benchmark
    return load_benchmark(b.name, n_tasks=b.n_tasks, samples_per_task=b.samples_per_task,
                          seed=cfg.seed, data_dir=b.data_dir,
                          validation=b.evaluate_on == "validation")


# --- learners --------------------------------------------------------------------------------
def learner_spec(cfg: Config, data: DataShape | Benchmark) -> LearnerSpec:
    """The learner `cfg` builds for `data`; `ConfigError` if they do not fit together."""
    data = data if isinstance(data, DataShape) else DataShape.of(data)
    max_tasks = cfg.max_tasks or data.n_tasks
    if max_tasks < data.n_tasks:
        raise ConfigError(f"max_tasks: {max_tasks} is fewer than the benchmark's "
                          f"{data.n_tasks} tasks")
    check_input_shape(cfg.net, data.input_shape)
    head = data.head if cfg.head == "auto" else cfg.head
    return LearnerSpec(cfg, data.input_shape, data.n_classes, head, max_tasks)


def new_learner(spec: LearnerSpec) -> Learner:
    """`spec`'s learner, built; what the method refuses (a memory budget too small for
    max_tasks beside its decode buffer, WSN capacities that do not fit the net) is a one-line
    `ConfigError` naming the method."""
    try:
        return build_learner(spec)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"{spec.config.method.name}: {e}") from None


# --- the daemon's stream ---------------------------------------------------------------------
DEFAULT_MAX_TASKS = 20  # a stream's max_tasks when neither it nor the config says


@dataclass(frozen=True)
class SampleSchema:
    """What one sample of a daemon's stream looks like, and the learner's limits on tasks and
    batches. `task_classes` holds each task's own class names when the stream declares them
    (a head per task); otherwise every task's labels are `classes`."""

    input_shape: tuple[int, ...]
    classes: tuple[str, ...]
    head: HeadMode
    max_tasks: int
    batch_size: int
    task_classes: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return math.prod(self.input_shape)

    @property
    def n_classes(self) -> int:
        """The head's width: the most classes any task has."""
        return max([len(self.classes), *map(len, self.task_classes.values())])

    def classes_of(self, task: str) -> tuple[str, ...]:
        """`task`'s class names (a task the stream did not declare: none)."""
        if self.task_classes:
            return self.task_classes.get(task, ())
        return self.classes

    def to_dict(self) -> dict[str, Any]:
        """As GET /v1/schema shows it."""
        return {"input_shape": list(self.input_shape), "classes": list(self.classes),
                "task_classes": {t: list(c) for t, c in self.task_classes.items()},
                "head": self.head, "max_tasks": self.max_tasks, "batch_size": self.batch_size}


def stream_schema(cfg: Config) -> SampleSchema:
    """The config's `stream:` section. With `input_shape` and `classes` in it, nothing else is
    needed: `head` defaults to the config's `head` (per_task where `classes` lists each task's
    names, else shared), `max_tasks` to the config's (else the number of tasks `classes`
    names, else DEFAULT_MAX_TASKS), `batch_size` to `benchmark.batch_size`. A section without
    `input_shape` or `classes` takes what it lacks from the config's benchmark, whose data it
    then loads."""
    s = cfg.stream
    task_classes = {t: tuple(c) for t, c in s.classes.items()} if isinstance(s.classes, dict) \
        else {}
    head = s.head or (None if cfg.head == "auto" else cfg.head)
    max_tasks = s.max_tasks or cfg.max_tasks
    if s.input_shape is not None and s.classes is not None:
        input_shape = tuple(s.input_shape)
        classes = () if task_classes else tuple(s.classes)
        head = head or ("per_task" if task_classes else "shared")
        max_tasks = max_tasks or len(task_classes) or DEFAULT_MAX_TASKS
    else:
        try:
            data = DataShape.of(benchmark_for(cfg))
        except BenchmarkError as e:
            raise ConfigError(f"stream: without input_shape and classes, the schema comes from "
                              f"the benchmark, which cannot be loaded: {e}") from None
        input_shape = tuple(s.input_shape or data.input_shape)
        head = head or data.head
        if s.classes is None and head == "per_task":  # each task's own names, if they differ
            task_classes = dict(data.task_classes)
        classes = () if task_classes else tuple(s.classes or data.classes)
        max_tasks = max_tasks or data.n_tasks
    for where, names in [("stream.classes", classes),
                         *((f"stream.classes.{t}", c) for t, c in task_classes.items())]:
        if len(set(names)) != len(names):
            raise ConfigError(f"{where}: class names must be distinct")
    if task_classes and head != "per_task":
        raise ConfigError("stream.classes: a class list per task needs a head per task "
                          "(head: per_task)")
    if len(task_classes) > max_tasks:
        raise ConfigError(f"stream.classes: {len(task_classes)} tasks named, more than "
                          f"max_tasks={max_tasks}")
    return SampleSchema(input_shape, classes, head, max_tasks,
                        s.batch_size or cfg.benchmark.batch_size, task_classes)


def stream_learner_spec(cfg: Config, schema: SampleSchema) -> LearnerSpec:
    """The learner a daemon with `schema` builds."""
    check_input_shape(cfg.net, schema.input_shape)
    return LearnerSpec(cfg, schema.input_shape, schema.n_classes, schema.head, schema.max_tasks)
