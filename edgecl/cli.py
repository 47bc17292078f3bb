"""The `edgecl` command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from edgecl import __version__
from edgecl.config import Config, ConfigError
from edgecl.registry import BENCHMARKS, LEARNERS, NEEDS_DATA_DIR

if TYPE_CHECKING:
    from edgecl.daemon.supernode import FleetLink
    from edgecl.tune import Benchmarks, Setting, Trial

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)
LEARN_TOKEN_ENV = "EDGECL_LEARN_TOKEN"
EMBEDDED = [name for name in BENCHMARKS if name not in NEEDS_DATA_DIR]  # data in a package


def _print_version(asked: bool) -> None:
    if asked:
        print(f"edgecl {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="Print edgecl's version and exit.")] = False) -> None:
    """edgecl: on-device continual learning. Learn every task in one pass, forget none, serve a
    fast per-task model."""


def plain_console(stderr: bool = False) -> Console:
    """A console that prints text as given. Rich markup is off: user text (paths, task names,
    `pip install 'edgecl[vision]'`) would otherwise lose its brackets, or fail to parse."""
    return Console(stderr=stderr, markup=False, highlight=False)


def print_table(table: Table) -> None:
    """`table` on stdout. On a terminal, long cells fold; elsewhere (a pipe, a file, a log) the
    table is as wide as its cells: never cut to 80 columns, ids never shortened."""
    out = plain_console()
    if not out.is_terminal:  # a table no wider than its cells needs, however wide that is
        out = Console(markup=False, highlight=False, width=1 << 16)
    out.print(table)


console = plain_console(stderr=True)


def say(message: str, error: bool = False) -> None:
    """One line on stderr, exactly as given; an error line starts with a bold red 'error: '."""
    console.print(Text.assemble(("error: ", "bold red") if error else "", message),
                  soft_wrap=True)


def fail(message: str, code: int = 2) -> None:
    """Print one clear line and exit (2: bad input)."""
    say(message, error=True)
    raise typer.Exit(code)


def progress_bar(rate: bool = False) -> Progress:
    """A progress bar whose texts (task descriptions, the rate field) are printed as given."""
    rate_column = [TextColumn("{task.fields[rate]}", markup=False)] if rate else []
    return Progress(TextColumn("{task.description}", markup=False), BarColumn(),
                    MofNCompleteColumn(), *rate_column, TimeRemainingColumn(), console=console)


def check_device(cfg: Config, cli_option: bool, config: Path | None) -> None:
    """Refuse `cuda` where torch sees none, naming where it was asked for: the `--device`
    option, else the config file's `device:` key."""
    import torch

    if cfg.device != "cuda" or torch.cuda.is_available():
        return
    where = "--device cuda" if cli_option else f"{config or 'config'}: device: cuda"
    fix = "--device auto or --device cpu" if cli_option else "device: auto or device: cpu"
    fail(f"{where}, but torch sees no CUDA device on this machine; use {fix}")


def use_threads(n: int) -> None:
    """torch's CPU threads for this process: `n` intra-op, 1 inter-op."""
    import contextlib

    import torch

    torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):  # settable only before torch's first parallel work
        torch.set_num_interop_threads(1)


def _preset_method(config: Path | None) -> str | None:
    """The method whose settings a preset states, if it states one."""
    from edgecl.config import MethodConfig, read_yaml, section_name

    if config is None:
        return None
    data = read_yaml(config)
    return str(section_name(data, "method", MethodConfig)) if "method" in data else None


def _bench_overrides(benchmark: str | None, method: str | None, tasks: int | None,
                     samples_per_task: int | None, batch_size: int | None, seed: int | None,
                     data_dir: Path | None, device: str | None,
                     threads: int | None) -> dict[str, Any]:
    bench = {"name": benchmark, "n_tasks": tasks, "samples_per_task": samples_per_task,
             "batch_size": batch_size, "data_dir": str(data_dir) if data_dir else None}
    out: dict[str, Any] = {"benchmark": {k: v for k, v in bench.items() if v is not None}}
    if seed is not None:
        out["seed"] = seed
    if device is not None:
        out["device"] = device
    if threads is not None:
        out["threads"] = threads
    if method is not None:
        out["method"] = {"name": method}
    return out


def _summary_table(results: list[dict[str, Any]], title: str) -> Table:
    from edgecl.report import COLUMNS, summary_row

    table = Table(title=title)
    for col in COLUMNS:
        table.add_column(col, justify="left" if col == "method" else "right", overflow="fold")
    for r in results:
        table.add_row(*summary_row(r))
    return table


@app.command()
def bench(
    benchmark: Annotated[str | None, typer.Option(
        help=f"{' | '.join(BENCHMARKS)} | file:PATH.npz (default: the config's, else "
             f"pmnist; {', '.join(sorted(NEEDS_DATA_DIR))} read from --data-dir)")] = None,
    method: Annotated[str | None, typer.Option(
        help=f"{' | '.join(LEARNERS)}, or all to compare every method (default: the "
             "config's, else finetune)")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML preset (see models/).")] = None,
    tasks: Annotated[int | None, typer.Option(help="Number of tasks.")] = None,
    samples_per_task: Annotated[int | None, typer.Option(help="Training samples per task.")] = None,
    batch_size: Annotated[int | None, typer.Option(
        help="Mini-batch size (default: the config's, else 10).")] = None,
    seed: Annotated[int | None, typer.Option(
        help="Seed of data, init and sampling (default: the config's, else 0).")] = None,
    data_dir: Annotated[Path | None, typer.Option(
        help="Folder with full MNIST / CIFAR-100 (read through torchvision).")] = None,
    device: Annotated[str | None, typer.Option(
        help="auto | cpu | cuda (default: the config's, else auto).")] = None,
    out: Annotated[Path | None, typer.Option(
        help="Output folder (default: runs/<benchmark>-<method>-s<seed>).")] = None,
    threads: Annotated[int | None, typer.Option(
        min=1, help="torch CPU threads (default: the config's, else 1: measured fastest for "
                    "these small nets, and safe on a busy machine).")] = None,
) -> None:
    """Run the GEM benchmark protocol: one pass over every task, accuracy matrix R, ACC/BWT/FWT.

    Writes DIR/result.json, DIR/R.png (heatmap of R) and DIR/checkpoint.pt. With --method all,
    one sub-folder per method plus DIR/comparison.md, comparison.json and comparison.png.
    """
    from edgecl.data import BenchmarkError
    from edgecl.protocol import run_protocol, run_warnings, write_run
    from edgecl.setup import (
        DEFAULTS_TUNED_ON,
        benchmark_for,
        learner_spec,
        method_configs,
        new_learner,
        untuned_methods,
    )

    overrides = _bench_overrides(benchmark, method, tasks, samples_per_task, batch_size, seed,
                                 data_dir, device, threads)
    try:
        configs = method_configs(config, overrides)
        check_device(configs[0], device is not None, config)
        data = benchmark_for(configs[0])
        # every learner built before any trains: a method's refusal (max_tasks against the
        # benchmark, its memory budget against max_tasks...) stops the run before it starts
        learners = [new_learner(learner_spec(cfg, data)) for cfg in configs]
    except (ConfigError, BenchmarkError) as e:
        fail(str(e))
    use_threads(configs[0].threads)
    many = len(configs) > 1
    untuned = untuned_methods(configs, _preset_method(config)) if many else []
    if untuned:
        say(f"note: {', '.join(untuned)} run their {DEFAULTS_TUNED_ON} settings on {data.name}, "
            "which nobody tuned for it: their results may be far from what they can do; "
            f"choose settings on validation with `edgecl tune --benchmark {data.name} "
            "--method M` and pass the preset it writes")
    name = method if many else configs[0].method.name
    slug = data.name.replace(":", "_").replace("/", "_")
    out = out or Path("runs") / f"{slug}-{name}-s{configs[0].seed}"
    for cfg in configs:  # a bad --out fails now, not after the training
        _make_folder(out / cfg.method.name if many else out)
    results = []
    for cfg, learner in zip(configs, learners, strict=True):
        with progress_bar(rate=True) as bar:
            job = bar.add_task(f"{cfg.method.name} on {data.name}", total=data.n_train, rate="")

            def advance(n: int, task_id: str, bar: Progress = bar, job: Any = job) -> None:
                bar.update(job, advance=n, rate=task_id)

            try:
                result, _ = run_protocol(cfg, data, advance, learner)
            except (ValueError, RuntimeError) as e:
                fail(f"{cfg.method.name}: {e}", code=1)
        write_run(out / cfg.method.name if many else out, result, learner)
        results.append(result)
    if many:
        _write_comparison(out, results, data.name)
    print_table(_summary_table(results, f"{data.name}: {data.source}, {len(data.tasks)} tasks"))
    say(f"results in {out}/")
    for r in results:  # skipped steps, a run at chance, a non-finite model: never silent
        for line in run_warnings(r):
            say(f"warning: {r['method']}: {line}")
    unusable = [r["method"] for r in results if r["finite"] is False]
    if unusable:
        fail(f"{', '.join(unusable)}: the final model is not finite; nothing of it is usable",
             code=1)


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        fail(f"{folder}: exists and is not a folder")
    except OSError as e:
        fail(f"{folder}: cannot create the output folder ({e.strerror})")


def _write_comparison(out: Path, results: list[dict[str, Any]], name: str) -> None:
    from edgecl.atomic import atomic_write_text
    from edgecl.report import markdown_table, plot_comparison

    atomic_write_text(out / "comparison.md", markdown_table(results))
    keep = ("method", "acc", "bwt", "fwt", "wall_s", "train_s", "samples_per_s", "footprint")
    atomic_write_text(out / "comparison.json",
                      json.dumps([{k: r[k] for k in keep} for r in results], indent=1) + "\n")
    plot_comparison(results, out / "comparison.png", f"{name}: every method")


@app.command()
def tune(
    benchmark: Annotated[str | None, typer.Option(
        help=f"{' | '.join(BENCHMARKS)} | file:PATH.npz (default: the config's, else "
             "pmnist).")] = None,
    method: Annotated[str | None, typer.Option(
        help=f"{' | '.join(LEARNERS)} (default: the config's, else finetune).")] = None,
    config: Annotated[Path | None, typer.Option(
        help="YAML preset to start from (see models/); the grid's keys override it.")] = None,
    grid: Annotated[list[str] | None, typer.Option(
        help="KEY=V1,V2,...: a dotted config key and the values to try, each read as YAML; "
             "repeat for more keys, every combination runs (default: optimizer.lr at a third, "
             "one and three times the method's).")] = None,
    seeds: Annotated[str, typer.Option(
        help="Comma-separated seeds each setting runs with; for a file:PATH.npz benchmark a "
             "seed also draws the held-out groups.")] = "0,1,2",
    samples_per_task: Annotated[int | None, typer.Option(
        help="Training samples per task, of those the hold-out left (default: the "
             "config's).")] = None,
    out: Annotated[Path | None, typer.Option(
        help="Where to write the chosen preset (default: runs/<benchmark>-<method>-tuned.yaml)."
    )] = None,
    threads: Annotated[int | None, typer.Option(
        min=1, help="torch CPU threads (default: the config's, else 1).")] = None,
) -> None:
    """Choose a method's hyper-parameters on the validation split, never the test split.

    Every grid setting runs the benchmark protocol once per seed, trained on 7/8 of each
    task's training samples and evaluated on the held-out 1/8 (whole groups of a file's
    task{i}_group_train); the test split is never read. Prints each setting's validation ACC
    (mean ± std over seeds) and training time, the offline bound (joint training of the same
    net on the same split), and writes the best setting as a complete preset for
    `edgecl bench --config` and `edgecl learn --config`.
    """
    from edgecl.atomic import atomic_write_text
    from edgecl.data import BenchmarkError
    from edgecl.setup import learner_spec, load_config
    from edgecl.tune import (
        Benchmarks,
        best,
        default_grid,
        preset_yaml,
        seed_configs,
        settings,
    )

    if method == "all":
        fail("--method all: tune one method at a time")
    seed_list = _parse_seeds(seeds)
    overrides = _bench_overrides(benchmark, method, None, samples_per_task, None, None, None,
                                 None, threads)
    load = Benchmarks()
    try:
        base = load_config(config, overrides)
        chosen_grid = _parse_grid(grid) if grid else default_grid(base)
        runs = [(s, seed_configs(config, overrides, s, seed_list)) for s in settings(chosen_grid)]
        for _, configs in runs:  # every setting's data and net checked before any trains
            for cfg in configs:
                learner_spec(cfg, load(cfg))
    except (ConfigError, BenchmarkError) as e:
        fail(str(e))
    name = f"{base.benchmark.name.replace(':', '_').replace('/', '_')}-{base.method.name}"
    out = out or Path("runs") / f"{name}-tuned.yaml"
    _check_preset_path(out)
    use_threads(base.threads)
    trials = _run_trials(runs, load)
    chosen = best(trials)
    chosen_configs = runs[trials.index(chosen)][1]
    _print_trials(trials, chosen, base, seed_list)
    if chosen.diverged:
        fail("every setting diverged on at least one seed: try lower learning rates (--grid "
             "optimizer.lr=...)", code=1)
    _print_offline_bound(chosen, chosen_configs, load)
    command = " ".join([
        "edgecl tune", *(["--config", str(config)] if config else []),
        "--benchmark", base.benchmark.name, "--method", base.method.name, "--seeds", seeds,
        *(f"--grid {k}={','.join(map(str, v))}" for k, v in chosen_grid.items())])
    atomic_write_text(out, preset_yaml(chosen_configs[0], trials, chosen, command))
    say(f"preset written to {out}; run it with: edgecl bench --config {out}")


def _parse_seeds(seeds: str) -> list[int]:
    try:
        parsed = [int(s) for s in seeds.split(",")]
    except ValueError:
        fail(f"--seeds {seeds}: give comma-separated non-negative integers, e.g. 0,1,2")
    if any(s < 0 for s in parsed) or len(set(parsed)) != len(parsed):
        fail(f"--seeds {seeds}: seeds must be distinct non-negative integers")
    return parsed


def _parse_grid(entries: list[str]) -> dict[str, list[Any]]:
    """`KEY=V1,V2` entries as {key: [values]}, each value read as YAML."""
    import yaml

    grid: dict[str, list[Any]] = {}
    for entry in entries:
        key, _, values = entry.partition("=")
        if not key or not values or key in grid:
            fail(f"--grid {entry}: give each key once as KEY=V1,V2,... "
                 "(e.g. optimizer.lr=0.01,0.03)")
        try:
            grid[key] = [yaml.safe_load(v) for v in values.split(",")]
        except yaml.YAMLError:
            fail(f"--grid {entry}: a value is not valid YAML")
    return grid


def _check_preset_path(out: Path) -> None:
    if out.is_dir():
        fail(f"{out}: is a folder; --out names the preset file to write")
    _make_folder(out.parent)


def _run_trials(runs: list[tuple[Setting, list[Config]]], load: Benchmarks) -> list[Trial]:
    from edgecl.tune import run_trial

    total = sum(load(cfg).n_train for _, configs in runs for cfg in configs)
    trials = []
    with progress_bar(rate=True) as bar:
        job = bar.add_task("tuning on the validation split", total=total, rate="")
        for setting, configs in runs:
            label = ", ".join(f"{k}={v}" for k, v in setting.items())

            def advance(n: int, task_id: str, label: str = label) -> None:
                bar.update(job, advance=n, rate=f"{label} {task_id}")

            try:
                trials.append(run_trial(setting, configs, load, advance))
            except (ValueError, RuntimeError) as e:
                fail(f"{label}: {e}", code=1)
    return trials


def _print_trials(trials: list[Trial], chosen: Trial, base: Config, seeds: list[int]) -> None:
    import statistics


    table = Table(title=f"{base.benchmark.name} / {base.method.name}: validation split, seeds "
                        f"{', '.join(map(str, seeds))}")
    for col in ("setting", "validation ACC", "train_s", ""):
        table.add_column(col, justify="left" if col == "setting" else "right", overflow="fold")
    for t in trials:
        train_s = f"{statistics.mean(t.train_s):.2f}" if t.train_s else "-"
        table.add_row(t.label, t.summary, train_s, "chosen" if t is chosen else "")
    print_table(table)


def _print_offline_bound(chosen: Trial, configs: list[Config], load: Benchmarks) -> None:
    from edgecl.tune import mean_std, offline_bound

    say(f"offline bound: joint training of the same net on the same split, {len(configs)} "
        "seed(s)...")
    try:
        bound = offline_bound(configs, load)
    except (ValueError, RuntimeError) as e:
        fail(f"offline bound: {e}", code=1)
    say(f"offline bound (joint training, validation split): ACC {mean_std(bound)}; "
        f"chosen {chosen.label}: ACC {mean_std(chosen.accs)}")


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Option(help="A checkpoint.pt written by `edgecl bench`.")],
    repo: Annotated[Path, typer.Option(help="Model repository: DIR/<task>/<version>/.")],
    task: Annotated[list[str] | None, typer.Option(
        help="Task to export; repeat for several (default: every task of the checkpoint).")
                    ] = None,
) -> None:
    """Export each task's model to ONNX, verify it against torch, publish it as a new version.

    Writes DIR/<task>/<version>/model.onnx and manifest.json. onnxruntime must match torch within
    1e-4 (max abs logit difference) with identical argmax on random and real test inputs, or the
    task is not published. Exit status 1 if any task failed.
    """
    from edgecl.export import Exporter, ExportError

    if repo.exists() and not repo.is_dir():
        fail(f"{repo}: exists and is not a folder")
    try:
        exporter = Exporter(checkpoint)
    except (FileNotFoundError, ValueError, ImportError) as e:
        fail(str(e))
    unknown = [t for t in task or [] if t not in exporter.tasks]
    if unknown:
        fail(f"unknown task(s) {', '.join(unknown)}; the checkpoint has: "
             f"{', '.join(exporter.tasks) or 'none'}")
    table = Table(title=f"{checkpoint} -> {repo}")
    for col in ("task", "version", "max |Δ|", "real inputs", "sha256"):
        table.add_column(col, justify="left" if col in ("task", "sha256") else "right",
                         overflow="fold")
    failed = 0
    for name in task or exporter.tasks:
        try:
            m = exporter.export(name, repo)
        except (ExportError, ValueError, OSError) as e:
            say(str(e), error=True)
            failed += 1
            continue
        v = m.verification
        table.add_row(name, str(m.version), f"{v.max_abs_diff:.1e}", str(v.real_inputs),
                      m.sha256[:12])
    print_table(table)
    if failed:
        raise typer.Exit(1)


@app.command()
def serve(
    repo: Annotated[Path, typer.Option(help="Model repository written by `edgecl export`.")],
    host: Annotated[str, typer.Option(
        help="Address to listen on (0.0.0.0 exposes the server to the network).")
                    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port (0: any free one).")
                    ] = 8080,
    providers: Annotated[str | None, typer.Option(
        help="onnxruntime execution providers in order, e.g. 'cuda,cpu' (default: those of "
             "tensorrt, cuda, cpu that are available).")] = None,
    threads: Annotated[int, typer.Option(min=1, help="onnxruntime threads per inference.")] = 1,
    poll_s: Annotated[float, typer.Option(
        min=0.05, help="Seconds between scans of the repository for new versions.")] = 2.0,
    token_file: Annotated[Path | None, typer.Option(
        help="File holding the bearer token clients must send (default: $EDGECL_SERVE_TOKEN "
             "if set, else none).")] = None,
    max_body_mb: Annotated[float, typer.Option(min=0.001, help="Largest request body in MiB.")
                           ] = 8.0,
    tls_cert: Annotated[Path | None, typer.Option(
        help="TLS certificate (PEM) to serve HTTPS with (needs --tls-key): the bearer token "
             "then never crosses the network in clear.")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="The TLS certificate's private key.")
                       ] = None,
    input_range: Annotated[str, typer.Option(
        help="Check request values against the range the model saw in training (the "
             "manifest's input_range, widened by --range-tolerance of its span on each side): "
             "off, warn (answer; count in edgecl_input_out_of_range_total and log) or reject "
             "(400 naming the range).")] = "reject",
    range_tolerance: Annotated[float, typer.Option(
        min=0.0, help="How far past the training range values may go, as a share of its "
                      "span (0.5: a [0, 1] model takes [-0.5, 1.5]).")] = 0.5,
    max_batch: Annotated[int, typer.Option(
        min=1, help="Rows one inference request may hold; more is a 413.")] = 1024,
    probe_timeout_s: Annotated[float, typer.Option(
        min=0.1, help="Seconds a new model version's probe may run in its child process "
                      "before the version is refused (a graph that never ends).")] = 20.0,
    max_connections: Annotated[int, typer.Option(
        min=2, help="Connections kept open (beyond, the oldest idle one is closed) and "
                    "requests in flight before others get a 503; health probes never do.")
                               ] = 64,
    max_connections_per_client: Annotated[int | None, typer.Option(
        min=1, help="Connections and requests in flight one client address may hold "
                    "(default: half of --max-connections; behind a reverse proxy, set it to "
                    "--max-connections).")] = None,
) -> None:
    """Serve every task's newest model over HTTP (KServe v2 protocol), hot-reloading new versions.

    POST /v2/models/<task>/infer, GET /v2/models/<task>, /v2/health/live, /v2/health/ready and
    /metrics (Prometheus). With a token, every endpoint but the health probes needs
    'Authorization: Bearer <token>'.
    """
    import logging
    import signal
    import threading

    from edgecl import systemd
    from edgecl.serve import TOKEN_ENV, ListenError, create_server

    if not repo.is_dir():
        fail(f"{repo}: no such model repository (create one with `edgecl export`)")
    tls = _tls(tls_cert, tls_key)
    token = _token(token_file, TOKEN_ENV)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        server = create_server(repo, host, port, providers.split(",") if providers else None,
                               threads, token, int(max_body_mb * (1 << 20)), tls,
                               input_range, range_tolerance, max_batch, probe_timeout_s,
                               max_connections, max_connections_per_client)
    except (ValueError, ListenError) as e:
        fail(str(e))
    except OSError as e:  # the repository folder itself cannot be listed
        fail(f"{repo}: cannot read the model repository ({e.strerror})")
    served = ", ".join(sorted(server.models.all())) or "none yet"
    auth = "bearer token" if token else "no token"
    say(f"listening on {server.url}, serving {served} ({auth})")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    serving = threading.Thread(target=server.run, args=(poll_s,), name="edgecl-serve")
    serving.start()
    systemd.supervise(stop, serving.is_alive, lambda: server.started)
    systemd.notify("STOPPING=1")
    server.shutdown()  # finishes the requests in flight
    serving.join()


@app.command()
def learn(
    state_dir: Annotated[Path, typer.Option(
        help="Folder of the daemon's journal, checkpoints and lock (created if missing).")],
    config: Annotated[Path | None, typer.Option(
        help="YAML preset (see models/): method, net, and the sample schema in its stream: "
             "section, or its benchmark's when it has none.")] = None,
    repo: Annotated[Path | None, typer.Option(
        help="Model repository: every consolidated task is exported and published there, "
             "where `edgecl serve --repo` picks it up.")] = None,
    host: Annotated[str, typer.Option(
        help="Address to listen on (0.0.0.0 exposes the daemon to the network).")
                    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port (0: any free one).")
                    ] = 8765,
    socket: Annotated[Path | None, typer.Option(
        help="Also accept NDJSON samples on this unix socket (mode 0600).")] = None,
    mqtt: Annotated[str | None, typer.Option(
        help="Also subscribe to edgecl/<name>/samples on this MQTT broker, "
             "e.g. mqtt://127.0.0.1:1883, or mqtts://user@host:8883 for TLS and a user "
             "(needs --name).")] = None,
    mqtt_password_file: Annotated[Path | None, typer.Option(
        help="File holding the password of the MQTT URL's user.")] = None,
    mqtt_ca: Annotated[Path | None, typer.Option(
        help="CA certificate (PEM) to verify an mqtts:// broker with (default: the "
             "system's).")] = None,
    name: Annotated[str | None, typer.Option(
        help="This device's name in MQTT topics (edgecl/<name>/samples).")] = None,
    device: Annotated[str | None, typer.Option(
        help="auto | cpu | cuda: where the learner runs (default: the config's, else auto).")
                      ] = None,
    token_file: Annotated[Path | None, typer.Option(
        help="File holding the bearer token clients must send (default: $EDGECL_LEARN_TOKEN "
             "if set, else none).")] = None,
    threads: Annotated[int | None, typer.Option(
        min=1, help="torch CPU threads for learning (default: the config's, else 1: the other "
                    "cores stay free for ingest, serve and the sensor process).")] = None,
    tls_cert: Annotated[Path | None, typer.Option(
        help="TLS certificate (PEM) to serve HTTPS with (needs --tls-key): the bearer token "
             "then never crosses the network in clear.")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="The TLS certificate's private key.")
                       ] = None,
    fleet: Annotated[str | None, typer.Option(
        help="Join the fleet whose Flower SuperLink listens at HOST:PORT (`edgecl fleet`): "
             "each round shares this device's weights (never its samples) and takes the "
             "fleet's average (needs --fleet-ca or --fleet-insecure, and "
             "pip install -e '.[fleet]').")] = None,
    fleet_ca: Annotated[Path | None, typer.Option(
        help="CA certificate (PEM) that signed the SuperLink's certificate.")] = None,
    fleet_insecure: Annotated[bool, typer.Option(
        help="Talk to the SuperLink in plain HTTP: a trusted network, or a try on "
             "localhost.")] = False,
) -> None:
    """Learn from a live sample stream, in one pass, forgetting nothing; survive crashes.

    Samples arrive over HTTP (POST /v1/samples), a unix socket (--socket) or MQTT (--mqtt) and
    are acknowledged once durable in the journal. The learner consumes the journal in order,
    checkpoints, and after a crash restores its newest checkpoint and replays the journal, so
    every acknowledged sample is learned exactly once. SIGTERM / SIGINT: finish the current step,
    checkpoint, exit 0. See GET /openapi.json for the API.
    """
    from edgecl.daemon.daemon import DaemonError
    from edgecl.daemon.service import LearnService, Listeners
    from edgecl.logs import log_json_lines
    from edgecl.web import ListenError

    if mqtt and not name:
        fail("--mqtt needs --name NAME (the topic is edgecl/<name>/samples)")
    listeners = Listeners(host, port, _token(token_file, LEARN_TOKEN_ENV), _tls(tls_cert, tls_key),
                          socket, mqtt, name or "",
                          _read_secret(mqtt_password_file, "password file") if mqtt_password_file
                          else None, mqtt_ca, _fleet_link(fleet, fleet_ca, fleet_insecure))
    from edgecl.setup import load_config

    try:
        cfg = load_config(config, {"device": device} if device else None)
    except ConfigError as e:
        fail(str(e))
    check_device(cfg, device is not None, config)
    log_json_lines()
    use_threads(threads or cfg.threads)
    try:
        service = LearnService.open(cfg, state_dir, repo, listeners)
    except (ConfigError, DaemonError, ListenError, OSError, ValueError) as e:
        fail(str(e))
    if not service.run():
        fail("the learning thread stopped; see the log", code=1)


def _fleet_link(superlink: str | None, ca: Path | None, insecure: bool) -> FleetLink | None:
    """learn --fleet's SuperLink, checked: a way to trust it, and Flower installed."""
    from edgecl.daemon.supernode import FleetLink
    from edgecl.fleet.launch import FleetError, flwr_executable

    if superlink is None:
        if ca or insecure:
            fail("--fleet-ca and --fleet-insecure go with --fleet HOST:PORT")
        return None
    if not (ca or insecure):
        fail("--fleet needs --fleet-ca CA.pem (the SuperLink's TLS) or --fleet-insecure")
    if ca and not ca.is_file():
        fail(f"--fleet-ca: {ca} is not a file")
    try:
        flwr_executable("flower-supernode")
    except FleetError as e:
        fail(str(e))
    return FleetLink(superlink, ca, insecure and not ca)


@app.command()
def replay(
    source: Annotated[str, typer.Argument(
        help=f"What to stream: embedded:NAME ({', '.join(EMBEDDED)}) or file:PATH.npz; its "
             "training samples, task by task.")],
    to: Annotated[str, typer.Option(help="The daemon's URL.")] = "http://127.0.0.1:8765",
    rate: Annotated[float | None, typer.Option(
        min=1, help="Samples per second at most (default: as fast as the daemon takes them).")
                    ] = None,
    tasks: Annotated[str | None, typer.Option(
        help="Comma-separated task names or indices to send (default: all, in order).")
                     ] = None,
    samples_per_task: Annotated[int | None, typer.Option(
        min=1, help="Training samples per task (default: the benchmark's).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the benchmark's task transforms.")] = 0,
    batch: Annotated[int, typer.Option(min=1, help="Samples per request.")] = 100,
    token_file: Annotated[Path | None, typer.Option(
        help="Bearer token file (default: $EDGECL_LEARN_TOKEN if set).")] = None,
    end_tasks: Annotated[bool, typer.Option(
        help="End each task after its samples (the daemon consolidates and exports it).")
                         ] = True,
    wait_s: Annotated[float, typer.Option(
        min=0, help="Seconds to wait for the daemon to be ready, and after the last sample "
                    "for it to learn (and export) everything sent.")] = 120.0,
) -> None:
    """Stream a benchmark's or a task file's training samples into a running `edgecl learn`.

    Waits for the daemon to be ready, checks the source's input shape and class names against
    the daemon's schema, sends every chosen task's training samples in order, labelled by class
    name (ending each task), then waits until the daemon has learned them all.
    """
    import time

    from edgecl.daemon.client import LearnClient, LearnError
    from edgecl.data import BenchmarkError, load_benchmark

    name = source.removeprefix("embedded:")
    token = _token(token_file, LEARN_TOKEN_ENV)
    try:
        bench = load_benchmark(name, samples_per_task=samples_per_task, seed=seed)
        chosen = _choose_tasks(bench.tasks, tasks)
        client = LearnClient(to, token, batch=batch)
    except (BenchmarkError, ValueError) as e:
        fail(str(e))
    total = sum(len(t.y_train) for t in chosen)
    try:
        client.wait_ready(wait_s)
    except (LearnError, OSError) as e:
        fail(f"{to}: not ready after {wait_s:g} s ({e})", code=1)
    try:  # every task's shape and class names against the daemon's schema, before sending any
        for task in chosen:
            for label in sorted(set(task.y_train.tolist())):
                client.check(task.name, task.x_train[0].numpy(), task.classes[label])
    except ValueError as e:
        fail(f"{to} does not take {source}: {e}")
    except (LearnError, OSError) as e:
        fail(f"{to}: {e}", code=1)
    t0 = time.perf_counter()
    with client, progress_bar() as bar:
        job = bar.add_task(f"{source} -> {to}", total=total)
        sent = 0
        try:
            for task in chosen:
                for i in range(0, len(task.y_train), batch):
                    x, y = task.x_train[i:i + batch].numpy(), task.y_train[i:i + batch]
                    client.send_many(task.name, x, [task.classes[k] for k in y.tolist()])
                    client.flush()
                    sent += len(y)
                    bar.update(job, advance=len(y))
                    if rate:  # sleep until this many samples are due
                        time.sleep(max(0.0, sent / rate - (time.perf_counter() - t0)))
                if end_tasks:
                    client.end_task(task.name)
            seconds = time.perf_counter() - t0
            say(f"sent {client.sent:,} samples of {len(chosen)} task(s) in {seconds:.1f} s "
                f"({client.sent / seconds:,.0f}/s; {client.retries} retries after 429); "
                "waiting for the daemon to learn them")
            client.wait_learned(wait_s)
        except (LearnError, OSError) as e:  # TimeoutError is an OSError
            fail(f"after {client.sent:,} acknowledged samples: {e}", code=1)


@app.command()
def fleet(
    state_dir: Annotated[Path, typer.Option(
        help="Folder of the fleet server's Flower files and SuperLink log (created if "
             "missing).")],
    host: Annotated[str, typer.Option(
        help="Address the SuperLink listens on (0.0.0.0: devices on the network).")
                    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="The SuperLink's TCP port.")
                    ] = 9092,
    rounds: Annotated[int, typer.Option(min=1, help="Rounds to run.")] = 3,
    min_nodes: Annotated[int, typer.Option(
        min=1, help="Devices to wait for (at most --round-timeout s) before each round.")] = 2,
    round_timeout: Annotated[float, typer.Option(
        min=1, help="Seconds each phase of a round (shares in, aggregate acknowledged) waits "
                    "for the devices; a device later than that misses the round.")] = 60.0,
    first_wait: Annotated[float, typer.Option(
        min=0, help="Seconds the first round waits for --min-nodes devices: they reconnect "
                    "to a new SuperLink at intervals of up to 20 s.")] = 300.0,
    status_file: Annotated[Path | None, typer.Option(
        help="JSON status written after each round, beside it a .prom file of Prometheus "
             "metrics (default: <state-dir>/status.json).")] = None,
    tls_cert: Annotated[Path | None, typer.Option(
        help="The SuperLink's TLS certificate (PEM; needs --tls-key and --tls-ca).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="Its private key.")] = None,
    tls_ca: Annotated[Path | None, typer.Option(
        help="The CA that signed it (devices get it as learn --fleet-ca).")] = None,
    insecure: Annotated[bool, typer.Option(
        help="Plain HTTP instead of TLS: a trusted network, or a try on localhost.")] = False,
    show: Annotated[bool, typer.Option(
        help="Run nothing: print the rounds of the status file as a table.")] = False,
) -> None:
    """Run a fleet's learning rounds: devices (`edgecl learn --fleet`) share their weights,
    never their samples, and each takes the fleet's average.

    Starts a Flower SuperLink and runs edgecl's Flower app on it. Each round asks every
    connected device for its weights, averages each array weighted by the samples the devices
    learned for it (a task's head only over the devices that met the task), and sends the
    average back; each device journals it and goes on learning. Needs pip install -e
    '.[fleet]'. Exits 0 when every round ran.
    """
    from edgecl.fleet.launch import FleetError, FleetSettings, run_fleet

    if show:
        path = status_file or state_dir / "status.json"
        try:
            print_table(_rounds_table(json.loads(path.read_text())))
        except (OSError, ValueError, KeyError) as e:
            fail(f"{path}: not a fleet status file ({e})")
        return
    if not insecure and not (tls_cert and tls_key and tls_ca):
        fail("the fleet server needs --tls-cert, --tls-key and --tls-ca, or --insecure")
    settings = FleetSettings(state_dir, host, port, rounds, min_nodes, round_timeout,
                             status_file or state_dir / "status.json", insecure,
                             tls_cert, tls_key, tls_ca, first_wait=first_wait)
    try:
        code = run_fleet(settings)
    except FleetError as e:
        fail(str(e))
    if code:
        fail(f"the fleet's run ended with status {code}; see {state_dir}/superlink.log",
             code=1)


@app.command()
def status(
    to: Annotated[str, typer.Option(help="The daemon's URL.")] = "http://127.0.0.1:8765",
    token_file: Annotated[Path | None, typer.Option(
        help="Bearer token file (default: $EDGECL_LEARN_TOKEN if set).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print /v1/status as JSON.")] = False,
) -> None:
    """What a running `edgecl learn` knows: counts, lag, and each task's held-out accuracy."""

    from edgecl.daemon.client import LearnClient, LearnError

    token = _token(token_file, LEARN_TOKEN_ENV)
    try:
        with LearnClient(to, token) as client:
            s = client.status()
    except (LearnError, OSError, ValueError) as e:
        fail(f"{to}: {e}", code=1)
    if as_json:
        print(json.dumps(s, indent=1))
        return
    print_table(_status_table(s))


def _status_table(s: dict[str, Any]) -> Table:
    def pct(v: float | None) -> str:
        return "" if v is None else f"{v:.3f}"

    j = s["journal"]
    table = Table(title=f"{s['method']} on {s['device']}: {s['accepted']:,} accepted, "
                        f"{s['learned']:,} learned, {s['rejected']:,} rejected, lag {j['lag']:,}")
    for col in ("task", "accepted", "held out", "acc. when learned", "acc. now", "forgetting",
                "served model"):
        table.add_column(col, justify="left" if col == "task" else "right", overflow="fold")
    for task, t in s["tasks"].items():
        then, now = t["accuracy_when_learned"], t["accuracy"]
        forgetting = None if then is None or now is None else then - now
        table.add_row(task + (" (open)" if task == s["open_task"] else ""), f"{t['accepted']:,}",
                      f"{t['held_out']:,}", pct(then), pct(now), pct(forgetting), _served(t))
    return table


def _rounds_table(s: dict[str, Any]) -> Table:
    """`edgecl fleet --show`: one row per round of a fleet server's status file."""
    state = "finished" if s["finished"] else f"error: {s['error']}" if s["error"] else "running"
    table = Table(title=f"fleet: {len(s['rounds'])} of {s['num_rounds']} rounds ({state})")
    for col in ("round", "replied", "failed", "KiB in", "aggregate KiB", "acked", "s", "notes"):
        table.add_column(col, justify="left" if col == "notes" else "right", overflow="fold")
    for r in s["rounds"]:
        notes = [r["note"], *(f"{node}: {why}" for node, why in r["errors"].items())]
        table.add_row(str(r["round"]), f"{len(r['replied'])}/{len(r['sampled'])}",
                      str(len(r["failed"])), f"{sum(r['bytes_received'].values()) / 1024:,.0f}",
                      f"{r['aggregate_bytes'] / 1024:,.0f}", str(len(r["acks"])),
                      f"{r['duration_s']:.1f}", "; ".join(n for n in notes if n))
    return table


def _served(task: dict[str, Any]) -> str:
    """'v3 @1,200' (version, journal offset it was exported at), and whether the learner has
    moved on from it since ('behind')."""
    if task["served_version"] is None:
        return "behind" if task["behind"] else ""
    offset = task["served_offset"]
    where = f" @{offset:,}" if offset is not None else ""
    return f"v{task['served_version']}{where}" + (", behind" if task["behind"] else "")


def _choose_tasks(all_tasks: tuple[Any, ...], spec: str | None) -> list[Any]:
    if spec is None:
        return list(all_tasks)
    names = [t.name for t in all_tasks]
    chosen = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item in names:
            chosen.append(all_tasks[names.index(item)])
        elif item.isdigit() and int(item) < len(all_tasks):
            chosen.append(all_tasks[int(item)])
        else:
            raise ValueError(f"--tasks: no task {item!r}; the source has {', '.join(names)} "
                             f"(or indices 0..{len(names) - 1})")
    return chosen


def _tls(cert: Path | None, key: Path | None) -> tuple[Path, Path] | None:
    """--tls-cert and --tls-key, both or neither."""
    if (cert is None) != (key is None):
        fail("--tls-cert and --tls-key go together")
    return (cert, key) if cert and key else None


def _token(path: Path | None, env: str) -> str | None:
    """The bearer token: from the file, else from $env, else none (an empty one is refused)."""
    import os

    token = _read_secret(path) if path else os.environ.get(env)
    if token is not None and not token:
        fail(f"${env} is set but empty")
    return token


def _read_secret(path: Path, what: str = "token file") -> str:
    """A token or password from its file: UTF-8, not empty; a warning if others can read it."""
    try:
        secret = path.read_text(encoding="utf-8").strip()
    except OSError as e:
        fail(f"{path}: cannot read the {what} ({e.strerror})")
    except UnicodeDecodeError:
        fail(f"{path}: the {what} is not UTF-8 text")
    if not secret:
        fail(f"{path}: the {what} is empty")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        say(f"warning: {path} is readable by others (mode {mode:o}); chmod 600 it")
    return secret
