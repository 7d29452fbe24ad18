"""make data-hh: a tiny random model + BPE tokenizer for running on the HH-RLHF sample (data/hh-tiny/)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rlhf.demo.hh_tiny import build  # noqa: E402

if __name__ == "__main__":
    print(f"built {build(sys.argv[1] if len(sys.argv) > 1 else 'data/hh-tiny')}")
