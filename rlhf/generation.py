"""Prompt encoding and batched sampling with the HF `generate` (KV cache, left padding)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt) -> list[int]:
    """Token ids of a prompt: chat messages through the chat template (with the generation prompt),
    raw text as is. The same encoding the SFT trainer used for training."""
    if isinstance(prompt, list):
        return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    return tokenizer(prompt)["input_ids"]


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and bool mask (True = real token), padded on the left so generation continues at the right."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = True
    return ids, mask


@dataclass(frozen=True)
class SamplingSpec:
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    do_sample: bool = True


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: list, spec: SamplingSpec, batch_size: int = 64,
                   seed: int | None = None) -> list[str]:
    """Sample one response per prompt; returns the decoded responses without special tokens."""
    if seed is not None:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    out: list[str] = []
    was_training = model.training
    model.eval()
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_pad([encode_prompt(tokenizer, p) for p in prompts[start:start + batch_size]],
                             tokenizer.pad_token_id)
        kwargs = dict(do_sample=spec.do_sample, max_new_tokens=spec.max_new_tokens,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        if spec.do_sample:
            kwargs.update(temperature=spec.temperature, top_k=spec.top_k or None, top_p=spec.top_p)
        seqs = model.generate(input_ids=ids.to(device), attention_mask=mask.long().to(device), **kwargs)
        out += tokenizer.batch_decode(seqs[:, ids.shape[1]:], skip_special_tokens=True)
    model.train(was_training)
    return [text.strip() for text in out]
