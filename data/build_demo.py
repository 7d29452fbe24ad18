"""make data: build the embedded demo (data files + tiny pre-trained base) into data/demo/.

Usage: python data/build_demo.py [OUT_DIR] [--seed N]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rlhf.demo.build import BuildSpec, build  # noqa: E402

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out_dir", nargs="?", default="data/demo")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(f"built the demo into {build(a.out_dir, BuildSpec(seed=a.seed))}")
