"""onnxruntime sessions: execution providers, small-device thread settings, verified loading.

A version is verified twice: first by `Prober` in a child process with a time limit (a graph
that loops forever or crashes onnxruntime is refused there, not in the server), then in the
server with the providers it serves on (`edgecl.serve.probe.check` both times).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edgecl.repository import (
    MODEL_FILE,
    Manifest,
    ManifestError,
    probe_input,
    read_manifest,
    sha256_of,
)
from edgecl.serve import probe
from edgecl.serve.probe import BATCHES, PROBE_RTOL, ProbeFailed, session_options

# Fastest first; the first available ones are used, CPU always last as the fallback.
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider",
                       "CPUExecutionProvider")
SHORT_NAMES = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider",
               "cpu": "CPUExecutionProvider"}
DEFAULT_PROBE_TIMEOUT_S = 20.0
_PASSED_KEPT = 256  # probe passes remembered (by content): a version is probed once

__all__ = ["BATCHES", "PROBE_RTOL", "LoadedModel", "ModelRefused", "ProbeCancelled", "Prober",
           "choose_providers", "load_model", "probe_version", "session_options"]


class ModelRefused(Exception):
    """A version that must not serve; `reason` is one of manifest, sha256, load, verify,
    timeout (its probe did not finish in time), crash (its probe process died)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ProbeCancelled(Exception):
    """The prober was closed (the server is stopping) while a probe ran: no verdict."""


def choose_providers(requested: Sequence[str] | None = None) -> list[str]:
    """The requested providers (short or full names), else the preferred ones available here."""
    available = ort.get_available_providers()
    if not requested:
        return [p for p in PREFERRED_PROVIDERS if p in available]
    chosen = [SHORT_NAMES.get(p.lower(), p) for p in requested]
    missing = [p for p in chosen if p not in available]
    if missing:
        raise ValueError(f"execution provider(s) {', '.join(missing)} not available in this "
                         f"onnxruntime build; available: {', '.join(available)}")
    return chosen


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """One verified version of a task's model, ready to run (thread-safe)."""

    manifest: Manifest
    session: ort.InferenceSession
    path: Path

    @property
    def version(self) -> int:
        return self.manifest.version

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Logits for a float32 batch shaped like the manifest's input."""
        spec = self.manifest
        return self.session.run([spec.output.name], {spec.input.name: x})[0]


def _spec(m: Manifest) -> dict[str, Any]:
    return {"input": m.input.model_dump(include={"name", "shape"}),
            "output": m.output.model_dump(include={"name", "shape"})}


def _probe_data(m: Manifest) -> tuple[np.ndarray, np.ndarray]:
    """(the probe input, the export's logits for it)."""
    return (probe_input(m.input.shape[1:], m.probe.seed, m.probe.batch),
            np.asarray(m.probe.logits, dtype=np.float32))


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(code).name
    except ValueError:
        return f"signal {code}"


class _ProbeProcess:
    """One `edgecl.serve.probe` child process, fed one version at a time."""

    def __init__(self) -> None:
        # a file, not a pipe: it never fills up; closed with the process (_close_files)
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115
        try:
            # -I: no user site, no PYTHON* variables, and not probe.py's folder (serve/http.py
            # would hide the standard library's http) on the path
            self.proc = subprocess.Popen([sys.executable, "-I", probe.__file__],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=self.stderr)
        except BaseException:
            self.stderr.close()
            raise
        self.dead = False
        self._out = b""

    def probe(self, manifest: Manifest, model: bytes, where: Path, timeout_s: float
              ) -> dict[str, Any]:
        """The child's verdict on one version; ModelRefused when it hangs (killed) or dies."""
        assert self.proc.stdin is not None
        x, expected = _probe_data(manifest)
        try:
            self.proc.stdin.write(probe.request(_spec(manifest), x, expected, model))
            self.proc.stdin.flush()
        except OSError:  # BrokenPipeError: it died
            return self._died(where)
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._out:
            left = deadline - time.monotonic()
            fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self.kill()
                raise ModelRefused("timeout", f"{where}: the probe did not finish within "
                                              f"{timeout_s:g} s (a graph that loops forever?); "
                                              "its process was killed")
            chunk = os.read(fd, 65536)
            if not chunk:
                return self._died(where)
            self._out += chunk
        line, _, self._out = self._out.partition(b"\n")
        try:
            verdict = json.loads(line)
        except ValueError:
            return self._died(where)
        return verdict

    def _died(self, where: Path) -> dict[str, Any]:
        with contextlib.suppress(OSError):
            self.proc.kill()  # it may only have closed its stdout
        code = self.proc.wait()
        self.stderr.seek(0)
        text = self.stderr.read()[-4096:].decode("utf-8", "replace").strip()
        self.kill()
        if code < 0:
            raise ModelRefused("crash", f"{where}: the probe process died of "
                                        f"{_signal_name(-code)}")
        last = (text.splitlines() or ["no output"])[-1]
        raise ModelRefused("crash", f"{where}: the probe process exited with status {code} "
                                    f"({last[:300]})")

    def kill(self) -> None:
        if not self.dead:
            self.dead = True
            with contextlib.suppress(OSError):
                self.proc.kill()
            self.proc.wait()
            self._close_files()

    def finish(self) -> None:
        """End of the requests: the child exits by itself."""
        if not self.dead:
            self.dead = True
            with contextlib.suppress(OSError):
                self.proc.stdin.close()  # type: ignore[union-attr]
            try:
                self.proc.wait(10.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self._close_files()

    def _close_files(self) -> None:
        for f in (self.proc.stdin, self.proc.stdout, self.stderr):
            with contextlib.suppress(OSError):
                f.close()  # type: ignore[union-attr]


class Prober:
    """Runs `edgecl.serve.probe` on versions in a child process (CPU, one thread), killed
    after `timeout_s` per version: a graph that hangs or crashes onnxruntime is refused
    (`timeout`, `crash`) without touching the server. `probe_versions` probes several in one
    process (its start is most of the cost). Passes are remembered by content (the model's
    sha256, the manifest's signature and probe), so a version is probed in a child once.
    `close()` kills the probes running and refuses new ones (ProbeCancelled): a stopping
    server does not wait for them. Thread-safe."""

    def __init__(self, timeout_s: float = DEFAULT_PROBE_TIMEOUT_S) -> None:
        if not timeout_s > 0:
            raise ValueError(f"probe timeout {timeout_s!r}: use a number of seconds > 0")
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._running: set[_ProbeProcess] = set()
        self._passed: OrderedDict[str, None] = OrderedDict()
        self._closed = False

    def check(self, manifest: Manifest, model: bytes, where: Path) -> None:
        """Return once `model` passed the probe; else ModelRefused (or ProbeCancelled)."""
        self._probe([(where, lambda: (manifest, model))])[where].check()

    def probe_versions(self, folders: Sequence[Path]) -> dict[Path, ModelRefused | None]:
        """Each version folder's verdict: None (passed) or why it must not serve (ModelRefused,
        also for a manifest or sha256 that does not check out). ProbeCancelled when closed."""
        items = [(folder, functools.partial(_read_version, folder)) for folder in folders]
        return {where: verdict.error for where, verdict in self._probe(items).items()}

    def _probe(self, items: list[tuple[Path, Callable[[], tuple[Manifest, bytes]]]]
               ) -> dict[Path, _Verdict]:
        verdicts: dict[Path, _Verdict] = {}
        child: _ProbeProcess | None = None
        try:
            for where, read in items:
                try:
                    manifest, model = read()
                    key = self._key(manifest)
                    with self._lock:
                        if key in self._passed:
                            self._passed.move_to_end(key)
                            verdicts[where] = _Verdict(None)
                            continue
                    if child is None or child.dead:
                        child = self._start()
                    verdict = child.probe(manifest, model, where, self.timeout_s)
                    if self._closed:
                        raise ProbeCancelled("the server is stopping")
                    if "reason" in verdict:
                        raise ModelRefused(verdict["reason"], f"{where}: {verdict['message']}")
                    self._remember(key)
                    verdicts[where] = _Verdict(None)
                except ModelRefused as e:
                    if self._closed:  # killed by close(), not by its model
                        raise ProbeCancelled("the server is stopping") from None
                    verdicts[where] = _Verdict(e)
        finally:
            if child is not None:
                child.finish()
                with self._lock:
                    self._running.discard(child)
        return verdicts

    @staticmethod
    def _key(manifest: Manifest) -> str:
        return hashlib.sha256(manifest.sha256.encode() + json.dumps(
            [_spec(manifest), manifest.probe.model_dump()], sort_keys=True).encode()).hexdigest()

    def _remember(self, key: str) -> None:
        with self._lock:
            self._passed[key] = None
            while len(self._passed) > _PASSED_KEPT:
                self._passed.popitem(last=False)

    def _start(self) -> _ProbeProcess:
        with self._lock:
            if self._closed:
                raise ProbeCancelled("the server is stopping")
            child = _ProbeProcess()
            self._running = {c for c in self._running if not c.dead} | {child}
            return child

    def close(self) -> None:
        with self._lock:
            self._closed = True
            running = list(self._running)
        for child in running:
            with contextlib.suppress(OSError):
                child.proc.kill()


@dataclass(frozen=True)
class _Verdict:
    error: ModelRefused | None

    def check(self) -> None:
        if self.error is not None:
            raise self.error


def _read_version(version_dir: Path) -> tuple[Manifest, bytes]:
    """The manifest and the model's bytes, checked against its sha256; else ModelRefused."""
    try:
        manifest = read_manifest(version_dir)
    except ManifestError as e:
        raise ModelRefused("manifest", str(e)) from None
    try:
        data = (version_dir / MODEL_FILE).read_bytes()
    except OSError as e:
        raise ModelRefused("load", f"{version_dir / MODEL_FILE}: {e.strerror}") from None
    digest = sha256_of(data)
    if digest != manifest.sha256:
        raise ModelRefused("sha256", f"{version_dir / MODEL_FILE}: sha256 {digest[:12]}… "
                                     f"does not match the manifest's {manifest.sha256[:12]}…")
    for spec in (manifest.input, manifest.output):
        if not spec.shape[1:] or min(spec.shape[1:]) < 1:
            raise ModelRefused("verify", f"{version_dir}: the manifest's {spec.name} shape "
                                         f"{spec.shape} is not a batch axis followed by sizes "
                                         "of at least 1")
    return manifest, data


def probe_version(version_dir: Path, prober: Prober) -> None:
    """Read one version folder and run `prober` on it: ModelRefused saying why it must not
    serve, or nothing. No session is made in this process."""
    error = prober.probe_versions([version_dir])[version_dir]
    if error is not None:
        raise error


def load_model(version_dir: Path, providers: Sequence[str], threads: int = 1,
               prober: Prober | None = None) -> LoadedModel:
    """Load and verify one version folder, or raise `ModelRefused` saying why.

    With a `prober`, the version passes it first (in a child process, time-limited); then the
    session is made here and verified again with `providers`."""
    manifest, data = _read_version(version_dir)
    if prober is not None:
        prober.check(manifest, data, version_dir)
    try:
        session = ort.InferenceSession(data, session_options(threads), providers=list(providers))
    except Exception as e:  # onnxruntime raises its own exception types for bad graphs
        raise ModelRefused("load", f"{version_dir}: onnxruntime cannot load it ({e})") from None
    x, expected = _probe_data(manifest)
    try:
        probe.check(session, _spec(manifest), x, expected)
    except ProbeFailed as e:
        raise ModelRefused(e.reason, f"{version_dir}: {e}") from None
    return LoadedModel(manifest, session, version_dir)
