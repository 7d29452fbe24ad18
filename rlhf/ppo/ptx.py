"""PPO-ptx (InstructGPT): batches of demonstrations whose SFT loss is mixed into every PPO optimiser step."""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch

from rlhf import data as rdata
from rlhf.chat import answer_ids, encode_prompt
from rlhf.config import ConfigError


def ptx_batches(p, tokenizer, device: torch.device | str | None = None, rank: int = 0,
                world: int = 1, text_prompts: str = "raw") -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Endless shuffled (ids, mask, labels) batches of p.ptx.batch_size demonstrations from p.ptx.file:
    right-padded (B, T) ids, bool mask, and bool labels (True on answer tokens and EOS: the SFT loss).
    With several processes, each draws from its own share of the demonstrations.

    The file is read and checked here, at the call (before the model loads), not at the first batch:
    a share smaller than one batch is a ConfigError (it would otherwise never yield a batch)."""
    if not p.ptx.file:
        raise ConfigError("ppo.ptx.coef > 0 needs ppo.ptx.file (demonstrations, as for SFT)")
    examples = rdata.as_chat(rdata.load_sft(p.ptx.file, skip_invalid=p.skip_invalid)[rank::world], text_prompts)
    if p.ptx.batch_size < 1 or len(examples) < p.ptx.batch_size:
        share = f" (this process's share: 1 of {world} processes)" if world > 1 else ""
        raise ConfigError(f"{p.ptx.file}: {len(examples)} demonstrations{share}, fewer than "
                          f"ppo.ptx.batch_size={p.ptx.batch_size}: lower ppo.ptx.batch_size or add demonstrations")
    rows = []
    for e in examples:
        prompt = encode_prompt(tokenizer, e.prompt)
        answer = answer_ids(tokenizer, e.prompt, e.completion, prompt)
        rows.append((prompt + answer, [False] * len(prompt) + [True] * len(answer)))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return _endless(rows, p.ptx.batch_size, random.Random(p.seed), tokenizer.pad_token_id, device)


def _endless(rows: list, batch_size: int, rng: random.Random, pad_id: int, device):
    """Full batches from reshuffled passes over `rows` (len(rows) >= batch_size, so every pass yields)."""
    while True:
        rng.shuffle(rows)
        for start in range(0, len(rows) - batch_size + 1, batch_size):
            yield collate(rows[start:start + batch_size], pad_id, device)


def collate(rows, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    labels = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (seq, lab) in enumerate(rows):
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = True
        labels[i, :len(seq)] = torch.tensor(lab)
    return ids.to(device), mask.to(device), labels.to(device)
