"""A device in a fleet: the weights it shares, the aggregates it takes, and where they are kept.

A round of the fleet (edgecl.fleet.server) asks each device for its share, averages the shares
per array, and sends the aggregate back. A device that can rehearse (er, der) then takes
`learn.fleet_rehearse_steps` steps on its own memory (FedAvg's local steps), part of taking the
aggregate. The share is the net's parameters, never samples or the
episodic memory: the body (weighted by every sample the device journaled), with its float32
buffers (the input standardisation's mean and scale, BatchNorm's running statistics), and each
task's head (weighted by that task's samples; a head every task shares, by all of them, with
an empty `task/<id>` array naming each task). A
device that takes an aggregate stops fitting its input statistics: the fleet's hold from then
on, so that every device computes the same function. The method's own state (EWC's Fisher,
GEM's memory) stays the device's own, and keeps protecting its tasks after an aggregate.

Taking an aggregate is an event of the journal: the aggregate is written to
`<state dir>/fleet/<sha256>.npz` (fsync'd) and a FLEET marker naming its sha256 journaled, and
the learning thread copies it into the net where it reads the marker. A replay of the journal
therefore gives the same learner, and a crash during a round loses nothing: an aggregate whose
marker was not journaled was never acknowledged to the fleet. A head of a task the device never
met is adopted into a free task slot: the device then predicts that task as the fleet does.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from edgecl.atomic import atomic_open
from edgecl.fleet.wire import Share, WireError, unpack
from edgecl.learners import Learner

log = logging.getLogger("edgecl.learn")

FLEET_DIR = "fleet"  # under the state dir: the aggregates the journal's FLEET markers name


class FleetError(ValueError):
    """An aggregate this device cannot take (the request is refused, nothing journaled)."""


def federation_refused(learner: Learner) -> str | None:
    """Why `learner` cannot share its weights with a fleet, or None when it can."""
    if not learner.can_federate:
        return (f"{learner.name} cannot take part in a fleet: its weights are not one body "
                "with per-task heads (fleet learning averages those); choose finetune, ewc, "
                "mas, lwf, agem, gem, er or der")
    return None


def body_tensors(body: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What the fleet averages of the body, by name: its parameters and float32 buffers (not
    counters, flags or the float64 sums the input statistics are fitted from)."""
    tensors = {f"body/{n}": p for n, p in body.named_parameters()}
    tensors.update((f"body/{n}", b) for n, b in body.named_buffers() if b.dtype == torch.float32)
    return tensors


def share_of(learner: Learner, samples: dict[str, int]) -> Share:
    """The learner's body and heads as a share; `samples`: samples journaled per task."""
    net = learner.net
    total = float(sum(samples.values()))
    arrays = body_tensors(net.body)
    weights = dict.fromkeys(arrays, total)
    if len(net.heads) == 1:
        for name, p in net.heads[0].named_parameters():
            arrays[f"head/{name}"], weights[f"head/{name}"] = p, total
        for task in learner.task_ids:  # no head of its own: named, so that devices adopt it
            arrays[f"task/{task}"] = torch.zeros(0)
            weights[f"task/{task}"] = float(samples.get(task, 0))
    else:
        for task in learner.task_ids:
            head = net.heads[net.head_index(learner.slot(task))]
            for name, p in head.named_parameters():
                key = f"head/{task}/{name}"
                arrays[key], weights[key] = p, float(samples.get(task, 0))
    return Share({k: t.detach().float().cpu().numpy().copy() for k, t in arrays.items()},
                 weights)


@dataclass
class Placement:
    """Where an aggregate goes in a learner: the parameter (or buffer) of each array, the tasks
    new to the device it adopts, and those it cannot (every task slot taken)."""

    targets: dict[str, torch.Tensor] = field(default_factory=dict)
    adopted: list[str] = field(default_factory=list)
    unplaced: list[str] = field(default_factory=list)

    def slot(self, learner: Learner, task: str) -> int | None:
        """The task's slot, a new one for a task new to the device; None when none is free."""
        if task in learner.task_ids:
            return learner.task_ids.index(task)
        if task not in self.adopted:
            if len(learner.task_ids) + len(self.adopted) >= learner.spec.max_tasks:
                if task not in self.unplaced:
                    self.unplaced.append(task)
                return None
            self.adopted.append(task)
        return len(learner.task_ids) + self.adopted.index(task)


def place(learner: Learner, share: Share) -> Placement:
    """Where each array of `share` goes; FleetError for an array that fits nothing, has
    another shape than its target, or holds NaN or infinity."""
    net = learner.net
    body = body_tensors(net.body)
    shared = len(net.heads) == 1
    placed = Placement()
    for key in share.arrays:
        part = key.split("/")
        if key in body:
            placed.targets[key] = body[key]
        elif shared and len(part) == 2 and part[0] == "task":
            placed.slot(learner, part[1])
        elif shared and len(part) == 2 and part[0] == "head":
            placed.targets[key] = dict(net.heads[0].named_parameters())[part[1]]
        elif not shared and len(part) == 3 and part[0] == "head":
            slot = placed.slot(learner, part[1])
            if slot is not None:
                head = net.heads[net.head_index(slot)]
                placed.targets[key] = dict(head.named_parameters())[part[2]]
        else:
            raise FleetError(f"the aggregate's array {key!r} is no part of this device's net")
    for key, target in placed.targets.items():
        if not np.isfinite(share.arrays[key]).all():
            raise FleetError(f"the aggregate's array {key} holds NaN or infinite values")
        if tuple(share.arrays[key].shape) != tuple(target.shape):
            raise FleetError(f"the aggregate's array {key} has shape "
                             f"{list(share.arrays[key].shape)}; this device's is "
                             f"{list(target.shape)} (another net config?)")
    return placed


def apply_aggregate(learner: Learner, share: Share) -> Placement:
    """Copy `share` into the learner's net (all of it or, on FleetError, nothing); returns
    where it went: the tasks adopted, and those left out for want of a free task slot."""
    placed = place(learner, share)
    for task in placed.adopted:
        learner.register_task(task)
    with torch.no_grad():
        for key, target in placed.targets.items():
            target.copy_(torch.from_numpy(share.arrays[key]))
    learner.freeze_input_statistics()
    return placed


class AggregateStore:
    """The aggregates of `<state dir>/fleet`, by sha256: written before their FLEET marker is
    journaled, read where the learning thread meets it, pruned once no journal record left
    names them."""

    def __init__(self, state_dir: Path) -> None:
        self.folder = state_dir / FLEET_DIR
        self.folder.mkdir(mode=0o700, exist_ok=True)
        self.lock = threading.Lock()  # held from a write until its marker is journaled

    def path(self, sha256: str) -> Path:
        return self.folder / f"{sha256}.npz"

    def write(self, data: bytes) -> str:
        """Store `data`; returns its sha256. The caller holds `lock` until its marker is
        journaled, so that `prune` cannot take it first."""
        sha256 = hashlib.sha256(data).hexdigest()
        if not self.path(sha256).exists():
            with atomic_open(self.path(sha256)) as f:  # fsync'd, and its folder
                f.write(data)
        return sha256

    def read(self, sha256: str) -> Share:
        """The aggregate a FLEET marker names; FleetError when it is gone or damaged."""
        try:
            data = self.path(sha256).read_bytes()
        except OSError as e:
            raise FleetError(f"the fleet aggregate {sha256} of the journal is gone: {e}") from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise FleetError(f"the fleet aggregate {sha256} of the journal is damaged")
        try:
            return unpack(data)
        except WireError as e:
            raise FleetError(f"the fleet aggregate {sha256}: {e}") from None

    def prune(self, named: Callable[[], set[str]]) -> None:
        """Remove the aggregates no journal record names any more; `named` is read under the
        lock, so an aggregate journaled meanwhile is named in it."""
        with self.lock:
            kept = named()
            for path in self.folder.glob("*.npz"):
                if path.stem not in kept:
                    os.unlink(path)
