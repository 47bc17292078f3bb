"""onnxruntime sessions: execution providers, small-device thread settings, verified loading."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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

# Fastest first; the first available ones are used, CPU always last as the fallback.
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider",
                       "CPUExecutionProvider")
SHORT_NAMES = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider",
               "cpu": "CPUExecutionProvider"}
# The probe re-run at load guards against a runtime computing something else (a wrong graph, a
# broken provider); it leaves room for TF32 / TensorRT kernels, which round differently from CPU.
PROBE_RTOL = 1e-2


class ModelRefused(Exception):
    """A version that must not serve; `reason` is one of manifest, sha256, load, verify."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


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


def session_options(threads: int = 1) -> ort.SessionOptions:
    """Sequential graph, `threads` intra-op threads, no spin-waiting.

    One thread is the default: at batch 1 a thread pool only adds hand-over cost (for the MLP
    benchmarks/onnx_vs_torch.py measures 8.0-8.3 us on 1 thread, 9.8-11.9 us on 2), and
    spinning workers would steal the cores the server's event loop and the learner need on a
    2-core device.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only
    return options


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


def load_model(version_dir: Path, providers: Sequence[str], threads: int = 1) -> LoadedModel:
    """Load and verify one version folder, or raise `ModelRefused` saying why."""
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
    try:
        session = ort.InferenceSession(data, session_options(threads), providers=list(providers))
    except Exception as e:  # onnxruntime raises its own exception types for bad graphs
        raise ModelRefused("load", f"{version_dir}: onnxruntime cannot load it ({e})") from None
    model = LoadedModel(manifest, session, version_dir)
    _verify(model)
    return model


def _verify(model: LoadedModel) -> None:
    """The session's signature matches the manifest and it reproduces the export-time probe."""
    m, where = model.manifest, model.path
    io = [(model.session.get_inputs(), m.input), (model.session.get_outputs(), m.output)]
    for (actual, *extra), spec in io:
        if (extra or actual.name != spec.name or actual.type != "tensor(float)"
                or list(actual.shape[1:]) != spec.shape[1:]):
            raise ModelRefused("verify", f"{where}: the graph's {actual.name} ({actual.type}, "
                                         f"shape {actual.shape}) does not match the manifest's "
                                         f"{spec.name} (shape {spec.shape})")
    probe = probe_input(m.input.shape[1:], m.probe.seed, m.probe.batch)
    try:
        logits = model.infer(probe)
    except Exception as e:
        raise ModelRefused("verify", f"{where}: the probe batch fails to run ({e})") from None
    expected = np.asarray(m.probe.logits, dtype=np.float32)
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    diff = float(np.abs(logits - expected).max()) if logits.shape == expected.shape else np.inf
    if not diff <= PROBE_RTOL * scale:
        raise ModelRefused("verify", f"{where}: probe logits differ from the export's by "
                                     f"{diff:.3g} (allowed {PROBE_RTOL * scale:.3g})")
