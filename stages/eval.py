"""make eval: judge checkpoints (base, SFT, PPO, exported dirs) on held-out prompts and write the report."""

import sys

from rlhf import preflight
from rlhf.cli import stage_main
from rlhf.eval.run import run

if __name__ == "__main__":
    sys.exit(stage_main("eval", run, check=preflight.check_eval))
