"""make ppo: PPO on the shared LoRA base against the reward model (see rlhf/ppo/train.py)."""

import sys

from rlhf.cli import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("ppo", "rlhf.ppo.train:run", check="rlhf.preflight:check_ppo"))
