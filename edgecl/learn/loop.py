"""Journal records -> learner steps: the deterministic core of `edgecl learn`.

Mini-batches come from journal order alone: consecutive training samples of one task,
`batch_size` of them, a task switch, an END marker or a FLUSH marker closing a batch early. A
deterministic share of the samples (chosen by sequence number) is held out for evaluation and
never trained on. So the learner is a function of the journal: restoring a checkpoint and
replaying the journal after its offset gives, on CPU, bit for bit the state of a run that never
stopped. Nothing here knows about threads, files or HTTP.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from edgecl.config import LearnConfig
from edgecl.learn.journal import END, FLUSH, SAMPLE, Record
from edgecl.learn.schema import SampleSchema
from edgecl.learners import Learner

_GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: spreads consecutive seqs over [0, 2^64)
_MASK64 = (1 << 64) - 1
EVAL_BATCH = 1000


def held_out(seq: int, share: float) -> bool:
    """Whether sample `seq` is kept for evaluation: a fixed pseudo-random `share` of seqs."""
    return ((seq * _GOLDEN) & _MASK64) < share * (1 << 64)


class HoldoutSet:
    """Per task, the newest `capacity` held-out samples: the device's own test sets."""

    def __init__(self, capacity: int, input_shape: tuple[int, ...]) -> None:
        self.capacity = capacity
        self.input_shape = input_shape
        self.x: dict[str, collections.deque[np.ndarray]] = {}
        self.y: dict[str, collections.deque[int]] = {}

    def add(self, task: str, x: np.ndarray, y: int) -> None:
        if task not in self.x:
            self.x[task] = collections.deque(maxlen=self.capacity)
            self.y[task] = collections.deque(maxlen=self.capacity)
        self.x[task].append(x)
        self.y[task].append(y)

    def tensors(self, task: str) -> tuple[torch.Tensor, torch.Tensor]:
        x = np.stack(self.x[task]) if self.x.get(task) else np.zeros((0, *self.input_shape))
        return (torch.from_numpy(x.astype(np.float32, copy=False)),
                torch.tensor(list(self.y.get(task, ())), dtype=torch.int64))

    def counts(self) -> dict[str, int]:
        return {task: len(ys) for task, ys in self.y.items()}

    def state_dict(self) -> dict[str, Any]:
        out = {}
        for task in self.x:
            x, y = self.tensors(task)
            out[task] = {"x": x, "y": y}
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.x, self.y = {}, {}
        for task, d in state.items():
            for x, y in zip(d["x"].numpy(), d["y"].tolist(), strict=True):
                self.add(task, x, y)


class Learning:
    """Feeds journal records to a learner; holds what a checkpoint must keep besides it.

    `offset` is the last seq whose effect is in the learner; records after it that do not yet
    close a batch wait in `pending`. `on_consolidated(task)` runs after a task is consolidated
    and evaluated (the daemon publishes its model there).
    """

    def __init__(self, learner: Learner, schema: SampleSchema, cfg: LearnConfig,
                 state: dict[str, Any] | None = None) -> None:
        self.learner = learner
        self.schema = schema
        self.cfg = cfg
        self.holdout = HoldoutSet(cfg.eval_per_task, schema.input_shape)
        self.offset = 0
        self.learned = 0  # samples consumed: trained on, or held out
        self.trained = 0
        self.accuracy_now: dict[str, float] = {}
        self.accuracy_learned: dict[str, float] = {}  # R[i, i]: right after task i was learned
        self.rows: dict[str, dict[str, float]] = {}  # R: row i, after task i's consolidation
        self.applied = applied_digest([])  # every seq applied, in order, chained
        self.pending: list[Record] = []
        self.pending_task: str | None = None  # the task of the pending training samples
        self.pending_train = 0
        self.on_consolidated: Callable[[str], None] | None = None
        if state is not None:
            self.load_state_dict(state)

    @property
    def read_seq(self) -> int:
        """The last seq taken (applied or pending)."""
        return self.pending[-1].seq if self.pending else self.offset

    def take(self, record: Record) -> None:
        """Process the next journal record (seqs must follow `read_seq`)."""
        if record.seq <= self.read_seq:
            raise ValueError(f"record {record.seq} taken after {self.read_seq}: out of order")
        if record.kind != SAMPLE:
            self.close_batch(record.seq)
            self.applied = applied_digest([record.seq], self.applied)
            if record.kind == END:
                self.end(record.task)
            elif record.kind != FLUSH:
                raise ValueError(f"record {record.seq}: unknown kind {record.kind}")
            return
        train = not held_out(record.seq, self.cfg.holdout)
        if train and self.pending_task not in (None, record.task):
            self.close_batch()
        self.pending.append(record)
        if train:
            self.pending_task = record.task
            self.pending_train += 1
            if self.pending_train >= self.schema.batch_size:
                self.close_batch()

    def close_batch(self, through_seq: int | None = None) -> None:
        """Learn the pending batch; the offset moves to `through_seq` (a marker) or its end."""
        batch, task = self.pending, self.pending_task
        self.pending, self.pending_task, self.pending_train = [], None, 0
        train = []
        for r in batch:
            if held_out(r.seq, self.cfg.holdout):
                self.holdout.add(r.task, self._inputs([r])[0], r.y)
            else:
                train.append(r)
        if task is not None:
            open_task = self.learner.open_task
            if open_task is not None and open_task != task:
                self.end(open_task)
            x = torch.from_numpy(self._inputs(train))
            self.learner.observe(x, torch.tensor([r.y for r in train]), task)
            self.trained += len(train)
        self.learned += len(batch)
        self.applied = applied_digest([r.seq for r in batch], self.applied)
        if through_seq is not None or batch:
            self.offset = through_seq if through_seq is not None else batch[-1].seq

    def _inputs(self, records: list[Record]) -> np.ndarray:
        raw = bytearray().join(r.x for r in records)  # writable: torch wants that
        return np.frombuffer(raw, dtype="<f4").reshape(len(records), *self.schema.input_shape)

    def end(self, task: str) -> None:
        """Consolidate `task` if it is the learner's open task; evaluate; tell the daemon."""
        if task != self.learner.open_task:
            return
        self.learner.end_task(task)
        self.rows[task] = self.evaluate()
        if task in self.rows[task]:
            self.accuracy_learned[task] = self.rows[task][task]
        if self.on_consolidated is not None:
            self.on_consolidated(task)

    def evaluate(self) -> dict[str, float]:
        """Held-out accuracy of every task the learner knows and holds samples of."""
        accs = {}
        for task in self.learner.task_ids:
            x, y = self.holdout.tensors(task)
            if not len(y):
                continue
            correct = sum(int((self.learner.predict(x[i:i + EVAL_BATCH], task).argmax(1).cpu()
                               == y[i:i + EVAL_BATCH]).sum()) for i in range(0, len(y), EVAL_BATCH))
            accs[task] = correct / len(y)
        self.accuracy_now.update(accs)
        return accs

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps besides the learner (pending records are re-read)."""
        return {"offset": self.offset, "learned": self.learned, "trained": self.trained,
                "applied": self.applied,
                "holdout": self.holdout.state_dict(), "accuracy_now": dict(self.accuracy_now),
                "accuracy_learned": dict(self.accuracy_learned),
                "rows": {k: dict(v) for k, v in self.rows.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.offset, self.learned = state["offset"], state["learned"]
        self.trained, self.applied = state["trained"], state["applied"]
        self.holdout.load_state_dict(state["holdout"])
        self.accuracy_now = dict(state["accuracy_now"])
        self.accuracy_learned = dict(state["accuracy_learned"])
        self.rows = {k: dict(v) for k, v in state["rows"].items()}
        self.pending, self.pending_task, self.pending_train = [], None, 0


def applied_digest(seqs: list[int], previous: str = "") -> str:
    """A sha256 chain over applied seqs: equal digests mean the same seqs, each once, in order."""
    if not seqs:
        return previous
    data = previous.encode() + b",".join(str(s).encode() for s in seqs)
    return hashlib.sha256(data).hexdigest()


def replay(learner: Learner, schema: SampleSchema, cfg: LearnConfig,
           records: list[Record]) -> Learning:
    """Learn `records` from scratch, as an uninterrupted daemon would (tests, audits)."""
    learning = Learning(learner, schema, cfg)
    for record in records:
        learning.take(record)
    return learning
