"""The DPO stage end to end on the demo: outputs, a kill and a resume, and the eval stage judging the DPO policy."""

import json
import math

import pytest

from conftest import kill_stage_once_written, run_stage, small_demo_files, small_file_args
from rlhf.runs import last_complete_checkpoint, read_metrics


@pytest.mark.slow
def test_dpo_resumes_after_a_kill_and_eval_judges_it(sft_run, demo_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "sft").symlink_to(sft_run / "sft")  # the session's SFT stage, read only
    f = small_demo_files(demo_dir, tmp_path / "data")
    args = [f"run_dir={run}", *small_file_args(f, "dpo", prefixed=False),  # small: trl tokenizes all of them
            "train.max_steps=6", "train.save_steps=2", "train.logging_steps=1", "train.eval_steps=3",
            "train.batch_size=8"]
    kill_stage_once_written("dpo", args, run / "dpo" / "checkpoints" / "checkpoint-2" / "trainer_state.json")
    assert not (run / "dpo" / "DONE").exists()
    killed_at = last_complete_checkpoint(run / "dpo" / "checkpoints")
    assert killed_at is not None and int(killed_at.name.split("-")[1]) < 6

    again = run_stage("dpo", *args)
    assert f"resuming from {killed_at}" in again.stdout
    out = run / "dpo"
    for name in ("DONE", "adapter_model.safetensors", "adapter_config.json", "config.yaml", "metrics.jsonl",
                 "tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert any((out / "tb").rglob("events.out.tfevents.*"))
    state = json.loads((out / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    rows = read_metrics(out / "metrics.jsonl")
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # no step logged twice after the resume
    evals = [r for r in rows if "eval/loss" in r]
    assert evals[0]["step"] == 0 and evals[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-4)  # adapter = identity
    assert "eval/rewards/accuracies" in evals[-1] and any("rewards/margins" in r for r in rows)
    done = json.loads((out / "DONE").read_text())
    assert done["eval_loss_end"] < done["eval_loss_start"]

    # make eval judges it next to SFT (the default list's `dpo?`: present now), as an adapter over the SFT model
    run_stage("eval", f"run_dir={run}", "checkpoints=[sft,dpo?]", "reward_model=false", "samples=16",
              "samples_per_prompt=1", "decoding=[sample]", "plots=false")
    m = json.loads((run / "eval" / "metrics.json").read_text())
    sample = m["results"]["sample"]
    assert list(sample) == ["sft", "dpo"]
    # the reference is SFT itself (KL exactly 0); the DPO adapter is on (its log-probs differ: a k1 estimate of a
    # small KL on 16 answers may come out on either side of 0)
    assert sample["sft"]["kl_mean"] == 0.0 and sample["dpo"]["kl_mean"] != 0.0
    dpo = sample["dpo"]
    assert dpo["gold_win_rate_low"] <= dpo["gold_win_rate"] <= dpo["gold_win_rate_high"]
