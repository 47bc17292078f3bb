import numpy as np
import pytest

from edgecl.metrics import acc, bwt, fwt, summarize

# Hand-computed example: 3 tasks.
R = np.array([[0.90, 0.10, 0.20],
              [0.80, 0.95, 0.15],
              [0.70, 0.85, 0.90]])
B = np.array([0.10, 0.12, 0.09])


def test_acc_is_mean_of_last_row():
    # (0.70 + 0.85 + 0.90) / 3
    assert acc(R) == pytest.approx(0.816667, abs=1e-6)


def test_bwt_averages_over_t_minus_one_tasks():
    # (0.70 - 0.90) + (0.85 - 0.95) = -0.30, over T-1 = 2 tasks
    assert bwt(R) == pytest.approx(-0.15)


def test_fwt_uses_superdiagonal_and_random_init_accuracy():
    # (R[0,1] - b1) + (R[1,2] - b2) = (0.10 - 0.12) + (0.15 - 0.09) = 0.04, over 2 tasks
    assert fwt(R, B) == pytest.approx(0.02)


def test_summarize_puts_each_metric_in_its_place():
    s = summarize(R, B)
    assert (s.acc, s.bwt, s.fwt) == pytest.approx((0.816667, -0.15, 0.02), abs=1e-6)


def test_no_forgetting_gives_zero_bwt_and_perfect_acc():
    perfect = np.tril(np.ones((4, 4)))
    s = summarize(perfect, np.zeros(4))
    assert (s.acc, s.bwt, s.fwt) == (1.0, 0.0, 0.0)


def test_single_task_has_no_transfer():
    assert bwt(np.array([[0.5]])) == 0.0
    assert fwt(np.array([[0.5]]), np.array([0.1])) == 0.0


def test_shape_errors():
    with pytest.raises(ValueError, match="square"):
        acc(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="one entry per task"):
        fwt(R, np.zeros(2))
