"""Over-optimisation guards on hand-made inputs: the degeneration measures (token lists), the KL budget,
the degeneration stop, the kept policy, the best-snapshot files and the report's flags."""

import math

import pytest
import torch

from rlhf.eval import degeneration as dg
from rlhf.eval.flags import flags
from rlhf.ppo.guards import Guards, GuardSpec, prune_best
from rlhf.ppo.monitor import preserved_rng

# "X , X , X ." as token ids: X = 7, "," = 1, "." = 2; EOS = 0
COLLAPSED = [7, 1, 7, 1, 7, 2, 0]
LIST = [3, 1, 4, 1, 5, 2, 0]           # "a , b , c ." + EOS


def test_repeated_ngram_fraction_by_hand():
    assert dg.repeated_ngram_fraction(LIST, 1) == pytest.approx(1 - 6 / 7)   # one comma repeats
    assert dg.repeated_ngram_fraction(COLLAPSED, 1) == pytest.approx(1 - 4 / 7)
    assert dg.repeated_ngram_fraction(COLLAPSED, 2) == pytest.approx(1 - 4 / 6)  # (7,1) and (1,7) twice
    assert dg.repeated_ngram_fraction(LIST, 2) == 0.0
    assert dg.repeated_ngram_fraction([], 1) == 0.0 and dg.repeated_ngram_fraction([5], 2) == 0.0
    assert dg.repeated_ngram_fraction("the the the".split(), 1) == pytest.approx(2 / 3)  # works on words too


def test_repeated_transitions_by_hand():
    assert dg.repeated_transitions(LIST) == 0.0                          # a healthy list, however long
    assert dg.repeated_transitions(LIST[:-2] + [1, 6, 1, 8, 2, 0]) == 0.0
    assert dg.repeated_transitions(COLLAPSED) == pytest.approx(2 / 6)    # (X ,) and (, X) come back
    assert dg.repeated_transitions("happy birthday Bob Bob !".split()) == pytest.approx(1 / 4)  # doubled word
    assert dg.repeated_transitions([4, 4, 4]) == 1.0
    assert dg.repeated_transitions([4]) == 0.0 and dg.repeated_transitions([]) == 0.0


def test_top_token_share_and_dominated():
    assert dg.top_token_share([9, 9, 9, 1]) == 0.75 and dg.top_token_share([]) == 0.0
    assert dg.answer_stats([9, 9, 9, 1])["dominated"] == 1.0
    assert dg.answer_stats([9, 9, 1, 2])["dominated"] == 0.0   # exactly half is not more than half
    assert dg.answer_stats([9, 9, 9])["dominated"] == 0.0      # too short to say
    assert dg.answer_stats(COLLAPSED) == {"length": 7.0, "distinct": 4.0, "repeat": pytest.approx(2 / 6),
                                          "dominated": 0.0}


def test_summary_and_distinct_answers():
    s = dg.summary([COLLAPSED, COLLAPSED, LIST, [9, 9, 9, 9]])
    assert s["distinct_answers"] == 0.75
    assert s["length"] == pytest.approx((7 + 7 + 7 + 4) / 4)
    assert s["dominated"] == 0.25
    assert s["repeat"] == pytest.approx((2 / 6 + 2 / 6 + 0 + 3 / 3) / 4)
    assert dg.per_answer([LIST, [9, 9, 9, 9]])["dominated"] == [0.0, 1.0]
    assert dg.summary([])["distinct_answers"] == 0.0


def test_response_tokens_keeps_real_response_tokens_only():
    ids = torch.tensor([[0, 5, 6, 7, 8, 0], [5, 5, 9, 0, 0, 0]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    assert dg.response_tokens(ids, mask, 2) == [[6, 7, 8], [9, 0]]


def spec(**kw):
    return GuardSpec(**({"kl_budget": 6.0, "patience": 3, "degeneration_margin": 0.1, "keep_best": "none"} | kw))


def test_kl_budget_stops_after_patience_consecutive_steps_only():
    g = Guards(spec())
    for step, kl in enumerate([7, 7, 5, 7, 7], start=1):   # the streak restarts below the budget
        assert g.after_step(step, kl) is None
    assert g.after_step(6, 6.5) is not None and g.stop_step == 6 and "6 nats" in g.stop_reason
    off = Guards(spec(kl_budget=None))
    assert all(off.after_step(s, 100.0) is None for s in range(1, 10))


def test_degeneration_stop_is_relative_to_the_sft_policy_at_step_0():
    g = Guards(spec(patience=2))
    g.after_monitor(0, 0.0, greedy_repeat=0.30, kl_ok=True)        # SFT: commas repeat
    g.after_monitor(10, 0.5, greedy_repeat=0.39, kl_ok=True)       # within 0.1 of SFT
    assert g.stop_reason is None and g.degeneration_streak == 0
    g.after_monitor(20, 0.9, greedy_repeat=0.45, kl_ok=True)
    assert g.stop_reason is None and g.degeneration_streak == 1
    g.after_monitor(30, 1.0, greedy_repeat=0.50, kl_ok=True)
    assert g.stop_step == 30 and "repetitive" in g.stop_reason
    assert Guards(spec(degeneration_margin=None)).after_monitor(0, 0, 0.9, True) is False


@pytest.mark.parametrize("keep, expected", [("none", 40), ("monitor_reward", 30), ("monitor_reward_guarded", 10)])
def test_kept_policy_by_criterion(keep, expected):
    g = Guards(spec(keep_best=keep, patience=5))
    points = [(0, 0.0, 0.30, True), (10, 0.5, 0.31, True), (20, 0.8, 0.31, False),  # 20: over the KL budget
              (30, 0.9, 0.60, True)]                                              # 30: degenerate
    saved = [step for step, *args in points if g.after_monitor(step, *args)]
    step, why = g.kept(last_step=40)
    assert step == expected and (keep in why or keep == "none")
    if keep == "monitor_reward":
        assert saved == [0, 10, 20, 30]
    if keep == "monitor_reward_guarded":
        assert saved == [0, 10]


def test_sft_is_kept_when_no_later_point_beats_it():
    g = Guards(spec(keep_best="monitor_reward_guarded"))
    g.after_monitor(0, 0.2, 0.3, True)
    g.after_monitor(10, 0.1, 0.3, True)
    assert g.kept(10)[0] == 0


def test_kept_says_which_step_and_why_in_one_line():
    """SFT when no later point is within the guards (no improvement, said so); the last policy, unguarded, without a
    monitor; the default is the guarded choice."""
    from rlhf.config import PPOStageConfig
    assert PPOStageConfig().guards.keep_best == "monitor_reward_guarded"
    g = Guards(spec(keep_best="monitor_reward_guarded", patience=2))
    for step, repeat in ((0, 0.1), (10, 0.3), (20, 0.4)):  # every point after SFT degenerate: a stop at 20
        g.after_monitor(step, step / 10, repeat, kl_ok=True)
    step, why = g.kept(20)
    assert step == 0 and g.guarded_points == 0 and "\n" not in why
    assert why.startswith("stopped early at step 20: greedy answers more repetitive") and "raise ppo.kl.coef" in why
    assert "kept SFT (step 0), no improvement: no monitor point after step 0 passed the guards" in why
    blind = Guards(spec(keep_best="monitor_reward_guarded"))
    blind.after_step(1, 0.5)
    assert blind.kept(5) == (5, "kept the last policy (step 5), unguarded: no held-out monitor to choose among "
                                "(ppo.monitor.every, ppo.monitor.prompts, ppo.eval_prompts_file)")


def test_a_warned_reward_model_is_optimised_only_under_the_guards(tmp_path):
    """rm/diagnostics.json's warnings: printed before PPO under the guarded choice (the default); an unguarded
    choice stops before PPO with one line naming the keys, unless ppo.guards.accept_rm_warnings."""
    import json
    from rlhf.config import ConfigError
    from rlhf.checks import rm_warnings_gate
    from rlhf.runs import rm_warnings
    assert rm_warnings(tmp_path) == [] and rm_warnings_gate([], "none", False, False) is None
    (tmp_path / "diagnostics.json").write_text(json.dumps({"warnings": ["the RM prefers a 'repeat' damaged answer",
                                                                        "another"]}))
    warned = rm_warnings(tmp_path)
    line = rm_warnings_gate(warned, "monitor_reward_guarded", True, False)
    assert line.startswith("the reward model's stage warned: the RM prefers a 'repeat' damaged answer (and 1 more)")
    assert "within the guards, or SFT" in line
    assert "set ppo.monitor.every > 0" in rm_warnings_gate(warned, "monitor_reward_guarded", False, False)
    with pytest.raises(ConfigError) as info:
        rm_warnings_gate(warned, "none", True, False)
    assert "ppo.guards.keep_best=none" in str(info.value) and "ppo.guards.accept_rm_warnings=true" in str(info.value)
    assert "\n" not in str(info.value)
    assert "unguarded" in rm_warnings_gate(warned, "monitor_reward", True, True)


def test_guard_state_round_trips_through_json():
    import json
    g = Guards(spec(keep_best="monitor_reward"))
    g.after_step(1, 9.0)
    g.after_monitor(0, 0.4, 0.2, True)
    h = Guards(spec(keep_best="monitor_reward"))
    h.load_state_dict(json.loads(json.dumps(g.state_dict())))
    assert h.state_dict() == g.state_dict() and h.best_score == 0.4
    fresh = Guards(spec())
    fresh.load_state_dict(json.loads(json.dumps(Guards(spec()).state_dict())))
    assert fresh.best_score == -math.inf


def test_prune_best_keeps_the_kept_step_and_drops_a_killed_runs_future(tmp_path):
    (tmp_path / "best").mkdir()
    for s in (0, 10, 20, 30):
        (tmp_path / "best" / f"step-{s}.safetensors").write_text("x")
    prune_best(tmp_path, keep_step=10, upto=20)
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == ["step-10.safetensors", "step-20.safetensors"]
    prune_best(tmp_path / "nothing", None)  # no folder: nothing to do


def test_preserved_rng_leaves_the_global_generators_as_they_were():
    import random
    torch.manual_seed(3)
    random.seed(3)
    with preserved_rng():
        torch.manual_seed(99)
        torch.rand(5)
        random.random()
    a, b = torch.rand(3), random.random()
    torch.manual_seed(3)
    random.seed(3)
    assert torch.equal(a, torch.rand(3)) and b == random.random()


def row(gold=None, reward=None, repeat=0.2, dominated=0.0):
    r = {"repeat_mean": repeat, "dominated_mean": dominated, "length_mean": 8.0}
    for key, v in (("gold", gold), ("reward", reward)):
        if v is not None:
            r |= {f"{key}_win_rate": v[0], f"{key}_win_rate_low": v[1], f"{key}_win_rate_high": v[2]}
    return r


def test_flags_worse_than_baseline_and_degenerate_greedy_answers():
    m = {"baseline": "sft", "results": {
        "sample": {"sft": row(), "ppo": row(gold=(0.39, 0.35, 0.43), reward=(0.7, 0.65, 0.75))},
        "greedy": {"sft": row(repeat=0.2), "ppo": row(gold=(0.45, 0.40, 0.51), repeat=0.45, dominated=0.3)}}}
    out = flags(m)
    assert len(out) == 2
    assert "ppo" in out[0] and "worse than **sft** by the gold judge" in out[0] and "0.390" in out[0]
    assert "greedy answers degenerate" in out[1] and "0.450" in out[1]
    healthy = {"baseline": "sft", "results": {"greedy": {"sft": row(), "ppo": row(gold=(0.6, 0.55, 0.65))}}}
    assert flags(healthy) == []
    old = {"baseline": "sft", "results": {"greedy": {"sft": {"length_mean": 1.0}, "ppo": {"length_mean": 2.0}}}}
    assert flags(old) == []  # a metrics.json from before the degeneration measures
    starting_point = {"baseline": "sft", "checkpoints": [{"name": "base", "kind": "base"}, {"name": "sft", "kind": "sft"}],
                      "results": {"greedy": {"sft": row(), "base": row(gold=(0.03, 0.01, 0.06), repeat=0.5)}}}
    assert flags(starting_point) == []  # the untrained base is worse than SFT by design: nothing to act on
    starting_point["checkpoints"][0]["kind"] = "model"  # a full model named "base" is judged like any other
    assert len(flags(starting_point)) == 2
