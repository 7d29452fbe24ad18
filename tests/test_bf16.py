"""model.dtype=bfloat16 runs every stage of the demo end to end on the CPU (tiny step counts, small eval sets)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_stage, small_demo_files
from rlhf.runs import read_metrics

pytestmark = pytest.mark.slow


def test_bf16_demo_pipeline_end_to_end(demo_dir, tmp_path):
    run, f = tmp_path / "run", small_demo_files(demo_dir, tmp_path / "data")
    prompts_eval = f["prompts_eval"]
    common = (f"run_dir={run}", "model.dtype=bfloat16")
    trainer = ("max_steps=2", "logging_steps=1", "eval_steps=2", "save_steps=2", "progress_bar=false")
    run_stage("sft", *common, f"sft.train_file={f['sft_train']}", f"sft.eval_file={f['sft_eval']}",
              *(f"sft.train.{k}" for k in trainer))
    run_stage("rm", *common, f"rm.train_file={f['rm_rankings_train']}", f"rm.eval_file={f['rm_pairs_eval']}",
              *(f"rm.train.{k}" for k in trainer))
    run_stage("ppo", *common, f"ppo.prompts_file={f['prompts_train']}", f"ppo.eval_prompts_file={prompts_eval}",
              "ppo.steps=2", "ppo.rollout_batch_size=8",
              "ppo.num_minibatches=2", "ppo.ppo_epochs=1", "ppo.reward_norm_samples=8", "ppo.save_steps=2",
              "ppo.progress_bar=false")
    run_stage("export", *common)
    run_stage("eval", *common, f"eval.prompts_file={prompts_eval}", "eval.samples_per_prompt=1",
              "eval.progress_bar=false")
    for stage in ("sft", "rm", "ppo", "export-ppo", "eval"):
        assert (run / stage / "DONE").is_file(), stage
    # the heads are float32 on the bf16 base; the export is bf16 and every logged number is finite
    assert load_file(str(run / "rm" / "score_head.safetensors"))["weight"].dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in load_file(str(run / "ppo" / "value" / "value_head.safetensors")).values())
    assert json.loads((run / "export-ppo" / "config.json").read_text())["dtype"] == "bfloat16"
    rows = read_metrics(run / "ppo" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[-1]["ppo/value_loss"] > 0  # step 0: the monitor's SFT row
