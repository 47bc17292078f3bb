"""Hyper-parameters chosen on the validation split: a grid search, its table and its preset.

A grid maps dotted config keys (`optimizer.lr`, `method.strength`) to the values to try; every
combination (a setting) runs once per seed with `benchmark.evaluate_on: validation`, so the
tasks train on 7/8 of their training split and R is measured on the held-out 1/8. The setting
with the best mean validation ACC is chosen. Nothing here reads a test split: every config it
builds evaluates on validation. `edgecl tune` and `benchmarks/sweep.py` share this code.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from edgecl.config import Config, LearnConfig, StreamConfig, deep_merge
from edgecl.data import Benchmark
from edgecl.joint import joint_training
from edgecl.learners import LearnerDiverged
from edgecl.protocol import Progress, run_protocol
from edgecl.setup import benchmark_for, load_config

Grid = dict[str, list[Any]]  # dotted config key -> the values to try
Setting = dict[str, Any]  # dotted config key -> one value
LR_FACTORS = (1 / 3, 1.0, 3.0)  # the default grid: the method's learning rate times these


@dataclass(frozen=True)
class Trial:
    """One setting's runs: validation ACC and training seconds per seed that did not diverge,
    and how many seeds did (a setting that diverged on any is never chosen over one that did
    not)."""

    setting: Setting
    accs: list[float]
    train_s: list[float]
    diverged: int = 0

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.setting.items()) or "defaults"

    @property
    def acc(self) -> float:
        return statistics.mean(self.accs) if self.accs and not self.diverged else -math.inf

    @property
    def summary(self) -> str:
        """Validation ACC as mean ± std, saying on how many seeds it diverged."""
        if not self.accs:
            return f"diverged on all {self.diverged} seed(s)"
        said = mean_std(self.accs)
        return f"{said} (diverged on {self.diverged} more)" if self.diverged else said


def nested(key: str, value: Any) -> dict[str, Any]:
    """{"a": {"b": value}} for the key "a.b"."""
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def settings(grid: Grid) -> list[Setting]:
    """Every combination of the grid's values, in the grid's order."""
    return [dict(zip(grid, combo, strict=True)) for combo in itertools.product(*grid.values())]


def seed_configs(config: Path | None, overrides: dict[str, Any], setting: Setting,
                 seeds: list[int], evaluate_on: str = "validation") -> list[Config]:
    """The config of `config` + `overrides` + `setting` for each seed (a `ConfigError` names a
    bad key or value)."""
    for key, value in setting.items():
        overrides = deep_merge(overrides, nested(key, value))
    return [load_config(config, deep_merge(overrides, {
        "seed": seed, "benchmark": {"evaluate_on": evaluate_on}})) for seed in seeds]


def default_grid(cfg: Config) -> Grid:
    """The method's learning rate (as `cfg` resolves it) a third, once and three times."""
    return {"optimizer.lr": [float(f"{cfg.optimizer.lr * f:.2g}") for f in LR_FACTORS]}


class Benchmarks:
    """Each config's benchmark, loaded once per (benchmark section, seed): a grid's settings
    share their data."""

    def __init__(self) -> None:
        self._loaded: dict[tuple[str, int], Benchmark] = {}

    def __call__(self, cfg: Config) -> Benchmark:
        key = (cfg.benchmark.model_dump_json(), cfg.seed)
        if key not in self._loaded:
            self._loaded[key] = benchmark_for(cfg)
        return self._loaded[key]


def run_trial(setting: Setting, configs: list[Config],
              load: Callable[[Config], Benchmark] = benchmark_for,
              progress: Progress | None = None) -> Trial:
    """Run the protocol once per config (one per seed); a seed on which the learner diverges
    is counted, not fatal: the grid goes on."""
    accs, train_s, diverged = [], [], 0
    for cfg in configs:
        try:
            result, _ = run_protocol(cfg, load(cfg), progress)
        except LearnerDiverged:
            diverged += 1
            continue
        accs.append(result["acc"])
        train_s.append(result["train_s"])
    return Trial(setting, accs, train_s, diverged)


def best(trials: list[Trial]) -> Trial:
    """The trial with the highest mean ACC (the first of equals)."""
    return max(trials, key=lambda t: t.acc)


def offline_bound(configs: list[Config], load: Callable[[Config], Benchmark] = benchmark_for
                  ) -> list[float]:
    """Joint training's ACC (`edgecl.joint`) for each config: the ceiling of its net."""
    return [float(joint_training(cfg, load(cfg))["acc"]) for cfg in configs]


def mean_std(values: list[float], digits: int = 4, signed: bool = False) -> str:
    """"mean ± sample std" (std 0 for one value)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    sign = "+" if signed else ""
    return f"{statistics.mean(values):{sign}.{digits}f} ± {std:.{digits}f}"


def preset_yaml(cfg: Config, trials: list[Trial], chosen: Trial, command: str) -> str:
    """`cfg` as a complete preset evaluated on the test split, its comment saying how it was
    chosen: every setting's validation ACC and the command that ran the search."""
    data = cfg.model_dump(mode="json")
    data["benchmark"]["evaluate_on"] = "test"
    for section, model in (("stream", StreamConfig), ("learn", LearnConfig)):
        if data[section] == model().model_dump(mode="json"):
            del data[section]
    lines = [f"# Chosen on the validation split of {cfg.benchmark.name} (about 1/8 of each task's",
             "# training samples held out; the test split never read), by mean validation ACC",
             f"# over {len(chosen.accs)} seed(s), with: {command}",
             *(f"#   {t.label}: {t.summary}{'  <- chosen' if t is chosen else ''}"
               for t in trials)]
    return "\n".join(lines) + "\n" + yaml.safe_dump(data, sort_keys=False, default_flow_style=None)
