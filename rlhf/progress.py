"""Progress bars for the loops that are not a transformers Trainer (rollouts, PPO steps, evaluation).

A bar is drawn only on an interactive terminal: CI logs and SLURM output files get none (tqdm's carriage
returns would fill them with thousands of partial lines).
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress(iterable=None, *, desc: str, enabled: bool = True, **kwargs) -> tqdm:
    """tqdm(iterable), silent unless `enabled` and stderr is a terminal."""
    return tqdm(iterable, desc=desc, disable=not (enabled and sys.stderr.isatty()), dynamic_ncols=True, **kwargs)
