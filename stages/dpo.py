"""make dpo: Direct Preference Optimization of a LoRA adapter on the SFT model, on the RM's preferences (see rlhf/dpo.py)."""

import sys

from rlhf.cli import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("dpo", "rlhf.dpo:run", check="rlhf.preflight:check_dpo"))
