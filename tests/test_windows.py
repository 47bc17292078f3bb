"""edgecl.data.windows: recordings of any length cut into fixed windows, with their sources."""

from __future__ import annotations

import numpy as np
import pytest

from edgecl.data.windows import windows


def recording(channels: int, steps: int, start: int = 0) -> np.ndarray:
    """Channel c at step t reads start + 100 c + t: every value says where it came from."""
    return (start + 100 * np.arange(channels)[:, None] + np.arange(steps)).astype(np.float64)


def test_back_to_back_windows_drop_the_tail():
    x, source = windows([recording(2, 10)], length=4)
    assert x.shape == (2, 2, 4) and x.dtype == np.float32
    assert x[0].tolist() == [[0, 1, 2, 3], [100, 101, 102, 103]]
    assert x[1].tolist() == [[4, 5, 6, 7], [104, 105, 106, 107]]  # steps 8 and 9 dropped
    assert source.tolist() == [0, 0]


def test_overlapping_windows_of_recordings_of_different_lengths():
    x, source = windows([recording(2, 7), recording(2, 5, start=1000)], length=4, stride=2)
    assert source.tolist() == [0, 0, 1]
    assert x[:, 0, 0].tolist() == [0, 2, 1000]  # where each window starts
    assert x[1, 1].tolist() == [102, 103, 104, 105]


def test_a_short_recording_becomes_one_window_zero_padded_at_the_end():
    x, source = windows([recording(3, 10), recording(3, 2, start=1000)], length=5, stride=5)
    assert source.tolist() == [0, 0, 1]
    assert x[2].tolist() == [[1000, 1001, 0, 0, 0], [1100, 1101, 0, 0, 0],
                             [1200, 1201, 0, 0, 0]]


def test_an_array_of_recordings_works_like_a_list_and_is_not_aliased():
    array = np.stack([recording(6, 100), recording(6, 100, start=5000)])
    x, source = windows(array, length=64, stride=18)
    x_list, source_list = windows(list(array), length=64, stride=18)
    assert np.array_equal(x, x_list) and np.array_equal(source, source_list)
    assert x.shape == (6, 6, 64) and source.tolist() == [0, 0, 0, 1, 1, 1]  # starts 0, 18, 36
    x[:] = -1  # the windows are a copy: the recordings are untouched
    assert array[0, 0, 0] == 0 and x.flags.c_contiguous


@pytest.mark.parametrize(("recordings", "kwargs", "message"), [
    ([np.zeros(50)], {"length": 10}, "recording 0 has shape (50,), no channel axis; recordings "
                                     "are [channels, steps]: for one channel use r[None, :] "
                                     "(shape (1, 50))"),
    ([np.zeros((2, 3, 4))], {"length": 2}, "recording 0 has shape (2, 3, 4)"),
    ([np.zeros((6, 20)), np.zeros((5, 20))], {"length": 10},
     "recording 1 has 5 channels but recording 0 has 6"),
    ([np.zeros((6, 20)), np.zeros((6, 0))], {"length": 10}, "recording 1 has no steps"),
    ([], {"length": 10}, "no recordings given"),
    ([np.zeros((6, 20))], {"length": 0}, "length must be a positive integer, got 0"),
    ([np.zeros((6, 20))], {"length": 10, "stride": True}, "stride must be a positive integer"),
    ([np.zeros((6, 20))], {"length": 2.5}, "length must be a positive integer, got 2.5"),
])
def test_bad_recordings_and_sizes_are_refused_with_one_line(recordings, kwargs, message):
    with pytest.raises(ValueError) as err:
        windows(recordings, **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)
