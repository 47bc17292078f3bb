"""Journal chunks -> learner steps: the deterministic core of `edgecl learn`.

Mini-batches come from journal order alone: consecutive training samples of one task,
`batch_size` of them; a chunk of another task, an END marker or a FLUSH marker closes a batch
early. A deterministic share of the samples (chosen by a hash of the sequence number) is held
out for evaluation and never trained on. So the learner is a function of the journal: restoring
a checkpoint and replaying the journal after its offset gives, on CPU, bit for bit the state of
a run that never stopped. Nothing here knows about threads, files or HTTP.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from edgecl.config import LearnConfig
from edgecl.daemon.fleet import AggregateStore, FleetError, apply_aggregate
from edgecl.daemon.journal import END, FLEET, FLUSH, LOST, REHEARSE, SAMPLE, Chunk
from edgecl.learners import Learner
from edgecl.metrics import Evaluator
from edgecl.setup import SampleSchema

log = logging.getLogger("edgecl.learn")
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio: spreads seqs over [0, 2^64)


def held_out(seqs: np.ndarray, share: float) -> np.ndarray:
    """Which samples of `seqs` are kept for evaluation: a fixed pseudo-random `share`."""
    with np.errstate(over="ignore"):  # the multiplication wraps modulo 2^64, as meant
        spread = seqs.astype(np.uint64) * _GOLDEN
    return spread < np.uint64(int(share * 2.0**64))


class HoldoutSet:
    """Per task, the newest `capacity` held-out samples: the device's own test sets, in ring
    buffers allocated (and touched) for `max_tasks` tasks up front, so memory stays flat."""

    def __init__(self, capacity: int, input_shape: tuple[int, ...], max_tasks: int) -> None:
        self.capacity = capacity
        self.x = torch.zeros(max_tasks, capacity, *input_shape).fill_(0.0)
        self.y = torch.zeros(max_tasks, capacity, dtype=torch.int64).fill_(0)
        self.filled = torch.zeros(max_tasks, dtype=torch.int64)  # samples ever added per slot
        self.slots: dict[str, int] = {}

    def add(self, task: str, x: np.ndarray, y: np.ndarray) -> None:
        slot = self.slots.setdefault(task, len(self.slots))
        start = int(self.filled[slot])
        for i in range(max(0, len(y) - self.capacity), len(y)):  # the newest `capacity`
            at = (start + i) % self.capacity
            self.x[slot, at] = torch.from_numpy(x[i])
            self.y[slot, at] = int(y[i])
        self.filled[slot] = start + len(y)

    def tensors(self, task: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The task's held-out samples (views of the buffers; order is not meaningful)."""
        if task not in self.slots:
            return self.x[0, :0], self.y[0, :0]
        slot = self.slots[task]
        n = min(int(self.filled[slot]), self.capacity)
        return self.x[slot, :n], self.y[slot, :n]

    def counts(self) -> dict[str, int]:
        slots = dict(self.slots)  # one step: status reads this while the learner adds tasks
        return {task: min(int(self.filled[s]), self.capacity) for task, s in slots.items()}

    def state_dict(self) -> dict[str, Any]:
        """The filled part of each task's ring (copies: a view would save the whole buffer)."""
        counts = self.counts()
        return {task: {"x": self.x[s, :counts[task]].clone(), "y": self.y[s, :counts[task]].clone(),
                       "filled": int(self.filled[s])} for task, s in self.slots.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.slots = {}
        self.filled.zero_()
        for slot, (task, d) in enumerate(state.items()):
            self.slots[task] = slot
            n = len(d["y"])
            self.x[slot, :n] = d["x"]
            self.y[slot, :n] = d["y"]
            self.filled[slot] = d["filled"]


@dataclass(frozen=True, eq=False)
class Piece:
    """Consecutive samples first .. first + len(y) - 1 of one chunk, waiting for their batch."""

    first: int
    x: np.ndarray
    y: np.ndarray
    held: np.ndarray  # bool per sample: held out, not trained on

    @property
    def last(self) -> int:
        return self.first + len(self.y) - 1


class Learning:
    """Feeds journal chunks to a learner; holds what a checkpoint must keep besides it.

    `offset` is the last seq whose effect is in the learner; samples after it that do not yet
    close a batch wait in `pending`. `take` returns the tasks a chunk consolidated (and
    evaluated), in order: the daemon publishes their models.
    """

    def __init__(self, learner: Learner, schema: SampleSchema, cfg: LearnConfig,
                 state: dict[str, Any] | None = None,
                 aggregates: AggregateStore | None = None) -> None:
        self.learner = learner
        self.aggregates = aggregates  # where FLEET markers' aggregates are (None: no fleet)
        self.schema = schema
        self.cfg = cfg
        self.holdout = HoldoutSet(cfg.eval_per_task, schema.input_shape, schema.max_tasks)
        self.offset = 0
        self.learned = 0  # samples consumed: trained on, or held out
        self.lost = 0  # records after the offset that journal damage destroyed (LOST markers)
        self.trained = 0
        self.accuracy_now: dict[str, float] = {}
        self.accuracy_learned: dict[str, float] = {}  # R[i, i]: right after task i was learned
        self.rows: dict[str, dict[str, float]] = {}  # R: row i, after task i's consolidation
        self.applied = ""  # a sha256 chain over the seq ranges applied, in order
        self.pending: list[Piece] = []
        self.pending_task: str | None = None
        self.pending_train = 0
        # per task, the least and greatest input value of every sample taken: the range its
        # exported model states, which serve's input guard holds requests to
        self.ranges: dict[str, tuple[float, float]] = {}
        # fleet aggregates taken (FLEET markers), the last one's sha256, those that could
        # not be (gone, damaged: logged), the tasks adopted from the fleet, and the tasks an
        # aggregate held that found no free task slot (logged)
        self.fleet = {"taken": 0, "last": None, "failed": 0, "adopted": [], "unplaced": 0}
        self._consolidated: list[str] = []  # by the chunk being taken
        self._skips_said: set[str] = set()  # tasks whose first skipped step was logged
        if state is not None:
            self.load_state_dict(state)

    @property
    def read_seq(self) -> int:
        """The last seq taken (applied or pending)."""
        return self.pending[-1].last if self.pending else self.offset

    def take(self, chunk: Chunk) -> list[str]:
        """Process the next journal chunk (seqs up to `read_seq` in it were taken before);
        returns the tasks it consolidated."""
        self._consolidated = []
        self._take(chunk)
        return self._consolidated

    def _take(self, chunk: Chunk) -> None:
        if chunk.last <= self.read_seq or chunk.seq > self.read_seq + 1:
            raise ValueError(f"chunk {chunk.seq}..{chunk.last} does not follow {self.read_seq}")
        if chunk.kind != SAMPLE:
            if chunk.kind not in (END, FLUSH, LOST, REHEARSE, FLEET):
                raise ValueError(f"chunk {chunk.seq}: unknown kind {chunk.kind}")
            if self.pending:
                self.close_batch()
            if chunk.kind == END:
                self.end(chunk.task)
            if chunk.kind == REHEARSE:
                self.learner.rehearse(int(chunk.y[0]))
            if chunk.kind == FLEET:
                self.take_aggregate(chunk.seq, chunk.task)
            if chunk.kind == LOST:  # may start before the offset: a checkpoint held those
                self.lost += chunk.last - self.offset
                self._advance([f"lost {self.offset + 1}-{chunk.last}"], chunk.last)
                return
            self._advance([str(chunk.seq)], chunk.seq)  # after the consolidation: lag 0 = done
            return
        if self.pending and self.pending_task != chunk.task:
            self.close_batch()
        start = self.read_seq + 1 - chunk.seq
        seqs = np.arange(chunk.seq + start, chunk.last + 1)
        held = held_out(seqs, self.cfg.holdout)
        train_ends = np.cumsum(~held)  # training samples up to and including each
        i = 0
        while i < len(seqs):
            need = self.schema.batch_size - self.pending_train
            base = int(train_ends[i - 1]) if i else 0
            j = int(np.searchsorted(train_ends, base + need))  # the batch's last sample
            end = min(j + 1, len(seqs))
            at = slice(start + i, start + end)
            self.pending_task = chunk.task
            self.pending.append(Piece(int(seqs[i]), chunk.x[at], chunk.y[at], held[i:end]))
            self.pending_train += int(train_ends[end - 1]) - base
            i = end
            if self.pending_train >= self.schema.batch_size:
                self.close_batch()

    def take_aggregate(self, seq: int, sha256: str) -> None:
        """Copy the fleet's aggregate a FLEET marker names into the learner, then rehearse
        (`fleet_rehearse_steps`). One that cannot be read (its file gone or damaged) is counted
        and logged, and learning goes on."""
        try:
            if self.aggregates is None:
                raise FleetError("the journal names a fleet aggregate, but no store was given")
            placed = apply_aggregate(self.learner, self.aggregates.read(sha256))
            if self.learner.can_rehearse and self.cfg.fleet_rehearse_steps:
                self.learner.rehearse(self.cfg.fleet_rehearse_steps)
        except FleetError as e:
            self.fleet["failed"] += 1
            log.error("journal seq %d: %s; the learner goes on without it", seq, e)
            return
        self.fleet["taken"] += 1
        self.fleet["last"] = sha256
        self.fleet["adopted"] = [*self.fleet["adopted"], *placed.adopted]
        self.fleet["unplaced"] += len(placed.unplaced)
        log.info("journal seq %d: took the fleet's aggregate %s%s", seq, sha256[:12],
                 f"; adopted tasks {', '.join(placed.adopted)}" if placed.adopted else "")
        if placed.unplaced:
            log.warning("journal seq %d: no free task slot (max_tasks %d) for the fleet's "
                        "tasks %s: not taken", seq, self.learner.spec.max_tasks,
                        ", ".join(placed.unplaced))

    def close_batch(self) -> None:
        """Learn the pending batch; the offset moves to its last sample."""
        pieces, task = self.pending, self.pending_task
        self.pending, self.pending_task, self.pending_train = [], None, 0
        self._apply(pieces, task)
        self._advance([f"{p.first}-{p.last}" for p in pieces], pieces[-1].last)

    def _advance(self, ranges: list[str], offset: int) -> None:
        """Chain the seq ranges just applied into `applied`; move the offset."""
        self.applied = hashlib.sha256(f"{self.applied}:{','.join(ranges)}".encode()).hexdigest()
        self.offset = offset

    def _apply(self, pieces: list[Piece], task: str | None) -> None:
        if len(pieces) == 1:  # the common case: views, no copies
            x, y, held = pieces[0].x, pieces[0].y, pieces[0].held
        else:
            x = np.concatenate([p.x for p in pieces])
            y = np.concatenate([p.y for p in pieces])
            held = np.concatenate([p.held for p in pieces])
        x = x.reshape(-1, *self.schema.input_shape)
        low, high = self.ranges.get(task, (float("inf"), float("-inf")))
        self.ranges[task] = (min(low, float(x.min())), max(high, float(x.max())))
        any_held = held.any()
        if any_held:
            self.holdout.add(task, x[held], y[held])
        if not held.all():
            open_task = self.learner.open_task
            if open_task is not None and open_task != task:
                self.end(open_task)
            if any_held:
                x, y = x[~held], y[~held]
            if self.learner.observe(torch.from_numpy(x), torch.from_numpy(y), task).skipped \
                    and task not in self._skips_said:
                self._skips_said.add(task)
                log.warning("task %s: the step on journal seqs %d-%d was not applied (not "
                            "finite); status counts every such step (skipped_steps)", task,
                            pieces[0].first, pieces[-1].last)
            self.trained += len(y)
        self.learned += len(held)

    def end(self, task: str) -> None:
        """Consolidate `task` if it is the learner's open task, and evaluate."""
        if task != self.learner.open_task:
            return
        self.learner.end_task(task)
        self.rows[task] = self.evaluate()
        if task in self.rows[task]:
            self.accuracy_learned[task] = self.rows[task][task]
        self._consolidated.append(task)

    def evaluate(self) -> dict[str, float]:
        """Held-out accuracy of every task the learner knows and holds samples of."""
        sets = [(task, *self.holdout.tensors(task)) for task in self.learner.task_ids]
        sets = [(task, x, y) for task, x, y in sets if len(y)]
        found = Evaluator(sets, self.learner.device)(self.learner)
        accs = {task: float(acc) for (task, _, _), acc in zip(sets, found, strict=True)}
        self.accuracy_now.update(accs)
        return accs

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps besides the learner (pending samples are read again)."""
        return {"offset": self.offset, "learned": self.learned, "trained": self.trained,
                "lost": self.lost,
                "applied": self.applied, "holdout": self.holdout.state_dict(),
                "accuracy_now": dict(self.accuracy_now),
                "accuracy_learned": dict(self.accuracy_learned),
                "rows": {k: dict(v) for k, v in self.rows.items()},
                "ranges": {k: list(v) for k, v in self.ranges.items()},
                "fleet": dict(self.fleet)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.offset, self.learned = state["offset"], state["learned"]
        self.trained, self.applied = state["trained"], state["applied"]
        self.lost = state.get("lost", 0)  # checkpoints from before LOST markers have none
        self.holdout.load_state_dict(state["holdout"])
        self.accuracy_now = dict(state["accuracy_now"])
        self.accuracy_learned = dict(state["accuracy_learned"])
        self.rows = {k: dict(v) for k, v in state["rows"].items()}
        # checkpoints from before ranges were kept have none: the next sample starts them
        self.ranges = {k: (float(v[0]), float(v[1])) for k, v in state.get("ranges", {}).items()}
        self.fleet = {**self.fleet, **state.get("fleet", {})}  # none before fleet learning
        self.pending, self.pending_task, self.pending_train = [], None, 0


def replay(learner: Learner, schema: SampleSchema, cfg: LearnConfig, chunks: list[Chunk],
           aggregates: AggregateStore | None = None) -> Learning:
    """Learn `chunks` from scratch, as an uninterrupted daemon would (tests, audits)."""
    learning = Learning(learner, schema, cfg, aggregates=aggregates)
    for chunk in chunks:
        learning.take(chunk)
    return learning
