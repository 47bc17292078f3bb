"""The GEM paper's continual-learning metrics (Lopez-Paz & Ranzato, 2017, section 2).

R is the T x T accuracy matrix: R[i, j] is the test accuracy on task j right after the learner
observed the last sample of task i (0-based here). b[j] is the test accuracy on task j of the
randomly initialised net, before any training. `Evaluator` measures those accuracies, for the
benchmark protocol and the daemon alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

EVAL_BATCH = 1000  # samples per forward pass when measuring accuracy


class Predicts(Protocol):
    predict: Callable[[torch.Tensor, str], torch.Tensor]  # (inputs, task id) -> logits


class Evaluator:
    """Accuracy on fixed labelled sets, one per task; the sets are moved to `device` once."""

    def __init__(self, sets: Iterable[tuple[str, torch.Tensor, torch.Tensor]],
                 device: torch.device) -> None:
        self.sets = [(task, x.to(device), y.to(device)) for task, x, y in sets]
        self.seconds = 0.0  # spent in every call so far

    def __call__(self, learner: Predicts) -> np.ndarray:
        """Each set's accuracy under `learner.predict`, in the order of the sets."""
        if not self.sets:
            return np.zeros(0)
        t0 = time.perf_counter()
        correct = [  # counts stay on the device: one sync for the whole evaluation
            sum((learner.predict(x[i:i + EVAL_BATCH], task).argmax(1) == y[i:i + EVAL_BATCH]).sum()
                for i in range(0, len(y), EVAL_BATCH))
            for task, x, y in self.sets]
        accs = torch.stack(correct).cpu().numpy() / np.asarray([len(y) for _, _, y in self.sets])
        self.seconds += time.perf_counter() - t0
        return accs


def _check(R: np.ndarray) -> np.ndarray:
    R = np.asarray(R, dtype=np.float64)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] == 0:
        raise ValueError(f"R must be a non-empty square matrix, got shape {R.shape}")
    return R


def acc(R: np.ndarray) -> float:
    """Average accuracy: mean of the last row, (1/T) sum_i R[T-1, i]."""
    R = _check(R)
    return float(R[-1].mean())


def bwt(R: np.ndarray) -> float:
    """Backward transfer: (1/(T-1)) sum_{i<T-1} R[T-1, i] - R[i, i].

    Averaged over T-1 tasks (the last task has no 'after'), as in the paper; 0.0 when T = 1.
    Negative values are forgetting.
    """
    R = _check(R)
    T = R.shape[0]
    if T == 1:
        return 0.0
    return float(np.mean(R[-1, :-1] - np.diag(R)[:-1]))


def fwt(R: np.ndarray, b: np.ndarray) -> float:
    """Forward transfer: (1/(T-1)) sum_{i>0} R[i-1, i] - b[i].

    Averaged over T-1 tasks (the first task has no 'before'), as in the paper; 0.0 when T = 1.
    """
    R = _check(R)
    b = np.asarray(b, dtype=np.float64)
    T = R.shape[0]
    if b.shape != (T,):
        raise ValueError(f"b must have one entry per task ({T}), got shape {b.shape}")
    if T == 1:
        return 0.0
    return float(np.mean(np.diag(R, k=1) - b[1:]))


@dataclass(frozen=True)
class Summary:
    acc: float
    bwt: float
    fwt: float


def summarize(R: np.ndarray, b: np.ndarray) -> Summary:
    return Summary(acc(R), bwt(R), fwt(R, b))
