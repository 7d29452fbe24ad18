"""make data-instruct: the instruction task's files (rlhf/demo/instruct.py) into data/instruct/.

Usage: python data/build_instruct.py [OUT_DIR] [--seed N]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rlhf.demo.build_instruct import InstructSpec, build  # noqa: E402

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out_dir", nargs="?", default="data/instruct")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(f"built the instruction task into {build(a.out_dir, InstructSpec(seed=a.seed))}")
