"""Per-task binary weight masks (WSN), stored at 1 bit per weight per task.

Each task's mask over a net's N maskable weights is one flat boolean vector, kept bit-packed with
numpy `packbits` (8 weights per byte; `unpackbits` restores it exactly). For the size report the
stack of masks is also compressed the way the WSN paper does it: each weight's task bits become
integer symbols (one byte per 8 tasks) and the symbol stream is entropy-coded. The coder is the
stdlib's LZMA (an LZ77 front end over an adaptive binary range coder): on the 20 masks of the
permuted-MNIST preset it lands within 1% of the symbols' order-0 entropy (the Huffman bound),
zlib and bz2 give 17% and 27% more bytes, it needs no new dependency, and it decodes exactly
(`decompress_masks`).
"""

from __future__ import annotations

import lzma
from typing import Any

import numpy as np
import torch

TASKS_PER_SYMBOL = 8  # one uint8 symbol holds a weight's bits for 8 consecutive tasks
# lc=0: adjacent symbols belong to different weights, so no literal context; a 1 MiB dictionary
# keeps the coder's memory small (about 12 MiB to compress, 1 MiB to decode) on a device.
_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME,
                  "dict_size": 1 << 20, "lc": 0}]


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as bit-packed uint8 bytes (flattened, 8 entries per byte)."""
    bits = mask.detach().flatten().to("cpu", torch.bool).numpy()
    return torch.from_numpy(np.packbits(bits))


def unpack_mask(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first `n` bits of `pack_mask`'s bytes, as a flat boolean tensor (on the CPU)."""
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=n).astype(bool))


def compress_masks(stack: torch.Tensor) -> bytes:
    """Entropy-code a `[tasks, weights]` boolean stack: per-weight task bits as byte symbols."""
    symbols = np.packbits(stack.numpy(), axis=0)  # [ceil(tasks / 8), weights]: symbol rows
    return lzma.compress(symbols.tobytes(), filters=_LZMA_FILTERS)


def decompress_masks(blob: bytes, n_tasks: int, n_weights: int) -> torch.Tensor:
    """Exactly the `[n_tasks, n_weights]` boolean stack that `compress_masks` was given."""
    n_symbol_rows = -(-n_tasks // TASKS_PER_SYMBOL)
    symbols = np.frombuffer(lzma.decompress(blob), np.uint8).reshape(n_symbol_rows, n_weights)
    return torch.from_numpy(np.unpackbits(symbols, axis=0, count=n_tasks).astype(bool))


class TaskMasks:
    """The fixed masks of finished tasks, by task slot, over `n_weights` maskable weights."""

    def __init__(self, n_weights: int) -> None:
        self.n_weights = int(n_weights)
        self._packed: dict[int, torch.Tensor] = {}  # slot -> uint8 [ceil(n_weights / 8)]

    def __contains__(self, slot: int) -> bool:
        return slot in self._packed

    def __len__(self) -> int:
        return len(self._packed)

    @property
    def slots(self) -> list[int]:
        return sorted(self._packed)

    def store(self, slot: int, mask: torch.Tensor) -> None:
        """Fix task `slot`'s mask (a boolean tensor with `n_weights` entries); once only."""
        if slot in self._packed:
            raise ValueError(f"task slot {slot} already has a fixed mask")
        if mask.numel() != self.n_weights or mask.dtype != torch.bool:
            raise ValueError(f"a mask must be {self.n_weights} booleans; got {mask.numel()} "
                             f"{mask.dtype}")
        self._packed[slot] = pack_mask(mask)

    def mask(self, slot: int) -> torch.Tensor:
        """Task `slot`'s mask as a flat boolean tensor on the CPU."""
        return unpack_mask(self._packed[slot], self.n_weights)

    def stack(self) -> torch.Tensor:
        """`[n_stored, n_weights]` booleans, in slot order."""
        if not self._packed:
            return torch.zeros(0, self.n_weights, dtype=torch.bool)
        return torch.stack([self.mask(s) for s in self.slots])

    def union(self) -> torch.Tensor:
        """The weights any stored task uses (flat booleans on the CPU)."""
        return self.stack().any(0)

    # --- sizes ---------------------------------------------------------------------------------
    @property
    def raw_bytes(self) -> int:
        return sum(p.numel() for p in self._packed.values())

    def compressed_bytes(self) -> int:
        return len(compress_masks(self.stack())) if self._packed else 0

    def footprint(self) -> dict[str, float]:
        """Raw (bit-packed) and entropy-coded sizes, also as bits per weight per task."""
        raw, compressed = self.raw_bytes, self.compressed_bytes()
        weight_tasks = max(1, self.n_weights * len(self))
        return {"masks_raw_bytes": raw, "masks_compressed_bytes": compressed,
                "mask_bits_per_weight_per_task": 8 * raw / weight_tasks,
                "mask_compressed_bits_per_weight_per_task": 8 * compressed / weight_tasks}

    # --- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Only the packed uint8 bytes: never float or integer masks."""
        return {"n_weights": self.n_weights, "packed": dict(self._packed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["n_weights"]) != self.n_weights:
            raise ValueError(f"masks over {state['n_weights']} weights cannot load into a net "
                             f"with {self.n_weights} maskable weights")
        self._packed = {int(s): p.to(torch.uint8) for s, p in state["packed"].items()}
