"""Fast checks of what a chat format says about answers (rlhf/chat.py) and of what generation samples
(rlhf/generation.py). The whole pipeline on every family is tests/test_families.py (slow)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import GenerationConfig

from rlhf.chat import answer_ids, encode_prompt, end_of_turn_id, stop_token_ids
from rlhf.checks import check_ppo
from conftest import ppo_settings
from rlhf.config import ConfigError, ModelConfig, PipelineConfig
from rlhf.demo.families import FAMILIES, build_tokenizer, generation_config
from rlhf.generation import SamplingSpec, generate_ids
from rlhf.models import load_causal_lm, load_tokenizer

TEXTS = ["name 3 fruits", "apple pear fig", "give 2 trees", "oak elm"] * 20
PROMPT = [{"role": "user", "content": "name 3 fruits"}]


def family_tokenizer(name: str, tmp_path=None):
    """The family's tokenizer; with tmp_path, as the pipeline loads it (pad made distinct from the stops)."""
    tok = build_tokenizer(FAMILIES[name], TEXTS, vocab_size=300)
    if tmp_path is None:
        return tok
    tok.save_pretrained(tmp_path)
    return load_tokenizer(str(tmp_path))


@pytest.mark.parametrize("name", ["llama3.1-base", "qwen2.5-base", "gemma2", "phi3", "mistral"])
def test_the_end_of_turn_is_read_off_the_template(name, tmp_path):
    """Where a turn ends with a token that is not EOS (Llama-3.1 base: <|eot_id|> vs <|end_of_text|>), the
    answer ends with the turn's token, and generation stops at it, at EOS and at the family's EOS ids."""
    family = FAMILIES[name]
    tok = family_tokenizer(name, tmp_path)
    eot = end_of_turn_id(tok)
    assert tok.convert_ids_to_tokens(eot) == family.turn_end
    assert answer_ids(tok, PROMPT, "apple pear fig")[-1] == eot
    stops = stop_token_ids(tok, generation_config(family, tok))
    assert stops[0] == eot and tok.eos_token_id in stops and tok.pad_token_id not in stops


def test_the_answer_is_what_the_template_writes_after_the_prompt():
    """Qwen3 opens every final answer with an empty think block: SFT trains it, PPO samples it, the RM reads
    it. The ChatML newline after <|im_end|> is never sampled, so it is not part of the answer."""
    tok = family_tokenizer("qwen3")
    assert tok.decode(answer_ids(tok, PROMPT, "apple pear fig")) == "<think>\n\n</think>\n\napple pear fig<|im_end|>"
    full = tok.apply_chat_template(PROMPT + [{"role": "assistant", "content": "apple pear fig"}], tokenize=True,
                                   return_dict=True)["input_ids"]
    ids = encode_prompt(tok, PROMPT) + answer_ids(tok, PROMPT, "apple pear fig")
    assert full[:len(ids)] == ids and tok.decode(full[len(ids):]) == "\n"


def test_prompts_and_answers_are_rendered_once_and_afresh_when_the_tokenizer_changes(monkeypatch):
    """The same prompt and answer (a K-way ranking's pairs, eval's k samples) go through the template once; a
    changed template or vocabulary renders again, and a caller that edits the ids it got edits no cached ones."""
    import rlhf.chat as chat
    tok = family_tokenizer("qwen2.5-base")
    renders = []
    real = type(tok).apply_chat_template
    monkeypatch.setattr(type(tok), "apply_chat_template", lambda self, *a, **k: renders.append(1) or real(self, *a, **k))
    first = encode_prompt(tok, PROMPT) + answer_ids(tok, PROMPT, "apple pear fig")
    n = len(renders)
    for _ in range(3):
        assert encode_prompt(tok, PROMPT) + answer_ids(tok, PROMPT, "apple pear fig") == first
    assert len(renders) == n
    encode_prompt(tok, PROMPT).append(-1)
    assert encode_prompt(tok, PROMPT) + answer_ids(tok, PROMPT, "apple pear fig") == first
    tok.chat_template = tok.chat_template.replace("<|im_start|>", "<|im_start|>user says ")
    changed = encode_prompt(tok, PROMPT)
    assert len(renders) == n + 1 and changed != first[:len(changed)]
    n = len(renders)
    tok.add_tokens(["zebra"])
    encode_prompt(tok, PROMPT)
    assert len(renders) == n + 1
    monkeypatch.setattr(chat, "RENDERED_CACHE_SIZE", 2)
    for text in ["a", "b", "c"]:
        answer_ids(tok, PROMPT, text)
    n = len(renders)
    answer_ids(tok, PROMPT, "a")                     # pushed out by the two after it
    assert len(renders) == n + 1


def test_family_eos_ids_count_only_if_special():
    """A generation config naming an ordinary word as EOS would cut answers in the middle: only special
    tokens of the tokenizer are taken from it."""
    tok = family_tokenizer("llama3-instruct")
    word = tok("apple", add_special_tokens=False)["input_ids"][0]
    eom = tok.convert_tokens_to_ids("<|eom_id|>")
    stops = stop_token_ids(tok, GenerationConfig(eos_token_id=[word, eom]))
    assert eom in stops and word not in stops


def test_pad_is_none_of_the_checkpoints_eos_ids(tmp_path):
    """Qwen2.5-Instruct's pad token <|endoftext|> is one of its generation config's EOS ids: the pipeline
    gives it a pad of its own (an answer ending at <|endoftext|> must not look like padding)."""
    family = FAMILIES["qwen2.5-instruct"]
    tok = family_tokenizer("qwen2.5-instruct")
    tok.save_pretrained(tmp_path)
    generation_config(family, tok).save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert tok.pad_token == "<|endoftext|>" and loaded.pad_token != "<|endoftext|>"
    assert loaded.pad_token_id not in stop_token_ids(loaded, generation_config(family, loaded))


HOSTILE = {"repetition_penalty": 3.0, "no_repeat_ngram_size": 1, "top_k": 2, "top_p": 0.3, "temperature": 0.2,
           "min_new_tokens": 8, "typical_p": 0.4, "bad_words_ids": [[5]], "max_new_tokens": 2, "do_sample": True}


def test_the_checkpoints_generation_config_changes_nothing_sampled(demo_dir, tmp_path):
    """Samples from a checkpoint whose generation_config.json sets penalties, bans and its own sampling
    settings equal those of the same weights without it, sampled and greedy."""
    hostile = tmp_path / "hostile"
    base = demo_dir / "base"
    shutil.copytree(base, hostile)
    gen = json.loads((hostile / "generation_config.json").read_text()) if (hostile / "generation_config.json").exists() else {}
    (hostile / "generation_config.json").write_text(json.dumps(gen | HOSTILE))
    tok = load_tokenizer(str(base))
    prompts = [encode_prompt(tok, [{"role": "user", "content": f"name {n} fruits"}]) for n in range(1, 9)]
    for spec in (SamplingSpec(max_new_tokens=10, temperature=1.0), SamplingSpec(max_new_tokens=10, do_sample=False)):
        out = []
        for path in (base, hostile):
            model = load_causal_lm(ModelConfig(name_or_path=str(path), dtype="float32"), tok)
            torch.manual_seed(0)
            out.append(generate_ids(model, tok, prompts, spec)[0])
        assert torch.equal(out[0], out[1])


def test_ppo_refuses_truncated_sampling():
    check_ppo(PipelineConfig())
    for bad in (ppo_settings("sampling.top_k=50"), ppo_settings("sampling.top_p=0.9")):
        with pytest.raises(ConfigError, match="ppo.sampling.top_k"):
            check_ppo(PipelineConfig(ppo=bad))
