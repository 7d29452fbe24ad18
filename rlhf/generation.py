"""Prompt encoding and batched sampling with the HF `generate` (KV cache, left padding).

What is sampled is decided here and nowhere else: softmax(logits / temperature) (optionally top-k / top-p,
never in PPO), stopping at the chat format's stop tokens (`rlhf.chat`). A checkpoint's own
`generation_config.json` (repetition penalties, n-gram bans, its favourite top_p, min_new_tokens, ...) is
ignored: transformers merges every field we leave unset from it, so `generate` runs against a bare config.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from rlhf.chat import encode_prompt, stop_token_ids  # noqa: F401 (encode_prompt: re-exported)
from rlhf.progress import progress
from rlhf.sequences import hf_model, left_pad, truncate_after_eos


@dataclass(frozen=True)
class SamplingSpec:
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    """0: off."""
    top_p: float = 1.0
    do_sample: bool = True

    def generation_config(self, tokenizer, stop_ids: Sequence[int]) -> GenerationConfig:
        """Every knob explicit (and `generate` runs without the model's own config: `bare_generation_config`)."""
        kwargs = dict(max_new_tokens=self.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=list(stop_ids), do_sample=self.do_sample, use_cache=True)
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        else:
            kwargs.update(temperature=None, top_k=None, top_p=None)
        return GenerationConfig(**kwargs)


def model_stop_ids(model, tokenizer) -> list[int]:
    """The stop tokens of `model` (a PeftModel or any HF causal LM) with `tokenizer`: see rlhf.chat."""
    return stop_token_ids(tokenizer, getattr(hf_model(model), "generation_config", None))


@contextmanager
def bare_generation_config(model):
    """Run `generate` with a blank `model.generation_config`: transformers fills every field the config we
    pass leaves unset from the model's own (repetition_penalty, no_repeat_ngram_size, suppress_tokens...),
    and any of them would make the samples differ from softmax(logits / T), the distribution PPO's
    log-probs describe."""
    hf = hf_model(model)
    saved = hf.generation_config
    hf.generation_config = GenerationConfig()
    try:
        yield
    finally:
        hf.generation_config = saved


@torch.no_grad()
def generate_ids(model, tokenizer, prompts: list[list[int]], spec: SamplingSpec, batch_size: int = 64,
                 desc: str | None = None, stop_ids: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Sample one response per prompt (token ids). Returns (ids, mask, P): (B, P + R) token ids of the
    left-padded prompts followed by the responses, their bool mask (False on padding and after the stop
    token), and the prompt width P. Responses are cut after their first stop token (`stop_ids`, default
    `model_stop_ids`: the chat format's end of turn, EOS, the model's EOS ids). `desc`: a progress bar."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    stop_ids = list(stop_ids) if stop_ids is not None else model_stop_ids(model, tokenizer)
    config = spec.generation_config(tokenizer, stop_ids)
    chunks = []
    with bare_generation_config(model):
        for start in progress(range(0, len(prompts), batch_size), desc=desc or "generate", enabled=desc is not None):
            ids, mask = left_pad(prompts[start:start + batch_size], tokenizer.pad_token_id, width)
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.long().to(device),
                                 generation_config=config)
            chunks.append((ids, mask, out[:, width:].cpu()))
    resp_width = max(c[2].shape[1] for c in chunks)
    all_ids, all_mask = [], []
    for ids, mask, resp in chunks:
        resp = torch.nn.functional.pad(resp, (0, resp_width - resp.shape[1]), value=tokenizer.pad_token_id)
        resp, resp_mask = truncate_after_eos(resp, stop_ids, tokenizer.pad_token_id)
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
