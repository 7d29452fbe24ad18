"""The command line every stage shares: `python -m stages.<stage> --config FILE [key=value ...]`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from rlhf.compat import CompatError, check as check_libraries
from rlhf.config import ConfigError, PipelineConfig, load_config, to_yaml
from rlhf.data import DataError
from rlhf.ppo.state import UnsafeCheckpointError
from rlhf.preempt import EXIT_PREEMPTED, Preempted


def stage_main(stage: str, run: Callable[[PipelineConfig], object], argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m stages.{stage}",
        description=f"Run the {stage} stage. Overrides are key=value; keys relative to the '{stage}' section "
                    f"(e.g. lora.r=8) or absolute (e.g. model.dtype=bfloat16, {stage}.train.lr=1e-4).")
    parser.add_argument("--config", default=None, help="YAML config (see configs/); defaults apply without one")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, stage=stage)
        if args.print_config:
            print(to_yaml(cfg))
            return 0
        check_libraries()  # trl/transformers internals we rely on, before anything loads
        run(cfg)
    except (ConfigError, DataError, FileNotFoundError, UnsafeCheckpointError, CompatError) as e:
        # Input errors: one clear message, no traceback.
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        # A signal (SLURM preemption or time limit, scancel, kill): the checkpoint is saved; a rerun resumes.
        print(f"[{stage}] {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    return 0
