"""Sample memories for continual learning on edge devices (GEM's episodic memory)."""

from edgecl.memory.episodic import EpisodicMemory, MemoryBudgetError

__all__ = ["EpisodicMemory", "MemoryBudgetError"]
