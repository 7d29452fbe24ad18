"""make data: build the embedded demo (data files + tiny pre-trained base) into data/demo/.

The base is copied from data/demo-base/ (committed) when that was built from the same spec, pre-training
corpus and tokenizer; otherwise it is pre-trained (~2.5 min on 2 CPU cores).

Usage: python data/build_demo.py [OUT_DIR] [--seed N] [--no-cache | --update-cache]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rlhf.demo.build import BASE_CACHE, BuildSpec, build  # noqa: E402

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", nargs="?", default="data/demo")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--no-cache", action="store_true", help="pre-train the base even if data/demo-base/ matches")
    g.add_argument("--update-cache", action="store_true",
                   help="pre-train the base and store it in data/demo-base/ (then commit it)")
    a = p.parse_args()
    out = build(a.out_dir, BuildSpec(seed=a.seed), cache=None if a.no_cache else BASE_CACHE,
                update_cache=a.update_cache)
    print(f"built the demo into {out}")
