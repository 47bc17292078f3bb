"""GEM (Lopez-Paz & Ranzato, NeurIPS 2017) and A-GEM (Chaudhry et al., ICLR 2019).

Both store every batch in the episodic memory of its task (the newest `memory.per_task` samples,
GEM's n_memories) and change the current gradient g only where it would raise the loss of a past
task:

    GEM:    G = [∇ℓ_k] for every past task k, each on its whole memory (batched passes)
            if any G_k·g < 0:  v = argmin ½ vᵀ(GGᵀ + eps·I)v + (Gg)ᵀv  s.t. v >= margin
                               g ← Gᵀv + g
    A-GEM:  g_ref = ∇ℓ on a random batch of all past tasks' memories
            if gᵀg_ref < 0:    g ← g - (gᵀg_ref / g_refᵀg_ref) g_ref

then an optimiser step along g. Gradients are flat float32 vectors over every parameter of the net
(`net.parameters()` order). In per_task head mode each past task's loss goes through its own head,
so its row of G is zero on the other heads.

A step reads float32 memory in place, in one pass over every past task. Compact memory (float16,
uint8) is decoded into the memory's own decode buffer, inside its byte budget: only the samples
a step reads (A-GEM's reference batch, fast GEM's subsample), or for exact GEM one past task's
memory at a time, one pass each. No float32 copy of the memory is kept.

Fast GEM (`fast: true`) draws afresh at every step `fast_tasks` of the past tasks and
`fast_samples` of each one's memory samples, and constrains the step by those gradients only: a
random subset of GEM's constraints, each estimated, at a fraction of the cost (GEM's cost grows
with tasks x memory, fast GEM's stays flat once there are `fast_tasks` past tasks).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import quadprog
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, PositiveInt
from torch import nn
from torch.func import functional_call, grad, vmap

from edgecl.config import MemoryConfig
from edgecl.learners.base import Learner, LearnerSpec, StepStats, resolve_device
from edgecl.memory import EpisodicMemory
from edgecl.nets import TaskNet


class GEMParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    memory_strength: float = Field(default=0.5, ge=0)  # GEM's margin: v >= memory_strength
    qp_eps: float = Field(default=1e-3, gt=0)  # ridge on GGᵀ
    fast: bool = False  # constrain each step by a random subsample of past tasks and memories
    fast_tasks: PositiveInt = 8  # past tasks per step, when fast
    fast_samples: PositiveInt = 16  # memory samples per past task and step, when fast


class AGEMParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # past-task memory samples behind each reference gradient; 512, not the usual 256: see
    # models/agem.yaml for the sweep
    ref_batch: PositiveInt = 512


@dataclass(frozen=True)
class PastMemory:
    """Every stored task but the current one: task i is `slots[i]`, whose memory holds
    `counts[i]` samples (the first of its row of `quota`) and goes through head `heads[i]`.
    Holds no tensor: everything a method keeps between steps lies in the memory's budget."""

    slots: tuple[int, ...]
    counts: tuple[int, ...]
    heads: tuple[int, ...]
    quota: int

    def head_index(self, device: torch.device) -> torch.Tensor:
        """`heads` as a tensor on `device`."""
        return torch.tensor(self.heads, device=device)

    def filled_rows(self) -> torch.Tensor:
        """Indices `task * quota + position` of the filled samples, on the CPU."""
        return torch.cat([task * self.quota + torch.arange(n)
                          for task, n in enumerate(self.counts)])


@dataclass(frozen=True)
class TaskBatch:
    """Memory samples of a few past tasks, batched: task i is `slots[i]`, with its samples in
    `x[i, :counts[i]]`, `y[i, :counts[i]]`, through head `heads[i]`."""

    slots: tuple[int, ...]
    x: torch.Tensor  # [k, n, *input_shape] float32
    y: torch.Tensor  # [k, n]
    counts: tuple[int, ...]
    heads: torch.Tensor


def per_task_gradients(net: TaskNet, x: torch.Tensor, y: torch.Tensor, counts: tuple[int, ...],
                       heads: torch.Tensor) -> torch.Tensor:
    """G [k, n_params]: row i is the gradient of task i's mean loss over `x[i, :counts[i]]`.

    Tasks holding the same number of samples share one forward and one backward, so full
    memories take a single batched pass (the per-task-sum trick for an MLP body, `vmap` over
    tasks for any other); task i goes through head `heads[i]`. Rows beyond a task's count take
    no part, not even in BatchNorm statistics. Columns follow `net.parameters()`; a row is zero
    on the heads of other tasks.
    """
    if len(set(counts)) == 1:  # the usual case: every past memory is full
        return _same_size_task_gradients(net, x[:, :counts[0]], y[:, :counts[0]], heads)
    G = x.new_empty(len(counts), sum(p.numel() for p in net.parameters()))
    sizes = torch.tensor(counts)
    for n in sizes.unique().tolist():
        tasks = (sizes == n).nonzero().squeeze(1).to(x.device)
        G[tasks] = _same_size_task_gradients(net, x[tasks, :n], y[tasks, :n], heads[tasks])
    return G


BodyGradients = tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]  # body, head W, head b


def _same_size_task_gradients(net: TaskNet, x: torch.Tensor, y: torch.Tensor,
                              heads: torch.Tensor) -> torch.Tensor:
    k = len(heads)
    weight = torch.stack([h.weight.detach() for h in net.heads])[heads]
    bias = torch.stack([h.bias.detach() for h in net.heads])[heads]
    body_gradients = _linear_body_gradients if _is_linear(net.body) else _vmapped_body_gradients
    body_grads, weight_grad, bias_grad = body_gradients(net.body, weight, bias, x, y)
    own_head = torch.cat([weight_grad.flatten(1), bias_grad.flatten(1)], dim=1)
    every_head = own_head.new_zeros(k, len(net.heads), own_head.shape[1])
    every_head[torch.arange(k, device=heads.device), heads] = own_head
    return torch.cat([*(g.flatten(1) for g in body_grads), every_head.flatten(1)], dim=1)


def _is_linear(body: nn.Module) -> bool:
    """An MLP: only nn.Linear layers hold parameters (each applied once, to flat rows), and
    nothing holds buffers."""
    holders = [m for m in body.modules() if list(m.parameters(recurse=False))]
    return all(isinstance(m, nn.Linear) for m in holders) and not list(body.buffers())


def _linear_body_gradients(body: nn.Module, weight: torch.Tensor, bias: torch.Tensor,
                           x: torch.Tensor, y: torch.Tensor) -> BodyGradients:
    """The per-task-sum trick for an MLP: one plain forward and backward over all k·m rows
    yields each Linear layer's inputs a and output gradients δ; task i's weight gradient is
    δ_iᵀa_i (one bmm per layer for all tasks), its bias gradient Σ δ_i. The heads' part is
    written out (softmax minus one-hot): on CPU that is several times faster than autograd
    through log_softmax over 10 classes."""
    k, m = x.shape[:2]
    layers = [layer for layer in body.modules() if isinstance(layer, nn.Linear)]
    inputs, outputs = [], []

    def keep(layer: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        inputs.append(args[0].detach())
        outputs.append(out)

    hooks = [layer.register_forward_hook(keep) for layer in layers]
    try:
        features = body(x.flatten(0, 1)).view(k, m, -1)
    finally:
        for hook in hooks:
            hook.remove()
    logits = torch.baddbmm(bias.unsqueeze(1), features.detach(), weight.transpose(1, 2))
    delta_logits = cross_entropy_gradient(logits, y) / m  # of each task's mean loss
    weight_grad = torch.bmm(delta_logits.transpose(1, 2), features.detach())
    delta_features = torch.bmm(delta_logits, weight)
    deltas = torch.autograd.grad(features, outputs, delta_features) if layers else ()
    body_grads = []
    for layer, a, delta in zip(layers, inputs, deltas, strict=True):
        delta = delta.view(k, m, -1)
        body_grads.append(torch.bmm(delta.transpose(1, 2), a.view(k, m, -1)))
        if layer.bias is not None:
            body_grads.append(delta.sum(1))
    return body_grads, weight_grad, delta_logits.sum(1)


def cross_entropy_gradient(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """∂/∂logits of the summed cross-entropy: softmax(logits) - onehot(y), over the last dim."""
    exp = (logits - logits.amax(-1, keepdim=True)).exp()
    grad = exp / exp.sum(-1, keepdim=True)
    grad.scatter_add_(-1, y.unsqueeze(-1), grad.new_full((*y.shape, 1), -1.0))
    return grad


def _vmapped_body_gradients(body: nn.Module, weight: torch.Tensor, bias: torch.Tensor,
                            x: torch.Tensor, y: torch.Tensor) -> BodyGradients:
    """Any body: `vmap` over tasks of the gradient of one task's loss. BatchNorm statistics go
    to per-task copies that are thrown away."""
    k = len(x)
    params = {n: p.detach() for n, p in body.named_parameters()}
    buffers = {n: b.expand(k, *b.shape).clone() for n, b in body.named_buffers()}

    def task_loss(params, buffers, weight, bias, x, y):
        features = functional_call(body, (params, buffers), (x,))
        return F.cross_entropy(F.linear(features, weight, bias), y)

    body_grads, weight_grad, bias_grad = vmap(
        grad(task_loss, argnums=(0, 2, 3)), in_dims=(None, 0, 0, 0, 0, 0)
    )(params, buffers, weight, bias, x, y)
    return list(body_grads.values()), weight_grad, bias_grad


def flatten(grads: Iterable[torch.Tensor | None], params: list[nn.Parameter]) -> torch.Tensor:
    """One vector of `grads`, zeros where a parameter has none, in the order of `params`."""
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                      for g, p in zip(grads, params, strict=True)])


def solve_gem_dual(GGt: torch.Tensor, Gg: torch.Tensor, margin: float, eps: float
                   ) -> torch.Tensor:
    """v of GEM's dual QP  min ½ vᵀ(GGᵀ + eps·I)v + (Gg)ᵀv  s.t. v >= margin.

    The dual needs G only through the k x k Gram matrix GGᵀ and the dot products Gg: only these
    leave the device, solved in float64. Raises quadprog's ValueError when it fails ("matrix G
    is not positive definite", "constraints are inconsistent").
    """
    P = GGt.double().cpu().numpy()
    k = len(P)
    P = 0.5 * (P + P.T) + eps * np.eye(k)
    q = -Gg.double().cpu().numpy()
    v = quadprog.solve_qp(P, q, np.eye(k), np.full(k, margin))[0]
    return torch.as_tensor(v, dtype=Gg.dtype, device=Gg.device)


def project_onto_halfspace(g: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """A-GEM: the vector closest to `g` whose dot product with `ref` is not negative (`g`
    itself, the same object, when it already is)."""
    dot = g @ ref
    if dot >= 0:
        return g
    return g - (dot / (ref @ ref)) * ref


class EpisodicLearner(Learner):
    """A method that keeps every task's newest samples in the episodic memory and reads those of
    past tasks (GEM, A-GEM, ER, DER++): the memory with the decode buffer a step reads through,
    the past tasks' part of it, and random draws from that part."""

    uses_memory = True
    stores_logits: ClassVar[bool] = False  # the memory keeps each sample's logits (DER++)

    def __init__(self, spec: LearnerSpec) -> None:
        params = self.Params.model_validate(spec.config.method.params)
        memory = spec.config.memory
        # built first: a budget too small for max_tasks beside the decode buffer is refused
        # with the decode buffer named
        episodic = EpisodicMemory(spec.input_shape, memory.per_task, spec.max_tasks,
                                  memory.budget_bytes, memory.dtype,
                                  resolve_device(spec.config.device),
                                  self.decode_rows(params, memory),
                                  spec.n_classes if self.stores_logits else 0)
        super().__init__(spec)
        self.memory = episodic
        self._past: PastMemory | None = None

    @classmethod
    @abstractmethod
    def decode_rows(cls, params: Any, memory: MemoryConfig) -> int:
        """Rows of float32 the memory decodes into at once: what one step reads of it."""

    def past_memory(self, slot: int) -> PastMemory | None:
        """Every stored task but `slot`; None while there is none.

        Cached until the set of past tasks or the quota changes: a past task's sample count only
        changes when the quota shrinks.
        """
        slots = tuple(s for s in self.memory.tasks if s != slot)
        if not slots:
            return None
        past = self._past
        if past is None or past.slots != slots or past.quota != self.memory.quota:
            counts = tuple(self.memory.filled(s) for s in slots)
            heads = tuple(self.net.head_index(s) for s in slots)
            past = self._past = PastMemory(slots, counts, heads, self.memory.quota)
        return past

    def draw(self, past: PastMemory, n: int) -> torch.Tensor:
        """Rows (indices `task * quota + position`, on the CPU) of `n` filled samples of `past`
        drawn without replacement with `self.rng`; all of them, shuffled, when there are fewer."""
        pick = torch.randperm(sum(past.counts), generator=self.rng)[:n]
        if all(count == past.quota for count in past.counts):  # the usual case: sample i is row i
            return pick
        return past.filled_rows()[pick]

    def gather(self, past: PastMemory, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Memory samples `rows` (indices `task * quota + position`, any shape, on the device),
        decoded: inputs `[*rows.shape, *input_shape]` and labels `rows.shape`."""
        x, y = self.memory.gather(past.slots, rows.flatten() // past.quota,
                                  rows.flatten() % past.quota)
        return x.view(*rows.shape, *x.shape[1:]), y.view(rows.shape)

    def load_method_state(self, state: dict[str, Any]) -> None:
        self._past = None  # the memory was replaced


class EpisodicProjection(EpisodicLearner):
    """GEM and A-GEM: store each batch, project the gradient against past memories, step."""

    def __init__(self, spec: LearnerSpec) -> None:
        super().__init__(spec)
        heads = self.net.heads
        # the head each parameter belongs to (None: the shared body)
        self._param_head: list[int | None] = [None for _ in self.net.body.parameters()] + [
            h for h in range(len(heads)) for _ in heads[h].parameters()]

    @abstractmethod
    def project(self, g: torch.Tensor, past: PastMemory) -> torch.Tensor | None:
        """The gradient to step along instead of `g`, or None when `g` violates nothing."""

    def learn(self, x: torch.Tensor, y: torch.Tensor, slot: int) -> StepStats:
        self.memory.add(x, y, slot)
        return self.projected_step(x, y, slot)

    def glance(self, x: torch.Tensor, y: torch.Tensor, slot: int) -> None:
        self.projected_step(x, y, slot)

    def projected_step(self, x: torch.Tensor, y: torch.Tensor, slot: int) -> StepStats:
        """One step on the batch along its gradient projected against past memories."""
        past = self.past_memory(slot)
        if past is None:
            return self.sgd_step(x, y, slot)
        self.optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.forward(x, slot), y)
        loss.backward()
        projected = self.project(self.flat_grad(), past)
        if projected is not None:
            heads = {self.net.head_index(s) for s in (*past.slots, slot)}  # no device read
            self.set_flat_grad(projected, heads)
        self.step(loss, self.optimizer.step)
        return StepStats(loss.detach())

    def flat_grad(self) -> torch.Tensor:
        params = list(self.net.parameters())
        return flatten([p.grad for p in params], params)

    def set_flat_grad(self, flat: torch.Tensor, heads: set[int]) -> None:
        """Write `flat` into the gradients of the body and of `heads`; other heads keep none,
        so the optimiser leaves them alone."""
        offset = 0
        for p, head in zip(self.net.parameters(), self._param_head, strict=True):
            if head is None or head in heads:
                p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()


class GEM(EpisodicProjection):
    """Gradient Episodic Memory: one constraint per past task, projection by a QP."""

    name = "gem"
    Params = GEMParams
    optimizer_defaults: ClassVar[dict[str, Any]] = {"lr": 0.1}  # the GEM paper's MNIST setting
    # japanesevowels: lr 0.1, 16 steps per batch scored 0.938 on validation (best with
    # 1 step: 0.568); `edgecl tune`'s grid in docs/results.md
    tuned: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {
        "japanesevowels": {"optimizer": {"lr": 0.1, "steps_per_batch": 16}}}

    def project(self, g: torch.Tensor, past: PastMemory) -> torch.Tensor | None:
        return self.constrain(self.past_task_gradients(past), g)

    def constrain(self, G: torch.Tensor, g: torch.Tensor) -> torch.Tensor | None:
        """g̃ = Gᵀv + g when some G_k·g < 0, else None. If quadprog fails even with a larger
        ridge, A-GEM's projection on the mean past-task gradient instead.

        A past task whose gradient is not finite (its memory holds the samples of a skipped
        step) is left out of the constraints, and counted (`gem_nonfinite_constraints`): the
        step is constrained by the others. A non-finite g itself is left to `Learner.step`."""
        Gg = G @ g
        violated, finite = torch.stack([(Gg < 0).any(), Gg.isfinite().all()]).tolist()
        if not finite:
            if not bool(g.isfinite().all()):
                return None  # the step is skipped
            keep = Gg.isfinite()
            self.count("gem_nonfinite_constraints", int(keep.logical_not().sum()))
            G, Gg = G[keep], Gg[keep]
            violated = bool((Gg < 0).any())
        if not violated:
            return None
        self.count("gem_projections")
        v = self.dual_solution(G @ G.T, Gg)
        if v is None:
            return project_onto_halfspace(g, G.mean(0))
        return G.T @ v + g

    def dual_solution(self, GGt: torch.Tensor, Gg: torch.Tensor) -> torch.Tensor | None:
        """v from quadprog, retried once with a ridge that conditions GGᵀ at any gradient scale
        (1e-3 of its mean diagonal, at least 100 eps); None when that fails too."""
        margin, eps = self.params.memory_strength, self.params.qp_eps
        try:
            return solve_gem_dual(GGt, Gg, margin, eps)
        except ValueError:
            self.count("gem_qp_retries")
        try:
            return solve_gem_dual(GGt, Gg, margin, self.retry_eps(GGt))
        except ValueError:
            self.count("gem_qp_fallbacks")
            return None

    def retry_eps(self, GGt: torch.Tensor) -> float:
        return max(100 * self.params.qp_eps, 1e-3 * float(GGt.diagonal().mean()))

    @classmethod
    def decode_rows(cls, params: GEMParams, memory: MemoryConfig) -> int:
        """Fast GEM decodes its subsample; exact GEM reads float32 memory in place and decodes
        compact memory one task's row at a time, one pass per task (on pmnist with uint8
        memory, the past-task gradients take 1.09x float32's time: benchmarks/memory_dtype.py)."""
        if params.fast:
            return params.fast_tasks * params.fast_samples
        return 0 if memory.dtype == "float32" else memory.per_task

    def past_task_gradients(self, past: PastMemory) -> torch.Tensor:
        if self.params.fast:
            b = self.subsample(past, self.params.fast_tasks, self.params.fast_samples)
            return per_task_gradients(self.net, b.x, b.y, b.counts, b.heads)
        heads = past.head_index(self.device)
        G = None
        for i, x, y in self.memory.task_runs(past.slots):
            k = len(x)
            part = per_task_gradients(self.net, x, y, past.counts[i:i + k], heads[i:i + k])
            if k == len(past.slots):
                return part
            if G is None:
                G = part.new_empty(len(past.slots), part.shape[1])
            G[i:i + k] = part
        return G

    def subsample(self, past: PastMemory, n_tasks: int, n_samples: int) -> TaskBatch:
        """`n_tasks` random past tasks, each with `n_samples` random filled samples of its memory
        (all of them where there are fewer)."""
        tasks = torch.randperm(len(past.counts), generator=self.rng)[:n_tasks]
        counts = torch.tensor(past.counts)[tasks]
        keys = torch.rand(len(tasks), past.quota, generator=self.rng)
        keys[torch.arange(past.quota) >= counts.unsqueeze(1)] = 2.0  # empty rows sort last
        rows = keys.topk(min(n_samples, past.quota), dim=1, largest=False).indices
        x, y = self.gather(past, (tasks.unsqueeze(1) * past.quota + rows).to(self.device))
        return TaskBatch(tuple(past.slots[i] for i in tasks.tolist()), x, y,
                         tuple(counts.clamp(max=n_samples).tolist()),
                         past.head_index(self.device)[tasks.to(self.device)])


class AGEM(EpisodicProjection):
    """Averaged GEM: one constraint, from a random batch of all past tasks' memories."""

    name = "agem"
    Params = AGEMParams
    # chosen on the validation split (models/agem.yaml); GEM's 0.1 scored lower there. On
    # rotmnist the same sweep (lr 0.03 / 0.1 x ref_batch 256 / 512) chose these settings again:
    # 0.508 on validation, test 0.486 ± 0.015. WSN's ([0.3, 0.5]) did too: 0.865.
    optimizer_defaults: ClassVar[dict[str, Any]] = {"lr": 0.03}
    # japanesevowels: lr 0.1, 8 steps per batch scored 0.914 on validation (best with
    # 1 step: 0.519); `edgecl tune`'s grid in docs/results.md
    tuned: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {
        "japanesevowels": {"optimizer": {"lr": 0.1, "steps_per_batch": 8}}}

    def project(self, g: torch.Tensor, past: PastMemory) -> torch.Tensor | None:
        """`project_onto_halfspace(g, g_ref)`, or None when g needs no projection. A reference
        gradient that is not finite (the memory holds the samples of a skipped step) is not
        used, and counted (`agem_nonfinite_references`); a non-finite g is left to
        `Learner.step`."""
        ref = self.reference_gradient(past)
        dot = g @ ref
        value = float(dot)
        if not math.isfinite(value):
            if bool(g.isfinite().all()):
                self.count("agem_nonfinite_references")
            return None
        if value >= 0:
            return None
        self.count("agem_projections")
        return g - (dot / (ref @ ref)) * ref

    @classmethod
    def decode_rows(cls, params: AGEMParams, memory: MemoryConfig) -> int:
        return params.ref_batch

    def reference_gradient(self, past: PastMemory) -> torch.Tensor:
        """Gradient of the mean loss on `ref_batch` filled memory samples drawn without
        replacement with `self.rng` (all of them when there are fewer), each through its task's
        head. Only those samples are decoded."""
        rows = self.draw(past, self.params.ref_batch).to(self.device)
        x, y = self.gather(past, rows)
        heads = past.head_index(self.device)[rows // past.quota]
        loss = F.cross_entropy(rows_forward(self.net, x, heads), y)
        params = list(self.net.parameters())
        return flatten(torch.autograd.grad(loss, params, allow_unused=True), params)


def rows_forward(net: TaskNet, x: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    """Logits of every row of `x` through its own head `heads[i]`, in one pass. BatchNorm
    statistics go to copies that are thrown away: memory rows must not shift the live ones."""
    buffers = {name: b.clone() for name, b in net.body.named_buffers()}
    features = functional_call(net.body, buffers, (x,), strict=False) if buffers else net.body(x)
    if len(net.heads) == 1:
        return net.heads[0](features)
    weight = torch.stack([h.weight for h in net.heads])[heads]
    bias = torch.stack([h.bias for h in net.heads])[heads]
    return torch.einsum("ncf,nf->nc", weight, features) + bias
