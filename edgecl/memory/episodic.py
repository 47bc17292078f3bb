"""GEM's episodic memory: a per-task ring buffer of past samples inside a hard byte budget.

Storage is one contiguous input tensor viewed as `[n_tasks_seen, quota, *input_shape]` (float32,
float16 or uint8) plus an int64 label tensor `[n_tasks_seen, quota]`. Each task keeps its `quota`
most recent samples; when a new task arrives and the budget no longer fits `quota` slots per task,
the quota shrinks and every task keeps its most recent samples, moved in place. Filled rows are
always a prefix `[0, filled)` of a task's row.

A step reads samples as float32. Float32 storage is read in place; compact storage (float16,
uint8) is decoded into one decode buffer of `decode_rows` rows that the method sizes to what a
step reads (A-GEM: its reference batch; exact GEM: one task's memory at a time), so no decoded
copy of the whole memory ever exists.

A memory built with `logits=k` (DER++) keeps with each sample the float32 logits `[k]` the net
gave it when it was stored: stored, shrunk, decoded (`gather_logits`), budgeted and saved with it.

The byte budget covers the stored samples (their logits included) and the decode buffer. A
budgeted memory reserves its storage once, at its first sample, and never reallocates it, so
adding a task never holds more than the budget. A budget that cannot hold one sample of each of
`max_tasks` tasks beside the decode buffer is refused when the memory is built, before any
learning.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from edgecl.config import ConfigError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "uint8": torch.uint8}
_LABEL_BYTES = torch.int64.itemsize
_FLOAT16_MAX = torch.finfo(torch.float16).max
_STATE_VERSION = 1


class MemoryBudgetError(ConfigError):
    """The byte budget cannot hold one sample of every task beside the decode buffer."""


def sample_bytes(input_shape: Sequence[int], dtype: str) -> int:
    """Stored bytes of one sample: its input in `dtype` and its int64 label."""
    return math.prod(input_shape) * _DTYPES[dtype].itemsize + _LABEL_BYTES


def decoded_bytes(input_shape: Sequence[int]) -> int:
    """Bytes of one row of the decode buffer: a float32 input and its int64 label."""
    return math.prod(input_shape) * torch.float32.itemsize + _LABEL_BYTES


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
        decode_rows: int = 0,
        logits: int = 0,
    ) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"memory dtype must be one of {sorted(_DTYPES)}; got {dtype!r}")
        if not input_shape or any(int(d) < 1 for d in input_shape):
            raise ValueError(f"input_shape must be non-empty positive sizes; got {input_shape!r}")
        if per_task < 1 or max_tasks < 1:
            raise ValueError(f"per_task and max_tasks must be >= 1; got {per_task}, {max_tasks}")
        if budget_bytes is not None and budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0 or None; got {budget_bytes}")
        if decode_rows < 0:
            raise ValueError(f"decode_rows must be >= 0; got {decode_rows}")
        if logits < 0:
            raise ValueError(f"logits must be >= 0; got {logits}")
        self.input_shape = tuple(int(d) for d in input_shape)
        self.per_task = int(per_task)
        self.max_tasks = int(max_tasks)
        self.budget_bytes = budget_bytes
        self.dtype = dtype
        self.device = torch.device(device)
        self.logits = int(logits)
        logit_bytes = self.logits * torch.float32.itemsize
        self.bytes_per_sample = sample_bytes(self.input_shape, dtype) + logit_bytes
        self.decode_rows = int(decode_rows)
        self.decode_bytes = self.decode_rows * (decoded_bytes(self.input_shape) + logit_bytes)
        self._quota_for(self.max_tasks)  # a budget too small for max_tasks is refused now
        self._bx = torch.zeros((0, *self.input_shape), dtype=_DTYPES[dtype], device=self.device)
        self._by = torch.zeros(0, dtype=torch.int64, device=self.device)
        self._bz = torch.zeros((0, self.logits), device=self.device)
        self._dx = torch.zeros((self.decode_rows, *self.input_shape), device=self.device)
        self._dy = torch.zeros(self.decode_rows, dtype=torch.int64, device=self.device)
        self._dz = torch.zeros((self.decode_rows, self.logits), device=self.device)
        self.clear()

    def clear(self) -> None:
        """Forget every stored sample and task (the storage stays reserved)."""
        self._quota = self._quota_for(1)  # no task stored: the quota one task would get
        self._slots: list[int] = []  # row -> slot, in first-seen order
        self._row: dict[int, int] = {}  # slot -> row
        self._filled: list[int] = []  # per row
        self._pos: list[int] = []  # per row: next ring write position (the oldest once full)

    def _quota_for(self, n_tasks: int) -> int:
        """Slots per task when `n_tasks` tasks share the budget; raises if that is 0."""
        if self.budget_bytes is None:
            return self.per_task
        room = max(0, self.budget_bytes - self.decode_bytes)
        quota = min(self.per_task, room // (self.bytes_per_sample * n_tasks))
        if quota == 0:
            kept = " with its logits" if self.logits else ""
            decode = (f" + a decode buffer of {self.decode_rows} float32 rows "
                      f"({self.decode_bytes} bytes)" if self.decode_rows else "")
            raise MemoryBudgetError(
                f"memory.budget_bytes: {self.budget_bytes} bytes cannot hold one sample per task "
                f"for {n_tasks} tasks: {self.bytes_per_sample} bytes per {self.dtype} "
                f"sample{kept} x {n_tasks} tasks{decode} needs at least "
                f"{self.bytes_per_sample * n_tasks + self.decode_bytes} bytes")
        return quota

    def _budget_rows(self) -> int:
        """The most sample rows the budget ever stores, at any number of tasks."""
        return max(n * self._quota_for(n) for n in range(1, self.max_tasks + 1))

    def _reserve(self, rows: int) -> None:
        """Make the storage hold `rows` sample rows, keeping the stored ones. A budgeted memory
        reserves everything its budget allows the first time, so it never grows again."""
        if len(self._bx) >= rows:
            return
        if self.budget_bytes is not None:
            rows = self._budget_rows()
        used = len(self._slots) * self._quota
        bx = torch.zeros((rows, *self.input_shape), dtype=self._bx.dtype, device=self.device)
        by = torch.zeros(rows, dtype=torch.int64, device=self.device)
        bz = torch.zeros((rows, self.logits), device=self.device)
        bx[:used] = self._bx[:used]
        by[:used] = self._by[:used]
        bz[:used] = self._bz[:used]
        self._bx, self._by, self._bz = bx, by, bz

    def _check_slot(self, slot: int) -> int:
        slot = operator.index(slot)
        if not 0 <= slot < self.max_tasks:
            raise ValueError(f"task slot {slot} out of range: this memory has slots "
                             f"0..{self.max_tasks - 1} (max_tasks={self.max_tasks})")
        return slot

    def _stored_row(self, slot: int) -> int:
        row = self._row.get(self._check_slot(slot))
        if row is None:
            raise ValueError(f"task slot {slot} has no stored samples")
        return row

    @property
    def _x(self) -> torch.Tensor:
        """The stored inputs `[n_tasks_seen, quota, *input_shape]`, a view of the storage."""
        n, quota = len(self._slots), self._quota
        return self._bx[:n * quota].view(n, quota, *self.input_shape)

    @property
    def _y(self) -> torch.Tensor:
        n, quota = len(self._slots), self._quota
        return self._by[:n * quota].view(n, quota)

    @property
    def _z(self) -> torch.Tensor:
        n, quota = len(self._slots), self._quota
        return self._bz[:n * quota].view(n, quota, self.logits)

    @property
    def quota(self) -> int:
        """Current slots per task (for one task while nothing is stored)."""
        return self._quota

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

    def _decode_into(self, out: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
        """`out` (float32) set to the values of `stored` (storage dtype, same shape)."""
        out.copy_(stored)
        if self.dtype == "uint8":
            out.div_(255.0)
        return out

    def _add_task(self, slot: int) -> int:
        """Give `slot` a row, shrinking every task to its most recent samples if needed."""
        n = len(self._slots)
        quota = self._quota_for(n + 1)
        if quota < self._quota:
            self._shrink(quota)
        self._reserve((n + 1) * quota)
        self._slots.append(slot)
        self._row[slot] = n
        self._filled.append(0)
        self._pos.append(0)
        return n

    def _shrink(self, quota: int) -> None:
        """Lay the stored tasks out at `quota` slots each, in place: each keeps its newest
        `quota` samples, oldest first. Row r moves down to r * quota (never past a row not yet
        moved), through a copy of at most one task's samples."""
        old = self._quota
        for row in range(len(self._slots)):
            # the newest `keep` samples end just before the write position (pos == filled
            # until the ring wraps)
            keep, pos = min(self._filled[row], quota), self._pos[row]
            chrono = row * old + (pos - keep + torch.arange(keep, device=self.device)) % old
            self._bx[row * quota:row * quota + keep] = self._bx[chrono]
            self._by[row * quota:row * quota + keep] = self._by[chrono]
            self._bz[row * quota:row * quota + keep] = self._bz[chrono]
            self._filled[row] = keep
            self._pos[row] = keep % quota
        self._quota = quota

    def add(self, x: torch.Tensor, y: torch.Tensor, slot: int,
            logits: torch.Tensor | None = None) -> None:
        """Store a batch `x [b, *input_shape]`, `y [b]` of task `slot` (and its `logits [b, k]`,
        which a memory built with `logits=k` needs), overwriting its oldest."""
        slot = self._check_slot(slot)
        x, y = torch.as_tensor(x), torch.as_tensor(y)
        if tuple(x.shape[1:]) != self.input_shape or y.shape != x.shape[:1]:
            raise ValueError(f"expected x [b, {', '.join(map(str, self.input_shape))}] and y [b]; "
                             f"got x {list(x.shape)} and y {list(y.shape)}")
        if (None if logits is None else tuple(logits.shape)) != (
                (len(x), self.logits) if self.logits else None):
            want = f"logits [b, {self.logits}]" if self.logits else "no logits"
            got = "none" if logits is None else list(logits.shape)
            raise ValueError(f"this memory takes {want} with the batch; got {got}")
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
        if self.logits:
            self._z[row, idx] = logits.detach()[-quota:].to(self.device, torch.float32)
        self._pos[row] = (pos + b) % quota
        self._filled[row] = min(self._filled[row] + b, quota)

    def get(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A float32 copy of the filled samples of `slot`, in ring-storage order: `(x, y)`."""
        row = self._row.get(self._check_slot(slot))
        if row is None:
            return (torch.zeros((0, *self.input_shape), device=self.device),
                    torch.zeros(0, dtype=torch.int64, device=self.device))
        n = self._filled[row]
        stored = self._x[row, :n]
        x = torch.empty(stored.shape, device=self.device)
        return self._decode_into(x, stored), self._y[row, :n].clone()

    def task_runs(self, slots: Sequence[int]) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Every stored row of `slots` as float32, a few whole tasks at a time: yields `(i, x, y)`
        with `x [k, quota, *input_shape]`, `y [k, quota]` the rows of `slots[i:i + k]` (a task's
        filled samples first, see `filled`; the rest is stale). Float32 storage comes as views,
        one per run of slots stored one after another; compact storage is decoded into the
        decode buffer, as many tasks as it holds, each run valid until the next decode."""
        rows = [self._stored_row(s) for s in slots]
        quota = self.quota
        if self.dtype == "float32":
            start = 0
            for i in range(1, len(rows) + 1):
                if i == len(rows) or rows[i] != rows[i - 1] + 1:
                    first, k = rows[start], i - start
                    yield start, self._x[first:first + k], self._y[first:first + k]
                    start = i
            return
        per_run = self.decode_rows // quota
        if per_run == 0:
            raise RuntimeError(f"the decode buffer of {self.decode_rows} rows cannot hold one "
                               f"task's {quota} samples")
        for start in range(0, len(rows), per_run):
            run = rows[start:start + per_run]
            x = self._dx[:len(run) * quota].view(len(run), quota, *self.input_shape)
            y = self._dy[:len(run) * quota].view(len(run), quota)
            for j, row in enumerate(run):
                self._decode_into(x[j], self._x[row])
                y[j] = self._y[row]
            yield start, x, y

    def gather(self, slots: Sequence[int], task: torch.Tensor, position: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample `position[i]` of task `slots[task[i]]` for every i, as float32 `x [n, *shape]`
        and `y [n]` in the decode buffer (valid until the next decode); n <= `decode_rows`."""
        flat = self._flat_rows(slots, task, position)
        n = len(flat)
        x, y = self._dx[:n], self._dy[:n]
        torch.index_select(self._by, 0, flat, out=y)
        if self.dtype == "float32":
            torch.index_select(self._bx, 0, flat, out=x)
        else:
            self._decode_into(x, self._bx[flat])
        return x, y

    def labels(self, slots: Sequence[int]) -> torch.Tensor:
        """The stored labels `[len(slots), quota]` of tasks `slots` (a copy; a task's positions
        beyond its `filled` count hold no sample)."""
        return self._y[[self._stored_row(s) for s in slots]]

    def gather_logits(self, slots: Sequence[int], task: torch.Tensor, position: torch.Tensor
                      ) -> torch.Tensor:
        """The stored logits `[n, logits]` of the samples `gather` reads for the same arguments,
        in the decode buffer (valid until the next `gather_logits`)."""
        flat = self._flat_rows(slots, task, position)
        return torch.index_select(self._bz, 0, flat, out=self._dz[:len(flat)])

    def _flat_rows(self, slots: Sequence[int], task: torch.Tensor, position: torch.Tensor
                   ) -> torch.Tensor:
        """Storage rows of sample `position[i]` of task `slots[task[i]]`; at most `decode_rows`."""
        n = len(task)
        if n > self.decode_rows:
            raise ValueError(f"{n} samples do not fit the decode buffer of {self.decode_rows}")
        rows = torch.tensor([self._stored_row(s) for s in slots], device=self.device)
        return rows[task] * self.quota + position

    def footprint(self) -> dict[str, int]:
        """Allocated bytes (storage and decode buffer), of which the decode buffer, bytes of
        the stored samples, budget (0: none), quota and sample count."""
        decode = self._dx.nbytes + self._dy.nbytes + self._dz.nbytes
        return {
            "memory_bytes": self._bx.nbytes + self._by.nbytes + self._bz.nbytes + decode,
            "memory_decode_bytes": decode,
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
        """CPU copy of the full state; loadable with `torch.load(..., weights_only=True)`. Only
        a memory that keeps logits saves "logits" and "z": the others save what they always
        saved."""
        state = {
            "version": _STATE_VERSION,
            **self._config(),
            "x": self._x.detach().to("cpu", copy=True),
            "y": self._y.detach().to("cpu", copy=True),
            "slots": list(self._slots),
            "filled": list(self._filled),
            "pos": list(self._pos),
        }
        if self.logits:
            state |= {"logits": self.logits, "z": self._z.detach().to("cpu", copy=True)}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()` taken from a memory built with the same arguments."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported memory state version {state.get('version')!r}")
        for key, want in {**self._config(), "logits": self.logits}.items():
            have = state.get(key, 0)  # a state without "logits" kept none
            if have != want:
                raise ValueError(f"memory state has {key}={have!r}; this memory has {want!r}")
        x, y = state["x"], state["y"]
        z = state.get("z", torch.zeros((*y.shape, 0)))
        slots, filled, pos = ([int(v) for v in state[k]] for k in ("slots", "filled", "pos"))
        n = len(slots)
        quota = self._quota_for(max(n, 1))
        if (x.dtype != _DTYPES[self.dtype] or tuple(x.shape) != (n, quota, *self.input_shape)
                or tuple(y.shape) != (n, quota) or tuple(z.shape) != (n, quota, self.logits)
                or len(filled) != n or len(pos) != n):
            want_z = f", z {[n, quota, self.logits]}" if self.logits else ""
            got_z = f", z {list(z.shape)}" if self.logits else ""
            raise ValueError(
                f"memory state of {n} tasks x {quota} slots needs x {self.dtype} "
                f"{[n, quota, *self.input_shape]}, y {[n, quota]}{want_z} and {n} fill counts "
                f"and positions; got x {x.dtype} {list(x.shape)}, y {list(y.shape)}{got_z}, "
                f"{len(filled)} and {len(pos)}")
        self.clear()
        self._reserve(n * quota)
        self._slots, self._filled, self._pos = slots, filled, pos
        self._row = {s: r for r, s in enumerate(slots)}
        self._quota = quota
        self._x.copy_(x)
        self._y.copy_(y)
        self._z.copy_(z)
