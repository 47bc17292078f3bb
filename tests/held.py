"""What an object really holds: the bytes of every tensor reachable from it, each storage once.

Found by walking the object graph (attributes, containers, gradients), independently of the
accounting under test (`Footprint`, `EpisodicMemory.footprint`).
"""

from __future__ import annotations

import types
from typing import Any

import torch

_LEAVES = (str, bytes, int, float, bool, type(None), type, types.ModuleType, types.FunctionType,
           torch.Generator, torch.device, torch.dtype)


def held_bytes(root: Any, without: Any = None, grads: bool = True) -> int:
    """Bytes of the tensor storages reachable from `root` (through gradients too, if `grads`),
    less those reachable from `without`."""
    held = _storages(root, grads)
    for key in _storages(without, grads) if without is not None else {}:
        held.pop(key, None)
    return sum(held.values())


def _storages(root: Any, grads: bool) -> dict[tuple[str, int], int]:
    storages: dict[tuple[str, int], int] = {}
    seen: set[int] = set()
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, _LEAVES):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            storages[(str(storage.device), storage.data_ptr())] = storage.nbytes()
            if grads and obj.grad is not None:
                stack.append(obj.grad)
        elif isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, list | tuple | set | frozenset):
            stack.extend(obj)
        elif hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
    return storages
