"""make export: a standalone HF model directory with a stage's adapters merged (see rlhf/export.py)."""

import sys

from rlhf.cli import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("export", "rlhf.export:run", check="rlhf.preflight:check_export"))
