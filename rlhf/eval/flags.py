"""Warnings the evaluation must not leave to a careful reader: a checkpoint worse than the baseline, and a
checkpoint whose answers degenerate. Computed from `metrics.json` alone (the report redraws them), printed by
`make eval` and put at the top of `report.md`.

* worse: its win rate over the baseline has a 95 % interval entirely below 0.5, by the reward model or by
  the gold judge, in some decoding;
* degenerate: its mean `repeat` (share of tokens repeating an earlier one, rlhf/eval/degeneration.py) or its
  share of answers dominated by one token exceeds the baseline's by more than DEGENERATION_MARGIN.

The base model is exempt: it is where the pipeline starts, so its being worse than SFT is the expected outcome
and nothing a user can act on (the summary still shows it); a base that is the baseline is compared against.
"""

from __future__ import annotations

from rlhf.eval.degeneration import DEGENERATION_MARGIN

JUDGES = (("gold", "the gold judge"), ("reward", "the reward model"))


def win_rate_text(row: dict, key: str) -> str:
    """`row`'s win rate `key` (e.g. gold_win_rate) with its 95 % interval, as every printout and page writes it:
    "0.777 (0.754–0.801)"."""
    return f"{row[key]:.3f} ({row[key + '_low']:.3f}–{row[key + '_high']:.3f})"


def flags(m: dict) -> list[str]:
    """One line per problem, in decoding then checkpoint order (markdown bold around names)."""
    base, out = m["baseline"], []
    untrained = {c["name"] for c in m.get("checkpoints", []) if c.get("kind") == "base"}
    for decoding, rows in m["results"].items():
        for name, row in rows.items():
            if name == base or name in untrained:
                continue
            for key, judge in JUDGES:
                if row.get(f"{key}_win_rate_high", 1.0) < 0.5:
                    out.append(f"**{name}** is worse than **{base}** by {judge} ({decoding} answers: win rate "
                               f"{win_rate_text(row, f'{key}_win_rate')}).")
            if degenerate(row, rows.get(base, {})):
                out.append(f"**{name}**: {decoding} answers degenerate: repeat {row['repeat_mean']:.3f} vs "
                           f"{rows[base]['repeat_mean']:.3f} for {base} (share of tokens repeating an earlier one), "
                           f"{row['dominated_mean']:.0%} of answers dominated by one token vs "
                           f"{rows[base]['dominated_mean']:.0%}.")
    return out


def degenerate(row: dict, base: dict) -> bool:
    keys = ("repeat_mean", "dominated_mean")
    if not all(k in row and k in base for k in keys):
        return False  # a metrics.json written before these measures existed
    return any(row[k] > base[k] + DEGENERATION_MARGIN for k in keys)
