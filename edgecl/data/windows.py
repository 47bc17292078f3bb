"""Cut sensor recordings of any length into the fixed-size windows edgecl learns from.

A device classifies what its sensors saw over the last few seconds: a window of ``length``
steps, shaped [channels, length]. ``windows`` cuts each recording [channels, steps] into such
windows, starting every ``stride`` steps; the steps after the last whole window are dropped,
and a recording shorter than ``length`` becomes one window zero-padded at the end (as the
``japanesevowels`` benchmark pads its utterances). It also returns the recording each window
came from, to label the windows (``labels[source]``) or to keep one recording's windows
together when splitting.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable

import numpy as np
from numpy.typing import ArrayLike


def windows(recordings: Iterable[ArrayLike], length: int, stride: int | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """Every window of each recording: float32 windows [n, channels, length] and, for each,
    the index of its recording (int64 [n]). ``stride`` defaults to ``length`` (windows back to
    back); a smaller stride overlaps them."""
    stride = length if stride is None else stride
    for value, name in ((length, "length"), (stride, "stride")):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
            raise ValueError(f"windows: {name} must be a positive integer, got {value!r}")
    cut, source = [], []
    for i, recording in enumerate(recordings):
        r = _recording(i, recording, cut[0].shape[1] if cut else None)
        if r.shape[1] < length:
            r = np.pad(r, ((0, 0), (0, length - r.shape[1])))
        w = np.lib.stride_tricks.sliding_window_view(r, length, axis=1)[:, ::stride]
        cut.append(w.transpose(1, 0, 2))  # [windows, channels, length]
        source.append(np.full(len(cut[-1]), i, dtype=np.int64))
    if not cut:
        raise ValueError("windows: no recordings given")
    return np.ascontiguousarray(np.concatenate(cut)), np.concatenate(source)


def _recording(i: int, recording: ArrayLike, channels: int | None) -> np.ndarray:
    """Recording ``i`` as float32 [channels, steps], checked against the first's channels."""
    r = np.asarray(recording, dtype=np.float32)
    if r.ndim == 1:
        raise ValueError(f"windows: recording {i} has shape {r.shape}, no channel axis; "
                         f"recordings are [channels, steps]: for one channel use r[None, :] "
                         f"(shape (1, {len(r)}))")
    if r.ndim != 2:
        raise ValueError(f"windows: recording {i} has shape {r.shape}; recordings are "
                         "[channels, steps]")
    if r.shape[1] == 0:
        raise ValueError(f"windows: recording {i} has no steps")
    if channels is not None and r.shape[0] != channels:
        raise ValueError(f"windows: recording {i} has {r.shape[0]} channels but recording 0 "
                         f"has {channels}")
    return r
