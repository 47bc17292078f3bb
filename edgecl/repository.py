"""The model repository: one folder per task, one immutable folder per version.

    <repo>/<task>/<version>/model.onnx
    <repo>/<task>/<version>/manifest.json
    <repo>/<task>/<version>/BAD            (optional: an operator rolled this version back)

Versions are positive integers that only increase. A version folder appears by a single rename of
a fully written, fsync'd temp folder beside it, so a reader never sees half a model; the temp
folders start with "." and are not versions. This module is shared by the writer (`edgecl export`)
and the reader (`edgecl serve`) and needs neither torch nor onnxruntime. `prune` bounds its
growth: a task keeps its newest versions, the others are removed.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    NonNegativeInt,
    PositiveInt,
    ValidationError,
    model_validator,
)

from edgecl.atomic import fsync_dir, temp_path

FORMAT = "edgecl-model/1"
MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
TASK_ID_RULE = "up to 128 letters, digits, '.', '_' or '-', starting with a letter or digit"
BAD_FILE = "BAD"  # <repo>/<task>/<version>/BAD: an operator rolled this version back
PROBE_SEED = 0
PROBE_BATCH = 4
DEFAULT_KEEP = 5  # versions `prune` keeps per task


class ManifestError(ValueError):
    """A manifest is missing, not JSON, or does not describe its folder."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Frozen):
    """A model input or output; shape[0] is -1, the dynamic batch axis."""

    name: str
    datatype: Literal["FP32"] = "FP32"
    shape: list[int]


class Verification(_Frozen):
    """How the exported graph was checked against torch before it was published."""

    tolerance: float
    max_abs_diff: float
    argmax_mismatches: int
    random_inputs: int
    real_inputs: int
    real_data: str  # where the real inputs came from, or why there were none


class Probe(_Frozen):
    """Logits of `probe_input(...)` at export: a loader re-runs them to verify its runtime."""

    seed: NonNegativeInt = PROBE_SEED
    batch: PositiveInt = PROBE_BATCH
    logits: list[list[float]]

    @model_validator(mode="after")
    def _one_row_per_sample(self) -> Probe:
        if len(self.logits) != self.batch or len({len(row) for row in self.logits}) != 1:
            raise ValueError(f"logits must be {self.batch} rows of one length")
        return self


class Manifest(_Frozen):
    format: Literal["edgecl-model/1"] = FORMAT
    task: str
    version: PositiveInt
    created: str  # ISO 8601, UTC
    sha256: str  # of model.onnx
    opset: int
    ir_version: int
    input: TensorSpec
    output: TensorSpec
    classes: list[str]  # output k is the logit of classes[k]
    normalisation: str
    input_range: list[float] | None  # [min, max] of the task's real test inputs, if known
    # the fixed per-task transform a client applies to raw data first (pmnist's permutation)
    input_transform: str = ""
    method: str
    head: str
    source_checkpoint: str
    source_sha256: str
    verification: Verification
    probe: Probe
    exporter: dict[str, str]  # package versions that wrote this model


def check_task_id(task: str) -> str:
    """Task ids become folder names and URL segments: letters, digits, '.', '_', '-'."""
    if not TASK_ID.fullmatch(task):
        raise ValueError(f"task id {task!r} cannot name a model folder: use {TASK_ID_RULE}")
    return task


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def probe_input(input_shape: list[int] | tuple[int, ...], seed: int = PROBE_SEED,
                batch: int = PROBE_BATCH) -> np.ndarray:
    """Deterministic float32 inputs in [0, 1) (numpy's PCG64 streams are stable across versions)."""
    return np.random.default_rng(seed).random((batch, *input_shape), dtype=np.float32)


def tasks(repo: Path) -> list[str]:
    """Task folders in `repo`, sorted."""
    if not repo.is_dir():
        return []
    return sorted(p.name for p in repo.iterdir() if p.is_dir() and TASK_ID.fullmatch(p.name))


def versions(repo: Path, task: str) -> list[int]:
    """Published versions of `task`, ascending (temp folders are skipped)."""
    folder = repo / task
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir()
                  if p.is_dir() and p.name.isascii() and p.name.isdigit() and int(p.name) > 0)


def marked_bad(version_dir: Path) -> bool:
    """Whether an operator marked this version bad (a `BAD` file in its folder).

    Raises OSError when the folder cannot be searched: a version that cannot be checked is not
    taken as good, and the caller keeps what is serving.
    """
    try:
        (version_dir / BAD_FILE).lstat()
    except (FileNotFoundError, NotADirectoryError):
        return False
    return True


def prune(repo: Path, task: str, keep: int = DEFAULT_KEEP,
          serving: Iterable[int] = ()) -> list[int]:
    """Remove `task`'s old versions; returns the version numbers removed, ascending.

    Kept: the newest `keep` versions, the newest `keep` not marked BAD (a server rolled back
    past BAD versions serves an older one: it stays, and so do the ones it would fall back to
    if that one failed to load), and the versions in `serving`. Only versions older than all of
    those go, so a reader never loses a version it may be loading now or next, and the newest
    version stays: numbers keep increasing. A version goes by one rename to a hidden
    `.pruning-*` folder (readers see it gone at once), then its files are deleted; leftovers of
    a prune cut short are deleted too. Safe to run beside a reader and beside a `publish`.
    """
    if keep < 1:
        raise ValueError(f"keep {keep!r}: a task keeps at least its newest version")
    task_dir = repo / check_task_id(task)
    if not task_dir.is_dir():
        return []
    for leftover in task_dir.glob(".pruning-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    found = versions(repo, task)
    good = [v for v in found if not marked_bad(task_dir / str(v))]
    kept = {*found[-keep:], *good[-keep:], *serving}
    oldest_kept = min(kept & set(found), default=0)
    removed = []
    for version in found:
        if version >= oldest_kept:
            break
        trash = temp_path(task_dir, ".pruning-")
        try:
            os.rename(task_dir / str(version), trash)
        except FileNotFoundError:  # another prune took it
            continue
        removed.append(version)
        shutil.rmtree(trash, ignore_errors=True)
    if removed:
        fsync_dir(task_dir)
    return removed


def read_manifest(version_dir: Path) -> Manifest:
    """The manifest of one version folder, checked against the folder's task and version."""
    path = version_dir / MANIFEST_FILE
    try:
        manifest = Manifest.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise ManifestError(f"{path}: missing") from None
    except OSError as e:  # not readable, a folder...
        raise ManifestError(f"{path}: cannot be read ({e.strerror})") from None
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        if first["loc"][:2] == ("probe", "logits") and first.get("input", 0) is None:
            # JSON has no NaN or infinity: the manifest's writer put null in their place
            raise ManifestError(f"{path}: {where} is null, not a number: the model's outputs "
                                "on the probe were NaN or infinite when it was exported; a "
                                "model that computes non-finite outputs cannot serve") from None
        raise ManifestError(f"{path}: {where}: {first['msg']}") from None
    if (manifest.task, str(manifest.version)) != (version_dir.parent.name, version_dir.name):
        raise ManifestError(f"{path}: describes {manifest.task}/{manifest.version}, "
                            f"not {version_dir.parent.name}/{version_dir.name}")
    return manifest


def publish(repo: Path, model: bytes, manifest_fields: dict[str, Any]) -> Manifest:
    """Write `model` and its manifest as the next version of its task; returns the manifest.

    The version is assigned here (newest + 1). Files are written and fsync'd in a temp folder that
    is then renamed into place; if a concurrent writer took the same number, the next one is used.
    """
    task = check_task_id(manifest_fields["task"])
    task_dir = repo / task
    task_dir.mkdir(parents=True, exist_ok=True)
    staging = temp_path(task_dir, ".staging-")
    staging.mkdir()  # 0o777 less the umask: the published version is as readable as any folder
    try:
        _write_synced(staging / MODEL_FILE, model)
        version = 0
        while True:
            version = max([version, *versions(repo, task)]) + 1
            manifest = Manifest(**manifest_fields, version=version)
            _write_synced(staging / MANIFEST_FILE, manifest.model_dump_json(indent=1).encode())
            fsync_dir(staging)
            if _rename_if_free(staging, task_dir / str(version)):
                break
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(task_dir)
    fsync_dir(repo)
    return manifest


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _rename_if_free(src: Path, dst: Path) -> bool:
    """rename(2) refuses a non-empty target, so a published version is never replaced."""
    if dst.exists():
        return False
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            return False
        raise
    return True
