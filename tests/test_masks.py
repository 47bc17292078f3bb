"""Tests for `edgecl.memory.masks`: bit-packed per-task masks and their entropy-coded stack."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgecl.memory import TaskMasks, compress_masks, decompress_masks, pack_mask, unpack_mask


def random_masks(n_tasks: int, n_weights: int, seed: int = 0, p: float = 0.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n_tasks, n_weights, generator=g) < p


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 200), seed=st.integers(0, 2**16))
def test_pack_is_one_bit_per_entry_and_unpacks_exactly(n, seed):
    mask = random_masks(1, n, seed)[0]
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-n // 8)
    assert torch.equal(unpack_mask(packed, n), mask)


def test_pack_accepts_any_shape_and_device_tensor():
    mask = random_masks(1, 60)[0].view(3, 4, 5)
    assert torch.equal(unpack_mask(pack_mask(mask), 60).view(3, 4, 5), mask)


@settings(max_examples=30, deadline=None)
@given(n_tasks=st.integers(1, 20), n_weights=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_compressed_stack_decodes_exactly(n_tasks, n_weights, seed):
    stack = random_masks(n_tasks, n_weights, seed)
    blob = compress_masks(stack)
    assert torch.equal(decompress_masks(blob, n_tasks, n_weights), stack)


def test_store_fetch_union_and_order():
    masks = TaskMasks(n_weights=20)
    stack = random_masks(3, 20)
    for slot in (2, 0, 1):
        masks.store(slot, stack[slot])
    assert masks.slots == [0, 1, 2] and len(masks) == 3 and 1 in masks and 3 not in masks
    assert torch.equal(masks.mask(1), stack[1])
    assert torch.equal(masks.stack(), stack)
    assert torch.equal(masks.union(), stack.any(0))
    assert not TaskMasks(5).union().any()


def test_a_fixed_mask_cannot_be_overwritten_or_malformed():
    masks = TaskMasks(n_weights=10)
    masks.store(0, torch.ones(10, dtype=torch.bool))
    with pytest.raises(ValueError, match="already has a fixed mask"):
        masks.store(0, torch.zeros(10, dtype=torch.bool))
    with pytest.raises(ValueError, match="must be 10 booleans"):
        masks.store(1, torch.ones(11, dtype=torch.bool))
    with pytest.raises(ValueError, match="must be 10 booleans"):
        masks.store(1, torch.ones(10))


def test_footprint_raw_is_one_bit_and_correlated_masks_compress_well_below():
    # WSN's masks overlap heavily from task to task: each flips a few bits of the previous one.
    n_tasks, n_weights = 20, 8000
    g = torch.Generator().manual_seed(0)
    stack = [torch.rand(n_weights, generator=g) < 0.5]
    for _ in range(n_tasks - 1):
        stack.append(stack[-1] ^ (torch.rand(n_weights, generator=g) < 0.05))
    masks = TaskMasks(n_weights)
    for slot, m in enumerate(stack):
        masks.store(slot, m)
    fp = masks.footprint()
    assert fp["masks_raw_bytes"] == masks.raw_bytes == n_tasks * n_weights // 8
    assert fp["mask_bits_per_weight_per_task"] == 1.0
    assert fp["mask_compressed_bits_per_weight_per_task"] < 0.6
    assert TaskMasks(8).footprint()["masks_compressed_bytes"] == 0


def test_state_is_packed_bytes_only_and_round_trips_through_a_safe_load():
    masks = TaskMasks(n_weights=13)
    stack = random_masks(2, 13)
    masks.store(0, stack[0])
    masks.store(3, stack[1])
    buffer = io.BytesIO()
    torch.save(masks.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert all(p.dtype == torch.uint8 and p.numel() == 2 for p in state["packed"].values())
    restored = TaskMasks(n_weights=13)
    restored.load_state_dict(state)
    assert restored.slots == [0, 3] and torch.equal(restored.mask(3), stack[1])
    with pytest.raises(ValueError, match="cannot load into a net with 14"):
        TaskMasks(n_weights=14).load_state_dict(state)
