"""Win rates and their uncertainty: pure functions of per-prompt scores.

`a` and `b` are (N,) scores of two models on the same N prompts (paired): a model "wins" a prompt when
its score is higher; ties count half, so two identical models have a win rate of exactly 0.5.
"""

from __future__ import annotations

import torch


def win_rate(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of prompts where a beats b; ties count half."""
    return outcomes(a, b).mean().item()


def outcomes(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N,) per-prompt result for a: 1 win, 0.5 tie, 0 loss."""
    if a.shape != b.shape or a.dim() != 1:
        raise ValueError(f"paired scores must be two (N,) tensors, got {tuple(a.shape)} and {tuple(b.shape)}")
    return (a > b).double() + 0.5 * (a == b).double()


def bootstrap_interval(a: torch.Tensor, b: torch.Tensor, level: float = 0.95, resamples: int = 2000,
                       seed: int = 0, group: int = 1) -> tuple[float, float, float]:
    """(win rate, low, high): the percentile bootstrap interval over prompts (pairs resampled together).

    `group` > 1: a and b hold `group` answers per prompt, consecutive (prompt 0's first, then prompt 1's...);
    answer j of a is compared with answer j of b, a prompt's result is the mean of its `group` outcomes, and
    prompts (not answers) are resampled. Deterministic for a given seed, so a report rendered twice shows
    the same interval."""
    result = outcomes(a, b)
    if result.shape[0] % group:
        raise ValueError(f"{result.shape[0]} scores do not split into groups of {group} answers per prompt")
    result = result.view(-1, group).mean(dim=1)
    n = result.shape[0]
    if n == 0:
        raise ValueError("no prompts to compute a win rate on")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (resamples, n), generator=gen)
    rates = result[idx].mean(dim=1)
    tail = (1 - level) / 2
    low, high = torch.quantile(rates, torch.tensor([tail, 1 - tail], dtype=rates.dtype)).tolist()
    return result.mean().item(), low, high
