"""Fingerprints of `edgecl bench` runs: proof that a refactor changed no result.

For every method it runs `edgecl bench --method all` on one benchmark and seed, then hashes what
each run computed: the accuracy matrix R, the initial accuracies b, and every tensor and value of
the learner's saved state (weights, memory, optimiser, RNG). Timings, host names and file paths
are left out. `--write FILE` stores the fingerprints; `--check FILE` compares against stored ones
and exits 1 on any difference, naming the methods that differ.

    .venv/bin/python benchmarks/fingerprint.py --check benchmarks/fingerprints/pmnist-s0.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch


def _feed(h: Any, obj: Any) -> None:
    """Hash `obj` (nested dicts, lists, tensors, numbers, strings) in a fixed order."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{obj.dtype}{list(obj.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=str):
            h.update(repr(k).encode())
            _feed(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, list | tuple):
        h.update(b"[")
        for v in obj:
            _feed(h, v)
        h.update(b"]")
    else:
        h.update(repr(obj).encode())


def digest(obj: Any) -> str:
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def fingerprints(benchmark: str, seed: int) -> dict[str, dict[str, str]]:
    """{method: {"R": sha256, "state": sha256, "acc": repr}} of one `bench --method all` run."""
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, "-m", "edgecl", "bench", "--benchmark", benchmark,
                        "--method", "all", "--seed", str(seed), "--out", out], check=True)
        found = {}
        for run in sorted(p for p in Path(out).iterdir() if (p / "result.json").is_file()):
            result = json.loads((run / "result.json").read_text())
            state = torch.load(run / "checkpoint.pt", map_location="cpu",
                               weights_only=True)["state"]
            found[run.name] = {"acc": repr(result["acc"]),
                               "R": digest([result["R"], result["b"]]), "state": digest(state)}
        return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmark", default="pmnist")
    parser.add_argument("--seed", type=int, default=0)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--write", type=Path, help="store the fingerprints in this JSON file")
    what.add_argument("--check", type=Path, help="compare with the fingerprints in this file")
    args = parser.parse_args()
    found = {"benchmark": args.benchmark, "seed": args.seed,
             "methods": fingerprints(args.benchmark, args.seed)}
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(json.dumps(found, indent=1) + "\n")
        print(f"wrote {len(found['methods'])} fingerprints to {args.write}")
        return 0
    stored = json.loads(args.check.read_text())
    if (stored["benchmark"], stored["seed"]) != (args.benchmark, args.seed):
        print(f"{args.check} holds {stored['benchmark']} seed {stored['seed']}; pass those")
        return 2
    differ = sorted(m for m in stored["methods"] | found["methods"]
                    if stored["methods"].get(m) != found["methods"].get(m))
    for m in sorted(stored["methods"] | found["methods"]):
        print(f"{m:12s} {'DIFFERS' if m in differ else 'identical'}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
