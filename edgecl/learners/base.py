"""The Learner contract shared by every continual-learning method.

A learner sees `(x, y, task)` mini-batches once, in order (`observe`), consolidates a task when it
ends (`end_task`, also triggered by a task switch), predicts per task, and hands out the dense
per-task network for export (`task_module`). Task ids are strings mapped to slots < max_tasks.
All randomness after initialisation comes from `self.rng`, which is saved in `state_dict()`.

No non-finite step is applied: every method steps through `Learner.step`, which leaves the
weights and the optimiser's state as they were when the step's loss, its gradients or the new
weights would not be finite, and counts the step (`nonfinite_steps`). What a step does besides
(a method's episodic memory stores the batch, A-GEM, fast GEM and replay draw from `self.rng`,
event counters) stands: the batch's samples are finite, and each method that reads its memory
leaves out a gradient that is not finite (GEM, A-GEM: that constraint; ER, DER++: those replayed
samples; EWC, MAS: those samples' importance). A learner whose last `MAX_NONFINITE_STREAK`
steps were all skipped, or whose weights are not finite when a task ends, raises
`LearnerDiverged`.
"""

from __future__ import annotations

import copy
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn

from edgecl.config import Config, OptimizerConfig, validate_config
from edgecl.memory import EpisodicMemory
from edgecl.nets import build_task_net
from edgecl.nets.norm import InputNorm

HeadMode = Literal["shared", "per_task"]

log = logging.getLogger("edgecl.learners")

# Steps in a row that may be skipped as non-finite before the learner gives up (LearnerDiverged).
MAX_NONFINITE_STREAK = 100
# `Learner.step`'s fast path: when the loss and every gradient, weight and optimiser-state tensor
# have an L2 norm below this, and lr, momentum and weight decay are finite and at most
# SAFE_HYPERPARAMETER, an SGD or Adam step provably lands on finite weights and state (the
# largest value it can reach is about 1e36, far below float32's 3.4e38), so it is applied
# without a copy to roll back to.
SAFE_MAGNITUDE = 1e15
SAFE_HYPERPARAMETER = 1e3


class LearnerDiverged(RuntimeError):
    """The learner cannot recover: its last `MAX_NONFINITE_STREAK` steps were all skipped as
    non-finite, or its weights are not finite at the end of a task. `task` names the task,
    `skipped` counts the steps skipped so far in all."""

    def __init__(self, message: str, task: str, skipped: int) -> None:
        super().__init__(message)
        self.task = task
        self.skipped = skipped


class NoParams(BaseModel):
    """A method without hyper-parameters of its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class LearnerSpec:
    """Everything needed to build a learner: the config plus the shape of the data."""

    config: Config
    input_shape: tuple[int, ...]
    n_classes: int
    head: HeadMode
    max_tasks: int

    def __post_init__(self) -> None:
        # `normalize: auto` decided for the data: sensor windows [channels, steps] are
        # standardised per channel by the model itself; anything else is taken as it is
        if self.config.normalize == "auto":
            normalize = "channel" if len(self.input_shape) == 2 else "none"
            object.__setattr__(self, "config",
                               self.config.model_copy(update={"normalize": normalize}))

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.model_dump(mode="json"),
                "input_shape": list(self.input_shape), "n_classes": self.n_classes,
                "head": self.head, "max_tasks": self.max_tasks}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LearnerSpec:
        # a saved config is complete: the method's defaults were merged in when it was built
        return cls(validate_config(d["config"]), tuple(d["input_shape"]), int(d["n_classes"]),
                   d["head"], int(d["max_tasks"]))


@dataclass
class StepStats:
    """What one `observe` step did. `loss` stays a tensor: reading it would sync a GPU.
    `skipped`: the step was not applied, its loss, gradients or new weights not being finite."""

    loss: torch.Tensor
    skipped: bool = False


@dataclass
class Footprint:
    """Bytes a learner holds on its device, in two totals that every method reports alike.

    `training_bytes`: what the device keeps to go on learning: every parameter (WSN: its scores
    too), room for the gradients of the trainable ones, the net's buffers, the optimiser's state
    (momentum, Adam's moments), the episodic memory with its decode buffer, and the method's own
    state (Fisher or Ω and the anchor, LwF's teacher, WSN's masks and its map of used weights).
    `deployable_bytes`: what serving every task learned so far needs: the weights, heads and
    buffers inference reads (WSN: its packed masks too, not its scores; LwF: not its teacher).
    """

    params_bytes: int
    grad_bytes: int
    buffers_bytes: int
    optimizer_bytes: int
    memory_bytes: int
    method_state_bytes: int
    deployable_bytes: int
    details: dict[str, float] = field(default_factory=dict)

    @property
    def state_bytes(self) -> int:
        """What the method holds beyond the net, its gradients and its optimiser."""
        return self.memory_bytes + self.method_state_bytes

    @property
    def training_bytes(self) -> int:
        return (self.params_bytes + self.grad_bytes + self.buffers_bytes + self.optimizer_bytes
                + self.state_bytes)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "state_bytes": self.state_bytes,
                "training_bytes": self.training_bytes}


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from _tensors(v)


def tensor_bytes(obj: Any) -> int:
    """Bytes of the storage of every tensor inside nested dicts/lists/tuples, each storage once
    (a view costs nothing beyond the tensor it views)."""
    storages = {}
    for t in _tensors(obj):
        storage = t.untyped_storage()
        storages[(storage.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def first_nonfinite(named: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating-point tensor of `named` holding a NaN or an infinity, or
    None when every one is finite (one device sync)."""
    named = [(name, t) for name, t in named if t.is_floating_point()]
    if not named:
        return None
    finite = torch.stack([t.detach().isfinite().all() for _, t in named])
    if bool(finite.all()):
        return None
    return named[int(finite.logical_not().nonzero()[0])][0]


def _totals(*groups: list[torch.Tensor]) -> list[float]:
    """The sum of the absolute values of each group of scalar tensors, read with one device
    sync: at least the largest of them, and NaN or infinite when any is."""
    if groups[0][0].device.type == "cpu":  # .item() is cheaper than a stack there
        return [sum(abs(t.item()) for t in group) for group in groups]
    return torch.stack([torch.stack(group).abs().sum() for group in groups]).tolist()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA device; use 'auto' "
                           "or 'cpu' (load_learner takes device='cpu' for a CUDA checkpoint)")
    return torch.device(name)


def make_optimizer(params: Any, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def zero_grad(optimizer: torch.optim.Optimizer) -> None:
    """`optimizer.zero_grad(set_to_none=True)` without its profiler mark."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None


def is_plain_sgd(optimizer: torch.optim.Optimizer) -> bool:
    """SGD whose update is p ← p - lr·g: no momentum, weight decay or maximisation."""
    return type(optimizer) is torch.optim.SGD and all(
        g["momentum"] == 0 and g["weight_decay"] == 0 and not g["maximize"]
        for g in optimizer.param_groups)


@torch.no_grad()
def optimizer_step(optimizer: torch.optim.Optimizer) -> None:
    """`optimizer.step()`. Plain SGD skips torch's per-step bookkeeping (hooks, profiler marks,
    grad-mode switches, per-group dispatch: about 1/5 of a batch-10 MLP step on a CPU) and applies
    the update torch's SGD applies, `p.add_(grad, alpha=-lr)`, so the weights are bit-identical.
    """
    if not is_plain_sgd(optimizer):
        optimizer.step()
        return
    for group in optimizer.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        if params:
            torch._foreach_add_(params, [p.grad for p in params], alpha=-group["lr"])


def flush_denormals() -> None:
    """Process-wide: subnormal floats (tiny Adam moments, WSN score gradients) make CPU math
    several times slower (WSN trains 4x faster without them); nothing here needs them.

    numpy measures its float types' limits once, on first use; measured with subnormals
    flushed, it warns that the smallest subnormal is zero (as matplotlib's first import of
    numpy.ma did, four times a run). So numpy measures them first."""
    for kind in (np.float16, np.float32, np.float64, np.longdouble):
        np.finfo(kind)
    torch.set_flush_denormal(True)


class Learner(ABC):
    """Base class: task bookkeeping, net, optimiser, optional episodic memory, checkpoints."""

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]] = NoParams
    uses_memory: ClassVar[bool] = False
    can_rehearse: ClassVar[bool] = False  # `rehearse` trains on the memory alone (idle time)
    # its net is one body with heads, whose average over a fleet means something (fleet)
    can_federate: ClassVar[bool] = True
    # Optimiser settings this method is tuned with (on pmnist, like its `Params` defaults).
    optimizer_defaults: ClassVar[dict[str, Any]] = {}
    # Per benchmark name, the "optimizer" and "method" keys it runs with where that benchmark
    # needs other values than pmnist's; each with the command that chose it (never the test set).
    # `edgecl.setup` states where these sit among a config's other sources.
    tuned: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {}

    def __init__(self, spec: LearnerSpec) -> None:
        self.spec = spec
        cfg = spec.config
        self.params = self.Params.model_validate(cfg.method.params)
        self.device = resolve_device(cfg.device)
        flush_denormals()
        self.rng = torch.Generator().manual_seed(cfg.seed)
        self.task_ids: list[str] = []
        self.open_task: str | None = None
        self.counters: dict[str, int] = {}  # method events worth reporting (e.g. QP fallbacks)
        self._skip_reason: str | None = None  # why `step` skipped this observe's step, if it did
        self._weight_bound: float | None = None  # see `step`
        self._weight_versions: list[int] = []
        self._nonfinite_logged: set[str] = set()  # tasks whose first skipped step was logged
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.net = self.build_net().to(self.device)
        self.optimizer = self.build_optimizer()
        self.input_norms = [m for m in self.net.modules() if isinstance(m, InputNorm)]
        self.fitting_norms = list(self.input_norms)  # those still fitting: until a task ends
        self.memory = (
            EpisodicMemory(spec.input_shape, cfg.memory.per_task, spec.max_tasks,
                           cfg.memory.budget_bytes, cfg.memory.dtype, self.device)
            if self.uses_memory else None
        )

    # --- what a method defines -------------------------------------------------------------
    def build_net(self) -> nn.Module:
        """A module with `forward(x, slot)` and `task_module(slot)`; default: `TaskNet`."""
        s = self.spec
        n_heads = s.max_tasks if s.head == "per_task" else 1
        return build_task_net(s.config.net, s.input_shape, s.n_classes, n_heads,
                              normalize=s.config.normalize)

    def build_optimizer(self) -> torch.optim.Optimizer:
        return make_optimizer(self.net.parameters(), self.spec.config.optimizer)

    @abstractmethod
    def learn(self, x: torch.Tensor, y: torch.Tensor, slot: int) -> StepStats:
        """One single-pass step on a batch of task `slot` (already on the device)."""

    def glance(self, x: torch.Tensor, y: torch.Tensor, slot: int) -> None:
        """Another step on the batch `learn` just stepped on (`optimizer.steps_per_batch` > 1):
        `learn` without what it does once per batch, such as storing the batch in memory."""
        self.learn(x, y, slot)

    def rehearse(self, steps: int) -> None:
        """`steps` steps on what the memory holds of every task, as a device does when idle
        (methods with `can_rehearse`); counted as `rehearsal_steps`."""
        raise NotImplementedError(f"{self.name} does not rehearse from memory")

    def begin_task(self, slot: int) -> None:  # noqa: B027 - optional hook
        """Called when task `slot` opens (its first batch, or its return after a switch)."""

    def consolidate(self, slot: int) -> None:  # noqa: B027 - optional hook
        """Called once when task `slot` ends (Fisher, teacher snapshot, mask...)."""

    def method_state(self) -> dict[str, Any]:
        """Method-specific tensors and numbers to checkpoint."""
        return {}

    def load_method_state(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Restore what `method_state` returned."""

    # --- the contract ----------------------------------------------------------------------
    def slot(self, task: str) -> int:
        """The slot of a known task id."""
        try:
            return self.task_ids.index(task)
        except ValueError:
            raise KeyError(f"unknown task {task!r}; known: {', '.join(self.task_ids) or 'none'}"
                           ) from None

    def register_task(self, task: str) -> int:
        """The slot of `task`, assigning the next free one to a new id."""
        if task in self.task_ids:
            return self.task_ids.index(task)
        self.check_room_for(task)
        self.task_ids.append(task)
        return len(self.task_ids) - 1

    def check_room_for(self, task: str) -> None:
        """Raise ValueError if `task` is new and every one of the `max_tasks` slots is taken."""
        if task not in self.task_ids and len(self.task_ids) >= self.spec.max_tasks:
            raise ValueError(f"task {task!r} would be task number {len(self.task_ids) + 1}, beyond "
                             f"max_tasks={self.spec.max_tasks}; raise max_tasks in the config")

    def check_batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Raise ValueError unless `x [b, *input_shape]`, `y [b]` hold b >= 1 samples whose
        integer labels lie in 0..n_classes-1."""
        shape = ", ".join(map(str, self.spec.input_shape))
        if tuple(x.shape[1:]) != self.spec.input_shape or y.shape != x.shape[:1] or not len(x):
            raise ValueError(f"expected a batch x [b, {shape}] and labels y [b] with b >= 1; "
                             f"got x {list(x.shape)} and y {list(y.shape)}")
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise ValueError(f"labels must be integers; got {y.dtype}")
        lo, hi = (int(v) for v in torch.aminmax(y))
        if lo < 0 or hi >= self.spec.n_classes:
            raise ValueError(f"labels must lie in 0..{self.spec.n_classes - 1}; got {lo}..{hi}")

    def observe(self, x: torch.Tensor, y: torch.Tensor, task: str) -> StepStats:
        """One single-pass step on a batch of `task`; a task id other than the open one ends
        that task first. A bad batch or a task beyond `max_tasks` raises ValueError and changes
        nothing. A step that `step` skips as non-finite returns `skipped` and leaves the net
        (the input statistics still fitting included) and the optimiser as they were; it is
        counted, and the first of each task logged (logger "edgecl.learners")."""
        self.check_batch(x, y)
        if task != self.open_task:
            self.check_room_for(task)
            if self.open_task is not None:
                self.end_task(self.open_task)
            self.open_task = task
            self.begin_task(self.register_task(task))
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        fitting = [(norm, [b.clone() for b in norm.buffers()]) for norm in self.fitting_norms]
        for norm in self.fitting_norms:
            norm.update(x)
        self._skip_reason = None
        stats = self.learn(x, y, self.slot(task))
        if self._skip_reason is None:
            self.counters.pop("nonfinite_streak", None)
            self.glances(x, y, task)
            return stats
        for norm, saved in fitting:  # a skipped step leaves the input statistics alone too
            for b, old in zip(norm.buffers(), saved, strict=True):
                b.copy_(old)
        stats.skipped = True
        self.step_skipped(task, self._skip_reason)
        return stats

    def glances(self, x: torch.Tensor, y: torch.Tensor, task: str) -> None:
        """The batch's steps after its first (`optimizer.steps_per_batch`); a skipped one is
        counted and ends them, and the steps before it stand."""
        for _ in range(1, self.spec.config.optimizer.steps_per_batch):
            self.glance(x, y, self.slot(task))
            if self._skip_reason is not None:
                self.step_skipped(task, self._skip_reason)
                return
            self.counters.pop("nonfinite_streak", None)

    def step_skipped(self, task: str, reason: str) -> None:
        """Count a step of `task` that `step` skipped (logged the first time per task); raise
        LearnerDiverged once the last MAX_NONFINITE_STREAK steps were all skipped."""
        self.count("nonfinite_steps")
        self.count("nonfinite_streak")
        skipped, streak = self.counters["nonfinite_steps"], self.counters["nonfinite_streak"]
        if task not in self._nonfinite_logged:
            self._nonfinite_logged.add(task)
            log.warning("task %r: a training step was skipped: its %s not finite; the weights "
                        "stay as they were (%d step(s) skipped so far; further skips in this "
                        "task are counted, not logged)", task, reason, skipped)
        if streak >= MAX_NONFINITE_STREAK:
            raise LearnerDiverged(
                f"the learner diverged on task {task!r}: its last {streak} steps were all "
                f"skipped, their loss, gradients or new weights not being finite ({skipped} "
                "skipped in all); lower the learning rate, or standardise the inputs "
                "(normalize: channel)", task, skipped)

    def nonfinite_weight(self) -> str | None:
        """The name of the first parameter or buffer of the net that is not finite, or None."""
        return first_nonfinite([*self.net.named_parameters(), *self.net.named_buffers()])

    def end_task(self, task: str) -> None:
        """Consolidate `task` if it is the open one; a known task that is already closed is left
        alone, an unknown id raises KeyError. Weights that are not finite at the end of the task
        raise LearnerDiverged, before anything is consolidated."""
        slot = self.slot(task)
        if task == self.open_task:
            bad = self.nonfinite_weight()
            if bad is not None:
                skipped = self.counters.get("nonfinite_steps", 0)
                raise LearnerDiverged(
                    f"the learner diverged on task {task!r}: its weight {bad} is not finite at "
                    f"the end of the task ({skipped} step(s) skipped in all)", task, skipped)
            self.freeze_input_statistics()  # the first task fixes them
            self.consolidate(slot)
            self.open_task = None

    def freeze_input_statistics(self) -> None:
        """Stop fitting the net's input standardisation (`normalize: channel`) to the stream:
        at the end of the first task, or when the statistics of a fleet's aggregate are taken."""
        for norm in self.fitting_norms:
            norm.freeze()
        self.fitting_norms = []

    def forward(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        return self.net(x, slot)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, task: str) -> torch.Tensor:
        slot = self.slot(task)
        was_training = self.net.training
        self.net.eval()
        try:
            return self.forward(x.to(self.device), slot)
        finally:
            self.net.train(was_training)

    def task_module(self, task: str) -> nn.Module:
        """An independent copy of task `task`'s dense network, in eval mode, on the CPU."""
        return copy.deepcopy(self.net.task_module(self.slot(task))).cpu().eval()

    def state_dict(self) -> dict[str, Any]:
        return {
            "net": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "task_ids": list(self.task_ids),
            "open_task": self.open_task,
            "rng": self.rng.get_state(),
            "memory": self.memory.state_dict() if self.memory is not None else None,
            "method": self.method_state(),
            "counters": dict(self.counters),
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.net.load_state_dict(d["net"])
        self.fitting_norms = [n for n in self.input_norms if not n.frozen]
        self.optimizer.load_state_dict(d["optimizer"])
        self.task_ids = list(d["task_ids"])
        self.open_task = d["open_task"]
        self.rng.set_state(d["rng"])
        if self.memory is not None:
            self.memory.load_state_dict(d["memory"])
        self.load_method_state(d["method"])
        self.counters = dict(d["counters"])
        self._weight_bound = None

    def stats(self) -> dict[str, Any]:
        """Counts of method events so far (only those that happened), for result.json; among
        them `nonfinite_steps`, the steps `step` skipped, and `nonfinite_streak`, how many of
        the latest steps in a row were skipped (present while a streak lasts)."""
        return dict(self.counters)

    def count(self, event: str, n: int = 1) -> None:
        self.counters[event] = self.counters.get(event, 0) + n

    def footprint(self) -> Footprint:
        params = list(self.net.parameters())
        buffers = list(self.net.buffers())
        mem = self.memory.footprint() if self.memory is not None else {}
        return Footprint(
            params_bytes=tensor_bytes(params),
            grad_bytes=sum(p.nbytes for p in params if p.requires_grad),
            buffers_bytes=tensor_bytes(buffers),
            optimizer_bytes=tensor_bytes(self.optimizer.state_dict()["state"]),
            memory_bytes=int(mem.get("memory_bytes", 0)),
            method_state_bytes=tensor_bytes(self.method_state()),
            deployable_bytes=tensor_bytes([*params, *buffers]),
            details={k: v for k, v in mem.items() if k != "memory_bytes"},
        )

    # --- helpers for methods -----------------------------------------------------------------
    def sgd_step(self, x: torch.Tensor, y: torch.Tensor, slot: int) -> StepStats:
        """Plain cross-entropy step: the whole of fine-tuning."""
        zero_grad(self.optimizer)
        loss = F.cross_entropy(self.forward(x, slot), y)
        loss.backward()
        self.step(loss)
        return StepStats(loss.detach())

    def step(self, loss: torch.Tensor, apply: Callable[[], Any] | None = None) -> bool:
        """Apply the optimiser step for the gradients in `.grad` (those of `loss`), unless it is
        not finite; returns whether it was applied. `apply` takes the step (default:
        `optimizer_step(self.optimizer)`). Every method steps through here.

        A step is skipped, changing neither the weights nor the optimiser's state, when the loss
        or a gradient is not finite or when a weight or optimiser-state value it writes would not
        be (`observe` then counts it). The decision depends on the values alone, never on timing,
        so a stream always gives the same skips.

        The usual step pays for one fused reduction and one device sync: the largest L2 norm
        among the loss, the gradients and the weights and optimiser state. Under plain SGD the
        weights' norm is not recomputed at every step: a bound on it is carried forward (each
        step adds at most lr times the gradients' norm) until a weight is written outside a
        step (tensor versions tell). Below SAFE_MAGNITUDE, with lr, momentum and weight decay
        at most SAFE_HYPERPARAMETER, the step cannot overflow and is applied as is. Anything
        else (a divergence under way, a huge learning rate) takes `_checked_step`: each tensor
        checked exactly, the step applied with a copy to roll back to.
        """
        apply = apply or (lambda: optimizer_step(self.optimizer))
        opt = self.optimizer
        weights = [p for group in opt.param_groups for p in group["params"]]
        params = [p for p in weights if p.grad is not None]
        if not params:
            apply()
            return True
        # the loss joins after the fused reduction: a scalar among the tensors slows it down
        grads = [*torch._foreach_norm([p.grad for p in params]), loss.detach()]
        versions = [p._version for p in weights]
        plain = is_plain_sgd(opt)
        if plain and self._weight_bound is not None and versions == self._weight_versions:
            [largest_grad], largest_weight = _totals(grads), self._weight_bound
        else:
            state = [v for p in params for v in opt.state.get(p, {}).values()
                     if isinstance(v, torch.Tensor) and v.shape == p.shape]
            with torch.no_grad():
                held = torch._foreach_norm(weights + state)
            largest_grad, largest_weight = _totals(grads, held)
        # at least the largest lr, momentum and weight decay; NaN or inf if any is
        hyper = sum(abs(group["lr"]) + abs(group.get("momentum", 0))
                    + abs(group.get("weight_decay", 0)) for group in opt.param_groups)
        if not (largest_grad < SAFE_MAGNITUDE and largest_weight < SAFE_MAGNITUDE
                and hyper <= SAFE_HYPERPARAMETER):
            return self._checked_step(loss, params, apply)
        apply()
        if plain:  # |new weight| <= |weight| + lr |gradient|
            self._weight_bound = largest_weight + hyper * largest_grad
            self._weight_versions = [p._version for p in weights]
        else:
            self._weight_bound = None
        return True

    @torch.no_grad()
    def _checked_step(self, loss: torch.Tensor, params: list[nn.Parameter],
                      apply: Callable[[], Any]) -> bool:
        """`step` for a step that might not be finite: checked tensor by tensor, and rolled back
        (weights and optimiser state of `params`) if what it wrote is not finite."""
        self._weight_bound = None
        opt = self.optimizer
        if not bool(loss.detach().isfinite()):
            self._skip_reason = "loss was"
            return False
        if first_nonfinite((str(i), p.grad) for i, p in enumerate(params)) is not None:
            self._skip_reason = "gradients were"
            return False
        weights = [p.detach().clone() for p in params]
        state = {p: {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                     for k, v in opt.state[p].items()} for p in params if p in opt.state}
        apply()
        written = [(str(i), p) for i, p in enumerate(params)] + [
            (k, v) for p in params for k, v in opt.state.get(p, {}).items()
            if isinstance(v, torch.Tensor)]
        if first_nonfinite(written) is None:
            return True
        for p, old in zip(params, weights, strict=True):
            p.copy_(old)
        for p in params:
            if p in state:
                opt.state[p] = state[p]
            else:
                opt.state.pop(p, None)
        self._skip_reason = "new weights were"
        return False
