"""The weights a device shares with its fleet, and the aggregates it gets back, as bytes.

A share is a set of named float32 arrays, each with a weight: how many samples the device learned
that the array reflects (zero: it learned nothing for it, and takes no part in that array's
average). Names say which part of the net an array is, the same on every device whatever order
it met its tasks in: `body/<parameter>` for the shared trunk, `head/<task id>/<parameter>` for a
task's own head, `head/<parameter>` for a head every task shares (then an empty
`task/<task id>` names each task the device learned, so that others adopt it).

On the wire it is one `.npz` (numpy's zip of arrays, read without pickle): member `names` (a
JSON list), `weights` (float64, one per name) and `a0`, `a1`, ... in the order of `names`.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass

import numpy as np

MEDIA_TYPE = "application/x-edgecl-weights"


class WireError(ValueError):
    """Bytes that are not a well-formed share."""


@dataclass(frozen=True)
class Share:
    arrays: dict[str, np.ndarray]
    weights: dict[str, float]

    def __post_init__(self) -> None:
        if set(self.arrays) != set(self.weights):
            raise WireError("every array needs a weight, and every weight an array")
        bad = [name for name, w in self.weights.items() if not (np.isfinite(w) and w >= 0)]
        if bad:
            raise WireError(f"weights must be finite and >= 0; not so for {bad[:3]}")

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


def pack(share: Share) -> bytes:
    names = sorted(share.arrays)
    buf = io.BytesIO()
    np.savez(buf, names=np.array(json.dumps(names)),
             weights=np.array([share.weights[n] for n in names], dtype=np.float64),
             **{f"a{i}": np.ascontiguousarray(share.arrays[n], dtype=np.float32)
                for i, n in enumerate(names)})
    return buf.getvalue()


def unpack(data: bytes) -> Share:
    """The share `pack` wrote; WireError for anything else (never unpickles)."""
    if not data.startswith(b"PK\x03\x04"):
        raise WireError("not an edgecl weights file (expected a .npz, a zip archive)")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            names = json.loads(str(z["names"]))
            weights = z["weights"]
            if not (isinstance(names, list) and all(isinstance(n, str) for n in names)
                    and weights.shape == (len(names),)):
                raise WireError("names and weights do not match")
            arrays = {n: z[f"a{i}"] for i, n in enumerate(names)}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        if isinstance(e, WireError):
            raise
        raise WireError(f"not an edgecl weights file: {e}") from None
    if any(a.dtype != np.float32 for a in arrays.values()):
        raise WireError("arrays must be float32")
    return Share(arrays, {n: float(w) for n, w in zip(names, weights, strict=True)})
