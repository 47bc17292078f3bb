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
    # Validation split, seeds 0-2 (benchmarks/sweep.py --config models/<method>.yaml --test
    # --set benchmark.name rotmnist --set optimizer.lr 0.003 0.01 0.03 --set method.strength ...);
    # mean validation ACC of the choice, then its test ACC:
    # EWC λ 3-3000: lr 0.01, λ 300: 0.608, test 0.600 ± 0.013.
    ("ewc", "rotmnist"): {"optimizer": {"lr": 0.01}, "method": {"strength": 300.0}},
    # MAS λ 0.03-3: lr 0.01, λ 1: 0.627, test 0.612 ± 0.008.
    ("mas", "rotmnist"): {"optimizer": {"lr": 0.01}, "method": {"strength": 1.0}},
    # LwF λ_o 0.1-64 (T=2): lr 0.01, λ_o 16: 0.601, test 0.603 ± 0.013.
    ("lwf", "rotmnist"): {"optimizer": {"lr": 0.01}, "method": {"strength": 16.0}},
    # A-GEM (lr 0.03 / 0.1 x ref_batch 256 / 512) and WSN (Adam lr 0.001-0.01 x capacity) chose
    # their pmnist settings again: A-GEM 0.508, test 0.486 ± 0.015; WSN ([0.3, 0.5]) 0.865.
}


def benchmark_settings(method: str, benchmark: str) -> dict[str, dict[str, Any]]:
    """The `optimizer` and `method` keys `method` runs with on `benchmark` unless told otherwise."""
    return BENCHMARK_SETTINGS.get((method, benchmark), {})
