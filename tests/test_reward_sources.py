"""ppo.reward.terms: reward functions checked before anything loads, scored on rollout rows, weighted with the RM."""

import math

import pytest
import torch

from rlhf import data as rdata
from rlhf.chat import answer_ids, encode_prompt
from rlhf.config import ConfigError, RewardTerm, load_config
from rlhf.demo.task import gold_score
from rlhf.sequences import left_pad
from rlhf.models import load_tokenizer
from rlhf.reward_sources import FunctionReward, RewardFunctionError, reward_source
from tests.conftest import DEMO_CONFIG, run_stage


def raises(prompt, response):
    raise KeyError("no such item")


def not_finite(prompt, response):
    return float("nan")


def three_args(prompt, response, reference):
    return 0.0


def length(prompt, response):
    return float(len(response.split()))


HERE = "tests.test_reward_sources"


@pytest.mark.parametrize("terms,message", [
    ([], "ppo.reward.terms is empty"),
    ([RewardTerm(), RewardTerm()], "each source may appear once"),
    ([RewardTerm(weight=0.0)], r"ppo.reward.terms\[0\].weight must be a finite non-zero number"),
    ([RewardTerm(weight=math.inf)], "finite non-zero"),
    ([RewardTerm(), RewardTerm(f"{HERE}:nope")], r"ppo.reward.terms\[1\].source: plug-in .* cannot be loaded"),
    ([RewardTerm("no_module_here:f")], "cannot be loaded"),
    ([RewardTerm("gold_score")], "must look like 'package.module:function'"),
    ([RewardTerm(f"{HERE}:HERE")], "is not callable"),
    ([RewardTerm(f"{HERE}:three_args")], r"cannot be called as f\(prompt, response\)"),
])
def test_bad_reward_terms_are_named(terms, message, tmp_path):
    """The terms' shape (rlhf.checks) and each function's import (preflight), both before anything loads."""
    with pytest.raises(ConfigError, match=message):
        check_rewards(terms, tmp_path)


def check_rewards(terms, run_dir) -> None:
    from rlhf.checks import check_ppo
    from rlhf.config import PipelineConfig
    from rlhf.plugins import reward_function

    cfg = PipelineConfig(run_dir=str(run_dir))
    cfg.ppo.reward.terms = terms
    check_ppo(cfg)
    for i, t in enumerate(terms):
        if t.source != "rm":
            reward_function(t.source, f"ppo.reward.terms[{i}].source")


def test_good_reward_terms_pass(tmp_path):
    check_rewards([RewardTerm()], tmp_path)
    check_rewards([RewardTerm("rlhf.demo.task:gold_score", 10.0), RewardTerm("rm", 0.5)], tmp_path)


def test_the_stage_refuses_a_bad_plugin_in_one_line_before_loading_anything(tmp_path):
    proc = run_stage("ppo", f"run_dir={tmp_path}", f'reward.terms=[{{source: "{HERE}:three_args"}}]', check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ppo.reward.terms[0].source: tests.test_reward_sources:three_args cannot be called")
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "ppo").exists()


@pytest.fixture(scope="module")
def rollout(demo_dir):
    """Rollout-shaped rows (left-padded prompt ids + answer ids through the end of turn) for demo prompts."""
    tokenizer = load_tokenizer(str(demo_dir / "base"))
    pairs = rdata.load_preferences(str(demo_dir / "rm_pairs_eval.jsonl"))[:6]
    prompts = [p.prompt for p in pairs]
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    answers = [p.chosen for p in pairs[:3]] + [p.rejected for p in pairs[3:]]
    ids, mask = left_pad([q + answer_ids(tokenizer, p, a, q) for p, q, a in zip(prompts, prompt_ids, answers)],
                         tokenizer.pad_token_id)
    return tokenizer, prompts, prompt_ids, answers, ids, mask


def test_a_function_scores_rollout_rows_as_it_scores_prompt_and_answer(rollout):
    tokenizer, prompts, prompt_ids, answers, ids, mask = rollout
    source = FunctionReward("rlhf.demo.task:gold_score", tokenizer, prompts, prompt_ids)
    expected = torch.tensor([gold_score(p, a) for p, a in zip(prompts, answers)])
    torch.testing.assert_close(source.score_ids(ids, mask), expected)
    assert len(set(expected.tolist())) > 1  # the rows differ: not one constant


def test_a_function_that_raises_or_returns_nan_stops_naming_prompt_and_answer(rollout):
    tokenizer, prompts, prompt_ids, answers, ids, mask = rollout
    with pytest.raises(RewardFunctionError, match=r"raised KeyError: 'no such item'; prompt .*, answer '"):
        FunctionReward(f"{HERE}:raises", tokenizer, prompts, prompt_ids).score_ids(ids, mask)
    with pytest.raises(RewardFunctionError) as e:
        FunctionReward(f"{HERE}:not_finite", tokenizer, prompts, prompt_ids).score_ids(ids, mask)
    assert str(e.value) == (f"reward function {HERE}:not_finite returned nan (not finite); "
                            f"prompt {prompts[0]!r}, answer {answers[0]!r}")


def prompt_and_answer(prompt, response):
    return 100.0 * len(prompt) + len(response)


class Digits:
    """decode: the ids as space-separated numbers."""

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


def test_a_function_gets_the_rollout_prompt_even_when_another_prompt_extends_it():
    """Prompt "short" is [5, 6], prompt "longer" [5, 6, 7]: a rollout row [pad, 5, 6 | 7, 8] answered "short"
    with "7 8", though its ids also start with "longer"'s; the rollout's prompt width says where answers start."""
    source = FunctionReward(f"{HERE}:prompt_and_answer", Digits(), ["short", "longer"], [[5, 6], [5, 6, 7]])
    ids = torch.tensor([[0, 5, 6, 7, 8], [5, 6, 7, 9, 0]])
    mask = torch.tensor([[False, True, True, True, True], [True, True, True, True, False]])
    assert source.score_ids(ids, mask, prompt_width=3).tolist() == [503.0, 601.0]
    both = reward_source([RewardTerm(f"{HERE}:prompt_and_answer", 2.0)], None, Digits(), ["short", "longer"],
                         [[5, 6], [5, 6, 7]])
    assert both.score_ids(ids, mask, prompt_width=3).tolist() == [1006.0, 1202.0]
    # the monitor and the end-of-run comparison score the same way
    from rlhf.eval.judging import Answers, judgements
    answers = Answers(texts=["7 8", "9"], ids=ids, mask=mask, width=3, comparable=True)
    assert judgements(answers, source, None, ["short", "longer"], None, 8)["reward"] == [503.0, 601.0]


class FixedRM:
    def score_ids(self, input_ids, mask):
        return torch.arange(len(input_ids), dtype=torch.float32)


def test_weighted_sum_of_the_rm_and_a_function(rollout):
    tokenizer, prompts, prompt_ids, answers, ids, mask = rollout
    rm = FixedRM()
    assert reward_source([RewardTerm()], rm, tokenizer, prompts, prompt_ids) is rm  # the default: the RM alone
    both = reward_source([RewardTerm("rm", 0.5), RewardTerm(f"{HERE}:length", 2.0)], rm, tokenizer, prompts, prompt_ids)
    expected = 0.5 * torch.arange(len(ids)) + 2.0 * torch.tensor([float(len(a.split())) for a in answers])
    torch.testing.assert_close(both.score_ids(ids, mask), expected)
    assert both.describe(["rm", "length"]) == "0.5 x rm + 2 x length"


def test_rewards_from_yaml_and_the_command_line():
    cfg = load_config(DEMO_CONFIG, ['reward.terms=[{source: rm, weight: 1}, {source: "rlhf.demo.task:gold_score", weight: 5}]'],
                      stage="ppo")
    assert cfg.ppo.reward.terms == [RewardTerm("rm", 1.0), RewardTerm("rlhf.demo.task:gold_score", 5.0)]
