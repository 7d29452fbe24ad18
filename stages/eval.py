"""make eval: judge checkpoints (base, SFT, PPO, exported dirs) on held-out prompts and write the report."""

import sys

from rlhf.cli import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("eval", "rlhf.eval.run:run", check="rlhf.preflight:check_eval"))
