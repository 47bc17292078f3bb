"""Soak runs behind the table in docs/reliability.md: serve and learn under sustained load.

    apt-get install -y wrk
    .venv/bin/python benchmarks/reliability.py [--parts serve learn] [--minutes 10]
        [--window-s 30] [--share 0.8] [--out result.json]

serve: exports the untrained pmnist MLP of models/finetune.yaml (benchmarks/serve_load.py's
model) and starts `edgecl serve --threads 1` in a subprocess. Its maximum rate is measured with
wrk (8 connections, 10 s, closed loop); then wrk runs at --share of that rate for --minutes, in
windows of --window-s, each reporting requests/s, p50 / p99 / max latency, non-2xx responses,
socket errors, the server's RSS and the machine's load average. wrk is closed loop: the rate is
held by 32 connections each pausing between requests (wrk's Lua `delay()`), the pause
calibrated once by a 10 s probe (wrk2's constant-rate mode, which would also correct for
coordinated omission, is not packaged by Debian). On a busy machine the rate drifts with the
neighbours' load: the windows show it.

learn: a fine-tuning `edgecl learn` daemon on the pmnist schema (models/finetune.yaml with
`learn: {max_lag: --max-lag}`) fed, for --minutes, as fast as --senders keep-alive connections
(threads, each its own tasks) can post binary requests of 100 real pmnist samples, each task's
first 1,000 then its end marker, tasks cycling. Ingest can outrun the learner, so the journal
lag reaches max_lag and backpressure (429) engages. A 429 is waited out (Retry-After, at most
0.1 s) and sent again, as `edgecl.daemon.client` does. Every --window-s:
samples acknowledged, 429s, journal lag, the daemon's RSS. At the end the client waits until
everything is learned and checks that the daemon accepted and learned exactly the samples it
acknowledged (samples lost: acknowledged - learned).

The machine's load average is recorded throughout: on a shared machine the absolute rates say
more about the neighbours than about edgecl. Processes are killed in `finally`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from learn_daemon import ROOT, Pmnist, Sender, proc_status_kb, running, write_config
from serve_load import LUA, export_model, server, wrk

PACED_CONNECTIONS = 32  # under the servers' limit of 64
WINDOW_KEYS = ("requests_per_s", "p50_ms", "p99_ms", "max_ms", "non_2xx", "socket_errors")


def load_average() -> float:
    return os.getloadavg()[0]


def rss_mb(pid: int) -> float:
    return proc_status_kb(pid)["VmRSS"] / 1024


def wrk_run(url: str, script: Path, connections: int, seconds: float) -> dict[str, float]:
    """One wrk run (2 threads): rate, latencies in ms, errors of every kind."""
    run = wrk(url, script, connections, seconds, threads=2)
    return {k.replace("_us", "_ms"): v / 1e3 if k.endswith("_us") else v for k, v in run.items()}


def paced_script(folder: Path, body: Path, delay_ms: float) -> Path:
    script = folder / f"paced-{delay_ms:.3f}.lua"
    script.write_text(LUA.format(body=body) + f"function delay()\n  return {delay_ms:.3f}\nend\n")
    return script


def part_serve(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    repo = tmp / "repo"
    version_dir, x = export_model(None, None, repo, "random")
    body = tmp / "body.json"
    body.write_text(json.dumps({"inputs": [{"name": "input", "shape": list(x.shape),
                                            "datatype": "FP32", "data": x.ravel().tolist()}]}))
    flat = tmp / "flat.lua"
    flat.write_text(LUA.format(body=body))
    with server("edgecl", repo, version_dir, args.port) as (url, pid):
        target = f"{url}/v2/models/{version_dir.parent.name}/infer"
        maximum = wrk_run(target, flat, 8, 10)
        rate = args.share * maximum["requests_per_s"]
        # enough connections that each one's time per request at `rate` exceeds the latency
        connections = PACED_CONNECTIONS
        period_ms = connections * 1e3 / rate
        probe = wrk_run(target, paced_script(tmp, body, period_ms), connections, 10)
        latency_ms = max(0.0, connections * 1e3 / probe["requests_per_s"] - period_ms)
        delay_ms = max(0.0, period_ms - latency_ms)
        script = paced_script(tmp, body, delay_ms)
        rss_start = rss_mb(pid)
        windows = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < args.minutes * 60:
            window = wrk_run(target, script, connections, args.window_s)
            windows.append({"t_s": round(time.monotonic() - t0), **window,
                            "rss_mb": rss_mb(pid), "load_1m": load_average()})
            print(f"serve {windows[-1]['t_s']:>5} s: " + ", ".join(
                f"{k} {windows[-1][k]:g}" for k in (*WINDOW_KEYS, "rss_mb", "load_1m")),
                flush=True)
    total = sum(w["requests_per_s"] * args.window_s for w in windows)
    p99s = [w["p99_ms"] for w in windows]
    return {"max_requests_per_s": maximum["requests_per_s"], "target_per_s": rate,
            "delay_ms": delay_ms, "requests": round(total),
            "mean_requests_per_s": total / (len(windows) * args.window_s),
            "non_2xx": sum(w["non_2xx"] for w in windows),
            "socket_errors": sum(w["socket_errors"] for w in windows),
            "p99_ms_min": min(p99s), "p99_ms_median": sorted(p99s)[len(p99s) // 2],
            "p99_ms_max": max(p99s), "rss_mb_start": rss_start, "rss_mb_end": windows[-1]["rss_mb"],
            "load_1m_mean": sum(w["load_1m"] for w in windows) / len(windows),
            "windows": windows}


def part_learn(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    data = Pmnist()
    config = write_config(tmp, "finetune", {"max_lag": args.max_lag})
    options = argparse.Namespace(edgecl=args.edgecl, timeout_s=600.0, poll_s=0.25)
    with running(options, config, tmp / "state", tmp) as daemon:
        daemon.wait_learned()
        senders = [Sender(daemon) for _ in range(args.senders)]
        deadline = time.monotonic() + args.minutes * 60
        threads = [threading.Thread(target=feed, args=(sender, data, i, args.senders, deadline))
                   for i, sender in enumerate(senders)]
        rss_start = daemon.rss_kb()["VmRSS"] / 1024
        windows: list[dict[str, Any]] = []
        t0 = time.monotonic()
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            time.sleep(min(args.window_s, max(0.0, deadline - time.monotonic())) or 0.1)
            s = daemon.status()
            windows.append({"t_s": round(time.monotonic() - t0),
                            "acked": sum(x.acked for x in senders),
                            "retries_429": sum(x.retries_429 for x in senders),
                            "lag": s["journal"]["lag"], "learned": s["learned"],
                            "rss_mb": daemon.rss_kb()["VmRSS"] / 1024, "load_1m": load_average()})
            print("learn " + ", ".join(f"{k} {v:g}" for k, v in windows[-1].items()), flush=True)
        seconds = time.monotonic() - t0
        acked = sum(x.acked for x in senders)
        final = daemon.wait_learned(acked)
        rss_end = daemon.rss_kb()["VmRSS"] / 1024
    return {"seconds": seconds, "acked": acked, "acked_per_s": acked / seconds,
            "retries_429": sum(x.retries_429 for x in senders), "accepted": final["accepted"],
            "learned": final["learned"], "lost": acked - final["learned"],
            "max_lag": max(w["lag"] for w in windows), "rss_mb_start": rss_start,
            "rss_mb_peak": max(w["rss_mb"] for w in windows), "rss_mb_end": rss_end,
            "load_1m_mean": sum(w["load_1m"] for w in windows) / len(windows),
            "windows": windows}


def feed(sender: Sender, data: Pmnist, first: int, step: int, deadline: float) -> None:
    """Post tasks first, first + step, ... (cycling): 10 requests of 100, then the end."""
    tasks = list(range(first, len(data.names), step))
    k = 0
    while time.monotonic() < deadline:
        visit, start = divmod(k, 10)
        task = tasks[visit % len(tasks)]
        sender.samples(data.binary(task, start * 100, 100))
        if start == 9:
            sender.end(data.names[task])
        k += 1
    sender.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=["serve", "learn"],
                        default=["serve", "learn"])
    parser.add_argument("--minutes", type=float, default=10.0, help="per part")
    parser.add_argument("--window-s", type=float, default=30.0)
    parser.add_argument("--share", type=float, default=0.8, help="of serve's maximum rate")
    parser.add_argument("--port", type=int, default=18081)
    parser.add_argument("--senders", type=int, default=2, help="learn: ingest connections")
    parser.add_argument("--max-lag", type=int, default=5000,
                        help="learn: journal records behind before 429 (the default config's "
                             "is 50,000)")
    parser.add_argument("--edgecl", default=str(Path(sys.executable).parent / "edgecl"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if "serve" in args.parts and shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install -y wrk")
    os.chdir(ROOT)  # models/*.yaml
    results: dict[str, Any] = {"minutes": args.minutes, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        for part in args.parts:
            folder = Path(tmp) / part
            folder.mkdir()
            results[part] = (part_serve if part == "serve" else part_learn)(args, folder)
            summary = {k: v for k, v in results[part].items() if k != "windows"}
            print(f"{part}: {json.dumps(summary)}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
