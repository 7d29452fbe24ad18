"""Tiny random-weight stand-ins of real model families, built offline, for the conformance tests.

Each stand-in has what a user's checkpoint brings and the pipeline must handle:

* the family's architecture class and config shape (GQA, tied embeddings, rope settings, soft-capping,
  sliding windows, fused projections, GPT-2's Conv1D), at a width of 64 and two layers;
* a byte-level BPE tokenizer (trained here on the task's text) carrying the family's real special tokens,
  its BOS/EOS/PAD/UNK as the checkpoint names them, and its real chat template. The templates are the
  originals as the families ship them, read from the copies trl keeps for template identification
  (`trl/chat_templates/*.jinja`); Mistral's, which trl does not keep, is written out below from
  Mistral-7B-Instruct-v0.2's tokenizer_config.json; GPT-2 has none (the pipeline installs the HH layout);
* its `generation_config.json` as shipped: sampling settings, and the list of EOS ids where the family has
  one (Llama-3 instruct: `<|end_of_text|>` and `<|eot_id|>`).

Where the base and instruct checkpoints of a family end a turn with a token that is not the base's EOS
(Llama-3.1 base: EOS `<|end_of_text|>`, turns end with `<|eot_id|>`; Qwen2.5 base: EOS `<|endoftext|>`,
turns end with `<|im_end|>`), both variants are here.

Adding a family: one `Family` entry (docs/models.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

from rlhf.models import HH_CHAT_TEMPLATE

# The pre-tokenizer split of Llama-3 and Qwen2 (tiktoken-style: digits in threes, newlines kept apart).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

MISTRAL_V02_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=1024)


@dataclass(frozen=True)
class Family:
    name: str
    checkpoint: str
    """The real hub checkpoint this stands in for (its config in configs/models/)."""
    model_type: str
    config: dict
    """Architecture settings (tiny sizes plus the family's shape); token ids are filled in from the tokenizer."""
    eos: str
    bos: str | None = None
    pad: str | None = None
    unk: str | None = None
    specials: tuple[str, ...] = ()
    """The family's other special tokens (turn markers)."""
    template: str | None = None
    """A trl chat template file (`qwen2_5.jinja`), or the template text itself, or None (no template)."""
    generation: dict = field(default_factory=dict)
    """generation_config.json as the checkpoint ships it; token fields name tokens (strings), lists allowed."""
    split: str | None = None
    """Pre-tokenizer regex: None = GPT-2's byte-level split."""
    turn_end: str = ""
    """The token that ends an assistant turn (what the conformance tests expect the pipeline to find)."""


LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eom_id|>", "<|eot_id|>", "<|python_tag|>")
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("llama3-instruct", "meta-llama/Meta-Llama-3-8B-Instruct", "llama",
           dict(num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
           eos="<|eot_id|>", bos="<|begin_of_text|>", specials=LLAMA3_SPECIALS, template="llama3.jinja",
           generation=dict(bos_token_id="<|begin_of_text|>", eos_token_id=["<|end_of_text|>", "<|eot_id|>"],
                           do_sample=True, temperature=0.6, top_p=0.9, max_length=4096),
           split=LLAMA3_SPLIT, turn_end="<|eot_id|>"),
    Family("llama3.1-base", "meta-llama/Llama-3.1-8B", "llama",
           dict(num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                max_position_embeddings=131072, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                  original_max_position_embeddings=8192)),
           eos="<|end_of_text|>", bos="<|begin_of_text|>", specials=LLAMA3_SPECIALS, template="llama3_1.jinja",
           generation=dict(bos_token_id="<|begin_of_text|>", eos_token_id="<|end_of_text|>", do_sample=True,
                           temperature=0.6, top_p=0.9),
           split=LLAMA3_SPLIT, turn_end="<|eot_id|>"),
    Family("qwen2.5-instruct", "Qwen/Qwen2.5-0.5B-Instruct", "qwen2",
           dict(num_key_value_heads=2, rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False),
           eos="<|im_end|>", pad="<|endoftext|>", specials=QWEN_SPECIALS, template="qwen2_5.jinja",
           generation=dict(bos_token_id="<|endoftext|>", pad_token_id="<|endoftext|>", do_sample=True,
                           eos_token_id=["<|im_end|>", "<|endoftext|>"], repetition_penalty=1.1, temperature=0.7,
                           top_p=0.8, top_k=20),
           split=LLAMA3_SPLIT, turn_end="<|im_end|>"),
    Family("qwen2.5-base", "Qwen/Qwen2.5-0.5B", "qwen2",
           dict(num_key_value_heads=2, rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False),
           eos="<|endoftext|>", pad="<|endoftext|>", specials=QWEN_SPECIALS, template="qwen2_5.jinja",
           generation=dict(bos_token_id="<|endoftext|>", eos_token_id="<|endoftext|>", do_sample=False,
                           max_new_tokens=2048),
           split=LLAMA3_SPLIT, turn_end="<|im_end|>"),
    Family("qwen3", "Qwen/Qwen3-0.6B", "qwen3",
           dict(num_key_value_heads=2, head_dim=16, rope_theta=1000000.0, tie_word_embeddings=True),
           eos="<|im_end|>", pad="<|endoftext|>", specials=QWEN_SPECIALS + ("<think>", "</think>"),
           template="qwen3.jinja",
           generation=dict(bos_token_id="<|endoftext|>", pad_token_id="<|endoftext|>", do_sample=True,
                           eos_token_id=["<|im_end|>", "<|endoftext|>"], temperature=0.6, top_k=20, top_p=0.95),
           split=LLAMA3_SPLIT, turn_end="<|im_end|>"),
    Family("gemma2", "google/gemma-2-2b-it", "gemma2",
           dict(num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=32,
                final_logit_softcapping=30.0, attn_logit_softcapping=50.0, hidden_activation="gelu_pytorch_tanh",
                tie_word_embeddings=True),
           eos="<eos>", bos="<bos>", pad="<pad>", unk="<unk>", specials=("<start_of_turn>", "<end_of_turn>"),
           template="gemma.jinja",
           generation=dict(bos_token_id="<bos>", eos_token_id=["<eos>", "<end_of_turn>"], pad_token_id="<pad>",
                           cache_implementation="hybrid"),
           turn_end="<end_of_turn>"),
    Family("gemma3", "google/gemma-3-1b-it", "gemma3_text",
           dict(num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=32,
                rope_theta=1000000.0, tie_word_embeddings=True),
           eos="<eos>", bos="<bos>", pad="<pad>", unk="<unk>", specials=("<start_of_turn>", "<end_of_turn>"),
           template="gemma3.jinja",
           generation=dict(bos_token_id="<bos>", eos_token_id=["<eos>", "<end_of_turn>"], pad_token_id="<pad>",
                           do_sample=True, top_k=64, top_p=0.95, cache_implementation="hybrid"),
           turn_end="<end_of_turn>"),
    Family("mistral", "mistralai/Mistral-7B-Instruct-v0.2", "mistral",
           dict(num_key_value_heads=2, rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=False),
           eos="</s>", bos="<s>", unk="<unk>", template=MISTRAL_V02_TEMPLATE,
           generation=dict(bos_token_id="<s>", eos_token_id="</s>"),
           turn_end="</s>"),
    Family("phi3", "microsoft/Phi-3-mini-4k-instruct", "phi3",
           dict(num_key_value_heads=4, rope_theta=10000.0, tie_word_embeddings=False),
           eos="<|endoftext|>", bos="<s>", pad="<|endoftext|>", unk="<unk>",
           specials=("<|assistant|>", "<|system|>", "<|end|>", "<|user|>"), template="phi3.jinja",
           generation=dict(bos_token_id="<s>", eos_token_id=["<|endoftext|>", "<|assistant|>", "<|end|>"],
                           pad_token_id="<|endoftext|>"),
           turn_end="<|end|>"),
    Family("gpt2", "openai-community/gpt2", "gpt2",
           dict(n_embd=64, n_layer=2, n_head=4, n_positions=1024),
           eos="<|endoftext|>", bos="<|endoftext|>", unk="<|endoftext|>",
           generation=dict(bos_token_id="<|endoftext|>", eos_token_id="<|endoftext|>"),
           turn_end="<|endoftext|>"),
]}


def chat_template(family: Family) -> str | None:
    if family.template is None or not family.template.endswith(".jinja"):
        return family.template
    return (files("trl") / "chat_templates" / family.template).read_text(encoding="utf-8")


def build_tokenizer(family: Family, texts: list[str], vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """A byte-level BPE over `texts` with the family's special tokens, names and chat template."""
    named = [t for t in (family.bos, family.eos, family.pad, family.unk) if t]
    specials = list(dict.fromkeys(named + list(family.specials)))
    core = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=family.split is None)
    core.pre_tokenizer = (byte_level if family.split is None else pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(family.split), behavior="isolated"), byte_level]))
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=family.bos, eos_token=family.eos,
                                  pad_token=family.pad, unk_token=family.unk,
                                  additional_special_tokens=[t for t in specials if t not in named])
    tok.chat_template = chat_template(family)
    return tok


def _token_ids(value, tok: PreTrainedTokenizerFast):
    if isinstance(value, list):
        return [tok.convert_tokens_to_ids(v) for v in value]
    return tok.convert_tokens_to_ids(value)


def generation_config(family: Family, tok: PreTrainedTokenizerFast) -> GenerationConfig:
    fields = {k: (_token_ids(v, tok) if k.endswith("_token_id") else v) for k, v in family.generation.items()}
    return GenerationConfig(**fields)


def build_model(family: Family, tok: PreTrainedTokenizerFast, seed: int = 0):
    ids = dict(vocab_size=len(tok), eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
               pad_token_id=tok.pad_token_id)
    sizes = {} if family.model_type == "gpt2" else TINY
    config = AutoConfig.for_model(family.model_type, **{**sizes, **family.config, **ids})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = generation_config(family, tok)
    return model


def pretrain(model, tok: PreTrainedTokenizerFast, conversations: list[list[dict]], steps: int, seed: int = 0,
             batch_size: int = 32, lr: float = 3e-3) -> list[float]:
    """Full training on whole conversations rendered by the chat template (the HH layout without one), so
    the stand-in, like a real checkpoint, already writes its own format and ends its turns. Returns losses."""
    template = tok.chat_template or HH_CHAT_TEMPLATE
    seqs = [tok.apply_chat_template(c, chat_template=template, tokenize=True, return_dict=True)["input_ids"]
            for c in conversations]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        rows = [seqs[i] for i in torch.randint(len(seqs), (batch_size,), generator=gen).tolist()]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def build_family(name: str, out_dir: str | Path, texts: list[str], conversations: list[list[dict]] = (),
                 pretrain_steps: int = 0, seed: int = 0) -> Path:
    """Write the stand-in of family `name` to `out_dir` (a model directory, loaded as any checkpoint is):
    random weights, or pre-trained for `pretrain_steps` on `conversations` (chat messages)."""
    family = FAMILIES[name]
    out = Path(out_dir)
    tok = build_tokenizer(family, texts)
    model = build_model(family, tok, seed)
    if pretrain_steps:
        pretrain(model, tok, list(conversations), pretrain_steps, seed)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "family.json").write_text(json.dumps({"family": name, "checkpoint": family.checkpoint}) + "\n")
    return out
