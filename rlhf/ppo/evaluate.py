"""The policy against the SFT model on held-out prompts, on the roles' one model: eval's judging path
(rlhf/eval/judging.py) with the policy adapter on, and with the role adapters off (SFT). Used at the end of
the PPO stage (`compare_with_sft`) and by the held-out monitor (`judged_answers`)."""

from __future__ import annotations

import torch

from rlhf.eval.judging import Answers, answer, judgements, prompt_text, summarize
from rlhf.generation import SamplingSpec, encode_prompt
from rlhf.models import active_adapter, sft_only
from rlhf.ppo.roles import POLICY, Roles


def views(roles: Roles) -> dict:
    """name -> a context manager factory that puts the roles' model in that role and yields it: the policy, the SFT
    model (also the KL's reference)."""
    return {"policy": lambda: active_adapter(roles.model, POLICY), "sft": lambda: sft_only(roles.model)}


@torch.no_grad()
def judged_answers(roles: Roles, tokenizer, prompt_ids: list[list[int]], spec: SamplingSpec, batch_size: int,
                   seed: int, view: str = "policy", prompts: list | None = None, judge=None) -> tuple[Answers, dict]:
    """(answers, judgements) of the roles' model as `view` (policy or sft), with the same seed for every view.
    The SFT model's own answers get no KL (it is 0 by definition: two forward passes saved)."""
    policy = view == "policy"
    with views(roles)[view]():
        a = answer(roles.model, tokenizer, prompt_ids, spec, batch_size, seed, with_logprob=policy)
    return a, judgements(a, roles.scorer, views(roles)["sft"] if policy else None, prompts, judge, batch_size)


def compare_with_sft(roles: Roles, tokenizer, prompts: list, spec: SamplingSpec, batch_size: int, judge=None,
                     seed: int = 1234, n_samples: int = 8) -> dict:
    """Sample once per prompt from the policy and from the SFT model (same seed), and compare them:
    `eval/<score>_policy`, `eval/<score>_sft` and `eval/<score>_win_rate` with its interval (reward; gold with
    a judge), `eval/kl` (the policy's samples), `eval/length_*`, and the first `n_samples` answers."""
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    answers, scores = {}, {}
    for name in ("policy", "sft"):
        answers[name], scores[name] = judged_answers(roles, tokenizer, ids, spec, batch_size, seed, name, prompts,
                                                     judge)
    summary = summarize(scores, baseline="sft")
    pol, sft = summary["policy"], summary["sft"]
    out = {"eval/n_prompts": len(prompts), "eval/reward_policy": pol["reward_mean"], "eval/reward_sft": sft["reward_mean"],
           **win_rate_entries("reward", pol), "eval/kl": pol["kl_mean"],
           "eval/length_policy": pol["length_mean"], "eval/length_sft": sft["length_mean"]}
    if judge is not None:
        out |= {"eval/gold_policy": pol["gold_mean"], "eval/gold_sft": sft["gold_mean"], **win_rate_entries("gold", pol)}
    out["samples"] = [{"prompt": prompt_text(p), "policy": a, "sft": b}
                      for p, a, b in list(zip(prompts, answers["policy"].texts, answers["sft"].texts))[:n_samples]]
    return out


def win_rate_entries(name: str, row: dict) -> dict:
    """eval/<name>_win_rate (ties half) with its 95 % paired-bootstrap interval, from a `summarize` row."""
    return {f"eval/{name}_win_rate{end}": row[f"{name}_win_rate{end}"] for end in ("", "_low", "_high")}
