"""model.dtype=bfloat16 runs every stage of the demo end to end on the CPU (tiny step counts, small eval sets)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import small_demo_files, small_pipeline
from rlhf.runs import read_metrics

pytestmark = pytest.mark.slow


def test_bf16_demo_pipeline_end_to_end(demo_dir, tmp_path):
    run = tmp_path / "run"
    small_pipeline(run, small_demo_files(demo_dir, tmp_path / "data"), "model.dtype=bfloat16")
    for stage in ("sft", "rm", "ppo", "export-ppo", "eval"):
        assert (run / stage / "DONE").is_file(), stage
    # the heads are float32 on the bf16 base; the export is bf16 and every logged number is finite
    assert load_file(str(run / "rm" / "score_head.safetensors"))["weight"].dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in load_file(str(run / "ppo" / "value" / "value_head.safetensors")).values())
    assert json.loads((run / "export-ppo" / "config.json").read_text())["dtype"] == "bfloat16"
    rows = read_metrics(run / "ppo" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[-1]["ppo/value_loss"] > 0  # step 0: the monitor's SFT row
