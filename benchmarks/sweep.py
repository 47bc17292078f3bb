"""Sweep a preset's settings on the validation split; report the chosen one's test ACC.

Each `--set KEY VALUE...` names a config key by its dotted path (`method.ref_batch`,
`optimizer.lr`, `benchmark.name`) and the values to try, each read as YAML (`0.1`, `true`,
`[0.3, 0.5]`). Every combination of the sets runs once per seed with
`benchmark.evaluate_on: validation`: the tasks train on 7/8 of the training split and R is
measured on the held-out 1/8, never on the test split. One line each reports its validation ACC
per seed, mean ± std, and the mean training time (`train_s`). The setting with the best mean
validation ACC is chosen; with `--test` it is then run on the test split (same seeds), the only
test numbers the sweep prints. The presets' comments quote sweeps made with it, e.g.

    .venv/bin/python benchmarks/sweep.py --config models/agem.yaml --seeds 0 1 2 --test \\
        --set method.ref_batch 256 512
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from pathlib import Path
from typing import Any

import yaml

from edgecl.cli import use_threads
from edgecl.config import deep_merge
from edgecl.protocol import run_protocol
from edgecl.setup import benchmark_for, load_config


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--config", type=Path, required=True, help="the preset to start from")
    p.add_argument("--set", nargs="+", action="append", default=[], metavar="KEY VALUE",
                   help="a dotted config key and the values to try (repeatable)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="[0 1 2]")
    p.add_argument("--test", action="store_true",
                   help="run the setting chosen on validation on the test split too")
    args = p.parse_args()
    for key, *values in args.set:
        if not values:
            p.error(f"--set {key}: give at least one value")
    return args


def nested(key: str, value: Any) -> dict[str, Any]:
    """{"a": {"b": value}} for the key "a.b"."""
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def run(config: Path, overrides: dict[str, Any], seeds: list[int], evaluate_on: str
        ) -> tuple[list[float], list[float]]:
    """ACC and train_s of each seed."""
    accs, train_s = [], []
    for seed in seeds:
        cfg = load_config(config, deep_merge(overrides, {
            "seed": seed, "benchmark": {"evaluate_on": evaluate_on}}))
        use_threads(cfg.threads)
        result, _ = run_protocol(cfg, benchmark_for(cfg))
        accs.append(result["acc"])
        train_s.append(result["train_s"])
    return accs, train_s


def mean_std(values: list[float], digits: int = 4, signed: bool = False) -> str:
    """"mean ± sample std" (std 0 for one value)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    sign = "+" if signed else ""
    return f"{statistics.mean(values):{sign}.{digits}f} ± {std:.{digits}f}"


def main() -> None:
    args = parse_args()
    keys = [key for key, *_ in args.set]
    choices = [[yaml.safe_load(v) for v in values] for _, *values in args.set]
    best: tuple[float, str, dict[str, Any]] | None = None
    for combo in itertools.product(*choices):
        overrides: dict[str, Any] = {}
        for key, value in zip(keys, combo, strict=True):
            overrides = deep_merge(overrides, nested(key, value))
        accs, train_s = run(args.config, overrides, args.seeds, "validation")
        setting = ", ".join(f"{k}={v}" for k, v in zip(keys, combo, strict=True)) or "preset"
        print(f"{setting}: validation ACC {' '.join(f'{a:.4f}' for a in accs)}; "
              f"{mean_std(accs)}; train_s {statistics.mean(train_s):.2f}", flush=True)
        if best is None or statistics.mean(accs) > best[0]:
            best = (statistics.mean(accs), setting, overrides)
    assert best is not None
    print(f"chosen on validation: {best[1]} ({best[0]:.4f})", flush=True)
    if args.test:
        accs, _ = run(args.config, best[2], args.seeds, "test")
        print(f"{best[1]}: test ACC {' '.join(f'{a:.4f}' for a in accs)}; {mean_std(accs)}")


if __name__ == "__main__":
    main()
