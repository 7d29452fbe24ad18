"""What the RL stage maximises: the trained reward model, reward functions written as code, or a weighted sum.

`ppo.reward.terms` lists terms `{source, weight}`; a source is `rm` (this run's reward model, with the ensemble
objective if it has several members) or `"package.module:function"`, a function `(prompt, response) -> float`
called with the prompt as the data gave it (chat messages or text) and the sampled answer as text (decoded as
`make eval` decodes it: special tokens dropped, stripped). The demo's gold judge `rlhf.demo.task:gold_score` is
such a function: a verifiable reward.

The sum has the reward model's interface (`score_ids(ids, mask)`), so a rollout, the reward normalisation, the
monitor and the end-of-run comparison score through it unchanged (as `roles.scorer`). Functions are checked
before any model loads (`check_rewards`: importable, callable, takes (prompt, response)); one that raises or
returns a non-finite value during the run stops it with the prompt and the answer named.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from rlhf.config import ConfigError, RewardTerm
from rlhf.plugins import reward_function

RM = "rm"


class RewardFunctionError(ConfigError):
    """A reward function raised or returned a value that is not a finite number; the message names the prompt
    and the answer."""


def uses_functions(terms: Sequence[RewardTerm]) -> bool:
    return any(t.source != RM for t in terms) or any(t.weight != 1.0 for t in terms)


class FunctionReward:
    """A `(prompt, response) -> float` function behind the reward model's `score_ids` interface.

    Rows are prompt ids + answer ids; the prompt is recognised by its token ids among the prompts the stage
    encoded (`prompts`, `prompt_ids`), the answer is the rest, decoded. A rollout gives `prompt_width` (its rows
    are [pad.. prompt | answer ..pad], the answer from column prompt_width on): the prompt is then exactly its
    real tokens before that column. Without it (rows padded as a whole) the longest stage prompt that prefixes
    the row is taken, which is ambiguous when one prompt's ids are a prefix of another's."""

    def __init__(self, spec: str, tokenizer, prompts: Sequence, prompt_ids: Sequence[Sequence[int]]):
        self.spec, self.fn, self.tokenizer = spec, reward_function(spec, "ppo.reward.terms"), tokenizer
        self.prompts = {tuple(ids): p for p, ids in zip(prompts, prompt_ids)}
        self.lengths = sorted({len(ids) for ids in prompt_ids}, reverse=True)

    def split(self, ids: list[int], prompt_len: int | None = None):
        """Real token ids of a row -> (prompt as the data gave it, decoded answer); prompt_len: the prompt's
        number of tokens when known (then it must be exactly one of the stage's prompts)."""
        for n in ([prompt_len] if prompt_len is not None else self.lengths):
            prompt = self.prompts.get(tuple(ids[:n]))
            if prompt is not None:
                return prompt, self.tokenizer.decode(ids[n:], skip_special_tokens=True).strip()
        raise ValueError(f"reward {self.spec}: a rollout's prompt is none of the stage's prompts: "
                         f"{self.tokenizer.decode(ids)[:200]!r}")

    def score_ids(self, input_ids: torch.Tensor, mask: torch.Tensor, prompt_width: int | None = None) -> torch.Tensor:
        out = []
        for row, m in zip(input_ids.cpu(), mask.cpu().bool()):
            prompt_len = int(m[:prompt_width].sum()) if prompt_width is not None else None
            prompt, answer = self.split(row[m].tolist(), prompt_len)
            try:
                value = float(self.fn(prompt, answer))
            except Exception as e:  # noqa: BLE001 - whatever the plug-in raises stops the run, named
                raise RewardFunctionError(f"reward function {self.spec} raised {type(e).__name__}: {e}; "
                                          f"prompt {prompt!r}, answer {answer!r}") from e
            if not math.isfinite(value):
                raise RewardFunctionError(f"reward function {self.spec} returned {value} (not finite); "
                                          f"prompt {prompt!r}, answer {answer!r}")
            out.append(value)
        return torch.tensor(out, dtype=torch.float32, device=input_ids.device)


class WeightedRewards:
    """sum_i weight_i * source_i.score_ids(ids, mask): the reward PPO maximises (before ppo.reward.norm)."""

    def __init__(self, terms: Sequence[tuple[float, object]]):
        self.terms = list(terms)

    def score_ids(self, input_ids: torch.Tensor, mask: torch.Tensor, prompt_width: int | None = None) -> torch.Tensor:
        width = {} if prompt_width is None else {"prompt_width": prompt_width}
        return sum(w * source.score_ids(input_ids, mask, **width).float() for w, source in self.terms)

    def describe(self, names: Sequence[str]) -> str:
        return " + ".join(f"{w:g} x {n}" for (w, _), n in zip(self.terms, names))


def reward_source(terms: Sequence[RewardTerm], rm_scorer, tokenizer, prompts: Sequence,
                  prompt_ids: Sequence[Sequence[int]]):
    """The object PPO scores rollouts with: the RM scorer itself when ppo.reward.terms is just `rm` (weight 1), else
    the weighted sum of its terms. `prompts`/`prompt_ids`: every prompt the stage may roll out on."""
    if not uses_functions(terms):
        return rm_scorer
    return WeightedRewards([(t.weight, rm_scorer if t.source == RM else
                             FunctionReward(t.source, tokenizer, prompts, prompt_ids)) for t in terms])
