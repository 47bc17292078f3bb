"""How long `edgecl learn` takes to be ready on an empty state dir, beside `import torch` alone.

For each config, N times: start `edgecl learn --port 0` on a new state dir, read its URL from
the log, poll /readyz until it answers 200; the time from the process's start to that answer,
against the time a bare `python -c "import torch"` takes (measured alternately, same machine).
The difference is what edgecl itself costs at start.

    .venv/bin/python benchmarks/learn_startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EDGECL = Path(sys.executable).with_name("edgecl")
SENSOR_STREAM = {"device": "cpu", "net": {"name": "conv1d"}, "method": {"name": "gem"},
                 "stream": {"input_shape": [6, 64],
                            "classes": ["standing", "running", "walking", "badminton"]}}


def torch_import_s() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    return time.perf_counter() - t0


def ready_s(config: Path, folder: Path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(EDGECL), "learn", "--config", str(config), "--state-dir",
                             str(folder / "state"), "--port", "0"],
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # one JSON object per line; the URL comes once it listens
            msg = json.loads(line).get("msg", "")
            if msg.startswith("listening on "):
                url = msg.split()[2]
                break
        else:
            raise RuntimeError(f"edgecl learn exited with {proc.wait()}")
        while True:
            try:
                with urllib.request.urlopen(f"{url}/readyz", timeout=5) as answer:
                    if answer.status == 200:
                        return time.perf_counter() - t0
            except OSError:
                pass
            time.sleep(0.01)
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sensors = Path(tmp) / "sensors.yaml"
        sensors.write_text(json.dumps(SENSOR_STREAM))  # JSON is YAML
        configs = {"stream: section alone (sensor windows, GEM, conv1d)": sensors,
                   "models/gem.yaml (no stream: the pmnist benchmark's schema)":
                       ROOT / "models" / "gem.yaml"}
        imports = []
        for name, config in configs.items():
            times = []
            for i in range(args.repeats):
                imports.append(torch_import_s())
                times.append(ready_s(config, Path(tmp) / f"{len(imports)}-{i}"))
            torch_s = statistics.median(imports)
            print(f"{name}: ready after {statistics.median(times):.2f} s (median of "
                  f"{args.repeats}; min {min(times):.2f}, max {max(times):.2f}); import torch "
                  f"alone {torch_s:.2f} s: edgecl's own start-up "
                  f"{statistics.median(times) - torch_s:.2f} s")


if __name__ == "__main__":
    main()
