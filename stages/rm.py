"""make rm: a reward model (LoRA adapter + score head on the SFT model) from preferences (see rlhf/rm/train.py)."""

import sys

from rlhf.cli import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("rm", "rlhf.rm.train:run", check="rlhf.preflight:check_rm"))
