"""Sweep a preset's settings: the benchmark protocol for every combination of values and seed.

Each `--set KEY VALUE...` names a config key by its dotted path (`method.ref_batch`,
`optimizer.lr`, `benchmark.name`) and the values to try, each read as YAML (`0.1`, `true`,
`[0.3, 0.5]`). Every combination of the sets runs once per seed; one line each reports its ACC
per seed, their mean, and the mean training time (`train_s`). The presets' comments quote sweeps
made with it, e.g.

    .venv/bin/python benchmarks/sweep.py --config models/agem.yaml --seeds 0 1 2 3 4 \\
        --set method.ref_batch 128 256 384 512 1024
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from pathlib import Path
from typing import Any

import yaml

from edgecl.bench import load_config_benchmark, run_protocol
from edgecl.config import deep_merge, load_config


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--config", type=Path, required=True, help="the preset to start from")
    p.add_argument("--set", nargs="+", action="append", default=[], metavar="KEY VALUE",
                   help="a dotted config key and the values to try (repeatable)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="[0]")
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


def main() -> None:
    args = parse_args()
    keys = [key for key, *_ in args.set]
    choices = [[yaml.safe_load(v) for v in values] for _, *values in args.set]
    for combo in itertools.product(*choices):
        overrides: dict[str, Any] = {}
        for key, value in zip(keys, combo, strict=True):
            overrides = deep_merge(overrides, nested(key, value))
        accs, train_s = [], []
        for seed in args.seeds:
            cfg = load_config(args.config, {**overrides, "seed": seed})
            result, _ = run_protocol(cfg, load_config_benchmark(cfg))
            accs.append(result["acc"])
            train_s.append(result["train_s"])
        setting = ", ".join(f"{k}={v}" for k, v in zip(keys, combo, strict=True)) or "preset"
        print(f"{setting}: ACC {' '.join(f'{a:.4f}' for a in accs)}; mean "
              f"{statistics.mean(accs):.4f}; train_s {statistics.mean(train_s):.2f}", flush=True)


if __name__ == "__main__":
    main()
