"""PPO-ptx (InstructGPT): batches of demonstrations whose SFT loss is mixed into every PPO optimiser step."""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch

from rlhf import data as rdata
from rlhf.chat import answer_ids, encode_prompt


def ptx_batches(p, tokenizer, device: torch.device | str | None = None, rank: int = 0,
                world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Endless shuffled (ids, mask, labels) batches of p.ptx_batch_size demonstrations from p.ptx_file:
    right-padded (B, T) ids, bool mask, and bool labels (True on answer tokens and EOS: the SFT loss).
    With several processes, each draws from its own share of the demonstrations."""
    if not p.ptx_file:
        raise ValueError("ppo.ptx_coef > 0 needs ppo.ptx_file (demonstrations, as for SFT)")
    examples = rdata.load_sft(p.ptx_file, skip_invalid=p.skip_invalid)[rank::world]
    rows = []
    for e in examples:
        prompt = encode_prompt(tokenizer, e.prompt)
        answer = answer_ids(tokenizer, e.prompt, e.completion, prompt)
        rows.append((prompt + answer, [False] * len(prompt) + [True] * len(answer)))
    rng = random.Random(p.seed)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    while True:
        rng.shuffle(rows)
        for start in range(0, len(rows) - p.ptx_batch_size + 1, p.ptx_batch_size):
            yield collate(rows[start:start + p.ptx_batch_size], tokenizer.pad_token_id, device)


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
