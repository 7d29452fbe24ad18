"""Prompt encoding and batched sampling with the HF `generate` (KV cache, left padding)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase

from rlhf.ppo.core import truncate_after_eos
from rlhf.progress import progress


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt) -> list[int]:
    """Token ids of a prompt: chat messages through the chat template (with the generation prompt),
    raw text as is. The same encoding the SFT trainer used for training."""
    if isinstance(prompt, list):
        return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    return tokenizer(prompt)["input_ids"]


def left_pad(seqs: list[list[int]], pad_id: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and bool mask (True = real token), padded on the left so generation continues at the right.
    T is `width` if given, else the longest sequence."""
    width = width or max(len(s) for s in seqs)
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
    """0: off."""
    top_p: float = 1.0
    do_sample: bool = True

    def generation_config(self, tokenizer) -> GenerationConfig:
        """Every knob explicit: a model's own generation_config (top_k=50, repetition penalties...) must not
        change what PPO samples behind its back."""
        kwargs = dict(max_new_tokens=self.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, do_sample=self.do_sample, use_cache=True)
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        else:
            kwargs.update(temperature=None, top_k=None, top_p=None)
        return GenerationConfig(**kwargs)


@torch.no_grad()
def generate_ids(model, tokenizer, prompts: list[list[int]], spec: SamplingSpec,
                 batch_size: int = 64, desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Sample one response per prompt (token ids). Returns (ids, mask, P): (B, P + R) token ids of the
    left-padded prompts followed by the responses, their bool mask (False on padding and after EOS), and
    the prompt width P. Responses are cut after their first EOS. `desc`: show a progress bar over batches."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    config = spec.generation_config(tokenizer)
    chunks = []
    for start in progress(range(0, len(prompts), batch_size), desc=desc or "generate", enabled=desc is not None):
        ids, mask = left_pad(prompts[start:start + batch_size], tokenizer.pad_token_id, width)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.long().to(device), generation_config=config)
        chunks.append((ids, mask, out[:, width:].cpu()))
    resp_width = max(c[2].shape[1] for c in chunks)
    all_ids, all_mask = [], []
    for ids, mask, resp in chunks:
        resp = torch.nn.functional.pad(resp, (0, resp_width - resp.shape[1]), value=tokenizer.pad_token_id)
        resp, resp_mask = truncate_after_eos(resp, tokenizer.eos_token_id, tokenizer.pad_token_id)
        all_ids.append(torch.cat([ids, resp], dim=1))
        all_mask.append(torch.cat([mask, resp_mask], dim=1))
    return torch.cat(all_ids).to(device), torch.cat(all_mask).to(device), width


def decode_responses(tokenizer, ids: torch.Tensor, mask: torch.Tensor, prompt_width: int) -> list[str]:
    """The response texts (special tokens dropped) of generate_ids' output."""
    return [tokenizer.decode(row[m], skip_special_tokens=True).strip()
            for row, m in zip(ids[:, prompt_width:].cpu(), mask[:, prompt_width:].cpu())]


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: list, spec: SamplingSpec, batch_size: int = 64,
                   seed: int | None = None) -> list[str]:
    """Sample one response per prompt (chat messages or text); returns the decoded responses."""
    if seed is not None:
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    ids, mask, width = generate_ids(model, tokenizer, [encode_prompt(tokenizer, p) for p in prompts], spec, batch_size)
    model.train(was_training)
    return decode_responses(tokenizer, ids, mask, width)
