"""`edgecl export`: per-task ONNX models, verified against torch, published atomically."""

import copy
import hashlib
import os
import stat

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import make_learner, task_batches
from typer.testing import CliRunner

from edgecl import export, repository
from edgecl.atomic import atomic_write_text
from edgecl.checkpoint import FORMAT, read_checkpoint, save_checkpoint
from edgecl.cli import app
from edgecl.data.digits import digits
from edgecl.data.pmnist import task_permutation
from edgecl.export import Exporter, ExportError, VerificationError
from edgecl.learners import LEARNERS
from edgecl.protocol import run_protocol
from edgecl.setup import benchmark_for, load_config

CLASSES = ["cat", "dog", "eel"]


def tiny_benchmark(path) -> str:
    """Tasks t0 and t1 of conftest's synthetic data as a file: benchmark with named classes."""
    arrays = {"classes": np.array(CLASSES), "head": np.array("per_task")}
    for t in range(2):
        x, y = (a.numpy() for a in task_batches(t, n_batches=1, batch=40)[0])
        arrays |= {f"task{t}_x_train": x, f"task{t}_y_train": y, f"task{t}_x_test": x,
                   f"task{t}_y_test": y, f"task{t}_name": np.array(f"t{t}")}
    np.savez(path, **arrays)
    return f"file:{path}"


def trained_checkpoint(folder, method="finetune", head="per_task"):
    """A tiny learner that learned t0 and t1 of `tiny_benchmark`, saved as folder/c.pt."""
    learner = make_learner(method, head, benchmark={"name": tiny_benchmark(folder / "b.npz")})
    for t in range(2):
        for x, y in task_batches(t):
            learner.observe(x, y, f"t{t}")
        learner.end_task(f"t{t}")
    save_checkpoint(folder / "c.pt", learner)
    return learner


def onnx_logits(version_dir, x):
    session = ort.InferenceSession(str(version_dir / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


def methods_and_heads():
    # Both head modes for the reference methods; the others share TaskNet's export path.
    for method in LEARNERS:
        both = method in ("finetune", "independent")
        for head in ("shared", "per_task") if both else ("per_task",):
            yield method, head


@pytest.mark.parametrize(("method", "head"), list(methods_and_heads()))
def test_exported_model_reproduces_the_learner(tmp_path, method, head):
    learner = trained_checkpoint(tmp_path, method, head)
    manifest = Exporter(tmp_path / "c.pt").export("t1", tmp_path / "repo")
    x = torch.rand(7, 1, 4, 4)
    np.testing.assert_allclose(onnx_logits(tmp_path / "repo" / "t1" / "1", x),
                               learner.predict(x, "t1").numpy(), atol=1e-5)
    assert (manifest.version, manifest.method, manifest.head) == (1, method, head)


def onnx_release(version: str) -> tuple[int, int]:
    """(IR version, ai.onnx opset) of an ONNX release, from onnx's own table."""
    [row] = [r for r in onnx.helper.VERSION_TABLE if r[0] == version]
    return row[1], row[2]


def test_graph_needs_nothing_newer_than_jetsons_oldest_onnxruntime_reads(tmp_path):
    """onnxruntime 1.17, the oldest wheel a Jetson gets, implements ONNX 1.15: a graph stamped
    with a newer IR (torch's own export says IR 10) or opset, or with an op of another domain,
    fails to load there. Loading in 1.17 itself: benchmarks/ort_versions.py (needs PyPI)."""
    trained_checkpoint(tmp_path)
    Exporter(tmp_path / "c.pt").export("t0", tmp_path / "repo")
    model = onnx.load(tmp_path / "repo" / "t0" / "1" / "model.onnx")
    onnx.checker.check_model(model, full_check=True)  # every op valid at the declared opset
    max_ir, max_opset = onnx_release("1.15.0")
    assert model.ir_version <= max_ir
    [(domain, opset)] = [(o.domain, o.version) for o in model.opset_import]
    assert domain == "" and opset <= max_opset
    assert {n.domain for n in model.graph.node} <= {""} and not model.functions


def test_the_manifest_describes_the_published_graph(tmp_path):
    trained_checkpoint(tmp_path)
    m = Exporter(tmp_path / "c.pt").export("t0", tmp_path / "repo")
    version_dir = tmp_path / "repo" / "t0" / "1"
    data = (version_dir / "model.onnx").read_bytes()
    model = onnx.load_from_string(data)
    assert repository.read_manifest(version_dir) == m
    assert m.sha256 == hashlib.sha256(data).hexdigest()  # of the bytes published
    assert (m.opset, m.ir_version) == (model.opset_import[0].version, model.ir_version)
    assert m.input.shape == [-1, 1, 4, 4] and m.output.shape == [-1, 3]
    assert m.classes == CLASSES and m.task == "t0"
    assert m.verification.real_inputs == 40 and m.verification.random_inputs == 65
    assert m.input_range is not None and 0 <= m.input_range[0] < m.input_range[1] <= 1.05
    assert m.source_checkpoint == str((tmp_path / "c.pt").resolve())
    assert m.input_transform == ""  # a file's tasks are used as given


def test_a_pmnist_model_states_the_permutation_its_clients_apply(tmp_path):
    cfg = load_config(None, {"benchmark": {"n_tasks": 2, "samples_per_task": 20}, "seed": 4})
    bench = benchmark_for(cfg)
    _, learner = run_protocol(cfg, bench)
    save_checkpoint(tmp_path / "c.pt", learner)
    m = Exporter(tmp_path / "c.pt").export("task01", tmp_path / "repo")
    assert m.input_transform.endswith("perm = edgecl.data.pmnist.task_permutation(4, 1, x.shape)")
    split = digits(None)
    raw = split.inputs(split.x_test[:1])[0]  # the digit as a camera gives it, in [0, 1]
    client = raw.flatten()[task_permutation(4, 1, tuple(raw.shape))].reshape(raw.shape)
    assert torch.equal(client, bench.tasks[1].x_test[0])  # what the task's model learned on
    served = onnx_logits(tmp_path / "repo" / "task01" / "1", client[None])
    assert np.allclose(served, learner.predict(client[None], "task01").numpy(), atol=1e-4)


def test_without_its_benchmark_a_model_is_verified_on_random_inputs(tmp_path):
    trained_checkpoint(tmp_path)
    (tmp_path / "b.npz").unlink()
    m = Exporter(tmp_path / "c.pt").export("t0", tmp_path / "repo")
    assert m.verification.real_inputs == 0 and m.input_range is None
    assert m.verification.real_data.startswith("random inputs only: the checkpoint's benchmark "
                                               "cannot be loaded")
    assert m.classes == ["0", "1", "2"]


def test_versions_only_increase_and_a_version_taken_meanwhile_is_kept(tmp_path, monkeypatch):
    trained_checkpoint(tmp_path)
    repo = tmp_path / "repo"
    first = Exporter(tmp_path / "c.pt").export("t0", repo)
    fields = first.model_dump(exclude={"version"})
    assert repository.publish(repo, b"second", fields).version == 2
    real_versions = repository.versions
    stale = iter([[1]])  # this writer's first look misses another writer's version 2
    monkeypatch.setattr(repository, "versions",
                        lambda r, t: next(stale, None) or real_versions(r, t))
    assert repository.publish(repo, b"third", fields).version == 3
    assert (repo / "t0" / "2" / "model.onnx").read_bytes() == b"second"
    assert (repo / "t0" / "3" / "model.onnx").read_bytes() == b"third"
    assert sorted(p.name for p in (repo / "t0").iterdir()) == ["1", "2", "3"]  # no staging left


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_published_and_atomically_written_files_get_the_umasks_modes(tmp_path, umask_027):
    trained_checkpoint(tmp_path)  # save_checkpoint writes through atomic_open
    atomic_write_text(tmp_path / "result.json", "{}")
    Exporter(tmp_path / "c.pt").export("t0", tmp_path / "repo")
    version = tmp_path / "repo" / "t0" / "1"
    assert mode(version) == 0o750  # 0o777 & ~0o027, not a temp folder's 0o700
    for path in (tmp_path / "c.pt", tmp_path / "result.json", version / "model.onnx",
                 version / "manifest.json"):
        assert mode(path) == 0o640, path  # 0o666 & ~0o027, not a temp file's 0o600


def test_a_model_that_fails_verification_is_not_published(tmp_path, monkeypatch):
    trained_checkpoint(tmp_path)
    real_to_onnx = export.to_onnx

    def off_by_half(module, input_shape):
        wrong = copy.deepcopy(module)
        with torch.no_grad():
            wrong[-1].bias[0] += 0.5  # the head's first logit
        return real_to_onnx(wrong, input_shape)

    monkeypatch.setattr(export, "to_onnx", off_by_half)
    with pytest.raises(VerificationError, match=r"differs from torch by 0\.5 .*tolerance 0\.0001"):
        Exporter(tmp_path / "c.pt").export("t0", tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_bad_task_ids_are_refused(tmp_path):
    trained_checkpoint(tmp_path)
    exporter = Exporter(tmp_path / "c.pt")
    with pytest.raises(ValueError, match="cannot name a model folder"):
        exporter.export("../t0", tmp_path / "repo")
    with pytest.raises(ExportError, match="unknown task 'nope'; the checkpoint has: t0, t1"):
        exporter.export("nope", tmp_path / "repo")


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_exports_the_tasks_asked_for(tmp_path):
    trained_checkpoint(tmp_path)
    r = cli("export", "--checkpoint", tmp_path / "c.pt", "--repo", tmp_path / "repo",
            "--task", "t1")
    assert r.exit_code == 0, r.output
    assert repository.tasks(tmp_path / "repo") == ["t1"]
    m = repository.read_manifest(tmp_path / "repo" / "t1" / "1")
    assert m.sha256[:12] in r.output  # the summary table


def test_cli_publishes_the_tasks_that_pass_and_exits_1(tmp_path, monkeypatch):
    trained_checkpoint(tmp_path)
    real_export = Exporter.export

    def fail_t0(self, task, repo):
        if task == "t0":
            raise VerificationError("task t0: onnxruntime differs from torch by 0.5")
        return real_export(self, task, repo)

    monkeypatch.setattr(Exporter, "export", fail_t0)
    r = cli("export", "--checkpoint", tmp_path / "c.pt", "--repo", tmp_path / "repo")
    assert r.exit_code == 1
    assert "error: task t0: onnxruntime differs from torch by 0.5" in r.output
    assert repository.tasks(tmp_path / "repo") == ["t1"]


def test_cli_reports_a_task_it_cannot_write_and_exports_the_others(tmp_path):
    trained_checkpoint(tmp_path)
    repo = tmp_path / "repo[/]"  # printed as is, not read as rich markup
    repo.mkdir(parents=True)
    (repo / "t0").write_text("in the way of t0's folder")
    r = cli("export", "--checkpoint", tmp_path / "c.pt", "--repo", repo)
    assert r.exit_code == 1
    assert f"error: [Errno 17] File exists: '{repo / 't0'}'" in r.output
    assert repository.tasks(repo) == ["t1"]


class NotAWeight:
    pass


def damage(tmp_path, kind):
    """tmp_path/bad.pt, broken in one way, from the good tmp_path/c.pt."""
    bad = tmp_path / "bad.pt"
    payload = read_checkpoint(tmp_path / "c.pt")
    if kind == "no spec":
        del payload["spec"]
    elif kind == "no net state":
        del payload["state"]["net"]
    elif kind == "python objects":
        payload = {"format": FORMAT, "spec": NotAWeight()}
    if kind == "text":
        bad.write_text("not a checkpoint\n")
    else:
        torch.save(payload, bad)
    return bad


@pytest.mark.parametrize(("args", "message"), [
    (["--task", "nope"], "unknown task(s) nope; the checkpoint has: t0, t1"),
    (["--checkpoint", "/nonexistent.pt"], "no checkpoint at /nonexistent.pt"),
    (["--repo", "{tmp}/b.npz"], "{tmp}/b.npz: exists and is not a folder"),
    (["--checkpoint", "no spec"], "{tmp}/bad.pt: damaged edgecl checkpoint (missing key 'spec')"),
    (["--checkpoint", "no net state"],
     "{tmp}/bad.pt: damaged edgecl checkpoint (missing key 'net')"),
    (["--checkpoint", "python objects"],
     "{tmp}/bad.pt: not an edgecl checkpoint (a weights-only load refuses what it holds"),
    (["--checkpoint", "text"], "{tmp}/bad.pt: not an edgecl checkpoint ("),
])
def test_cli_bad_input_is_one_line_and_exit_code_2(tmp_path, args, message):
    trained_checkpoint(tmp_path)
    if args[0] == "--checkpoint" and not args[1].startswith("/"):
        args = ["--checkpoint", damage(tmp_path, args[1])]
    r = cli("export", "--checkpoint", tmp_path / "c.pt", "--repo", tmp_path / "repo",
            *(str(a).format(tmp=tmp_path) for a in args))
    assert r.exit_code == 2
    [line] = r.output.splitlines()  # one line, nothing else
    assert line.startswith("error: ") and message.format(tmp=tmp_path) in line
    assert not (tmp_path / "repo").exists()
