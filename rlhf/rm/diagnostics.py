"""Reward-model diagnostics on held-out pairs: pure functions of the two reward vectors.

All take `chosen`, `rejected`: (N,) float tensors of rewards for the preferred and the other answer.
"""

from __future__ import annotations

from collections import defaultdict

import torch


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Share of pairs ranked as the labels say; ties count half."""
    diff = chosen - rejected
    return ((diff > 0).float() + 0.5 * (diff == 0).float()).mean().item()


def expected_calibration_error(chosen: torch.Tensor, rejected: torch.Tensor, bins: int = 10) -> tuple[float, list[dict]]:
    """ECE of the Bradley-Terry probability sigma(r_chosen - r_rejected) that the labelled order is right.

    Each pair is scored by its confidence max(p, 1 - p) and whether the more likely order is the labelled
    one; confidences are binned over [0.5, 1]. Returns (ECE, per-bin rows) with the bins' mean confidence
    and observed accuracy (a reliability diagram).
    """
    p = torch.sigmoid((chosen - rejected).double())
    conf = torch.maximum(p, 1 - p)
    correct = (p > 0.5).double() + 0.5 * (p == 0.5).double()
    edges = torch.linspace(0.5, 1.0, bins + 1, dtype=torch.float64)
    which = torch.bucketize(conf, edges[1:-1], right=True)
    ece, rows = 0.0, []
    for b in range(bins):
        sel = which == b
        n = int(sel.sum())
        if n == 0:
            continue
        c, a = conf[sel].mean().item(), correct[sel].mean().item()
        ece += n / len(p) * abs(a - c)
        rows.append({"low": edges[b].item(), "high": edges[b + 1].item(), "n": n, "confidence": c, "accuracy": a})
    return ece, rows


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation; 0.0 when either side is constant."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = (x.norm() * y.norm()).item()
    return (x @ y).item() / denom if denom > 0 else 0.0


def accuracy_by_tag(chosen: torch.Tensor, rejected: torch.Tensor, tags: list[list[str]]) -> dict[str, dict]:
    """Accuracy over the pairs whose rejected answer carries each tag (a pair may count for several tags)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, pair_tags in enumerate(tags):
        for tag in pair_tags or ["(none)"]:
            groups[tag].append(i)
    return {tag: {"n": len(idx), "accuracy": pairwise_accuracy(chosen[idx], rejected[idx])}
            for tag, idx in sorted(groups.items())}


def summarize(chosen: torch.Tensor, rejected: torch.Tensor, len_chosen: torch.Tensor, len_rejected: torch.Tensor,
              tags: list[list[str]] | None = None) -> dict:
    """Every diagnostic at once, as the JSON the RM stage writes (names as in metrics.jsonl: rm/...)."""
    rewards = torch.cat([chosen, rejected])
    ece, reliability = expected_calibration_error(chosen, rejected)
    out = {
        "rm/accuracy": pairwise_accuracy(chosen, rejected),
        "rm/margin_mean": (chosen - rejected).mean().item(),
        "rm/reward_mean": rewards.mean().item(),
        "rm/reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
        "rm/ece": ece,
        "rm/length_corr": pearson(rewards, torch.cat([len_chosen, len_rejected]).float()),
        "rm/n_pairs": len(chosen),
        "reliability": reliability,
    }
    if tags is not None:
        out["accuracy_by_tag"] = accuracy_by_tag(chosen, rejected, tags)
    return out


def damaged_wins(intact: torch.Tensor, damaged: torch.Tensor) -> dict:
    """A reward-hacking probe's row: how often the damaged answer scores above the intact one (ties half) and
    the mean of damaged - intact (> 0: the RM prefers the damage on average)."""
    return {"n": len(intact), "win_rate": pairwise_accuracy(damaged, intact),
            "margin_mean": (damaged - intact).mean().item()}


NEAR_WIN_RATE = 0.05  # a probe this close under its threshold is named too: PPO learns the largest hole first


def weak_rm_warnings(accuracy: float, probes: dict[str, dict], min_accuracy: float, max_win_rate: float) -> list[str]:
    """One line per sign that PPO will exploit this RM, each saying what to change: low held-out accuracy, or a
    probe whose damaged answer wins too often (or within NEAR_WIN_RATE of too often)."""
    out = []
    if accuracy < min_accuracy:
        out.append(f"held-out accuracy {accuracy:.3f} is below rm.warn_accuracy={min_accuracy}: PPO will optimise "
                   f"the RM's errors (more or cleaner preference data, more epochs, a larger RM)")
    fix = ("train the RM on such pairs (rm.probes.train_share, e.g. 0.25), or list the probe in rm.probes.no_warning "
           "if this damage is no harm on your task")
    for name, row in probes.items():
        if row["win_rate"] > max_win_rate:
            out.append(f"the RM prefers a '{name}' damaged answer to the intact one in {row['win_rate']:.0%} of "
                       f"{row['n']} held-out answers (> rm.probes.warn_win_rate={max_win_rate}): PPO can learn it; "
                       f"{fix}")
        elif row["win_rate"] > max_win_rate - NEAR_WIN_RATE:
            out.append(f"the RM prefers a '{name}' damaged answer to the intact one in {row['win_rate']:.1%} of "
                       f"{row['n']} held-out answers, near rm.probes.warn_win_rate={max_win_rate}: PPO may learn it "
                       f"first; {fix}")
    return out
