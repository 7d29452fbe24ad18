"""The order the suite's tests are handed to the pytest-xdist processes, from markers alone.

`--dist loadgroup` keeps each `xdist_group` on one process and hands out work in collection order; this sorts
that order so that two cores stay busy to the end:

1. the `early` tests, by rank (a group goes where its earliest member goes): rank 0 the real model's chain (the
   longest group: it must start at once, on a process of its own) and the test that needs the demo's whole chain
   (its process builds SFT, RM and PPO, minutes); ranks 1 and 2 the other long groups (the SLURM cluster, the
   2-process runs: minutes each, so they must not start last); rank 4 the longest single tests; within a rank,
   by the order of point 2 (so the real model, which needs no demo run, comes before the demo's chain);
2. then the rest by the shared runs they need (none, SFT, RM, PPO: `CHAIN`), so that a process seldom waits for
   a run another is still building; among equals, a group before single tests.
"""

from __future__ import annotations

# The demo's shared runs, each built on the one before (tests/conftest.py): a test needing a later one waits longer.
CHAIN = ("sft_run", "rm_run", "ppo_run")
LATE = 99  # the rank of a test without the `early` marker


def group_of(item) -> str | None:
    mark = item.get_closest_marker("xdist_group")
    if mark is None:
        return None
    return mark.args[0] if mark.args else mark.kwargs.get("name")


def early_rank(item) -> int:
    mark = item.get_closest_marker("early")
    return mark.args[0] if mark is not None else LATE


def order(items: list) -> None:
    """Sort pytest's `items` in place (see the module's docstring)."""
    group = {id(i): group_of(i) for i in items}
    own = {id(i): early_rank(i) for i in items}
    level = {id(i): max((n + 1 for n, name in enumerate(CHAIN) if name in i.fixturenames), default=0) for i in items}
    group_rank: dict[str, int] = {}
    group_level: dict[str, int] = {}
    for i in items:
        if (g := group[id(i)]) is not None:
            group_rank[g] = min(group_rank.get(g, LATE), own[id(i)])
            group_level[g] = max(group_level.get(g, 0), level[id(i)])

    first = {}
    for n, i in enumerate(items):
        first.setdefault(group[id(i)] or id(i), n)

    def key(i):  # a group's tests stay together, where its first test was collected among its equals
        g = group[id(i)]
        return (group_rank[g] if g else own[id(i)], group_level[g] if g else level[id(i)], g is None, first[g or id(i)],
                own[id(i)])
    items.sort(key=key)
