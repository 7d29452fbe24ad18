"""Non-finite numbers stop a run loudly: the metrics file, the Trainer stages' callback, the PPO loop."""


import pytest
import torch

from conftest import run_stage
from rlhf.runs import MetricsFile, check_finite, read_metrics
from rlhf.trainers import FiniteLogsCallback


def test_metrics_file_refuses_non_finite_numbers_naming_step_and_key(tmp_path):
    m = MetricsFile(tmp_path / "metrics.jsonl")
    m.write(1, {"ppo/score": 1.0, "ppo/explained_variance": float("nan")})  # undefined by definition: left out
    with pytest.raises(FloatingPointError, match=r"step 2: ppo/value_loss is inf"):
        m.write(2, {"ppo/score": 1.0, "ppo/value_loss": float("inf")})
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "ppo/score": 1.0}]


def test_trainer_callback_stops_sft_and_rm_at_a_nan_loss_or_grad_norm():
    state = type("State", (), {"global_step": 7})()
    FiniteLogsCallback("sft").on_log(None, state, None, logs={"loss": 0.5, "grad_norm": 1.0, "learning_rate": 1e-3})
    with pytest.raises(FloatingPointError, match=r"^sft step 7: train/loss is nan$"):
        FiniteLogsCallback("sft").on_log(None, state, None, logs={"loss": float("nan"), "grad_norm": 1.0})
    with pytest.raises(FloatingPointError, match=r"^rm step 7: train/grad_norm is inf$"):
        FiniteLogsCallback("rm").on_log(None, state, None, logs={"loss": 0.5, "grad_norm": float("inf")})


def test_check_finite_names_the_first_bad_element_of_a_tensor():
    check_finite({"a": torch.ones(3), "b": 2.0}, "here")
    with pytest.raises(FloatingPointError, match=r"^ppo step 3: ppo/score is -inf$"):
        check_finite({"ppo/score": torch.tensor([1.0, float("-inf"), float("nan")])}, "ppo step 3")


def fake_finished_sft_and_rm(run, demo_dir, nan_head: bool):
    """sft/ and rm/ as the stages leave them, on the demo base (untrained adapters, so no training time)."""
    from peft import get_peft_model
    from safetensors.torch import load_file, save_file
    from rlhf.config import LoraSpec, ModelConfig
    from rlhf.models import load_causal_lm, load_sft_model, load_tokenizer, lora_config
    from rlhf.rm.scoring import HEAD_FILE
    from rlhf.runs import finish_stage
    from tiny import tiny_rm_dir

    cfg, tok = ModelConfig(name_or_path=str(demo_dir / "base")), load_tokenizer(str(demo_dir / "base"))
    get_peft_model(load_causal_lm(cfg, tok), lora_config(LoraSpec(r=4, alpha=8))).save_pretrained(run / "sft")
    tok.save_pretrained(run / "sft")
    finish_stage(run / "sft", {})
    rm = tiny_rm_dir(run / "rm", lambda: load_sft_model(cfg, run / "sft", tok))
    head = load_file(str(rm / HEAD_FILE))["weight"]
    save_file({"weight": torch.full_like(head, float("nan")) if nan_head else head}, str(rm / HEAD_FILE))
    tok.save_pretrained(rm)
    finish_stage(rm, {})


def test_ppo_run_with_a_nan_reward_stops_at_that_step_and_saves_nothing(tmp_path, demo_dir):
    fake_finished_sft_and_rm(tmp_path, demo_dir, nan_head=True)
    proc = run_stage("ppo", f"run_dir={tmp_path}", "ppo.reward.norm=none", "ppo.steps=2", "ppo.checkpoint.every=1",
                     "ppo.sampling.rollout_batch_size=8", "ppo.update.num_minibatches=2", "ppo.eval_prompts_file=null",
                     "ppo.progress_bar=false", check=False)
    assert proc.returncode != 0 and "FloatingPointError: ppo step 1: ppo/score is nan" in proc.stderr
    out = tmp_path / "ppo"
    assert not (out / "DONE").exists() and not (out / "policy").exists()
    assert not list((out / "checkpoints").glob("*")) if (out / "checkpoints").exists() else True
    assert not (out / "metrics.jsonl").exists() or read_metrics(out / "metrics.jsonl") == []
