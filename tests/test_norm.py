"""Input standardisation fitted from the stream travels with the model: checkpoint, ONNX export
and manifest; a client sends raw values and gets the learner's answer."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import make_learner

from edgecl.export import export_module
from edgecl.nets.norm import InputNorm
from edgecl.repository import MODEL_FILE, read_manifest

SHAPE = (3, 8)  # [channels, steps]


def raw_batches(n_batches: int, seed: int = 0):
    """Sensor windows in raw units: channel c around 100 * c + 5 with spread 10 ** c."""
    g = torch.Generator().manual_seed(seed)
    offset = torch.tensor([5.0, 105.0, 205.0]).view(1, 3, 1)
    spread = torch.tensor([1.0, 10.0, 100.0]).view(1, 3, 1)
    for _ in range(n_batches):
        y = torch.randint(0, 3, (16,), generator=g)
        x = offset + spread * (torch.randn(16, *SHAPE, generator=g) + y.view(-1, 1, 1))
        yield x, y


def norm_of(learner) -> InputNorm:
    (norm,) = learner.input_norms
    return norm


@pytest.mark.parametrize("method", ["finetune", "wsn", "independent"])
def test_statistics_come_from_the_first_task_and_then_stay(method):
    learner = make_learner(method, input_shape=SHAPE, normalize="channel",
                           net={"name": "conv1d", "channels": [8], "kernel_size": 3})
    norms = learner.input_norms
    assert norms and all(not n.frozen for n in norms)
    seen = []
    for x, y in raw_batches(20):
        learner.observe(x, y, "t0")
        seen.append(x)
    data = torch.cat(seen).transpose(0, 1).reshape(3, -1).double()
    for n in norms:
        torch.testing.assert_close(n.mean.double(), data.mean(1), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close((1 / n.inv_std).double(), data.std(1, unbiased=False),
                                   rtol=1e-5, atol=1e-6)
    learner.end_task("t0")
    frozen = [n.mean.clone() for n in norms]
    for x, y in raw_batches(5, seed=1):
        learner.observe(x * 3, y, "t1")
    assert all(n.frozen and torch.equal(n.mean, m) for n, m in zip(norms, frozen, strict=True))


def test_a_dead_channel_is_centred_not_blown_up():
    norm = InputNorm(SHAPE)
    x = torch.randn(10, *SHAPE)
    x[:, 1] = 7.0
    norm.update(x)
    out = norm(x)
    assert torch.all(out[:, 1] == 0) and torch.isfinite(out).all()


def test_restored_learner_keeps_fitting_where_it_stopped():
    a = make_learner(input_shape=SHAPE, normalize="channel")
    batches = list(raw_batches(6))
    for x, y in batches[:3]:
        a.observe(x, y, "t0")
    b = make_learner(input_shape=SHAPE, normalize="channel")
    b.load_state_dict(a.state_dict())
    for learner in (a, b):
        for x, y in batches[3:]:
            learner.observe(x, y, "t0")
    assert torch.equal(norm_of(a).mean, norm_of(b).mean)
    assert torch.equal(norm_of(a).count, norm_of(b).count)


def test_the_exported_model_takes_raw_values(tmp_path):
    learner = make_learner(input_shape=SHAPE, normalize="channel")
    for x, y in raw_batches(20):
        learner.observe(x, y, "t0")
    learner.end_task("t0")
    raw = next(raw_batches(1, seed=5))[0]
    manifest = export_module(learner.task_module("t0"), tmp_path, "t0", learner.spec,
                             ["a", "b", "c"], raw, "raw test windows", "test", "0" * 64)
    assert "send raw values" in manifest.normalisation and "frozen" in manifest.normalisation
    session = ort.InferenceSession(str(tmp_path / "t0" / "1" / MODEL_FILE))
    got = session.run(None, {"input": raw.numpy()})[0]
    np.testing.assert_allclose(got, learner.predict(raw, "t0").numpy(), rtol=1e-4, atol=1e-4)
    assert read_manifest(tmp_path / "t0" / "1").normalisation == manifest.normalisation
