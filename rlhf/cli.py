"""The command line every stage shares: `python -m stages.<stage> --config FILE [--force] [key=value ...]`."""

from __future__ import annotations

import argparse
import errno
import importlib
import sys
from collections.abc import Callable

from rlhf.compat import CompatError, check as check_libraries
from rlhf.config import ConfigError, PipelineConfig, load_config, to_yaml
from rlhf.data import DataError
from rlhf.errors import EXIT_PREEMPTED, EngineError, Preempted, StageFinished, UnsafeCheckpointError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
StageFunction = Callable[[PipelineConfig], object] | str


def stage_main(stage: str, run: StageFunction, argv: list[str] | None = None, check: StageFunction | None = None) -> int:
    """run: the stage; check: validates the config, data files and model path before `run` touches the stage
    directory. Either may be "module:function", imported only when it is called: the entry points name them so,
    and a bad key, file or finished stage is reported before torch and transformers load (about a second)."""
    parser = argparse.ArgumentParser(
        prog=f"python -m stages.{stage}",
        description=f"Run the {stage} stage. Overrides are key=value; keys relative to the '{stage}' section "
                    f"(e.g. lora.r=8) or absolute (e.g. model.dtype=bfloat16, {stage}.train.lr=1e-4).")
    parser.add_argument("--config", default=None, help="YAML config (see configs/); defaults apply without one")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--force", action="store_true",
                        help="train the stage again although it has finished; its outputs are replaced only "
                             "once the new run has finished (same as force=true)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)  # `make <stage> ARGS="--force lr=1e-4"` puts flags anywhere
    without_bitsandbytes = False
    try:
        cfg = load_config(args.config, args.overrides + (["force=true"] if args.force else []), stage=stage)
        if args.print_config:
            print(to_yaml(cfg))
            return 0
        without_bitsandbytes = skip_bitsandbytes(cfg)
        if check is not None:
            resolve(check)(cfg)
        check_libraries(stage)  # the trl/transformers internals this stage relies on, before any model loads
        resolve(run)(cfg)
    except (ConfigError, DataError, FileNotFoundError, StageFinished, UnsafeCheckpointError, CompatError) as e:
        # Input errors, and a finished stage started again: one clear message, no traceback.
        print(f"error: {e}", file=sys.stderr)
        return 2
    except EngineError as e:
        # The sampling engine died, cannot be reached, or disagrees with the trainer (rlhf/vllm_engine.py).
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        # Checkpoints are complete or ignored (runs.last_complete_checkpoint), and a finished stage is replaced
        # only by a finished rerun, so the fix is to make room and run the stage again.
        print(f"error: the disk is full ({e.filename or e}); free some space and run the {stage} stage again: "
              f"it resumes from its last complete checkpoint", file=sys.stderr)
        return 1
    except Preempted as e:
        # A signal (SLURM preemption or time limit, scancel, kill): the checkpoint is saved; a rerun resumes.
        print(f"[{stage}] {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    finally:
        if without_bitsandbytes:
            sys.modules.pop("bitsandbytes", None)
    return 0


def skip_bitsandbytes(cfg: PipelineConfig) -> bool:
    """peft imports bitsandbytes whenever it is installed (and transformers notes that it is): 2-4 s of CPU at
    every stage's start on 2 cores, for nothing unless something loads a quantized model. When nothing can
    (`preflight.bitsandbytes_unused`), a None entry in sys.modules makes it look not installed to this process;
    stage_main removes it when the stage ends. Only in a process that has not imported it yet (a stage's own)."""
    from rlhf.preflight import bitsandbytes_unused

    if "bitsandbytes" in sys.modules or not bitsandbytes_unused(cfg):
        return False
    sys.modules["bitsandbytes"] = None
    return True


def resolve(fn: StageFunction) -> Callable[[PipelineConfig], object]:
    """"module:function" -> the function (our own modules: an import error is a bug and keeps its traceback)."""
    if not isinstance(fn, str):
        return fn
    module, _, name = fn.partition(":")
    return getattr(importlib.import_module(module), name)
