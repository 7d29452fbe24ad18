"""DPO pieces without training: the reference is the SFT model with the adapter off, rows are the RM's, the stage
is wired into the run directory's bookkeeping and into eval's checkpoint list."""

import copy
import json

import pytest
import torch
from peft import PeftModel

from rlhf import data as rdata
from rlhf.config import ConfigError, PipelineConfig, load_config
from rlhf.checks import check_dpo
from rlhf.dpo import build_trainer, tokenize_preferences
from rlhf.eval.checkpoints import parse_checkpoints
from rlhf.models import load_tokenizer
from rlhf.rm.scoring import pair_ids
from rlhf.runs import begin_stage, finish_stage, is_done
from tests.conftest import DEMO_CONFIG, run_stage
from tests.tiny import LORA, randomize_lora_b, tiny_llama


@pytest.fixture(scope="module")
def demo_pairs(demo_dir):
    tokenizer = load_tokenizer(str(demo_dir / "base"))
    pairs = rdata.load_preferences(str(demo_dir / "rm_rankings_train.jsonl"))[:24]  # 4 rankings x 6 pairs
    return tokenizer, pairs


def test_rows_are_the_reward_models(demo_pairs):
    """prompt_ids + chosen_ids is exactly what the RM is trained on (pair_ids), end of turn included."""
    tokenizer, pairs = demo_pairs
    rows = tokenize_preferences(pairs, tokenizer, max_length=64, name="demo")
    assert len(rows) == len(pairs)
    for row, p in zip(rows, pairs):
        assert row["prompt_ids"] + row["chosen_ids"] == pair_ids(tokenizer, p.prompt, p.chosen)
        assert row["prompt_ids"] + row["rejected_ids"] == pair_ids(tokenizer, p.prompt, p.rejected)


def test_long_pairs_are_dropped_and_counted(demo_pairs, capsys):
    tokenizer, pairs = demo_pairs
    lengths = [max(len(pair_ids(tokenizer, p.prompt, p.chosen)), len(pair_ids(tokenizer, p.prompt, p.rejected)))
               for p in pairs]
    limit = sorted(lengths)[len(lengths) // 2]
    rows = tokenize_preferences(pairs, tokenizer, max_length=limit, name="demo")
    n_long = sum(n > limit for n in lengths)
    assert 0 < n_long < len(pairs) and len(rows) == len(pairs) - n_long
    assert f"[dpo] demo: dropped {n_long} of {len(pairs)} pairs longer than max_length={limit}" in capsys.readouterr().err
    with pytest.raises(rdata.DataError, match="every pair is longer than dpo.max_length"):
        tokenize_preferences(pairs, tokenizer, max_length=min(lengths) - 1, name="demo")


def sequence_logps(model, batch) -> torch.Tensor:
    """Sum of log p(answer token) over each row's completion, computed by hand on a plain causal LM."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    logps = torch.log_softmax(logits.float(), -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (logps * batch["completion_mask"][:, 1:]).sum(-1)


def test_reference_is_the_sft_model_with_the_adapter_off(demo_pairs, tmp_path):
    """trl computes the reference log-probs on our model with the DPO adapter disabled: they equal the SFT model's
    own, even once the adapter has moved away from identity; the policy's (adapter on) do not. And there is no
    second copy: no ref_model, no 'ref' adapter, only the SFT weights plus one adapter."""
    tokenizer, pairs = demo_pairs
    sft = tiny_llama(len(tokenizer))
    sft.config.pad_token_id = tokenizer.pad_token_id
    sft_copy = copy.deepcopy(sft)  # the SFT model as an independent module, for the hand-computed log-probs
    cfg = PipelineConfig()
    cfg.dpo.lora, cfg.report_to = LORA, []
    rows = tokenize_preferences(pairs, tokenizer, 64, "demo")
    trainer = build_trainer(cfg, sft, tokenizer, rows, rows, tmp_path)
    model = trainer.model
    assert isinstance(model, PeftModel) and trainer.ref_model is None and list(model.peft_config) == ["default"]
    n_sft = sum(p.numel() for p in sft_copy.parameters())
    n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert sum(p.numel() for p in model.parameters()) == n_sft + n_lora
    randomize_lora_b(model)  # as after some training
    batch = trainer.data_collator([rows[i] for i in range(8)])
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(model, batch)
    expected = sequence_logps(sft_copy, batch)
    torch.testing.assert_close(torch.cat([ref_chosen, ref_rejected]), expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        policy = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    policy = torch.log_softmax(policy[:, :-1].float(), -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    policy = (policy * batch["completion_mask"][:, 1:]).sum(-1)
    assert (policy - expected).abs().max() > 1e-3


def test_settings_are_checked_first():
    cfg = PipelineConfig()
    cfg.dpo.beta = 0.0
    with pytest.raises(ConfigError, match="dpo.beta must be > 0"):
        check_dpo(cfg)
    cfg.dpo.beta, cfg.dpo.loss_type = 0.1, "sigmoidal"
    with pytest.raises(ConfigError, match="dpo.loss_type must be one of"):
        check_dpo(cfg)
    # the CLI: one line, before any file or model is read
    proc = run_stage("dpo", "run_dir=/nonexistent", "beta=-1", check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: dpo.beta must be > 0, got -1.0"


def test_preferences_default_to_the_reward_models():
    cfg = load_config(DEMO_CONFIG, ["rm.train_file=x.jsonl", "rm.eval_file=null"])
    assert cfg.dpo.train_file == "x.jsonl" and cfg.dpo.eval_file is None and cfg.dpo.max_length == cfg.rm.max_length
    cfg = load_config(DEMO_CONFIG, ["train_file=y.jsonl"], stage="dpo")
    assert cfg.dpo.train_file == "y.jsonl" and cfg.rm.train_file != "y.jsonl"


def finished(run, stage):
    out = begin_stage(run / stage)
    finish_stage(out, {})
    return out


def test_dpo_is_built_on_sft_and_eval_on_dpo(tmp_path):
    for stage in ("sft", "rm", "ppo", "dpo", "eval"):
        finished(tmp_path, stage)
    out = begin_stage(tmp_path / "rm", force=True)
    finish_stage(out, {})  # a new RM: PPO and eval are stale, DPO (which never read the RM) is not
    assert is_done(tmp_path / "dpo") and not (tmp_path / "ppo").exists() and not (tmp_path / "eval").exists()
    finished(tmp_path, "eval")
    out = begin_stage(tmp_path / "dpo", force=True)
    finish_stage(out, {})  # a new DPO policy: the eval that judged the old one is stale
    assert is_done(tmp_path / "dpo") and not (tmp_path / "eval").exists() and is_done(tmp_path / "eval.stale")
    out = begin_stage(tmp_path / "sft", force=True)
    finish_stage(out, {})
    assert not (tmp_path / "dpo").exists() and is_done(tmp_path / "dpo.stale")


def test_eval_judges_dpo_when_it_has_finished(tmp_path):
    for stage in ("sft", "ppo"):
        finished(tmp_path, stage)
    entries = ["base", "sft", "ppo", "dpo?"]
    assert [c.name for c in parse_checkpoints(entries, tmp_path)] == ["base", "sft", "ppo"]
    with pytest.raises(FileNotFoundError, match="no finished dpo stage"):
        parse_checkpoints(["sft", "dpo"], tmp_path)
    finished(tmp_path, "dpo")
    ckpts = parse_checkpoints(entries, tmp_path)
    assert [(c.name, c.kind, c.path) for c in ckpts][-1] == ("dpo", "adapter", str(tmp_path / "dpo"))
    assert json.loads((tmp_path / "dpo" / "DONE").read_text())["finished"]
