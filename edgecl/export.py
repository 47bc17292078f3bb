"""Per-task ONNX export: a task's dense module -> ONNX -> verified against torch -> published.

`Exporter(checkpoint).export(task, repo)` writes `repo/<task>/<version>/model.onnx` and its
`manifest.json` (see `edgecl.repository`) only after onnxruntime reproduces torch on random
inputs and on the task's real test inputs: max abs difference <= 1e-4 and identical argmax.
A module whose parameters or buffers are not all finite is refused before it is exported, and
logits that are not finite (NaN or Inf, from torch or from onnxruntime) fail verification: a
diverged learner publishes nothing.

The graph is torch's dynamo export at opset 18 (its native opset: no version conversion) stamped
with IR version 8, the IR of opset 18. onnxruntime reads it from 1.14 on, so every wheel a Jetson
can install (1.17 - 1.23 on JetPack 6's Python 3.10) runs it; torch would otherwise stamp IR 10,
which onnxruntime reads only from 1.18.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from edgecl import __version__
from edgecl.checkpoint import checkpoint_bytes, load_learner
from edgecl.data import BenchmarkError, TaskData
from edgecl.learners import LearnerSpec, first_nonfinite
from edgecl.nets.norm import InputNorm
from edgecl.repository import (
    Manifest,
    Probe,
    TensorSpec,
    Verification,
    check_task_id,
    probe_input,
    publish,
    sha256_of,
)
from edgecl.setup import benchmark_for

OPSET = 18
IR_VERSION = 8
INPUT_NAME, OUTPUT_NAME = "input", "logits"
TOLERANCE = 1e-4  # max abs logit difference, float32
RANDOM_INPUTS = 64
REAL_INPUTS = 1000  # test samples compared per task, at most
NORMALISATION = ("none: float32 inputs exactly as the learner saw them in training (the "
                 "benchmark's values; MNIST variants: pixels / 255, in [0, 1])")


class ExportError(RuntimeError):
    """A task could not be exported; nothing was published for it."""


class VerificationError(ExportError):
    """onnxruntime does not reproduce torch within tolerance, or the logits are not finite."""


def check_finite(module: nn.Module, task: str) -> None:
    """Raise ExportError naming the first parameter or buffer of `module` that holds a NaN or
    an infinity: a learner that diverged has nothing worth exporting."""
    for kind, named in (("parameter", module.named_parameters()),
                        ("buffer", module.named_buffers())):
        bad = first_nonfinite(named)
        if bad is not None:
            raise ExportError(f"task {task}: the model's {kind} {bad} is not finite (NaN or Inf): "
                              "the learner diverged; not exported")


def to_onnx(module: nn.Module, input_shape: tuple[int, ...]) -> onnx.ModelProto:
    """`module` as a checked ONNX graph: input "input" [batch, *input_shape], output "logits"."""
    example = torch.zeros(2, *input_shape)  # a batch of 1 would be specialised, not dynamic
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                module, (example,), dynamo=True, opset_version=OPSET, verbose=False,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: torch.export.Dim("batch")},))
        model = program.model_proto
        model.ir_version = IR_VERSION
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # the exporter and the checker raise many types; report them all
        raise ExportError(f"cannot export {type(module).__name__} to ONNX: {e}") from e
    return model


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The dynamo exporter warns about things that do not concern us (torchvision ops...)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


class Comparison(NamedTuple):
    """onnxruntime against torch on some inputs."""

    diff: float  # max abs logit difference; NaN when a logit is NaN, never less than a real one
    mismatches: int  # inputs whose argmax differs
    torch_nonfinite: int  # inputs whose torch logits are not all finite
    onnx_nonfinite: int  # the same for onnxruntime's


def compare(session: ort.InferenceSession, module: nn.Module, batches: list[torch.Tensor]
            ) -> Comparison:
    """onnxruntime vs torch on every input of `batches`."""
    diff, mismatches, torch_bad, onnx_bad = 0.0, 0, 0, 0
    with torch.no_grad():
        for x in batches:
            expected = module(x).numpy()
            got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
            torch_bad += int((~np.isfinite(expected)).any(1).sum())
            onnx_bad += int((~np.isfinite(got)).any(1).sum())
            with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: NaN, counted above
                batch_diff = np.abs(got - expected).max()
            diff = float(np.max([diff, batch_diff]))  # keeps a NaN; max(0.0, nan) is 0.0
            mismatches += int((got.argmax(1) != expected.argmax(1)).sum())
    return Comparison(diff, mismatches, torch_bad, onnx_bad)


def normalisation(module: nn.Module) -> str:
    """What the model expects of its inputs: raw values when it standardises them itself."""
    norms = [m for m in module.modules() if isinstance(m, InputNorm)]
    return norms[0].describe() if norms else NORMALISATION


def export_module(module: nn.Module, repo: Path, task: str, spec: LearnerSpec,
                  classes: list[str], real: torch.Tensor | None, real_note: str,
                  source: str, source_sha256: str, input_transform: str = "",
                  input_range: tuple[float, float] | None = None) -> Manifest:
    """Export `module` (task `task` of a learner with `spec`) to ONNX, verify it against torch
    on random inputs and on `real` ones (`real_note` says where they come from, or why there
    are none), and publish it as the task's next version in `repo`; `input_transform` states
    the task's fixed input transform for clients (see `TaskData.transform`), `input_range` the
    least and greatest input value the model was trained on (default: those of `real`), which
    serve's input guard holds requests to."""
    check_task_id(task)
    check_finite(module, task)
    model = to_onnx(module, spec.input_shape).SerializeToString()
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    verification = _verify(task, session, module, spec.input_shape, real, real_note)
    probe = session.run([OUTPUT_NAME], {INPUT_NAME: probe_input(spec.input_shape)})[0]
    return publish(repo, model, {
        "task": task, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sha256": sha256_of(model), "opset": OPSET, "ir_version": IR_VERSION,
        "input": TensorSpec(name=INPUT_NAME, shape=[-1, *spec.input_shape]),
        "output": TensorSpec(name=OUTPUT_NAME, shape=[-1, spec.n_classes]),
        "classes": classes,
        "normalisation": normalisation(module),
        "input_range": (list(input_range) if input_range is not None
                        else None if real is None else [float(real.min()), float(real.max())]),
        "input_transform": input_transform,
        "method": spec.config.method.name, "head": spec.head,
        "source_checkpoint": source, "source_sha256": source_sha256,
        "verification": verification, "probe": Probe(logits=probe.tolist()),
        "exporter": {"edgecl": __version__, "torch": torch.__version__,
                     "onnx": onnx.__version__, "onnxruntime": ort.__version__},
    })


def _verify(task: str, session: ort.InferenceSession, module: nn.Module,
            input_shape: tuple[int, ...], real: torch.Tensor | None,
            real_note: str) -> Verification:
    g = torch.Generator().manual_seed(0)
    random = torch.rand(RANDOM_INPUTS, *input_shape, generator=g)
    # two batch sizes of random inputs: the batch axis really is dynamic
    runs = {"random": compare(session, module, [random, random[:1]])}
    if real is not None and len(real):
        runs["real"] = compare(session, module, [real])
    n_real = 0 if real is None else len(real)
    counts = {"random": RANDOM_INPUTS + 1, "real": n_real}
    nonfinite = [f"{who} on {bad} of the {counts[inputs]} {inputs} inputs"
                 for inputs, run in runs.items()
                 for who, bad in (("torch", run.torch_nonfinite),
                                  ("onnxruntime", run.onnx_nonfinite)) if bad]
    if nonfinite:
        raise VerificationError(
            f"task {task}: the model's outputs are not finite (NaN or Inf logits from "
            f"{'; '.join(nonfinite)}): the learner diverged; not published")
    diff = float(np.max([run.diff for run in runs.values()]))
    mismatches = sum(run.mismatches for run in runs.values())
    if not (diff <= TOLERANCE and mismatches == 0):
        raise VerificationError(
            f"task {task}: onnxruntime differs from torch by {diff:.3g} (max abs logit "
            f"difference, tolerance {TOLERANCE:g}) with {mismatches} of "
            f"{RANDOM_INPUTS + 1 + n_real} argmax differing; not published")
    return Verification(tolerance=TOLERANCE, max_abs_diff=diff, argmax_mismatches=0,
                        random_inputs=RANDOM_INPUTS + 1, real_inputs=n_real, real_data=real_note)


@dataclass(frozen=True)
class RealInputs:
    """Real inputs of a task for verification, or why there are none."""

    task: TaskData | None
    note: str


class Exporter:
    """Exports the tasks of one checkpoint (learner loaded once, benchmark rebuilt if it can be)."""

    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint = checkpoint.resolve()
        data = checkpoint_bytes(checkpoint)  # one read: what is loaded is what is hashed
        self.learner = load_learner(checkpoint, device="cpu", data=data)
        self.checkpoint_sha256 = sha256_of(data)

    @property
    def tasks(self) -> list[str]:
        return list(self.learner.task_ids)

    def export(self, task: str, repo: Path) -> Manifest:
        """Export, verify and publish `task`'s model as its next version; returns its manifest."""
        check_task_id(task)
        if task not in self.learner.task_ids:
            raise ExportError(f"unknown task {task!r}; the checkpoint has: "
                              f"{', '.join(self.learner.task_ids) or 'none'}")
        inputs = self.real_inputs(task)
        real = inputs.task.x_test[:REAL_INPUTS] if inputs.task else None
        return export_module(
            self.learner.task_module(task), repo, task, self.learner.spec, self._classes(inputs),
            real, inputs.note, str(self.checkpoint), self.checkpoint_sha256,
            inputs.task.transform if inputs.task else "")

    def real_inputs(self, task: str) -> RealInputs:
        """The task's test set from the checkpoint's benchmark config, when it can be rebuilt."""
        tasks, note = self._benchmark
        if task in tasks or not tasks:
            return RealInputs(tasks.get(task), note)
        return RealInputs(None, f"random inputs only: task {task!r} is not in the benchmark")

    @functools.cached_property
    def _benchmark(self) -> tuple[dict[str, TaskData], str]:
        """The checkpoint's benchmark tasks by name and a note on them, built on first use."""
        spec = self.learner.spec
        try:
            bench = benchmark_for(spec.config)
        except (BenchmarkError, OSError) as e:
            return {}, f"random inputs only: the checkpoint's benchmark cannot be loaded ({e})"
        if bench.input_shape != spec.input_shape or bench.n_classes != spec.n_classes:
            return {}, (f"random inputs only: the config's benchmark {bench.name} does not fit "
                        f"the learner (input {list(bench.input_shape)}, {bench.n_classes} "
                        f"classes vs {list(spec.input_shape)}, {spec.n_classes})")
        return {t.name: t for t in bench.tasks}, f"{bench.name} test set ({bench.source})"

    def _classes(self, inputs: RealInputs) -> list[str]:
        if inputs.task is not None:
            return list(inputs.task.classes)
        return [str(k) for k in range(self.learner.spec.n_classes)]
