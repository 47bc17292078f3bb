"""Every results table of docs/results.md, regenerated: each method over several seeds, mean ± std.

Each table is `edgecl bench --method all` on one benchmark and net (the settings each method
runs with there: its preset values, or the tuned settings in the method's class in
`edgecl/learners/` for benchmarks that need others), run once per seed, plus the offline upper
bound (`edgecl.joint`: the same net trained on all tasks' data at once for `--epochs` epochs, its
SGD learning rate chosen on the validation split). Hyper-parameters were chosen on validation
splits (`benchmarks/sweep.py`); these are test-split numbers. One thread, as `edgecl bench`.

    .venv/bin/python benchmarks/results.py                  # every table into docs/results.md
    .venv/bin/python benchmarks/results.py --tables pmnist --seeds 0 1 2 --no-docs
    .venv/bin/python benchmarks/results.py --docs-only      # the saved tables into the page

Tables go to runs/results/<table>.md (and .json with every run's numbers); unless --no-docs,
each replaces the lines between `<!-- results:<table> -->` and `<!-- /results:<table> -->` in
docs/results.md (the text around the blocks is written by hand).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgecl.cli import use_threads
from edgecl.config import Config
from edgecl.joint import joint_training
from edgecl.protocol import run_protocol
from edgecl.setup import benchmark_for, method_configs
from edgecl.tune import mean_std

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DOC = ROOT / "docs" / "results.md"


@dataclass(frozen=True)
class Table:
    config: str | None  # a preset under models/, or None for the defaults
    overrides: dict[str, Any] = field(default_factory=dict)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)


SENSOR_SEEDS = (0, 1, 2)  # the conv net's GEM takes minutes a seed on 2 cores


TABLES = {
    "pmnist": Table(None, {"benchmark": {"name": "pmnist"}}),
    "rotmnist": Table(None, {"benchmark": {"name": "rotmnist"}}),
    "basicmotions-conv1d": Table("models/basicmotions-conv1d.yaml", seeds=SENSOR_SEEDS),
    "basicmotions-mlp": Table("models/basicmotions-mlp.yaml", seeds=SENSOR_SEEDS),
    "basicmotions-classes-conv1d": Table("models/basicmotions-conv1d.yaml",
                                         {"benchmark": {"name": "basicmotions-classes"}},
                                         SENSOR_SEEDS),
    "japanesevowels-conv1d": Table("models/basicmotions-conv1d.yaml",
                                   {"benchmark": {"name": "japanesevowels"}}, SENSOR_SEEDS),
}
JOINT_LRS = (0.01, 0.03, 0.1)  # SGD, as the table's fine-tuning
COLUMNS = ("method", "ACC", "ACC - bound", "BWT", "FWT", "train s", "training state",
           "deployable state")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--tables", nargs="+", choices=list(TABLES), default=list(TABLES))
    p.add_argument("--seeds", type=int, nargs="+",
                   help="seeds of every table (default: each table's, 0-4 or 0-2)")
    p.add_argument("--epochs", type=int, default=5, help="of the offline upper bound [5]")
    p.add_argument("--no-docs", action="store_true", help="leave docs/results.md alone")
    p.add_argument("--docs-only", action="store_true",
                   help="run nothing: put the tables saved in runs/results/ into docs/results.md")
    return p.parse_args()


def run_table(table: Table, seeds: list[int], epochs: int) -> dict[str, list[dict[str, Any]]]:
    """Every method's result per seed, and the offline bound's as method "joint"."""
    runs: dict[str, list[dict[str, Any]]] = {}
    lr = None
    for seed in seeds:
        configs = method_configs(
            ROOT / table.config if table.config else None,
            {**table.overrides, "seed": seed, "method": {"name": "all"}})
        bench = benchmark_for(configs[0])
        for cfg in configs:
            result, _ = run_protocol(cfg, bench)
            runs.setdefault(cfg.method.name, []).append(result)
            print(f"seed {seed} {cfg.method.name}: ACC {result['acc']:.4f}", flush=True)
        finetune = next(c for c in configs if c.method.name == "finetune")
        lr = lr or joint_lr(finetune, epochs)
        joint = joint_training(with_lr(finetune, lr), bench, epochs)
        runs.setdefault("joint", []).append({**joint, "lr": lr})
        print(f"seed {seed} joint (lr {lr}): ACC {joint['acc']:.4f}", flush=True)
    return runs


def with_lr(cfg: Config, lr: float) -> Config:
    return cfg.model_copy(update={"optimizer": cfg.optimizer.model_copy(update={"lr": lr})})


def joint_lr(cfg: Config, epochs: int) -> float:
    """The offline bound's learning rate, chosen on the validation split (first seed)."""
    val = cfg.model_copy(update={"benchmark": cfg.benchmark.model_copy(
        update={"evaluate_on": "validation"})})
    bench = benchmark_for(val)
    scores = {lr: joint_training(with_lr(val, lr), bench, epochs)["acc"] for lr in JOINT_LRS}
    print(f"joint validation ACC by lr: {scores}", flush=True)
    return max(scores, key=scores.__getitem__)


def row(method: str, results: list[dict[str, Any]], epochs: int, bound: float) -> list[str]:
    """A table row; `bound`: the offline bound's mean ACC, which each method is measured to."""
    if method == "joint":
        return [f"offline upper bound ({epochs} epochs, lr {results[0]['lr']})",
                mean_std([r["acc"] for r in results], 3),
                "", "", "", f"{statistics.mean(r['train_s'] for r in results):.1f}", "", ""]
    fp = results[0]["footprint"]  # the same every seed
    acc = [r["acc"] for r in results]
    return [method, mean_std(acc, 3), f"{statistics.mean(acc) - bound:+.3f}",
            mean_std([r["bwt"] for r in results], 3, signed=True),
            mean_std([r["fwt"] for r in results], 3, signed=True),
            f"{statistics.mean(r['train_s'] for r in results):.1f}",
            f"{fp['training_bytes']:,}", f"{fp['deployable_bytes']:,}"]


def markdown(name: str, runs: dict[str, list[dict[str, Any]]], seeds: list[int],
             epochs: int) -> str:
    first = runs["finetune"][0]
    lines = [f"`{name}`: {first['benchmark']}, {first['n_tasks']} tasks, "
             f"{first['config']['net']['name']} net, seeds {', '.join(map(str, seeds))} "
             "(mean ± std):", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    bound = statistics.mean(r["acc"] for r in runs["joint"])
    lines += ["| " + " | ".join(row(m, results, epochs, bound)) + " |"
              for m, results in runs.items()]
    return "\n".join(lines) + "\n"


def replace_in_results_doc(name: str, text: str, doc: Path = RESULTS_DOC) -> None:
    """Put `text` between the `<!-- results:name -->` and `<!-- /results:name -->` lines of doc."""
    start, end = f"<!-- results:{name} -->", f"<!-- /results:{name} -->"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.DOTALL)
    old = doc.read_text(encoding="utf-8")
    if not pattern.search(old):
        raise SystemExit(f"{doc.relative_to(ROOT)} has no {start} ... {end} block for this table")
    doc.write_text(pattern.sub(lambda _: f"{start}\n{text}{end}", old), encoding="utf-8")


def main() -> None:
    args = parse_args()
    use_threads(1)
    out = ROOT / "runs" / "results"
    out.mkdir(parents=True, exist_ok=True)
    for name in args.tables:
        if not args.docs_only:
            seeds = args.seeds or list(TABLES[name].seeds)
            runs = run_table(TABLES[name], seeds, args.epochs)
            (out / f"{name}.md").write_text(markdown(name, runs, seeds, args.epochs))
            (out / f"{name}.json").write_text(json.dumps(runs, indent=1) + "\n")
        text = (out / f"{name}.md").read_text()
        if not args.no_docs:
            replace_in_results_doc(name, text)
        print(text, flush=True)


if __name__ == "__main__":
    main()
