"""make sft: supervised fine-tuning of a LoRA adapter on demonstrations (see rlhf/sft.py)."""

import sys

from rlhf import preflight, sft
from rlhf.cli import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("sft", sft.run, check=preflight.check_sft))
