"""Per-benchmark settings of the methods, where a benchmark needs other values than pmnist's.

A method's `Params` defaults and `optimizer_defaults` are its pmnist settings. On another
benchmark, `--method M --benchmark B` runs with ``BENCHMARK_SETTINGS[(M, B)]`` beneath whatever
the config states (the config wins, key by key). Where the GEM paper's `run_experiments.sh` sets a
value (fine-tuning "single", "independent" and GEM on rotated MNIST) it is the paper's; the rest
were chosen by `benchmarks/sweep.py` on the validation split (never on the test score), each with
the command that chose it.
"""

from __future__ import annotations

from typing import Any

BENCHMARK_SETTINGS: dict[tuple[str, str], dict[str, dict[str, Any]]] = {
    # GEM paper, rotated MNIST: single lr 0.003, independent lr 0.1 (fine-tune warm start).
    ("finetune", "rotmnist"): {"optimizer": {"lr": 0.003}},
    ("independent", "rotmnist"): {"optimizer": {"lr": 0.1}},
}


def benchmark_settings(method: str, benchmark: str) -> dict[str, dict[str, Any]]:
    """The `optimizer` and `method` keys `method` runs with on `benchmark` unless told otherwise."""
    return BENCHMARK_SETTINGS.get((method, benchmark), {})
