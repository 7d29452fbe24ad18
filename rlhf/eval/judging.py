"""The one evaluation path: answer held-out prompts with a fixed seed, judge every answer, summarise against a
baseline. `make eval` (rlhf/eval/run.py) runs it over its checkpoints; PPO runs the same functions over the
roles' model for its end-of-stage comparison with SFT and for the held-out monitor (rlhf/ppo/evaluate.py).

Judgements of an answer: `reward` (the reward model, on the very token ids a PPO rollout would be scored on),
`kl` (sampled answers: log pi(y|x) - log pi_sft(y|x) at the sampling temperature; its mean estimates
KL(pi || pi_sft)), `gold` (the task's judge, when there is one), `length`, and the degeneration measures of
rlhf/eval/degeneration.py on token ids.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import cached_property

import torch

from rlhf.eval import degeneration as dg
from rlhf.eval.stats import bootstrap_interval
from rlhf.generation import SamplingSpec, decode_responses, generate_ids
from rlhf.sequences import batches, sequence_logprobs


@dataclass
class Answers:
    """One model's answers to N prompts under one decoding."""

    texts: list[str]
    ids: torch.Tensor          # (N, P + R) in the model's tokenizer
    mask: torch.Tensor         # (N, P + R) bool
    width: int                 # P
    comparable: bool           # same tokenizer as the pipeline's: ids can be scored and compared as they are
    temperature: float = 1.0   # the sampling temperature (log-probs are taken at it)
    logprob: torch.Tensor | None = None   # (N,) log pi(y|x) at the sampling temperature (sampled answers)

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask[:, self.width:].sum(1).cpu()

    @cached_property
    def tokens(self) -> list[list[int]]:
        """Each answer's real token ids (what the degeneration measures read; the judgements and PPO's monitor
        both read them, so they are taken once)."""
        return dg.response_tokens(self.ids, self.mask, self.width)


@torch.no_grad()
def answer(model, tokenizer, prompt_ids: list[list[int]], spec: SamplingSpec, batch_size: int, seed: int,
           comparable: bool = True, desc: str | None = None, with_logprob: bool = True,
           generated: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> Answers:
    """The model's answers (as it is now: a PeftModel answers with its active adapters), sampled with the fixed
    seed, so identical models give identical answers. Sampled answers of a comparable model also carry their
    log-probability (the KL's first half) unless `with_logprob` is off. `desc`: a progress bar. `generated`:
    the answers as another engine sampled them (generate_ids' layout); the model then only computes log-probs."""
    torch.manual_seed(seed)
    if generated is None:
        generated = generate_ids(model, tokenizer, prompt_ids, spec, batch_size, desc=desc)
    ids, mask, width = generated
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    a = Answers(decode_responses(tokenizer, ids, mask, width), ids, mask, width, comparable, spec.temperature)
    if with_logprob and comparable and spec.do_sample:
        a.logprob = sequence_logprobs(model, ids, mask, width, spec.temperature, batch_size)
    return a


@torch.no_grad()
def judgements(a: Answers, scorer, reference: Callable[[], AbstractContextManager] | None, prompts: list | None,
               judge, batch_size: int) -> dict[str, list | None]:
    """Per-answer scores {reward, kl, gold, length, repeat, distinct, dominated}; None where not measured.

    scorer: the reward model (`score_ids`, and `score` for answers in another tokenizer) or None;
    reference: a context manager factory yielding the SFT model (for the KL of sampled answers) or None;
    prompts: the prompts as given (text or messages), needed by the judge and by `scorer.score`."""
    reward = kl = gold = None
    if scorer is not None:
        if a.comparable:  # the token ids a PPO rollout would be scored on
            reward = torch.cat([scorer.score_ids(a.ids[rows], a.mask[rows], prompt_width=a.width).cpu()
                                for rows in batches(a.ids.shape[0], batch_size)])
        else:  # another tokenizer: the text, re-tokenised as the RM was trained (answer + end of turn)
            reward = scorer.score(prompts, a.texts, batch_size)
        reward = reward.tolist()
    if a.logprob is not None and reference is not None:
        with reference() as sft:
            kl = (a.logprob - sequence_logprobs(sft, a.ids, a.mask, a.width, a.temperature, batch_size)).tolist()
    if judge is not None:
        gold = [float(judge(p, t)) for p, t in zip(prompts, a.texts)]
    return {"reward": reward, "gold": gold, "kl": kl, "length": a.lengths.tolist(), **dg.per_answer(a.tokens)}


def summarize(scores: dict[str, dict[str, list | None]], baseline: str, group: int = 1) -> dict[str, dict[str, float]]:
    """Per model: means of every score, and win rates over the baseline with 95 % intervals (`group`
    answers per prompt, consecutive; prompts are the unit of the bootstrap)."""
    out = {}
    for name, s in scores.items():
        row: dict[str, float] = {"n": len(s["length"])}
        for key, values in s.items():
            if values is not None:
                t = torch.tensor(values, dtype=torch.float64)
                row[f"{key}_mean"] = t.mean().item()
                row[f"{key}_std"] = t.std().item() if len(t) > 1 else 0.0
        if name != baseline:
            for key in ("reward", "gold"):
                if s[key] is not None:
                    rate, low, high = bootstrap_interval(torch.tensor(s[key]), torch.tensor(scores[baseline][key]),
                                                         group=group)
                    row |= {f"{key}_win_rate": rate, f"{key}_win_rate_low": low, f"{key}_win_rate_high": high}
        out[name] = row
    return out


def prompt_text(prompt) -> str:
    """A prompt as one line: a text as it is, chat messages' contents joined by ' | '."""
    return prompt if isinstance(prompt, str) else " | ".join(m["content"] for m in prompt)
