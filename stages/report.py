"""make report: redraw <run_dir>/eval/report.md and its plots from the saved metrics (no model needed)."""

import sys

from rlhf.cli import stage_main
from rlhf.eval.report import render


def run(cfg):
    path = render(cfg.run_dir, plots=cfg.eval.plots)
    print(f"[report] {path}")
    return path


if __name__ == "__main__":
    sys.exit(stage_main("report", run))
