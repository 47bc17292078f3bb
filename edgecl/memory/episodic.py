"""GEM's episodic memory: a per-task ring buffer of past samples inside a hard byte budget.

Storage is one contiguous input tensor `[n_tasks_seen, quota, *input_shape]` (float32, float16 or
uint8) plus an int64 label tensor `[n_tasks_seen, quota]`, so all past tasks' memories can be read
in one batched tensor. Each task keeps its `quota` most recent samples; when a new task arrives
and the budget no longer fits `quota` slots per task, the quota shrinks and every task keeps its
most recent samples. Filled rows are always a prefix `[0, filled)` of a task's row.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "uint8": torch.uint8}
_LABEL_BYTES = torch.int64.itemsize
_FLOAT16_MAX = torch.finfo(torch.float16).max
_STATE_VERSION = 1


class MemoryBudgetError(ValueError):
    """The byte budget cannot hold even one sample per task."""


class EpisodicMemory:
    """Bounded per-task ring buffer of `(x, y)` samples addressed by integer task slots."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        per_task: int,
        max_tasks: int,
        budget_bytes: int | None = None,
        dtype: str = "float32",
        device: torch.device | str = "cpu",
    ) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"memory dtype must be one of {sorted(_DTYPES)}; got {dtype!r}")
        if not input_shape or any(int(d) < 1 for d in input_shape):
            raise ValueError(f"input_shape must be non-empty positive sizes; got {input_shape!r}")
        if per_task < 1 or max_tasks < 1:
            raise ValueError(f"per_task and max_tasks must be >= 1; got {per_task}, {max_tasks}")
        if budget_bytes is not None and budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0 or None; got {budget_bytes}")
        self.input_shape = tuple(int(d) for d in input_shape)
        self.per_task = int(per_task)
        self.max_tasks = int(max_tasks)
        self.budget_bytes = budget_bytes
        self.dtype = dtype
        self.device = torch.device(device)
        self.bytes_per_sample = (
            math.prod(self.input_shape) * _DTYPES[dtype].itemsize + _LABEL_BYTES
        )
        self.clear()

    def clear(self) -> None:
        """Forget every stored sample and task."""
        # no task stored: zero rows, but the quota one task would get (checks the budget)
        self._x = torch.zeros((0, self._quota_for(1), *self.input_shape),
                              dtype=_DTYPES[self.dtype], device=self.device)
        self._y = torch.zeros((0, self.quota), dtype=torch.int64, device=self.device)
        self._slots: list[int] = []  # row -> slot, in first-seen order
        self._row: dict[int, int] = {}  # slot -> row
        self._filled: list[int] = []  # per row
        self._pos: list[int] = []  # per row: next ring write position (the oldest once full)

    def _quota_for(self, n_tasks: int) -> int:
        """Slots per task when `n_tasks` tasks share the budget; raises if that is 0."""
        if self.budget_bytes is None:
            return self.per_task
        quota = min(self.per_task, self.budget_bytes // (self.bytes_per_sample * n_tasks))
        if quota == 0:
            raise MemoryBudgetError(
                f"memory budget of {self.budget_bytes} bytes cannot hold one sample per task: "
                f"{self.bytes_per_sample} bytes per sample x {n_tasks} tasks needs at least "
                f"{self.bytes_per_sample * n_tasks} bytes"
            )
        return quota

    def _check_slot(self, slot: int) -> int:
        slot = operator.index(slot)
        if not 0 <= slot < self.max_tasks:
            raise ValueError(f"task slot {slot} out of range: this memory has slots "
                             f"0..{self.max_tasks - 1} (max_tasks={self.max_tasks})")
        return slot

    @property
    def quota(self) -> int:
        """Current slots per task (for one task while nothing is stored)."""
        return self._x.shape[1]

    @property
    def tasks(self) -> list[int]:
        """Slots holding at least one sample, in first-seen order."""
        return list(self._slots)

    def filled(self, slot: int) -> int:
        """Number of stored samples of `slot` (0 for a slot never written)."""
        row = self._row.get(self._check_slot(slot))
        return 0 if row is None else self._filled[row]

    def __len__(self) -> int:
        return sum(self._filled)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to(self.device, torch.float32)
        if self.dtype == "uint8":
            lo, hi = (float(v) for v in torch.aminmax(x))
            if not (lo >= 0.0 and hi <= 1.0):
                raise ValueError(f"uint8 memory needs inputs in [0, 1]; observed min={lo:g}, "
                                 f"max={hi:g}")
            return x.mul(255.0).round_().to(torch.uint8)
        if self.dtype == "float16":
            peak = float(x.abs().max())
            if peak > _FLOAT16_MAX:
                raise ValueError(f"float16 memory overflows: observed |x| up to {peak:g} "
                                 f"> {_FLOAT16_MAX:g}")
            return x.to(torch.float16)
        return x

    def _decode(self, stored: torch.Tensor) -> torch.Tensor:
        """Float32 values of storage rows that indexing already copied (float32 passes as is)."""
        if self.dtype == "uint8":
            return stored.to(torch.float32).div_(255.0)
        return stored.to(torch.float32)

    def _add_task(self, slot: int) -> int:
        """Give `slot` a row, shrinking every task to its most recent samples if needed."""
        n = len(self._slots)
        quota = self._quota_for(n + 1)
        new_x = torch.zeros((n + 1, quota, *self.input_shape), dtype=self._x.dtype,
                            device=self.device)
        new_y = torch.zeros((n + 1, quota), dtype=torch.int64, device=self.device)
        if quota == self.quota:
            new_x[:n] = self._x
            new_y[:n] = self._y
        else:  # evict: each task keeps its newest `quota` samples, oldest at position 0
            old = self.quota
            for row in range(n):
                # the newest `keep` samples end just before the write position (pos == filled
                # until the ring wraps)
                keep, pos = min(self._filled[row], quota), self._pos[row]
                chrono = (pos - keep + torch.arange(keep, device=self.device)) % old
                new_x[row, :keep] = self._x[row, chrono]
                new_y[row, :keep] = self._y[row, chrono]
                self._filled[row] = keep
                self._pos[row] = keep % quota
        self._x, self._y = new_x, new_y
        self._slots.append(slot)
        self._row[slot] = n
        self._filled.append(0)
        self._pos.append(0)
        return n

    def add(self, x: torch.Tensor, y: torch.Tensor, slot: int) -> None:
        """Store a batch `x [b, *input_shape]`, `y [b]` of task `slot`, overwriting its oldest."""
        slot = self._check_slot(slot)
        x, y = torch.as_tensor(x), torch.as_tensor(y)
        if tuple(x.shape[1:]) != self.input_shape or y.shape != x.shape[:1]:
            raise ValueError(f"expected x [b, {', '.join(map(str, self.input_shape))}] and y [b]; "
                             f"got x {list(x.shape)} and y {list(y.shape)}")
        if x.shape[0] == 0:
            return
        enc = self._encode(x)
        row = self._row.get(slot)
        if row is None:
            row = self._add_task(slot)
        quota = self.quota
        enc, y = enc[-quota:], y[-quota:].to(self.device, torch.int64)
        b, pos = enc.shape[0], self._pos[row]
        idx = (pos + torch.arange(b, device=self.device)) % quota
        self._x[row, idx] = enc
        self._y[row, idx] = y
        self._pos[row] = (pos + b) % quota
        self._filled[row] = min(self._filled[row] + b, quota)

    def get(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Filled samples of `slot` in ring-storage order: `(x float32, y int64)`."""
        row = self._row.get(self._check_slot(slot))
        if row is None:
            return (torch.zeros((0, *self.input_shape), device=self.device),
                    torch.zeros(0, dtype=torch.int64, device=self.device))
        idx = torch.arange(self._filled[row], device=self.device)
        return self._decode(self._x[row, idx]), self._y[row, idx]

    def batched(self, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """All rows of `slots`: inputs `[k, quota, *shape]` float32 and labels `[k, quota]`.
        Task i's filled rows are the first `filled(slots[i])`; the rest (and unseen slots) are
        zeros. Float32 storage of slots stored one after another comes back as a view, without
        a copy (see `is_view`); anything else is a decoded copy."""
        rows = [self._row.get(self._check_slot(s), -1) for s in slots]
        first = rows[0] if rows else -1
        if self.dtype == "float32" and first >= 0 and rows == [*range(first, first + len(rows))]:
            return self._x[first:first + len(rows)], self._y[first:first + len(rows)]
        x = torch.zeros((len(rows), self.quota, *self.input_shape), dtype=torch.float32,
                        device=self.device)
        y = torch.zeros((len(rows), self.quota), dtype=torch.int64, device=self.device)
        seen = torch.tensor([r >= 0 for r in rows], dtype=torch.bool, device=self.device)
        if bool(seen.any()):
            src = torch.tensor([r for r in rows if r >= 0], dtype=torch.int64, device=self.device)
            x[seen] = self._decode(self._x[src])
            y[seen] = self._y[src]
        return x, y

    def is_view(self, t: torch.Tensor) -> bool:
        """Whether `t` shares this memory's current storage (costs no memory of its own)."""
        return t.untyped_storage().data_ptr() == self._x.untyped_storage().data_ptr()

    def footprint(self) -> dict[str, int]:
        """Allocated and used storage bytes, budget (0: none), quota and sample count."""
        return {
            "memory_bytes": self._x.nbytes + self._y.nbytes,
            "memory_used_bytes": len(self) * self.bytes_per_sample,
            "memory_budget_bytes": self.budget_bytes or 0,
            "memory_quota": self.quota,
            "memory_samples": len(self),
        }

    def _config(self) -> dict[str, Any]:
        return {
            "input_shape": list(self.input_shape),
            "per_task": self.per_task,
            "max_tasks": self.max_tasks,
            "budget_bytes": self.budget_bytes or 0,
            "dtype": self.dtype,
        }

    def state_dict(self) -> dict[str, Any]:
        """CPU copy of the full state; loadable with `torch.load(..., weights_only=True)`."""
        return {
            "version": _STATE_VERSION,
            **self._config(),
            "x": self._x.detach().to("cpu", copy=True),
            "y": self._y.detach().to("cpu", copy=True),
            "slots": list(self._slots),
            "filled": list(self._filled),
            "pos": list(self._pos),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()` taken from a memory built with the same arguments."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported memory state version {state.get('version')!r}")
        for key, want in self._config().items():
            if state[key] != want:
                raise ValueError(f"memory state has {key}={state[key]!r}; this memory has {want!r}")
        x, y = state["x"], state["y"]
        slots, filled, pos = ([int(v) for v in state[k]] for k in ("slots", "filled", "pos"))
        n = len(slots)
        quota = self._quota_for(max(n, 1))
        if (x.dtype != _DTYPES[self.dtype] or tuple(x.shape) != (n, quota, *self.input_shape)
                or tuple(y.shape) != (n, quota) or len(filled) != n or len(pos) != n):
            raise ValueError(
                f"memory state of {n} tasks x {quota} slots needs x {self.dtype} "
                f"{[n, quota, *self.input_shape]}, y {[n, quota]} and {n} fill counts and "
                f"positions; got x {x.dtype} {list(x.shape)}, y {list(y.shape)}, "
                f"{len(filled)} and {len(pos)}")
        self._x = x.to(self.device, copy=True)
        self._y = y.to(self.device, torch.int64, copy=True)
        self._slots, self._filled, self._pos = slots, filled, pos
        self._row = {s: r for r, s in enumerate(slots)}
