import math

import pytest
import torch

from rlhf.eval.stats import bootstrap_interval, outcomes, win_rate


def t(*xs):
    return torch.tensor(xs, dtype=torch.float)


def test_win_rate_ties_count_half():
    assert outcomes(t(1, 2, 3, 4), t(0, 2, 5, 1)).tolist() == [1.0, 0.5, 0.0, 1.0]
    assert win_rate(t(1, 2, 3, 4), t(0, 2, 5, 1)) == pytest.approx(2.5 / 4)
    same = torch.rand(50)
    assert win_rate(same, same) == 0.5


def test_bootstrap_interval_brackets_and_matches_the_normal_approximation():
    # 310 wins out of 400 (p = 0.775): normal 95 % half-width 1.96 * sqrt(p(1-p)/n) = 0.0409
    a = torch.cat([torch.ones(310), torch.zeros(90)])
    b = torch.full((400,), 0.5)
    rate, low, high = bootstrap_interval(a, b, resamples=4000)
    assert rate == pytest.approx(0.775)
    half = 1.96 * math.sqrt(0.775 * 0.225 / 400)
    assert low == pytest.approx(0.775 - half, abs=0.008) and high == pytest.approx(0.775 + half, abs=0.008)
    assert bootstrap_interval(a, b, resamples=4000) == (rate, low, high)  # deterministic


def test_degenerate_cases():
    assert bootstrap_interval(t(1, 1, 1), t(0, 0, 0)) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="paired"):
        win_rate(t(1, 2), t(1, 2, 3))
    with pytest.raises(ValueError, match="no prompts"):
        bootstrap_interval(t(), t())
