"""Tests for `edgecl.memory.EpisodicMemory`: ring order, budget, eviction, dtypes, state."""

from __future__ import annotations

import pytest
import torch
from held import held_bytes
from hypothesis import given, settings
from hypothesis import strategies as st

from edgecl.config import ConfigError
from edgecl.memory import EpisodicMemory, MemoryBudgetError

# shape (1,) float32: 4 input bytes + 8 label bytes per sample
BPS = 12


def ids(*values: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch whose input and label both carry the sample id."""
    v = torch.tensor(values, dtype=torch.int64)
    return v.float().unsqueeze(1), v


def same(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    return all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def stored_ids(mem: EpisodicMemory, slot: int) -> list[int]:
    x, y = mem.get(slot)
    assert x.shape == (y.shape[0], *mem.input_shape)
    assert torch.equal(x[:, 0].long(), y)
    return y.tolist()


def test_ring_overwrites_oldest_in_place() -> None:
    mem = EpisodicMemory((1,), per_task=4, max_tasks=2)
    mem.add(*ids(0, 1, 2), slot=1)
    assert stored_ids(mem, 1) == [0, 1, 2]
    assert mem.filled(1) == 3
    mem.add(*ids(3, 4, 5), slot=1)  # 3 fills the last slot, 4 and 5 overwrite 0 and 1
    assert stored_ids(mem, 1) == [4, 5, 2, 3]
    assert mem.filled(1) == 4
    mem.add(*ids(6), slot=1)  # overwrites the oldest, 2
    assert stored_ids(mem, 1) == [4, 5, 6, 3]
    assert len(mem) == 4
    assert mem.tasks == [1]


def test_batch_larger_than_quota_keeps_last_samples() -> None:
    mem = EpisodicMemory((1,), per_task=3, max_tasks=1)
    mem.add(*ids(0), slot=0)
    mem.add(*ids(*range(10, 17)), slot=0)
    assert sorted(stored_ids(mem, 0)) == [14, 15, 16]
    mem.add(*ids(17), slot=0)  # the oldest of the kept three goes first
    assert sorted(stored_ids(mem, 0)) == [15, 16, 17]


def test_unfilled_rows_never_returned() -> None:
    mem = EpisodicMemory((1,), per_task=5, max_tasks=3)
    mem.add(*ids(1, 2), slot=2)
    mem.add(*ids(3), slot=0)
    assert mem.tasks == [2, 0]
    assert mem.filled(1) == 0
    x1, y1 = mem.get(1)
    assert x1.shape == (0, 1) and y1.shape == (0,)
    assert stored_ids(mem, 2) == [1, 2]



def runs(mem: EpisodicMemory, slots: list[int]) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """`task_runs` with each run copied out (a decoded run is overwritten by the next)."""
    return [(i, x.clone(), y.clone()) for i, x, y in mem.task_runs(slots)]


def test_float32_runs_are_views_of_consecutive_rows() -> None:
    mem = EpisodicMemory((1,), per_task=4, max_tasks=3)
    for slot in (0, 2, 1):  # rows 0, 1, 2
        mem.add(*ids(10 * slot, 10 * slot + 1), slot=slot)
    (i, x, y), = mem.task_runs([0, 2])
    assert i == 0 and x.shape == (2, 4, 1) and [row[:2].tolist() for row in y] == [[0, 1],
                                                                                   [20, 21]]
    mem.add(*ids(2), slot=0)
    assert x[0, 2, 0] == 2.0  # a view sees later adds
    apart = runs(mem, [0, 1, 2])  # rows 0, 2, 1: three runs
    assert [i for i, _, _ in apart] == [0, 1, 2]
    assert [y[0, :2].tolist() for _, _, y in apart] == [[0, 1], [10, 11], [20, 21]]


@pytest.mark.parametrize("dtype", ["float16", "uint8"])
def test_compact_runs_are_decoded_a_buffer_at_a_time(dtype) -> None:
    mem = EpisodicMemory((2,), per_task=3, max_tasks=5, dtype=dtype, decode_rows=7)
    order = [4, 0, 1, 2, 3]
    for slot in range(5):
        mem.add(torch.rand(3, 2) / 2 + slot / 8, torch.full((3,), slot), slot=slot)
    got = runs(mem, order)
    assert [(i, len(x)) for i, x, _ in got] == [(0, 2), (2, 2), (4, 1)]  # 7 rows: 2 tasks of 3
    x = torch.cat([x for _, x, _ in got])
    y = torch.cat([y for _, _, y in got])
    assert x.dtype == torch.float32
    for task, slot in enumerate(order):
        assert same((x[task], y[task]), mem.get(slot))  # decoded as `get` decodes
    no_buffer = EpisodicMemory((2,), per_task=3, max_tasks=5, dtype=dtype)
    no_buffer.add(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), slot=0)
    with pytest.raises(RuntimeError, match="decode buffer of 0 rows"):
        next(no_buffer.task_runs([0]))


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_gather_decodes_only_the_samples_asked_for(dtype) -> None:
    mem = EpisodicMemory((1,), per_task=4, max_tasks=3, dtype=dtype, decode_rows=3)
    for slot in range(3):
        mem.add(torch.tensor([[0.1], [0.2], [0.3]]) + slot / 4, torch.tensor([0, 1, 2]) + 10 * slot,
                slot=slot)
    x, y = mem.gather([2, 0], torch.tensor([0, 1, 0]), torch.tensor([2, 0, 1]))
    assert y.tolist() == [22, 0, 21]
    assert x.dtype == torch.float32 and x.shape == (3, 1)
    assert torch.equal(x[:, 0], torch.stack([mem.get(2)[0][2, 0], mem.get(0)[0][0, 0],
                                             mem.get(2)[0][1, 0]]))
    with pytest.raises(ValueError, match="4 samples do not fit the decode buffer of 3"):
        mem.gather([0], torch.zeros(4, dtype=torch.long), torch.arange(4))
    with pytest.raises(ValueError, match="task slot 1 has no stored samples"):
        EpisodicMemory((1,), 4, 3, decode_rows=1).gather([1], torch.zeros(1, dtype=torch.long),
                                                         torch.zeros(1, dtype=torch.long))


def test_eviction_keeps_most_recent_when_tasks_grow() -> None:
    mem = EpisodicMemory((1,), per_task=4, max_tasks=4, budget_bytes=4 * BPS)
    mem.add(*ids(0, 1, 2, 3, 4, 5), slot=0)  # wrapped: ring [4, 5, 2, 3]
    (_, first, _), = mem.task_runs([0])
    assert mem.quota == 4
    mem.add(*ids(10, 11, 12), slot=1)  # quota 48 // 24 = 2
    assert mem.quota == 2
    assert sorted(stored_ids(mem, 0)) == [4, 5]
    assert sorted(stored_ids(mem, 1)) == [11, 12]
    mem.add(*ids(6), slot=0)  # ring order survives eviction: 4 is the oldest
    assert sorted(stored_ids(mem, 0)) == [5, 6]
    mem.add(*ids(20), slot=2)  # quota 48 // 36 = 1
    assert stored_ids(mem, 0) == [6] and stored_ids(mem, 1) == [12] and stored_ids(mem, 2) == [20]
    mem.add(*ids(30), slot=3)  # quota 48 // 48 = 1: no eviction, nothing lost
    assert [mem.filled(s) for s in range(4)] == [1, 1, 1, 1]
    assert mem.footprint()["memory_bytes"] == 4 * BPS
    (_, last, _), = mem.task_runs([0])
    # every eviction moved samples inside the storage reserved at the first sample
    assert last.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()


def test_a_budgeted_memory_reserves_its_storage_once_and_never_reallocates() -> None:
    mem = EpisodicMemory((1,), per_task=4, max_tasks=4, budget_bytes=8 * BPS)
    mem.add(*ids(0, 1, 2), slot=0)
    (_, first, _), = mem.task_runs([0])
    reserved = held_bytes(mem)
    assert reserved == 8 * BPS  # the most it will ever store: 2 tasks x 4 or 4 tasks x 2
    for slot in (1, 2, 3):  # 8, then 6, then 8 samples
        mem.add(*ids(10 * slot, 10 * slot + 1), slot=slot)
        (_, now, _), = mem.task_runs([0])
        assert now.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        assert held_bytes(mem) == reserved
    assert [stored_ids(mem, s) for s in range(4)] == [[1, 2], [10, 11], [20, 21], [30, 31]]


def test_eviction_of_partly_filled_tasks() -> None:
    mem = EpisodicMemory((1,), per_task=6, max_tasks=3, budget_bytes=6 * BPS)
    mem.add(*ids(0, 1, 2, 3), slot=0)  # quota 6, not wrapped
    mem.add(*ids(7), slot=1)  # quota 3: task 0 drops its oldest
    assert stored_ids(mem, 0) == [1, 2, 3]
    mem.add(*ids(20), slot=2)  # quota 2: task 1 keeps its one sample and its free slot
    assert stored_ids(mem, 0) == [2, 3] and stored_ids(mem, 1) == [7]
    mem.add(*ids(8), slot=1)  # fills the free slot, overwrites nothing
    assert stored_ids(mem, 1) == [7, 8]
    mem.add(*ids(9), slot=1)
    assert stored_ids(mem, 1) == [9, 8]
    mem.add(*ids(4), slot=0)
    assert stored_ids(mem, 0) == [4, 3]


def test_budget_too_small_for_max_tasks_is_refused_before_any_sample() -> None:
    with pytest.raises(MemoryBudgetError, match=r"^memory.budget_bytes: 47 bytes cannot hold one "
                       r"sample per task for 4 tasks: 12 bytes per float32 sample x 4 tasks "
                       r"needs at least 48 bytes$"):
        EpisodicMemory((1,), per_task=4, max_tasks=4, budget_bytes=47)
    with pytest.raises(MemoryBudgetError, match=r"for 2 tasks: 12 bytes per float32 sample x 2 "
                       r"tasks \+ a decode buffer of 3 float32 rows \(36 bytes\) needs at least "
                       r"60 bytes"):
        EpisodicMemory((1,), per_task=4, max_tasks=2, budget_bytes=59, decode_rows=3)
    fits = EpisodicMemory((1,), per_task=4, max_tasks=2, budget_bytes=60, decode_rows=3)
    fits.add(*ids(1), slot=0)
    fits.add(*ids(2), slot=1)
    assert fits.quota == 1 and stored_ids(fits, 0) == [1] and stored_ids(fits, 1) == [2]
    assert issubclass(MemoryBudgetError, ConfigError)  # the CLI's exit 2


def test_bad_slots_and_batches() -> None:
    mem = EpisodicMemory((1,), per_task=4, max_tasks=2)
    with pytest.raises(ValueError, match="slot 2 out of range"):
        mem.add(*ids(1), slot=2)
    with pytest.raises(ValueError, match="slot -1 out of range"):
        mem.get(-1)
    with pytest.raises(ValueError, match="expected x"):
        mem.add(torch.zeros(2, 3), torch.zeros(2), slot=0)
    with pytest.raises(ValueError, match="dtype"):
        EpisodicMemory((1,), 4, 2, dtype="int8")


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple),
    per_task=st.integers(1, 12),
    dtype=st.sampled_from(["float32", "float16", "uint8"]),
    budget=st.integers(1, 3000),
    decode_rows=st.integers(0, 12),
    adds=st.lists(st.tuples(st.integers(0, 5), st.integers(1, 15)), min_size=1, max_size=25),
)
def test_budget_is_hard_and_memory_matches_reference(
    shape: tuple[int, ...], per_task: int, dtype: str, budget: int, decode_rows: int,
    adds: list[tuple[int, int]]
) -> None:
    try:
        mem = EpisodicMemory(shape, per_task, 6, budget_bytes=budget, dtype=dtype,
                             decode_rows=decode_rows)
    except MemoryBudgetError as e:  # refused only if six tasks of one sample cannot fit
        assert "for 6 tasks" in str(e)
        return
    ref: dict[int, list[int]] = {}  # slot -> ids, oldest first
    quotas = []
    next_id = 0
    for slot, b in adds:
        batch = list(range(next_id, next_id + b))
        next_id += b
        # the id (< 200, exact in every dtype) goes in the first input element and the label
        x = torch.zeros(b, *shape)
        x.view(b, -1)[:, 0] = torch.tensor(batch, dtype=torch.float32) % 200 / 255
        mem.add(x, torch.tensor(batch), slot)
        quotas.append(mem.quota)
        ref[slot] = [*ref.get(slot, []), *batch]
        ref = {s: v[-mem.quota:] for s, v in ref.items()}
        assert held_bytes(mem) <= budget  # what it really holds, decode buffer included
        assert mem.footprint()["memory_bytes"] == held_bytes(mem)
        assert mem.footprint()["memory_samples"] == len(mem) == sum(map(len, ref.values()))
    assert quotas == sorted(quotas, reverse=True) and 1 <= quotas[-1] <= per_task
    assert mem.tasks == list(ref)
    for slot, want in ref.items():
        gx, gy = mem.get(slot)
        assert sorted(gy.tolist()) == want
        assert torch.allclose(gx.view(len(want), -1)[:, 0] * 255, (gy % 200).float(), atol=0.25)


def test_uint8_round_trip_and_range_error() -> None:
    x = torch.rand(64, 3, 2, generator=torch.Generator().manual_seed(0))
    x[0, 0, 0], x[1, 0, 0] = 0.0, 1.0
    mem = EpisodicMemory((3, 2), per_task=64, max_tasks=1, dtype="uint8")
    mem.add(x, torch.arange(64), slot=0)
    assert mem._x.dtype == torch.uint8  # compact storage
    assert mem.footprint()["memory_bytes"] == 64 * (6 + 8)
    gx, gy = mem.get(0)
    assert gx.dtype == torch.float32
    assert (gx - x[gy]).abs().max() <= 1 / 510 + 1e-7
    with pytest.raises(ValueError, match=r"min=-0\.5, max=0\.75"):
        mem.add(torch.tensor([[[-0.5, 0.75]] * 3]), torch.tensor([0]), slot=0)
    with pytest.raises(ValueError, match=r"max=2"):
        mem.add(torch.full((1, 3, 2), 2.0), torch.tensor([0]), slot=0)
    assert len(mem) == 64 and torch.equal(mem.get(0)[0], gx)  # rejected batches change nothing


def test_float16_round_trip() -> None:
    x = torch.randn(32, 5, generator=torch.Generator().manual_seed(1)) * 10
    mem = EpisodicMemory((5,), per_task=32, max_tasks=1, dtype="float16")
    mem.add(x, torch.arange(32), slot=0)
    assert mem._x.dtype == torch.float16
    gx, gy = mem.get(0)
    assert gx.dtype == torch.float32
    assert torch.equal(gx, x[gy].half().float())
    assert torch.allclose(gx, x[gy], rtol=2**-11, atol=0)
    with pytest.raises(ValueError, match="float16"):
        mem.add(torch.full((1, 5), 1e6), torch.tensor([0]), slot=0)


def test_get_returns_a_copy() -> None:
    mem = EpisodicMemory((2,), per_task=2, max_tasks=1)
    mem.add(torch.ones(2, 2), torch.tensor([1, 1]), slot=0)
    gx, gy = mem.get(0)
    gx.zero_()
    gy.zero_()
    assert torch.equal(mem.get(0)[0], torch.ones(2, 2)) and mem.get(0)[1].tolist() == [1, 1]


def test_footprint_numbers() -> None:
    # float16 [4, 4]: 40 bytes a sample; a decode row is 72 bytes; 1,000 - 144 leaves 856 bytes:
    # quota 10 (per_task) for 1 or 2 tasks, 856 // 120 = 7 for 3
    mem = EpisodicMemory((4, 4), per_task=10, max_tasks=3, budget_bytes=1000, dtype="float16",
                         decode_rows=2)
    assert mem.bytes_per_sample == 40
    assert mem.footprint() == {
        "memory_bytes": 144, "memory_decode_bytes": 144, "memory_used_bytes": 0,
        "memory_budget_bytes": 1000, "memory_quota": 10, "memory_samples": 0,
    }
    mem.add(torch.zeros(3, 4, 4), torch.zeros(3, dtype=torch.long), slot=0)
    mem.add(torch.zeros(1, 4, 4), torch.zeros(1, dtype=torch.long), slot=2)
    reserved = 144 + 21 * 40  # the most rows ever stored: 3 tasks x 7 > 2 tasks x 10
    assert mem.footprint() == {
        "memory_bytes": reserved, "memory_decode_bytes": 144, "memory_used_bytes": 4 * 40,
        "memory_budget_bytes": 1000, "memory_quota": 10, "memory_samples": 4,
    }
    mem.add(torch.zeros(1, 4, 4), torch.zeros(1, dtype=torch.long), slot=1)
    assert mem.footprint()["memory_quota"] == 7
    assert mem.footprint()["memory_bytes"] == reserved
    unbounded = EpisodicMemory((4, 4), per_task=10, max_tasks=3)
    unbounded.add(torch.zeros(1, 4, 4), torch.zeros(1, dtype=torch.long), slot=0)
    assert unbounded.footprint()["memory_budget_bytes"] == 0
    assert unbounded.footprint()["memory_bytes"] == 10 * 72  # grows a task at a time


def test_state_dict_round_trip(tmp_path) -> None:
    def fresh() -> EpisodicMemory:
        return EpisodicMemory((2, 3), per_task=5, max_tasks=4, budget_bytes=200, dtype="uint8")

    gen = torch.Generator().manual_seed(3)
    mem = fresh()
    # leaves ring positions 0, 3 and 2 mid-row, so a restore that lost them would diverge
    for step, (slot, b) in enumerate([(2, 4), (0, 3), (2, 2), (3, 3), (0, 1), (2, 2)]):
        mem.add(torch.rand(b, 2, 3, generator=gen), torch.arange(b) + 10 * step, slot=slot)
    path = tmp_path / "memory.pt"
    torch.save(mem.state_dict(), path)
    back = fresh()
    back.load_state_dict(torch.load(path, weights_only=True))

    assert back.tasks == mem.tasks and back.footprint() == mem.footprint()
    for slot in range(4):
        assert same(back.get(slot), mem.get(slot))
    # same future: ring positions and eviction match
    for m in (mem, back):
        m.add(torch.full((2, 2, 3), 0.5), torch.tensor([98, 99]), slot=0)
        m.add(torch.full((1, 2, 3), 0.25), torch.tensor([77]), slot=1)
    for slot in range(4):
        assert same(back.get(slot), mem.get(slot))

    snapshot = mem.state_dict()
    mem.add(torch.zeros(5, 2, 3), torch.zeros(5, dtype=torch.long), slot=0)
    assert not torch.equal(snapshot["x"], mem.state_dict()["x"])  # a snapshot, not a view

    other = EpisodicMemory((2, 3), per_task=5, max_tasks=4, budget_bytes=200, dtype="float16")
    with pytest.raises(ValueError, match="dtype"):
        other.load_state_dict(snapshot)


def test_clear_forgets_every_task_and_keeps_the_settings():
    mem = EpisodicMemory((2,), per_task=3, max_tasks=2, budget_bytes=200)
    mem.add(torch.ones(3, 2), torch.tensor([1, 2, 3]), slot=0)
    mem.add(torch.zeros(1, 2), torch.tensor([4]), slot=1)
    reserved = mem.footprint()["memory_bytes"]
    mem.clear()
    assert len(mem) == 0 and mem.tasks == [] and mem.filled(0) == 0
    assert mem.footprint()["memory_bytes"] == reserved  # the storage stays reserved
    mem.add(torch.full((1, 2), 0.5), torch.tensor([7]), slot=1)
    x, y = mem.get(1)
    assert mem.tasks == [1] and y.tolist() == [7] and torch.equal(x, torch.full((1, 2), 0.5))


def test_a_state_of_the_wrong_shape_is_refused_with_the_shapes() -> None:
    mem = EpisodicMemory((2,), per_task=4, max_tasks=3)
    mem.add(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), slot=0)
    state = mem.state_dict()
    state["x"] = state["x"][:, :3]
    with pytest.raises(ValueError, match=r"needs x float32 \[1, 4, 2\].*got x torch.float32 "
                                         r"\[1, 3, 2\]"):
        EpisodicMemory((2,), per_task=4, max_tasks=3).load_state_dict(state)
