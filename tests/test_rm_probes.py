"""Reward-hacking probes and best-checkpoint selection on hand-made strings and numbers."""

import random

import pytest
import torch

from rlhf.rm import diagnostics as d
from rlhf.rm import probes as p
from rlhf.data import PreferencePair


def test_repeat_span_says_a_span_twice_in_a_row():
    assert p.repeat_span("apple", random.Random(0)) == "apple apple"
    assert p.repeat_span("", random.Random(0)) == ""
    text = "apple, pear, plum, fig, kiwi, lime."
    for seed in range(20):
        out = p.repeat_span(text, random.Random(seed)).split()
        assert len(out) > 6
        k = len(out) - 6
        start = next(i for i in range(7) if out[:i] + out[i + k:] == text.split())  # the copy sits right after
        assert out[start:start + k] == out[start - k:start] or out[start:start + k] == out[start + k:start + 2 * k]
    assert p.repeat_span(text, random.Random(3)) == p.repeat_span(text, random.Random(3))  # seeded


def test_truncate_empty_shuffle():
    assert p.truncate("apple, pear, plum, fig.") == "apple, pear,"
    assert p.truncate("a b c") == "a"
    assert p.truncate("watermelon") == "water"
    assert p.empty("anything") == ""
    out = p.shuffle_words("one two three four", random.Random(0))
    assert out != "one two three four" and sorted(out.split()) == ["four", "one", "three", "two"]
    assert p.shuffle_words("same same", random.Random(0)) == "same same"  # no other order: unchanged
    assert p.shuffle_words("a\nb c", random.Random(1)) == p.shuffle_words("a\nb c", random.Random(1))


def test_other_answers_come_from_other_prompts():
    prompts, answers = ["p1", "p1", "p2", "p3"], ["a", "b", "c", "d"]
    for seed in range(10):
        out = p.other_answers(prompts, answers, random.Random(seed))
        assert all(o is not None and prompts[answers.index(o)] != prompts[i] for i, o in enumerate(out))
    assert p.other_answers(["p"], ["a"], random.Random(0)) == [None]
    assert p.other_answers(["p", "q"], ["a", "a"], random.Random(0)) == [None, None]  # same text: no damage


def test_damage_leaves_out_what_it_cannot_damage():
    out = p.damage(["p1", "p2"], ["x", "one two"], seed=0)
    assert set(out) == set(p.PROBES)
    assert out["shuffle"][0] is None and out["shuffle"][1] == "two one"
    assert out["empty"] == ["", ""] and out["other_prompt"] == ["one two", "x"]
    assert p.damage(["p1", "p2"], ["x", "one two"], seed=0) == out


def test_intact_answers_are_distinct_chosen_answers():
    pairs = [PreferencePair(prompt, chosen, "r", None, 0, "x") for prompt, chosen in
             (("p1", "a"), ("p1", "a"), ("p2", "d"), ("p3", " "))]
    assert p.intact_answers(pairs, 0, 0) == (["p1", "p2"], ["a", "d"])
    assert len(p.intact_answers(pairs, 1, 0)[0]) == 1


def test_damaged_wins_and_warnings():
    row = d.damaged_wins(torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([2.0, 0.0, 1.0, -1.0]))
    assert row == {"n": 4, "win_rate": pytest.approx((1 + 0 + 0.5 + 0) / 4), "margin_mean": pytest.approx((1 - 1 + 0 - 2) / 4)}
    probes = {"repeat": {"n": 10, "win_rate": 0.4, "margin_mean": 0.1}, "empty": {"n": 10, "win_rate": 0.0, "margin_mean": -3}}
    warnings = d.weak_rm_warnings(0.6, probes, min_accuracy=0.65, max_win_rate=0.25)
    assert len(warnings) == 2 and "0.600 is below" in warnings[0] and "'repeat'" in warnings[1] and "40%" in warnings[1]
    assert d.weak_rm_warnings(0.9, probes, 0.65, 0.5) == []
    assert "rm.probes.train_share" in warnings[1] and "rm.probes.no_warning" in warnings[1]
    near = d.weak_rm_warnings(0.9, {"repeat": {"n": 200, "win_rate": 0.235, "margin_mean": -0.2}}, 0.65, 0.25)
    assert len(near) == 1 and "23.5% of 200 held-out answers, near rm.probes.warn_win_rate=0.25" in near[0]
    assert "rm.probes.train_share" in near[0] and "\n" not in near[0]



def test_probe_table_is_scored_by_the_scorer_ppo_uses(demo_dir):
    """run_probes through a RewardScorer (the demo base, a fresh "reward" adapter, a random head) on held-out
    pairs: one row per probe, each the share of damaged answers the scorer ranks above the intact ones."""
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    from rlhf.data import load_preferences
    from rlhf.models import load_tokenizer
    from rlhf.rm.scoring import RewardScorer

    tokenizer = load_tokenizer(str(demo_dir / "base"))
    base = AutoModelForCausalLM.from_pretrained(str(demo_dir / "base"))
    model = PeftModel(base, LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="reward")
    torch.manual_seed(0)
    scorer = RewardScorer(model, torch.nn.Linear(base.config.hidden_size, 1, bias=False), tokenizer)
    prompts, answers = p.intact_answers(load_preferences(str(demo_dir / "rm_pairs_eval.jsonl")), 12, seed=0)
    table = p.run_probes(scorer, prompts, answers, seed=0)
    assert set(table) == set(p.PROBES) and table["empty"]["n"] == 12
    damaged = p.damage(prompts, answers, seed=0)["truncate"]
    rows = [i for i, a in enumerate(damaged) if a is not None]
    intact = scorer.score(prompts, answers)[rows]
    cut = scorer.score([prompts[i] for i in rows], [damaged[i] for i in rows])
    assert table["truncate"] == d.damaged_wins(intact, cut)


def test_probe_pairs_prefer_the_intact_training_answer_to_each_damaged_copy():
    """rm.probes.train_share: a share of the training split's distinct answers, damaged by every probe not skipped,
    each (intact, damaged) a pair of its own group numbered after the data's; 0: none."""
    pairs = [PreferencePair(f"p{i}", f"alpha beta gamma delta {i}", "r", None, i // 2, "x") for i in range(8)]
    assert p.training_pairs(pairs, 0.0, seed=0) == []
    extra = p.training_pairs(pairs, 0.5, seed=0, skip=["shuffle"])
    kinds = [e.source for e in extra]
    assert sorted(set(kinds)) == ["probe:empty", "probe:other_prompt", "probe:repeat", "probe:truncate"]
    assert all(kinds.count(k) == 4 for k in set(kinds))  # 4 of the 8 distinct answers, each kind once
    intact = {(e.prompt, e.chosen) for e in extra}
    assert len(intact) == 4 and intact <= {(q.prompt, q.chosen) for q in pairs}
    assert all(e.rejected != e.chosen and e.margin is None for e in extra)
    assert [e.group for e in extra] == list(range(4, 4 + len(extra)))  # the data's groups are 0-3
    assert p.training_pairs(pairs, 0.5, seed=0, skip=["shuffle"]) == extra  # seeded


def test_the_checks_know_every_probe():
    """rm.probes.no_warning is checked against rlhf.checks' list, torch-free: it names the probes that run."""
    from rlhf import checks
    from rlhf.rm import probes

    assert checks.PROBES == probes.PROBES
