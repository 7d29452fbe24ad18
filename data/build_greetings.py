"""make data-greetings: build the greetings task (data files + tiny pre-trained base) into data/greetings/.

Usage: python data/build_greetings.py [OUT_DIR] [--seed N]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rlhf.demo.build_greetings import GreetingsSpec, build  # noqa: E402

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out_dir", nargs="?", default="data/greetings")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(f"built the greetings task into {build(a.out_dir, GreetingsSpec(seed=a.seed))}")
