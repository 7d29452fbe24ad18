"""make ppo: PPO on the shared LoRA base against the reward model (see rlhf/ppo/train.py)."""

import sys

from rlhf import preflight
from rlhf.cli import stage_main
from rlhf.ppo import train

if __name__ == "__main__":
    sys.exit(stage_main("ppo", train.run, check=preflight.check_ppo))
