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
import math
import statistics
from pathlib import Path

import yaml

from edgecl.cli import use_threads
from edgecl.tune import Benchmarks, best, run_trial, seed_configs, settings


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


def main() -> None:
    args = parse_args()
    grid = {key: [yaml.safe_load(v) for v in values] for key, *values in args.set}
    load = Benchmarks()
    trials = []
    for setting in settings(grid):
        configs = seed_configs(args.config, {}, setting, args.seeds)
        use_threads(configs[0].threads)
        trial = run_trial(setting, configs, load)
        train_s = f"{statistics.mean(trial.train_s):.2f}" if trial.train_s else "-"
        print(f"{trial.label}: validation ACC {' '.join(f'{a:.4f}' for a in trial.accs)}; "
              f"{trial.summary}; train_s {train_s}", flush=True)
        trials.append(trial)
    chosen = best(trials)
    if chosen.acc == -math.inf:
        raise SystemExit("every setting diverged on some seed: none is chosen")
    print(f"chosen on validation: {chosen.label} ({chosen.acc:.4f})", flush=True)
    if args.test:
        configs = seed_configs(args.config, {}, chosen.setting, args.seeds, evaluate_on="test")
        test = run_trial(chosen.setting, configs)
        print(f"{chosen.label}: test ACC {' '.join(f'{a:.4f}' for a in test.accs)}; "
              f"{test.summary}")


if __name__ == "__main__":
    main()
