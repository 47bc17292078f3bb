"""YAML -> typed, validated configuration.

A config is one complete learner setup: benchmark, net, method, optimiser, memory. Every key is
checked; an unknown key or a bad value raises `ConfigError` with one line naming the key and why.
This module knows nothing of the methods: `edgecl.setup` completes a config with a method's
defaults and checks its hyper-parameters against the method's own `Params`.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
)


class ConfigError(ValueError):
    """A configuration problem, stated in one line that names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MLPConfig(_Strict):
    name: Literal["mlp"] = "mlp"
    hidden: list[PositiveInt] = [100, 100]


class ResNetConfig(_Strict):
    name: Literal["resnet18"]
    nf: PositiveInt = 20


class Conv1dConfig(_Strict):
    name: Literal["conv1d"]
    channels: list[PositiveInt] = Field(default=[32, 64, 64], min_length=1)
    kernel_size: PositiveInt = 5


NetConfig = Annotated[MLPConfig | ResNetConfig | Conv1dConfig, Field(discriminator="name")]
# each net by its union tag ("mlp", ...): pydantic puts the tags in error paths
NET_MODELS: dict[str, type[BaseModel]] = {get_args(net.model_fields["name"].annotation)[0]: net
                                          for net in get_args(get_args(NetConfig)[0])}
NET_TAGS = frozenset(NET_MODELS)


class OptimizerConfig(_Strict):
    name: Literal["sgd", "adam"] = "sgd"
    lr: PositiveFloat = 0.03
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.0
    weight_decay: NonNegativeFloat = 0.0
    # optimiser steps on each incoming batch (La-MAML's "glances"): small tasks, few batches
    steps_per_batch: PositiveInt = 1


class MemoryConfig(_Strict):
    """Episodic memory: `per_task` slots per task inside a hard `budget_bytes` (None: no cap)."""

    per_task: PositiveInt = 256
    budget_bytes: PositiveInt | None = None
    dtype: Literal["float32", "float16", "uint8"] = "float32"


class BenchmarkConfig(_Strict):
    """`n_tasks` / `samples_per_task` of None: the benchmark's default ("all": every sample)."""

    name: str = "pmnist"
    n_tasks: PositiveInt | None = None
    samples_per_task: PositiveInt | Literal["all"] | None = None
    batch_size: PositiveInt = 10
    data_dir: str | None = None
    # "validation": train on 7/8 of the training split, evaluate on the held-out 1/8 (never on
    # the test split): how hyper-parameters are chosen (benchmarks/sweep.py).
    evaluate_on: Literal["test", "validation"] = "test"


ClassNames = Annotated[list[str], Field(min_length=2)]  # label names, in index order


class StreamConfig(_Strict):
    """What `edgecl learn` accepts: the sample schema (`edgecl.setup.stream_schema` says where
    the keys left out come from)."""

    input_shape: list[PositiveInt] | None = Field(default=None, min_length=1)
    # one list for every task, or a list per task name (a head per task, each its own names)
    classes: ClassNames | dict[str, ClassNames] | None = None
    head: Literal["shared", "per_task"] | None = None
    max_tasks: PositiveInt | None = None
    batch_size: PositiveInt | None = None


class LearnConfig(_Strict):
    """The `edgecl learn` daemon: held-out share, checkpoints, backpressure, request limits."""

    holdout: Annotated[float, Field(ge=0, lt=1)] = 0.05
    eval_per_task: PositiveInt = 500  # held-out samples kept per task (the newest)
    checkpoint_every: PositiveInt = 20_000  # samples learned between checkpoints
    checkpoint_seconds: PositiveFloat = 60.0
    keep_checkpoints: PositiveInt = 3
    max_lag: PositiveInt = 50_000  # journaled but not yet learned; beyond it ingest says 429
    max_request_samples: PositiveInt = 10_000
    max_body_mb: PositiveFloat = 32.0
    flush_idle_s: PositiveFloat = 5.0  # a partial batch waiting this long is closed (journaled)
    # an end of task that names a count of samples waits this long for them to arrive
    end_wait_s: PositiveFloat = 30.0
    # idle rehearsal (replay methods): once no record has arrived for `rehearse_after_s`, the
    # daemon takes up to `rehearse_steps` extra steps on its memory (0: none), journaled
    rehearse_steps: NonNegativeInt = 0
    rehearse_after_s: PositiveFloat = 10.0
    # fleet learning (learn --fleet): memory steps the replay methods take right after each
    # aggregate (FedAvg's local steps), so the device fits its own tasks to the fleet's body.
    # 100 is a first choice, not tuned on a validation split (docs/fleet.md compares 0 and 100)
    fleet_rehearse_steps: NonNegativeInt = 100


class MethodConfig(BaseModel):
    """`name` plus the method's own hyper-parameters (validated against its `Params`)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str = "finetune"

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Config(_Strict):
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # torch's CPU threads (intra-op; inter-op is 1). Not torch's default of one per core: on a
    # device the learner shares the cores with ingest, serve and the sensor process.
    threads: PositiveInt = 1
    # "channel": the model standardises each input channel itself, with statistics fitted from
    # the stream's first task (edgecl.nets.norm), so it takes raw sensor values. "auto": channel
    # for inputs shaped [channels, steps] (sensor windows), none for anything else (images).
    normalize: Literal["auto", "none", "channel"] = "auto"
    head: Literal["auto", "shared", "per_task"] = "auto"
    max_tasks: PositiveInt | None = None
    benchmark: BenchmarkConfig = BenchmarkConfig()
    net: NetConfig = MLPConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    memory: MemoryConfig = MemoryConfig()
    method: MethodConfig = MethodConfig()
    stream: StreamConfig = StreamConfig()
    learn: LearnConfig = LearnConfig()


def _keys_at(model: type[BaseModel], loc: Sequence[int | str]) -> list[str]:
    """The keys `model` allows in the mapping that holds the key at `loc` (a pydantic error
    path, the net's tag included)."""
    for part in loc[:-1]:
        model = NET_MODELS[part] if part in NET_TAGS else model.model_fields[part].annotation
    return list(model.model_fields)


def _unknown_key(key: str, valid: Sequence[str]) -> str:
    """'unknown key', the closest valid key if one is close, and every valid key."""
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown key{hint} (valid: {', '.join(valid)})"


def first_error(err: ValidationError, model: type[BaseModel], prefix: str = "",
                 also_valid: Sequence[str] = ()) -> str:
    """The first error as 'key.path: message'; `model` is the one validated, `also_valid` the
    keys its parent mapping holds beside its fields (a method section's `name`)."""
    e = err.errors()[0]
    # Discriminated unions put the tag ("mlp") in the path; it is noise to a reader.
    loc = [str(p) for p in e["loc"] if p not in NET_TAGS]
    if e["type"] == "extra_forbidden":
        msg = _unknown_key(loc[-1], [*also_valid, *_keys_at(model, e["loc"])])
    else:
        msg = e["msg"]
    if e["type"] == "union_tag_invalid":
        loc.append("name")
        msg = f"unknown net {e['ctx']['tag']!r}; valid: {e['ctx']['expected_tags']}"
    key = ".".join([prefix, *loc] if prefix else loc) or "(top level)"
    return f"{key}: {msg}"


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` wins; nested dicts merge key by key."""
    out = dict(base)
    for k, v in override.items():
        both_dicts = isinstance(v, dict) and isinstance(out.get(k), dict)
        out[k] = deep_merge(out[k], v) if both_dicts else v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as e:  # a folder, no permission...
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start} cannot be decoded)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ConfigError(f"{path}: the top level must be a mapping of keys, not {kind}")
    return data


def section_name(data: dict[str, Any], section: str, model: type[BaseModel]) -> Any:
    """The `name` that `data[section]` gives, else `model`'s default name."""
    part = data.get(section)
    default = model.model_fields["name"].default
    return part.get("name", default) if isinstance(part, dict) else default


def validate_config(data: dict[str, Any], source: str = "config") -> Config:
    """`data` as a `Config`, or a one-line `ConfigError` naming the key. A method's own
    hyper-parameters are checked by `edgecl.setup.build_config`, which knows the methods."""
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: {first_error(e, Config)}") from None
