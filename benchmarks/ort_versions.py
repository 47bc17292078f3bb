"""Do exported models run, with their export-time logits, in older onnxruntime releases?

A Jetson on JetPack 6 (Python 3.10) can install onnxruntime up to about 1.23, and older boxes
older ones, while `edgecl export` runs with the newest. This script trains four tiny learners
(2 tasks x 20 samples each: the MLP of models/gem.yaml, the 1-D conv net of
models/mnist1d-conv1d.yaml, the reduced ResNet-18 of models/splitmnist-resnet18.yaml and WSN's
folded subnetwork of models/wsn.yaml), exports their first task, then for each onnxruntime
version asked for makes a venv beside the models (`pip install onnxruntime==V "numpy<2"`: needs
PyPI), runs each model there on its manifest's probe inputs and prints the largest difference
from the logits the exporter recorded, and whether every argmax agrees.

    .venv/bin/python benchmarks/ort_versions.py [--versions 1.17.3 1.23.2] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from edgecl.checkpoint import save_checkpoint
from edgecl.export import Exporter
from edgecl.protocol import run_protocol
from edgecl.repository import probe_input
from edgecl.setup import benchmark_for, load_config

MODELS = Path(__file__).resolve().parent.parent / "models"
PRESETS = {"mlp": "gem.yaml", "conv1d": "mnist1d-conv1d.yaml",
           "resnet18": "splitmnist-resnet18.yaml", "wsn": "wsn.yaml"}

# Runs inside each version's venv: numpy and onnxruntime only.
CHECK = """
import json, sys
import numpy as np, onnxruntime as ort
rows = []
for case in json.load(open(sys.argv[1])):
    session = ort.InferenceSession(case["model"], providers=["CPUExecutionProvider"])
    probe = np.load(case["probe"])
    logits = session.run(None, {session.get_inputs()[0].name: probe["x"]})[0]
    rows.append({"model": case["name"],
                 "max_abs_diff": float(np.abs(logits - probe["logits"]).max()),
                 "same_argmax": bool((logits.argmax(1) == probe["logits"].argmax(1)).all())})
print(json.dumps({"onnxruntime": ort.__version__, "rows": rows}))
"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--versions", nargs="+", default=["1.17.3", "1.23.2"],
                   help="onnxruntime releases to try [1.17.3 1.23.2]")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where models and venvs go (kept; venvs are reused) [a temp folder]")
    return p.parse_args()


def export_models(workdir: Path) -> list[dict[str, str]]:
    """Train, export and write the probe of one model per net kind; the cases to check."""
    cases = []
    for name, preset in PRESETS.items():
        cfg = load_config(MODELS / preset, {"device": "cpu", "benchmark": {
            "n_tasks": 2, "samples_per_task": 20}})
        _, learner = run_protocol(cfg, benchmark_for(cfg))
        checkpoint = workdir / name / "checkpoint.pt"
        save_checkpoint(checkpoint, learner)
        exporter = Exporter(checkpoint)
        manifest = exporter.export(exporter.tasks[0], workdir / name / "repo")
        folder = workdir / name / "repo" / manifest.task / str(manifest.version)
        x = probe_input(manifest.input.shape[1:], manifest.probe.seed, manifest.probe.batch)
        np.savez(folder / "probe.npz", x=x, logits=np.asarray(manifest.probe.logits, np.float32))
        cases.append({"name": name, "model": str(folder / "model.onnx"),
                      "probe": str(folder / "probe.npz")})
    return cases


def venv_python(workdir: Path, version: str) -> Path:
    """The python of a venv holding onnxruntime `version` (made once, then reused)."""
    venv = workdir / f"ort-{version}"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"onnxruntime=={version}",
                        "numpy<2"], check=True)
    return python


def main() -> None:
    args = parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="edgecl-ort-"))
    workdir.mkdir(parents=True, exist_ok=True)
    cases_file = workdir / "cases.json"
    cases_file.write_text(json.dumps(export_models(workdir)))
    print(f"{'onnxruntime':>12s} {'model':>9s} {'max |diff|':>11s} {'same argmax':>12s}")
    for version in args.versions:
        out = subprocess.run([str(venv_python(workdir, version)), "-c", CHECK, str(cases_file)],
                             check=True, capture_output=True, text=True).stdout
        report = json.loads(out)
        for row in report["rows"]:
            print(f"{report['onnxruntime']:>12s} {row['model']:>9s} "
                  f"{row['max_abs_diff']:11.2e} {row['same_argmax']!s:>12s}")
    print(f"models and venvs in {workdir}")


if __name__ == "__main__":
    main()
