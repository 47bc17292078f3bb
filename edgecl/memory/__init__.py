"""Sample memories for continual learning on edge devices (GEM's episodic memory)."""

from edgecl.memory.episodic import EpisodicMemory, MemoryBudgetError
from edgecl.memory.masks import (
    TaskMasks,
    compress_masks,
    decompress_masks,
    pack_mask,
    unpack_mask,
)

__all__ = ["EpisodicMemory", "MemoryBudgetError", "TaskMasks", "compress_masks",
           "decompress_masks", "pack_mask", "unpack_mask"]
