"""The `edgecl` command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from edgecl.config import Config, ConfigError, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="edgecl: on-device continual learning. Learn every task in one pass, "
                       "forget none, serve a fast per-task model.")
console = Console(stderr=True)


@app.callback()
def _commands() -> None:
    """Keeps `edgecl` a group of commands even while it has only one."""


def fail(message: str, code: int = 2) -> None:
    """Print one clear line and exit (2: bad input)."""
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _bench_overrides(benchmark: str | None, method: str | None, tasks: int | None,
                     samples_per_task: int | None, batch_size: int | None, seed: int | None,
                     data_dir: Path | None, device: str | None) -> dict[str, Any]:
    bench = {"name": benchmark, "n_tasks": tasks, "samples_per_task": samples_per_task,
             "batch_size": batch_size, "data_dir": str(data_dir) if data_dir else None}
    out: dict[str, Any] = {"benchmark": {k: v for k, v in bench.items() if v is not None}}
    if seed is not None:
        out["seed"] = seed
    if device is not None:
        out["device"] = device
    if method is not None:
        out["method"] = {"name": method}
    return out


def _configs_for(config: Path | None, overrides: dict[str, Any]) -> list[Config]:
    """One config, or one per registered method for `--method all`."""
    from edgecl.learners import LEARNERS

    method = overrides.get("method", {}).get("name")
    if method != "all":
        return [load_config(config, overrides)]
    base = load_config(config, {k: v for k, v in overrides.items() if k != "method"})
    # The preset's own method keeps its tuned parameters; the others run with their defaults.
    return [base if name == base.method.name
            else load_config(config, {**overrides, "method": {"name": name}})
            for name in LEARNERS]


def _summary_table(results: list[dict[str, Any]], title: str) -> Table:
    from edgecl.report import COLUMNS, summary_row

    table = Table(title=title)
    for col in COLUMNS:
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in results:
        table.add_row(*summary_row(r))
    return table


@app.command()
def bench(
    benchmark: Annotated[str | None, typer.Option(
        help="pmnist | rotmnist | splitmnist | mnist1d | cifar100 | file:PATH.npz "
             "[default: the config's, else pmnist]")] = None,
    method: Annotated[str | None, typer.Option(
        help="A registered method, or 'all' to compare every method [default: the config's, "
             "else finetune]")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML preset (see models/).")] = None,
    tasks: Annotated[int | None, typer.Option(help="Number of tasks.")] = None,
    samples_per_task: Annotated[int | None, typer.Option(help="Training samples per task.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Mini-batch size [default: 10].")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of data, init and sampling [default: 0].")
                    ] = None,
    data_dir: Annotated[Path | None, typer.Option(
        help="Folder with full MNIST / CIFAR-100 (read through torchvision).")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda [default: auto].")] = None,
    out: Annotated[Path | None, typer.Option(
        help="Output folder [default: runs/<benchmark>-<method>-s<seed>].")] = None,
) -> None:
    """Run the GEM benchmark protocol: one pass over every task, accuracy matrix R, ACC/BWT/FWT.

    Writes DIR/result.json, DIR/R.png (heatmap of R) and DIR/checkpoint.pt. With --method all,
    one sub-folder per method plus DIR/comparison.md, comparison.json and comparison.png.
    """
    from edgecl.bench import load_config_benchmark, run_protocol, write_run
    from edgecl.data import BenchmarkError

    overrides = _bench_overrides(benchmark, method, tasks, samples_per_task, batch_size, seed,
                                 data_dir, device)
    try:
        configs = _configs_for(config, overrides)
        data = load_config_benchmark(configs[0])
    except (ConfigError, BenchmarkError) as e:
        fail(str(e))
    many = len(configs) > 1
    name = method if many else configs[0].method.name
    slug = data.name.replace(":", "_").replace("/", "_")
    out = out or Path("runs") / f"{slug}-{name}-s{configs[0].seed}"
    results = []
    for cfg in configs:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                      console=console, transient=False) as bar:
            job = bar.add_task(f"{cfg.method.name} on {data.name}", total=data.n_train, rate="")

            def advance(n: int, task_id: str, bar: Progress = bar, job: Any = job) -> None:
                bar.update(job, advance=n, rate=task_id)

            try:
                result, learner = run_protocol(cfg, data, advance)
            except (ConfigError, ValueError, RuntimeError) as e:
                fail(f"{cfg.method.name}: {e}", code=1)
        write_run(out / cfg.method.name if many else out, result, learner)
        results.append(result)
    if many:
        _write_comparison(out, results, data.name)
    Console().print(_summary_table(results, f"{data.name}: {data.source}, {len(data.tasks)} tasks"))
    console.print(f"results in {out}/")


def _write_comparison(out: Path, results: list[dict[str, Any]], name: str) -> None:
    from edgecl.atomic import atomic_write_text
    from edgecl.report import markdown_table, plot_comparison

    atomic_write_text(out / "comparison.md", markdown_table(results))
    keep = ("method", "acc", "bwt", "fwt", "wall_s", "train_s", "samples_per_s", "footprint")
    atomic_write_text(out / "comparison.json",
                      json.dumps([{k: r[k] for k in keep} for r in results], indent=1) + "\n")
    plot_comparison(results, out / "comparison.png", f"{name}: every method")

