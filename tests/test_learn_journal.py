"""The journal (durable, ordered, group-committed) and the journal -> learner loop."""

import dataclasses
import shutil
import struct
import threading

import numpy as np
import pytest
from learn_helpers import SHAPE, assert_same_state, stream_config, task_samples

from edgecl.daemon import journal as journal_module
from edgecl.daemon.journal import END, FLUSH, LOST, SAMPLE, Journal
from edgecl.daemon.loop import Learning, held_out, replay
from edgecl.daemon.schema import SampleError, Samples, Sender
from edgecl.learners import LearnerSpec, build_learner
from edgecl.setup import stream_schema

CFG = stream_config()
SCHEMA = stream_schema(CFG)


def samples(task: str, n: int, seed: int = 0) -> Samples:
    x, y = task_samples(int(task[-1]) if task[-1].isdigit() else 0, n, seed)
    return Samples([task] * n, x, y)


def new_learner():
    s = SCHEMA
    return build_learner(LearnerSpec(CFG, s.input_shape, s.n_classes, s.head, s.max_tasks))


@pytest.fixture
def journal(tmp_path):
    j = Journal(tmp_path / "j.sqlite3", max_tasks=3)
    yield j
    j.close()


def test_appends_get_consecutive_seqs_and_survive_reopening(tmp_path, journal):
    a = journal.append(samples("t0", 3)).result()
    m = journal.append_marker(END, "t0").result()
    b = journal.append(samples("t1", 2)).result()
    assert (a.first_seq, a.count, m.first_seq, b.first_seq, b.count) == (1, 3, 4, 5, 2)
    journal.truncate(4)
    journal.close()
    again = Journal(tmp_path / "j.sqlite3", max_tasks=3)
    try:
        assert again.append(samples("t1", 1)).result().first_seq == 7  # never reused
        got = again.read(0, 100)
        assert [(c.seq, c.count) for c in got] == [(5, 2), (7, 1)] and again.first_seq() == 5
        assert again.accepted == {"t0": 3, "t1": 3}
        expected = samples("t1", 2)
        assert got[0].x[1].reshape(SHAPE).tolist() == expected.x[1].tolist()
        assert got[0].y.tolist() == expected.y.tolist()
        assert [(c.seq, c.count) for c in again.read(5, 100)] == [(5, 2), (7, 1)]  # holds 6
        assert [c.seq for c in again.read(6, 100)] == [7]
    finally:
        again.close()


def test_concurrent_appends_share_commits_and_keep_each_request_contiguous(journal):
    acks = []

    def client(i: int) -> None:
        for _ in range(20):
            acks.append((journal.append(samples(f"t{i}", 5)).result(), i))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    by_seq = {c.seq + i: c.task for c in journal.read(0, 1000) for i in range(c.count)}
    assert len(by_seq) == 300 and journal.last_seq == 300
    for ack, i in acks:  # each request's samples are consecutive and all its own
        assert [by_seq[s] for s in range(ack.first_seq, ack.first_seq + 5)] == [f"t{i}"] * 5


def test_a_request_of_several_tasks_becomes_one_chunk_per_run(journal):
    mixed = Samples(["a", "a", "b", "a"], samples("a", 4).x, np.array([0, 1, 2, 0]))
    assert journal.append(mixed).result().count == 4
    chunks = journal.read(0, 10)
    assert [(c.seq, c.count, c.task) for c in chunks] == [(1, 2, "a"), (3, 1, "b"), (4, 1, "a")]
    assert np.concatenate([c.y for c in chunks]).tolist() == [0, 1, 2, 0]


def test_a_task_beyond_max_tasks_is_refused_and_nothing_of_the_request_is_journaled(journal):
    for t in ("a0", "a1", "a2"):
        journal.append(samples(t, 1)).result()
    mixed = Samples(["a0", "a3"], samples("a0", 2).x, np.array([0, 1]))
    with pytest.raises(SampleError, match="max_tasks=3") as e:
        journal.append(mixed).result()
    assert e.value.status == 409
    assert journal.last_seq == 3 and journal.accepted == {"a0": 1, "a1": 1, "a2": 1}


def fill(journal, plan):
    """Journal a plan of ("samples", task, n) / ("end", task) / ("flush", task) steps."""
    for step in plan:
        if step[0] == "samples":
            journal.append(samples(step[1], step[2], seed=journal.last_seq)).result()
        else:
            journal.append_marker(END if step[0] == "end" else FLUSH, step[1]).result()
    return journal.read(0, 10_000)


PLAN = [("samples", "t0", 23), ("samples", "t1", 2), ("samples", "t0", 9), ("flush", "t0"),
        ("samples", "t0", 30), ("end", "t0"), ("samples", "t1", 41), ("end", "t1"),
        ("samples", "t2", 17)]


def test_batches_are_cut_by_journal_order_alone(journal):
    records = fill(journal, PLAN)
    learner = new_learner()
    steps = []
    learner.learn = lambda x, y, slot, real=learner.learn: steps.append(
        (learner.task_ids[slot], len(y))) or real(x, y, slot)
    learning = replay(learner, SCHEMA, CFG.learn, records)
    seqs = np.concatenate([np.arange(c.seq, c.last + 1) for c in records if c.kind == 0])
    held = held_out(seqs, CFG.learn.holdout)
    pending = sum(len(p.y) for p in learning.pending)
    assert sum(n for _, n in steps) == learning.trained == (~held).sum() - learning.pending_train
    assert all(n <= SCHEMA.batch_size for _, n in steps)
    # a full batch, or one that a task switch or a marker closed: never two tasks in one
    order = [t for t, _ in steps]
    assert order[0] == "t0" and "t1" in order and order[-1] == "t2"
    assert learning.learned == len(seqs) - pending
    assert learner.open_task == "t2" and set(learning.accuracy_learned) == {"t0", "t1"}
    assert 0 < sum(learning.holdout.counts().values()) <= held.sum()


def test_held_out_share_is_close_to_the_setting():
    share = held_out(np.arange(1, 100_001), 0.05).mean()
    assert 0.045 < share < 0.055
    assert not held_out(np.arange(1, 1000), 0.0).any()
    assert held_out(np.arange(1, 1000), 0.05).tolist() == [
        held_out(np.array([s]), 0.05)[0] for s in range(1, 1000)]  # per seq, not per batch


@pytest.mark.parametrize("method", ["finetune", "gem", "ewc", "lwf", "wsn"])
def test_restore_and_replay_equals_an_uninterrupted_run(journal, method):
    """Checkpoint at every batch boundary of a run, restore into a fresh learner, replay the
    rest: the final state is the uninterrupted run's, bit for bit."""
    cfg = stream_config(method)
    s = stream_schema(cfg)
    spec = LearnerSpec(cfg, s.input_shape, s.n_classes, s.head, s.max_tasks)
    records = fill(journal, PLAN)
    reference = replay(build_learner(spec), s, cfg.learn, records)
    for cut in (2, 4, 6, len(records) - 1):
        first = replay(build_learner(spec), s, cfg.learn, records[:cut])
        restored = build_learner(spec)
        restored.load_state_dict(first.learner.state_dict())
        resumed = Learning(restored, s, cfg.learn, first.state_dict())
        for chunk in records:  # the journal after the offset, as the daemon reads it
            if chunk.last > resumed.offset:
                resumed.take(chunk)
        assert_same_state(reference.learner.state_dict(), resumed.learner.state_dict())
        assert resumed.learned == reference.learned and resumed.offset == reference.offset
        assert resumed.accuracy_now == reference.accuracy_now


def numbered(task: str, sender: str, seq: int) -> Samples:
    return dataclasses.replace(samples(task, 2), sender=Sender(sender, seq))


def test_a_senders_repeats_are_not_journaled_and_its_gaps_are_counted_missing(tmp_path):
    path = tmp_path / "j.sqlite3"
    journal = Journal(path, max_tasks=3)
    try:
        answers = [journal.append(numbered("t0", "cam", n)).result() for n in (1, 2, 2, 1, 5)]
        assert [(a.count, a.duplicate) for a in answers] == [
            (2, False), (2, False), (0, True), (0, True), (2, False)]
        assert journal.missing == 2 and journal.duplicates == 2  # 3 and 4 never came
        assert journal.append(numbered("t0", "late", 3)).result().count == 2
        assert journal.missing == 4  # a sender first heard at 3 skipped 1 and 2
        assert journal.accepted == {"t0": 8}
    finally:
        journal.close()
    again = Journal(path, max_tasks=3)
    try:  # what a sender sent and skipped is durable
        assert again.append(numbered("t0", "cam", 5)).result().duplicate
        assert again.append(numbered("t0", "cam", 6)).result().count == 2
        assert again.missing == 4 and again.senders["cam"].missing == 2
    finally:
        again.close()


def test_the_senders_heard_from_least_recently_are_forgotten_beyond_the_limit(tmp_path,
                                                                             monkeypatch):
    monkeypatch.setattr(journal_module, "MAX_SENDERS", 2)
    journal = Journal(tmp_path / "j.sqlite3", max_tasks=3)
    try:
        for name in ("a", "b", "a", "c"):
            journal.append(numbered("t0", name, journal.senders.get(name, Sender(name, 0)).seq
                                    + 1)).result()
        assert set(journal.senders) == {"a", "c"}
    finally:
        journal.close()
    again = Journal(tmp_path / "j.sqlite3", max_tasks=3)
    try:
        assert set(again.senders) == {"a", "c"}
    finally:
        again.close()


def wal_frames(wal: bytes) -> tuple[int, int]:
    """(page size, number of frames) of a SQLite WAL file."""
    page = struct.unpack(">I", wal[8:12])[0]
    return page, (len(wal) - 32) // (24 + page)


def test_a_flipped_wal_bit_loses_commits_that_are_counted_and_seqs_never_go_back(tmp_path):
    """SQLite replays a WAL up to the first frame that fails its checksum and drops the rest,
    committed or not, saying nothing: the last seq kept outside SQLite catches it."""
    live, copy = tmp_path / "live", tmp_path / "copy"
    live.mkdir()
    copy.mkdir()
    journal = Journal(live / "j.sqlite3", max_tasks=3)
    try:
        for i in range(20):  # 20 commits of 3 samples, all in the WAL (open: not checkpointed)
            journal.append(samples("t0", 3, seed=i)).result()
        for name in ("j.sqlite3", "j.sqlite3-wal", "j.sqlite3.last-seq"):
            shutil.copy(live / name, copy / name)  # what a power cut leaves on disk
    finally:
        journal.close()
    wal = bytearray((copy / "j.sqlite3-wal").read_bytes())
    page, frames = wal_frames(wal)
    frame = frames // 2
    wal[32 + frame * (24 + page) + 24 + page // 2] ^= 0x10  # one bit of that frame's page
    (copy / "j.sqlite3-wal").write_bytes(wal)
    damaged = Journal(copy / "j.sqlite3", max_tasks=3)
    try:
        chunks = damaged.read(0, 100)
        kept = sum(c.count for c in chunks if c.kind == SAMPLE)
        lost = [c for c in chunks if c.kind == LOST]
        assert 0 < kept < 60 and len(lost) == 1 and lost[0].last == 60
        assert lost[0].count == 60 - kept == damaged.damage["lost_records"]
        assert "were acknowledged" in damaged.damage["problem"]
        assert damaged.last_seq == 60
        assert damaged.append(samples("t0", 1)).result().first_seq == 61
    finally:
        damaged.close()
