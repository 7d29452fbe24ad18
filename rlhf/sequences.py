"""Token sequences as every stage passes them around, and the forward passes over them.

A batch is `(B, T)` token ids with a `torch.bool` mask (True = a real token). Prompts are left-padded (so
generation continues at the right), sampled responses right-padded after their stop token; positions count
real tokens only, so a padded row sees the positions an unpadded one does. This module is the one home of:
padding, positions, the last real token, the end of an answer (stop tokens), masked sums, token log-probs
and entropies at a temperature, the response slice of a sequence's logits, the masked forward passes (LM
logits, last hidden states) and batching. The RL math (`rlhf/ppo/core.py`), generation, the reward model and
evaluation all build on it; it imports nothing of the pipeline.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence

import torch

Tensor = torch.Tensor


# ------------------------------------------------------------------------------------- padding, positions

def left_pad(seqs: list[list[int]], pad_id: int, width: int | None = None) -> tuple[Tensor, Tensor]:
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


def position_ids(mask: Tensor) -> Tensor:
    """Positions that count real tokens only, so a left-padded row sees the positions a right-padded one does."""
    return (mask.long().cumsum(dim=1) - 1).clamp(min=0)


def last_token_index(mask: Tensor) -> Tensor:
    """(B, T) bool mask, True = real token -> (B,) index of the last real token (left or right padding)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, positions, -1).max(dim=1).values


def batches(n: int, size: int) -> Iterator[Tensor]:
    """Row indices 0..n-1 in consecutive chunks of at most `size` (the last may be shorter)."""
    return iter(torch.arange(n).split(size))


# ------------------------------------------------------------------------------------- the end of an answer

def _stop_set(stop_ids: int | Sequence[int], like: Tensor) -> Tensor:
    ids = [stop_ids] if isinstance(stop_ids, int) else list(stop_ids)
    if not ids:
        raise ValueError("no stop token id given")
    return torch.tensor(ids, dtype=like.dtype, device=like.device)


def first_eos_mask(tokens: Tensor, stop_ids: int | Sequence[int]) -> tuple[Tensor, Tensor]:
    """(B, T) sampled tokens -> (mask (B, T) bool, ended (B,) bool).

    `stop_ids`: the token(s) that end an answer (EOS, and a chat model's end-of-turn tokens, e.g. Llama-3's
    `<|eot_id|>` or ChatML's `<|im_end|>`). mask is True up to and including the first stop token of each
    row (the whole row when there is none); ended says whether the row holds a stop token at all.
    """
    is_eos = torch.isin(tokens, _stop_set(stop_ids, tokens))
    # eos_before[t] counts the stop tokens strictly before t: a token is kept while none has been seen yet
    eos_before = is_eos.long().cumsum(dim=1) - is_eos.long()
    return eos_before == 0, is_eos.any(dim=1)


def truncate_after_eos(tokens: Tensor, stop_ids: int | Sequence[int], pad_id: int) -> tuple[Tensor, Tensor]:
    """(B, T) sampled tokens -> (tokens (B, T), mask (B, T) bool): everything after the first stop token
    becomes `pad_id` and is masked out. The stop token itself stays a real token: the reward model reads its
    score there. Rows are right-padded, so valid tokens are a prefix of each row (what GAE needs).

    `ended` (rows that hold a stop token) comes from `first_eos_mask`.
    """
    if pad_id in _stop_set(stop_ids, tokens).tolist():
        # the RM pools at the last real token; with pad == EOS that is ambiguous
        raise ValueError(f"pad_id must differ from the stop token ids ({pad_id} is one of them)")
    mask, _ = first_eos_mask(tokens, stop_ids)
    return torch.where(mask, tokens, torch.full_like(tokens, pad_id)), mask


# ------------------------------------------------------------------------------ masked sums, log-probs

def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of `x` over valid tokens: over everything (scalar) or along `dim`. Padding may hold anything,
    nan included: it is replaced, never multiplied by the mask (nan * 0 is nan)."""
    x = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() if dim is None else x.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over valid tokens: scalar, or along `dim`. No valid token gives nan (0/0), on purpose:
    an empty mean is a bug upstream, and 0 would hide it in the logs."""
    return masked_sum(x, mask, dim) / mask.sum(dim=dim)


def _scaled(z: Tensor, temperature: float) -> Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return z / temperature if temperature != 1.0 else z


def _upcast(z: Tensor) -> Tensor:
    return z if z.dtype == torch.float64 else z.float()


def _token_logprobs(z: Tensor, tokens: Tensor, temperature: float) -> Tensor:
    z = _scaled(_upcast(z), temperature)
    return torch.gather(z, -1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)


def _entropy(z: Tensor, temperature: float) -> Tensor:
    z = _scaled(_upcast(z), temperature)
    return torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(dim=-1)


def _full_precision(logits: Tensor) -> bool:
    # bf16 logsumexp loses about two digits, so half-precision logits are cast to float32. Casting the
    # whole (B, T, V) tensor at once would double the largest tensor of the step: it is done a row at a time.
    return logits.dtype in (torch.float32, torch.float64)


def logprobs_from_logits(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """(B, T, V) logits and (B, T) tokens -> (B, T) log pi(token) under softmax(logits / temperature).

    `logits[:, t]` must be the distribution that produced `tokens[:, t]` (already shifted by the caller).
    The temperature is the sampling one: old, new and reference log-probs must all use it.
    No full log_softmax is kept: log p = logit[token] - logsumexp(logits). Output is float32 (or float64).
    """
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match tokens {tuple(tokens.shape)}")
    if _full_precision(logits):
        return _token_logprobs(logits, tokens, temperature)
    return torch.stack([_token_logprobs(z, tok, temperature) for z, tok in zip(logits, tokens)])


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """(B, T, V) -> (B, T) entropy of softmax(logits / temperature): logsumexp(z) - sum(p * z), float32 or 64."""
    if _full_precision(logits):
        return _entropy(logits, temperature)
    return torch.stack([_entropy(z, temperature) for z in logits])


# ----------------------------------------------------------------------- responses: prompt width P, R tokens

def response_width(ids: Tensor, prompt_width: int) -> int:
    """R + 1: how many final positions' logits a response needs (`logits_to_keep`). The logits at P - 1 ..
    P + R - 2 predict the R response tokens: the last R + 1 positions but the final one (prompts are
    left-padded, responses right-padded, so these are the same positions in every row)."""
    return ids.shape[1] - prompt_width + 1


def response_logits(logits: Tensor, ids: Tensor, prompt_width: int) -> Tensor:
    """(B, P + R, V) logits of the full sequences, or (B, R + 1, V) of the last R + 1 positions only ->
    (B, R, V) the logits that predict the response tokens."""
    keep = response_width(ids, prompt_width)
    if logits.shape[1] not in (ids.shape[1], keep):
        raise ValueError(f"logits of {logits.shape[1]} positions: expected {ids.shape[1]} (all) or {keep} (R + 1)")
    return logits[:, -keep:-1]


def response_logprobs(logits: Tensor, ids: Tensor, prompt_width: int, temperature: float) -> Tensor:
    """(B, P + R, V) or (B, R + 1, V) logits -> (B, R) log-probs of the response tokens at `temperature`."""
    return logprobs_from_logits(response_logits(logits, ids, prompt_width), ids[:, prompt_width:], temperature)


# --------------------------------------------------------------------------------- masked forward passes

def backbone(model) -> torch.nn.Module:
    """The transformer body of an HF model (the part a causal LM and a classifier share)."""
    return getattr(model, model.base_model_prefix)


def hf_model(model):
    """The transformers model under a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def lm_logits(model, ids: Tensor, mask: Tensor, keep: int = 0) -> Tensor:
    """(B, T, V) logits of a causal LM (a PeftModel: under its active adapter) on left-padded `ids`; with
    keep > 0, (B, keep, V) of the last `keep` positions only.

    keep: the LM head runs on those positions only (`logits_to_keep`, where the model takes it). (B, T, V)
    logits are the largest tensor of a step on long prompts (V ~ 150k); a response needs R + 1 positions."""
    kwargs = {"logits_to_keep": keep} if keep and "logits_to_keep" in inspect.signature(
        hf_model(model).forward).parameters else {}
    logits = model(input_ids=ids, attention_mask=mask.long(), position_ids=position_ids(mask), use_cache=False,
                   **kwargs).logits
    return logits[:, -keep:] if keep else logits


def last_hidden(model, ids: Tensor, mask: Tensor) -> Tensor:
    """(B, T, H) last hidden states of the model's transformer body (no LM head; a PeftModel's active
    adapter applies): what the reward and value heads read."""
    return backbone(hf_model(model))(input_ids=ids, attention_mask=mask.long(), position_ids=position_ids(mask),
                                      use_cache=False).last_hidden_state


@torch.no_grad()
def sequence_logprobs(model, ids: Tensor, mask: Tensor, prompt_width: int, temperature: float,
                      batch_size: int) -> Tensor:
    """(N,) log pi(response | prompt) of each row at `temperature`, under the model's active adapter (float32,
    on the CPU): the sum of the response tokens' log-probs, in batches."""
    out = []
    for rows in batches(ids.shape[0], batch_size):
        i, m = ids[rows], mask[rows]
        logits = lm_logits(model, i, m, response_width(i, prompt_width))
        out.append(masked_sum(response_logprobs(logits, i, prompt_width, temperature), m[:, prompt_width:], dim=1))
    return torch.cat(out).float().cpu()
