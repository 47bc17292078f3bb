"""Tests for `edgecl.memory.EpisodicMemory`: ring order, budget, eviction, dtypes, state."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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

    x, y = mem.batched([0, 1, 2])
    assert x.shape == (3, 5, 1) and y.shape == (3, 5)
    valid = torch.arange(5) < torch.tensor([[1], [0], [2]])  # filled rows: a prefix per task
    assert y[valid].tolist() == [3, 1, 2]
    assert torch.equal(x[valid][:, 0].long(), y[valid])
    assert not x[~valid].any() and not y[~valid].any()


def test_batched_rows_stored_in_order_are_a_view_and_others_a_copy() -> None:
    mem = EpisodicMemory((1,), per_task=4, max_tasks=3)
    for slot in range(3):
        mem.add(*ids(10 * slot, 10 * slot + 1), slot=slot)
    x, y = mem.batched([0, 1])
    assert mem.is_view(x) and [row[:2].tolist() for row in y] == [[0, 1], [10, 11]]
    mem.add(*ids(2), slot=0)
    assert x[0, 2, 0] == 2.0  # a view sees later adds
    reordered, _ = mem.batched([1, 0])
    assert not mem.is_view(reordered) and torch.equal(reordered, x.flip(0))
    compact = EpisodicMemory((1,), per_task=4, max_tasks=3, dtype="uint8")
    compact.add(torch.full((1, 1), 0.5), torch.tensor([1]), slot=0)
    decoded, _ = compact.batched([0])
    assert not compact.is_view(decoded) and decoded.dtype == torch.float32


def test_eviction_keeps_most_recent_when_tasks_grow() -> None:
    mem = EpisodicMemory((1,), per_task=4, max_tasks=5, budget_bytes=4 * BPS)
    mem.add(*ids(0, 1, 2, 3, 4, 5), slot=0)  # wrapped: ring [4, 5, 2, 3]
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
    before = mem.state_dict()
    with pytest.raises(MemoryBudgetError, match=r"48 bytes.*12 bytes per sample.*5 tasks"):
        mem.add(*ids(40), slot=4)  # quota would be 0
    after = mem.state_dict()  # the failed add changed nothing
    assert torch.equal(before["x"], after["x"]) and before["filled"] == after["filled"]
    assert mem.tasks == [0, 1, 2, 3]


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


def test_budget_too_small_and_bad_slots() -> None:
    with pytest.raises(MemoryBudgetError, match=r"11 bytes.*12 bytes per sample.*1 tasks"):
        EpisodicMemory((1,), per_task=4, max_tasks=2, budget_bytes=11)
    assert issubclass(MemoryBudgetError, ValueError)
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
    adds=st.lists(st.tuples(st.integers(0, 5), st.integers(1, 15)), min_size=1, max_size=25),
)
def test_budget_is_hard_and_memory_matches_reference(
    shape: tuple[int, ...], per_task: int, dtype: str, budget: int, adds: list[tuple[int, int]]
) -> None:
    itemsize = {"float32": 4, "float16": 2, "uint8": 1}[dtype]
    bps = itemsize * int(torch.tensor(shape).prod()) + 8
    if budget < bps:
        with pytest.raises(MemoryBudgetError):
            EpisodicMemory(shape, per_task, 6, budget_bytes=budget, dtype=dtype)
        return
    mem = EpisodicMemory(shape, per_task, 6, budget_bytes=budget, dtype=dtype)
    assert mem.bytes_per_sample == bps
    ref: dict[int, list[int]] = {}  # slot -> ids, oldest first
    next_id = 0
    for slot, b in adds:
        batch = list(range(next_id, next_id + b))
        next_id += b
        # the id (< 200, exact in every dtype) goes in the first input element and the label
        x = torch.zeros(b, *shape)
        x.view(b, -1)[:, 0] = torch.tensor(batch, dtype=torch.float32) % 200 / 255
        n = len(ref) + (slot not in ref)
        quota = min(per_task, budget // (bps * n))
        if quota == 0:
            with pytest.raises(MemoryBudgetError):
                mem.add(x, torch.tensor(batch), slot)
            continue
        mem.add(x, torch.tensor(batch), slot)
        ref[slot] = [*ref.get(slot, []), *batch]
        ref = {s: v[-quota:] for s, v in ref.items()}
        fp = mem.footprint()
        assert fp["memory_bytes"] <= budget
        assert fp["memory_bytes"] == len(ref) * quota * bps
        assert fp["memory_quota"] == mem.quota == quota
        assert fp["memory_samples"] == len(mem) == sum(map(len, ref.values()))
        assert fp["memory_used_bytes"] == len(mem) * bps
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
    bx, _ = mem.batched([0])
    assert torch.equal(bx[0], gx)
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
    mem = EpisodicMemory((4, 4), per_task=10, max_tasks=3, budget_bytes=1000, dtype="float16")
    bps = 16 * 2 + 8
    assert mem.bytes_per_sample == bps
    assert mem.footprint() == {
        "memory_bytes": 0, "memory_used_bytes": 0, "memory_budget_bytes": 1000,
        "memory_quota": 10, "memory_samples": 0,
    }
    mem.add(torch.zeros(3, 4, 4), torch.zeros(3, dtype=torch.long), slot=0)
    mem.add(torch.zeros(1, 4, 4), torch.zeros(1, dtype=torch.long), slot=2)
    quota = 1000 // (bps * 2)  # 12, capped at per_task
    assert quota > 10
    assert mem.footprint() == {
        "memory_bytes": 2 * 10 * bps, "memory_used_bytes": 4 * bps,
        "memory_budget_bytes": 1000, "memory_quota": 10, "memory_samples": 4,
    }
    mem.add(torch.zeros(1, 4, 4), torch.zeros(1, dtype=torch.long), slot=1)
    assert mem.footprint()["memory_quota"] == 1000 // (bps * 3) == 8
    assert mem.footprint()["memory_bytes"] == 3 * 8 * bps
    unbounded = EpisodicMemory((4, 4), per_task=10, max_tasks=3)
    assert unbounded.footprint()["memory_budget_bytes"] == 0


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
    mem.clear()
    assert len(mem) == 0 and mem.tasks == [] and mem.filled(0) == 0
    assert mem.footprint()["memory_bytes"] == 0
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
