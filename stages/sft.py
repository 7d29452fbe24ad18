"""make sft: supervised fine-tuning of a LoRA adapter on demonstrations (see rlhf/sft.py)."""

import sys

from rlhf.cli import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("sft", "rlhf.sft:run", check="rlhf.preflight:check_sft"))
