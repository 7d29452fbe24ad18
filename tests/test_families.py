"""Conformance of real model families: every stage, from a config alone, on a tiny random-weight stand-in of
each family (rlhf/demo/families.py: the family's architecture, special tokens, chat template and
generation_config.json), trained on a slice of the demo task.

One pipeline run per family (SFT -> RM -> PPO -> export -> eval, in this process) is shared by the checks:
the prompt rendering matches the family's template in every stage, rollouts stop at the family's end of
turn and the reward is read there, a hostile generation_config.json changes nothing the pipeline samples,
pad differs from every stop token, and the export answers as the adapter does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf import preflight
from rlhf.chat import answer_ids, encode_prompt, end_of_turn_id
from rlhf.cli import stage_main
from rlhf.demo.families import FAMILIES, build_family
from rlhf.eval.run import run as eval_run
from rlhf.export import run as export_run
from rlhf.generation import SamplingSpec, generate_ids, model_stop_ids
from rlhf.config import ModelConfig, load_config
from rlhf.models import load_causal_lm, load_sft_model, load_tokenizer
from rlhf.ppo.train import run as ppo_run
from rlhf.rm.scoring import pair_ids
from rlhf.rm.train import run as rm_run
from rlhf.sft import run as sft_run

pytestmark = pytest.mark.slow

PROMPT = [{"role": "user", "content": "name 3 fruits"}]
# The prompt above as each family's own chat template renders it (with the generation prompt), and the
# answer "apple pear fig" as the template writes it after that prompt, through its end of turn.
RENDERED = {
    "llama3-instruct": ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nname 3 fruits<|eot_id|>"
                        "<|start_header_id|>assistant<|end_header_id|>\n\n", "apple pear fig<|eot_id|>"),
    "llama3.1-base": ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
                      "December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>"
                      "\n\nname 3 fruits<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
                      "apple pear fig<|eot_id|>"),
    "qwen2.5-instruct": ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                         "<|im_end|>\n<|im_start|>user\nname 3 fruits<|im_end|>\n<|im_start|>assistant\n",
                         "apple pear fig<|im_end|>"),
    "qwen2.5-base": ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                     "<|im_end|>\n<|im_start|>user\nname 3 fruits<|im_end|>\n<|im_start|>assistant\n",
                     "apple pear fig<|im_end|>"),
    "qwen3": ("<|im_start|>user\nname 3 fruits<|im_end|>\n<|im_start|>assistant\n",
              "<think>\n\n</think>\n\napple pear fig<|im_end|>"),
    "gemma2": ("<bos><start_of_turn>user\nname 3 fruits<end_of_turn>\n<start_of_turn>model\n",
               "apple pear fig<end_of_turn>"),
    "gemma3": ("<bos><start_of_turn>user\nname 3 fruits<end_of_turn>\n<start_of_turn>model\n",
               "apple pear fig<end_of_turn>"),
    "mistral": ("<s>[INST] name 3 fruits [/INST]", "apple pear fig</s>"),
    "phi3": ("<|user|>\nname 3 fruits<|end|>\n<|assistant|>\n", "apple pear fig<|end|>"),
    "gpt2": ("\n\nHuman: name 3 fruits\n\nAssistant:", " apple pear fig<|endoftext|>"),
}
# What a checkpoint may ship that must not change what the pipeline samples.
HOSTILE = {"do_sample": True, "temperature": 0.3, "top_k": 3, "top_p": 0.5, "repetition_penalty": 2.0,
           "no_repeat_ngram_size": 2, "min_new_tokens": 6, "typical_p": 0.5, "bad_words_ids": [[5], [7]],
           "max_new_tokens": 3}
CHECKS = {"sft": preflight.check_sft, "rm": preflight.check_rm, "ppo": preflight.check_ppo,
          "export": preflight.check_export}
# Pre-training of each stand-in (10 s at 100 steps). At 50 the least that any family's PPO answers ended was 0.875
# of a step's (qwen3, mistral; 0.94 at 100) and of the policy's 32 samples 0.84 (mistral; 0.94): the checks ask 0.75.
# SFT then trains 16 steps: the least step 0.812 (mistral; 0.875 at 32 steps, which cost ~5 s of CPU more a family).
PRETRAIN_STEPS = 50
SLICES = {"sft_train.jsonl": 512, "sft_eval.jsonl": 32, "rm_rankings_train.jsonl": 64, "rm_pairs_eval.jsonl": 32,
          "prompts_train.jsonl": 64, "prompts_eval.jsonl": 16}


def test_every_family_has_its_expected_rendering():
    assert set(RENDERED) == set(FAMILIES)


@pytest.fixture(scope="session")
def family_data(demo_dir, tmp_path_factory) -> Path:
    """A slice of the demo task's files (the families' tokenizers are trained on its text)."""
    out = tmp_path_factory.mktemp("family-data")
    for name, n in SLICES.items():
        lines = (demo_dir / name).read_text().splitlines()[:n]
        (out / name).write_text("\n".join(lines) + "\n")
    return out


def corpus(data: Path) -> list[str]:
    texts = []
    for name in SLICES:
        for line in (data / name).read_text().splitlines():
            row = json.loads(line)
            texts += [m["content"] for m in row["prompt"]] if isinstance(row.get("prompt"), list) else []
            texts += [v for k in ("completion", "chosen", "rejected") if isinstance(v := row.get(k), str)]
            texts += row.get("responses", [])
    return texts


def conversations(data: Path) -> list[list[dict]]:
    """The SFT slice as whole chats: what the stand-in is pre-trained on, so that, like a real checkpoint,
    it already writes its own format and ends its turns (a random one would never stop)."""
    rows = [json.loads(line) for line in (data / "sft_train.jsonl").read_text().splitlines()]
    return [r["prompt"] + [{"role": "assistant", "content": r["completion"]}] for r in rows]


def family_config(data: Path, model_dir: Path, run_dir: Path) -> dict:
    judge = "rlhf.demo.task:gold_score"
    lengths = {"max_length": 256, "max_prompt_length": 160}
    quiet = {"progress_bar": False, "logging_steps": 10}
    return {
        "run_dir": str(run_dir),
        "model": {"name_or_path": str(model_dir), "dtype": "float32"},
        "sft": {"train_file": str(data / "sft_train.jsonl"), "eval_file": str(data / "sft_eval.jsonl"), **lengths,
                "train": {"lr": 3e-3, "max_steps": 16, "batch_size": 16, **quiet}},
        "rm": {"train_file": str(data / "rm_rankings_train.jsonl"), "eval_file": str(data / "rm_pairs_eval.jsonl"),
               **lengths, "train": {"lr": 1e-3, "max_steps": 6, "batch_size": 24, **quiet}},
        "ppo": {"prompts_file": str(data / "prompts_train.jsonl"), "eval_prompts_file": str(data / "prompts_eval.jsonl"),
                "eval_samples": 8, "max_prompt_length": 160, "steps": 2, "progress_bar": False, "judge": judge,
                "sampling": {"rollout_batch_size": 16, "forward_batch_size": 16, "max_new_tokens": 16,
                             "temperature": 1.0},
                "update": {"epochs": 1, "num_minibatches": 2}, "reward": {"norm_samples": 16},
                "checkpoint": {"every": 2}},
        "export": {"stage": "ppo"},
        "eval": {"checkpoints": ["sft", "ppo", f"export={run_dir}/export-ppo", f"hostile={run_dir}/hostile"],
                 "prompts_file": str(data / "prompts_eval.jsonl"), "samples": 8, "max_prompt_length": 160,
                 "decoding": ["sample", "greedy"], "max_new_tokens": 16, "temperature": 1.0, "judge": judge,
                 "plots": False, "progress_bar": False},
    }


# one family's pipeline is built once: its tests stay on one process
@pytest.fixture(scope="session", params=[pytest.param(f, marks=pytest.mark.xdist_group(f"family-{f}")) for f in FAMILIES])
def family_run(request, family_data, tmp_path_factory) -> dict:
    """The whole pipeline on one family's stand-in, each stage run by its entry point from the config file."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    model_dir = build_family(name, root / "model", corpus(family_data), conversations(family_data),
                             pretrain_steps=PRETRAIN_STEPS)
    hostile_model = root / "hostile-model"  # the same checkpoint with a hostile generation_config.json
    shutil.copytree(model_dir, hostile_model)
    _make_hostile(hostile_model)
    run_dir = root / "run"
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(family_config(family_data, hostile_model, run_dir)))
    for stage, run in (("sft", sft_run), ("rm", rm_run), ("ppo", ppo_run), ("export", export_run)):
        assert stage_main(stage, run, ["--config", str(config)], check=CHECKS[stage]) == 0, f"{name}: {stage} failed"
    shutil.copytree(run_dir / "export-ppo", run_dir / "hostile")
    _make_hostile(run_dir / "hostile")
    assert stage_main("eval", eval_run, ["--config", str(config)], check=preflight.check_eval) == 0, f"{name}: eval"
    return {"name": name, "family": FAMILIES[name], "run": run_dir, "model": model_dir, "hostile": hostile_model,
            "config": config}


def _make_hostile(model_dir: Path) -> None:
    path = model_dir / "generation_config.json"
    gen = json.loads(path.read_text())
    path.write_text(json.dumps(gen | HOSTILE | {"suppress_tokens": [gen["eos_token_id"]] if isinstance(
        gen.get("eos_token_id"), int) else gen.get("eos_token_id", [])}, indent=2))


def test_every_stage_finishes_from_the_config(family_run):
    run = family_run["run"]
    for stage in ("sft", "rm", "ppo", "eval", "export-ppo"):
        assert (run / stage / "DONE").is_file(), stage
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert set(metrics["results"]["sample"]) == {"sft", "ppo", "export", "hostile"}


def test_prompts_and_answers_render_as_the_family_writes_them(family_run):
    """The SFT tokenizer (the one every later stage loads) renders the family's own format, and the RM is
    trained on exactly prompt + answer through the end of turn, as trl's SFT split them."""
    tok = load_tokenizer(str(family_run["run"] / "sft"))
    prompt_text, answer_text = RENDERED[family_run["name"]]
    assert tok.decode(encode_prompt(tok, PROMPT)) == prompt_text
    assert tok.decode(answer_ids(tok, PROMPT, "apple pear fig")) == answer_text
    assert pair_ids(tok, PROMPT, "apple pear fig") == encode_prompt(tok, PROMPT) + answer_ids(tok, PROMPT, "apple pear fig")
    assert tok.convert_ids_to_tokens(end_of_turn_id(tok)) == family_run["family"].turn_end


def test_pad_is_no_stop_token(family_run):
    tok = load_tokenizer(str(family_run["run"] / "sft"))
    stops = model_stop_ids(load_causal_lm(ModelConfig(name_or_path=str(family_run["model"])), tok), tok)
    assert tok.pad_token_id not in stops and tok.pad_token_id != tok.eos_token_id
    assert end_of_turn_id(tok) == stops[0]


def test_rollouts_end_at_the_turn_end_where_the_reward_is_read(family_run):
    """PPO's answers end (high eos_rate) and they end with the family's end of turn: the token the RM was
    trained to read its score at (the last token of every pair it was trained on)."""
    run, family = family_run["run"], family_run["family"]
    steps = [json.loads(line) for line in (run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert min(s["ppo/eos_rate"] for s in steps if "ppo/eos_rate" in s) >= 0.75
    tok = load_tokenizer(str(run / "sft"))
    eot = tok.convert_tokens_to_ids(family.turn_end)
    model = load_sft_model_with_policy(family_run)
    prompts = [encode_prompt(tok, PROMPT)] * 32
    torch.manual_seed(0)
    ids, mask, width = generate_ids(model, tok, prompts, SamplingSpec(max_new_tokens=16, temperature=1.0))
    last = [row[m][-1].item() for row, m in zip(ids[:, width:], mask[:, width:])]
    ended = [t == eot for t in last]
    assert sum(ended) >= 0.75 * len(ended), tok.convert_ids_to_tokens(last)
    assert pair_ids(tok, PROMPT, "apple")[-1] == eot


def load_sft_model_with_policy(family_run):
    cfg = load_config(family_run["config"])
    tok = load_tokenizer(str(family_run["run"] / "sft"))
    model = load_sft_model(cfg.model, family_run["run"] / "sft", tok)
    return PeftModel.from_pretrained(model, str(family_run["run"] / "ppo" / "policy"))


def test_a_hostile_generation_config_changes_nothing_sampled(family_run):
    """The checkpoint's own generation_config.json (penalties, bans, its sampling settings) is ignored:
    `make eval` gives the hostile copy of the export exactly the export's answers, and generation on the
    model loaded from a hostile checkpoint gives what the clean one gives."""
    rows = [json.loads(line) for line in (family_run["run"] / "eval" / "samples.jsonl").read_text().splitlines()]
    for decoding in ("sample", "greedy"):
        by = {c: [r["response"] for r in rows if r["checkpoint"] == c and r["decoding"] == decoding]
              for c in ("export", "hostile")}
        assert by["export"] == by["hostile"], decoding
    tok = load_tokenizer(str(family_run["model"]))
    out = []
    for model_dir in (family_run["model"], family_run["hostile"]):
        model = load_causal_lm(ModelConfig(name_or_path=str(model_dir)), tok)
        torch.manual_seed(3)
        out.append(generate_ids(model, tok, [encode_prompt(tok, PROMPT)] * 8, SamplingSpec(max_new_tokens=12))[0])
    assert torch.equal(out[0], out[1])


def test_the_export_loads_with_plain_transformers_and_answers_as_the_adapter(family_run):
    run = family_run["run"]
    export = AutoModelForCausalLM.from_pretrained(str(run / "export-ppo"))
    tok = AutoTokenizer.from_pretrained(str(run / "export-ppo"))
    assert tok.pad_token_id != tok.eos_token_id
    ids = torch.tensor([encode_prompt(tok, PROMPT) + answer_ids(tok, PROMPT, "apple pear fig")])
    adapter = load_sft_model_with_policy(family_run)
    with torch.no_grad():
        torch.testing.assert_close(export(input_ids=ids).logits, adapter(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    rows = [json.loads(line) for line in (run / "eval" / "samples.jsonl").read_text().splitlines()]
    greedy = {c: [r["response"] for r in rows if r["checkpoint"] == c and r["decoding"] == "greedy"]
              for c in ("ppo", "export")}
    assert greedy["ppo"] == greedy["export"]  # make eval: the export answers as the adapter does
