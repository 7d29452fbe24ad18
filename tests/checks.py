"""Checks that more than one model's tests make: the demo's runs and the real chat model's."""

from pathlib import Path

import torch
from peft import PeftModel

from rlhf.config import ModelConfig
from rlhf.data import load_preferences, load_prompts
from rlhf.generation import SamplingSpec, generate_texts
from rlhf.models import load_sft_model, load_tokenizer
from rlhf.rm.scoring import RewardScorer, build_reward_model, pair_ids


def ppo_scorer_and_rm_classifier(run: Path, base: str, pairs_file: Path, n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """The scores PPO and eval use (shared causal LM + "reward" adapter, left padding, other batch boundaries) and
    those of the model the RM stage trained (a sequence classifier, right-padded, HF's own pooling), on the same
    held-out chosen and rejected answers."""
    tokenizer = load_tokenizer(str(run / "sft"))
    model_cfg = ModelConfig(name_or_path=base)
    pairs = load_preferences(str(pairs_file))[:n]
    prompts = [p.prompt for p in pairs] * 2
    answers = [p.chosen for p in pairs] + [p.rejected for p in pairs]  # varied lengths: real padding

    clf = PeftModel.from_pretrained(build_reward_model(load_sft_model(model_cfg, run / "sft", tokenizer), 0),
                                    str(run / "rm")).eval()
    seqs = [pair_ids(tokenizer, p, a) for p, a in zip(prompts, answers)]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in seqs])
    with torch.no_grad():
        trained = clf(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long()).logits.squeeze(-1)
    del clf
    scorer = RewardScorer.attach(load_sft_model(model_cfg, run / "sft", tokenizer), run / "rm", tokenizer)
    shared = scorer.score(prompts, answers, batch_size=7)
    assert not any(p.requires_grad for n, p in scorer.model.named_parameters() if "reward" in n)
    return shared, trained


def export_and_adapter_generations(run: Path, base: str, export_dir: Path, stage: str, prompts_file: Path,
                                   n: int, max_new_tokens: int) -> tuple[list[str], list[str]]:
    """Greedy answers of an exported model dir loaded with plain transformers (no peft, no rlhf), and of the
    adapter model it came from, to the first `n` prompts of `prompts_file`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = load_tokenizer(str(run / "sft"))
    prompts = [p.prompt for p in load_prompts(str(prompts_file))[:n]]
    greedy = SamplingSpec(max_new_tokens=max_new_tokens, do_sample=False)
    adapter_model = load_sft_model(ModelConfig(name_or_path=base), run / "sft", tok)
    if stage == "ppo":
        adapter_model = PeftModel.from_pretrained(adapter_model, str(run / "ppo" / "policy"))
    ours = generate_texts(adapter_model, tok, prompts, greedy)
    del adapter_model
    plain = generate_texts(AutoModelForCausalLM.from_pretrained(export_dir), AutoTokenizer.from_pretrained(export_dir),
                           prompts, greedy)
    return plain, ours
