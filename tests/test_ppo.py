"""Stage 3 end to end on the demo: alignment works, outputs reload, a killed run resumes to the same result."""

import json
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from checks import export_and_adapter_generations
from conftest import PPO_RUN_STEPS, ROOT, kill_stage_once_written, run_stage
from rlhf.config import LoraSpec, ModelConfig
from rlhf.data import load_prompts
from rlhf.generation import SamplingSpec, generate_texts
from rlhf.models import active_adapter, load_sft_model, load_tokenizer
from rlhf.ppo.roles import POLICY, build_roles, load_adapter_state
from rlhf.runs import read_metrics

pytestmark = pytest.mark.slow


@pytest.mark.xdist_group("chain")
@pytest.mark.early(0)  # it needs the whole chain: the process that starts it builds SFT, RM and PPO first
def test_ppo_raises_rm_and_gold_scores_at_a_small_kl(ppo_run):
    out = ppo_run / "ppo"
    for name in ("policy/adapter_model.safetensors", "value/adapter_model.safetensors", "value/value_head.safetensors",
                 "tokenizer.json", "config.yaml", "metrics.jsonl", "eval.json", "DONE"):
        assert (out / name).is_file(), name
    assert any((out / "tb").glob("events.out.tfevents.*"))
    e = json.loads((out / "eval.json").read_text())
    print({k: round(v, 3) for k, v in e.items() if k.startswith("eval/")})
    assert e["eval/reward_policy"] > e["eval/reward_sft"] and e["eval/reward_win_rate"] > 0.6
    assert e["eval/gold_policy"] > e["eval/gold_sft"] + 0.03  # the gold judge agrees, not only the RM
    assert 0 < e["eval/kl"] < 5
    monitor = read_metrics(out / "metrics.jsonl")
    rows = [r for r in monitor if "ppo/kl" in r]
    assert [r["step"] for r in rows] == list(range(1, PPO_RUN_STEPS + 1))
    # the held-out monitor at step 0 (SFT) and every 10 steps; the demo never reaches a guard
    assert [r["step"] for r in monitor if "monitor/greedy/repeat" in r] == list(range(0, PPO_RUN_STEPS + 1, 10))
    done = json.loads((out / "DONE").read_text())
    assert not done["stopped_early"] and done["kept_step"] == PPO_RUN_STEPS and done["steps_run"] == PPO_RUN_STEPS
    first, last = rows[:PPO_RUN_STEPS // 2], rows[PPO_RUN_STEPS // 2:]
    assert sum(r["ppo/score"] for r in last) > sum(r["ppo/score"] for r in first)
    assert all(abs(r["ppo/kl"]) < 5 for r in rows) and rows[0]["ppo/kl"] == 0.0
    assert all(r["ppo/optimizer_steps"] == 16 for r in rows)
    for key in ("ppo/entropy", "ppo/clipfrac", "ppo/approx_kl", "ppo/policy_loss", "ppo/value_loss",
                "ppo/explained_variance", "ppo/non_score_reward", "ppo/response_length", "time/generate",
                "time/score", "time/train"):
        assert key in rows[-1], key


def test_saved_policy_reloads_with_the_same_greedy_generations(ppo_run, demo_dir):
    """The PEFT export in ppo/policy/ and the last checkpoint's state generate the same tokens."""
    tok = load_tokenizer(str(ppo_run / "sft"))
    cfg = ModelConfig(name_or_path=str(demo_dir / "base"))
    prompts = [p.prompt for p in load_prompts(str(demo_dir / "prompts_eval.jsonl"))[:32]]
    greedy = SamplingSpec(max_new_tokens=12, do_sample=False)

    exported = PeftModel.from_pretrained(load_sft_model(cfg, ppo_run / "sft", tok), str(ppo_run / "ppo" / "policy"))
    roles = build_roles(load_sft_model(cfg, ppo_run / "sft", tok), ppo_run / "rm", tok, LoraSpec(), True)
    load_adapter_state(roles, load_file(str(ppo_run / "ppo" / "checkpoints" / f"checkpoint-{PPO_RUN_STEPS}" / "adapters.safetensors")))
    with active_adapter(roles.model, POLICY):
        from_checkpoint = generate_texts(roles.model, tok, prompts, greedy)
    assert generate_texts(exported, tok, prompts, greedy) == from_checkpoint
    sft_only = generate_texts(load_sft_model(cfg, ppo_run / "sft", tok), tok, prompts, greedy)
    assert sft_only != from_checkpoint  # PPO changed something


SMALL = ("ppo.steps=4 ppo.sampling.rollout_batch_size=16 ppo.update.num_minibatches=2 ppo.update.epochs=2 ppo.checkpoint.every=1 "
         "ppo.reward.norm_samples=16 ppo.eval_prompts_file=null ppo.kl.adaptive=true")


def test_killed_ppo_resumes_to_the_same_result(rm_run, tmp_path):
    """Kill the PPO stage (SIGKILL) after its 2nd checkpoint; the rerun resumes and ends with exactly the
    adapters, KL controller and metrics of a run that was never interrupted (adapters, optimizer, scheduler,
    RNG, step)."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    for run in (straight, killed):
        for stage in ("sft", "rm"):
            shutil.copytree(rm_run / stage, run / stage)
    run_stage("ppo", f"run_dir={straight}", *SMALL.split())  # the reference: the same stage, never interrupted

    kill_stage_once_written("ppo", [f"run_dir={killed}", *SMALL.split()],
                            killed / "ppo" / "checkpoints" / "checkpoint-2" / "state.json")
    assert not (killed / "ppo" / "DONE").exists()

    again = run_stage("ppo", f"run_dir={killed}", *SMALL.split())
    assert "[ppo] resuming from" in again.stdout
    a = load_file(str(straight / "ppo" / "policy" / "adapter_model.safetensors"))
    b = load_file(str(killed / "ppo" / "policy" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    ma, mb = read_metrics(straight / "ppo" / "metrics.jsonl"), read_metrics(killed / "ppo" / "metrics.jsonl")
    assert [r["step"] for r in mb] == [1, 2, 3, 4]
    for ra, rb in zip(ma, mb):
        for key in ("ppo/score", "ppo/kl", "ppo/kl_coef", "ppo/policy_loss", "ppo/lr"):
            assert ra[key] == pytest.approx(rb[key], abs=1e-5), (ra["step"], key)


def test_ppo_needs_finished_sft_and_rm(tmp_path):
    proc = run_stage("ppo", f"run_dir={tmp_path}", check=False)
    assert proc.returncode == 2 and "no finished sft stage" in proc.stderr


@pytest.mark.parametrize("stage", ["ppo", "sft"])
def test_export_round_trip_plain_transformers_generates_the_same_tokens(ppo_run, demo_dir, tmp_path, stage):
    """`make export`: the merged model dir loads with plain transformers (no peft, no rlhf) and generates,
    greedily, exactly the tokens of the adapter model it came from."""
    out = tmp_path / f"export-{stage}"
    run_stage("export", f"run_dir={ppo_run}", f"stage={stage}", f"out_dir={out}")
    assert (out / "DONE").exists() and (out / "model.safetensors").exists()
    assert not any((out / n).exists() for n in ("adapter_config.json", "adapter_model.safetensors"))
    plain, ours = export_and_adapter_generations(ppo_run, str(demo_dir / "base"), out, stage,
                                                 demo_dir / "prompts_eval.jsonl", 32, 12)
    assert plain == ours


def test_the_gold_reward_config_trains_on_the_judge_s_scores(rm_run, tmp_path):
    """configs/demo-gold-reward.yaml (ppo.reward.terms: the gold judge, weight 1): the reward PPO logs and compares is
    the judge's score itself, rollouts and the end-of-run comparison alike."""
    run = tmp_path / "run"
    for stage in ("sft", "rm"):
        shutil.copytree(rm_run / stage, run / stage, ignore=shutil.ignore_patterns("checkpoints"))
    proc = run_stage("ppo", f"run_dir={run}", "ppo.steps=1", "ppo.sampling.rollout_batch_size=8", "ppo.update.num_minibatches=2",
                     "ppo.reward.norm_samples=16", "ppo.eval_samples=8", "ppo.monitor.every=0",
                     config=ROOT / "configs" / "demo-gold-reward.yaml")
    assert "[ppo] reward: 1 x rlhf.demo.task:gold_score" in proc.stdout
    result = json.loads((run / "ppo" / "eval.json").read_text())
    assert result["eval/reward_policy"] == pytest.approx(result["eval/gold_policy"], abs=1e-6)
    assert result["eval/reward_sft"] == pytest.approx(result["eval/gold_sft"], abs=1e-6)
    assert 0 < result["eval/gold_sft"] < 1  # some of SFT's answers are perfect, not all: a reward that varies


def test_guards_stop_on_the_kl_budget_and_keep_the_best_monitored_policy(rm_run, tmp_path):
    """A KL budget no policy can keep (k3 KL is > 0 once the policy moves) stops the run after guard_patience
    steps; the monitor ran at step 0 and every step; policy/ is the kept monitor point's, and DONE says why."""
    for stage in ("sft", "rm"):
        shutil.copytree(rm_run / stage, tmp_path / stage)
    run_stage("ppo", f"run_dir={tmp_path}", "ppo.steps=6", "ppo.sampling.rollout_batch_size=16", "ppo.update.num_minibatches=2",
              "ppo.reward.norm_samples=16", "ppo.eval_samples=8", "ppo.monitor.every=1", "ppo.monitor.prompts=8",
              "ppo.kl.estimator=k3", "ppo.guards.kl_budget=1e-9", "ppo.guards.patience=2",
              "ppo.guards.keep_best=monitor_reward_guarded")
    done = json.loads((tmp_path / "ppo" / "DONE").read_text())
    rows = read_metrics(tmp_path / "ppo" / "metrics.jsonl")
    # step 1 samples from the SFT policy itself (KL exactly 0): steps 2 and 3 exceed the budget
    assert done["stopped_early"] and done["steps_run"] == 3 and "ppo.guards.kl_budget" in done["kept_reason"]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert all("monitor/greedy/repeat" in r and "monitor/sample/kl" in r for r in rows)
    assert rows[0]["monitor/sample/kl"] == pytest.approx(0.0, abs=1e-5)  # step 0 is the SFT policy
    assert done["kept_step"] in (0, 1)  # the only points within the budget
    kept = load_file(str(tmp_path / "ppo" / "best" / f"step-{done['kept_step']}.safetensors"))
    saved = load_file(str(tmp_path / "ppo" / "policy" / "adapter_model.safetensors"))
    assert saved and all(torch.equal(value, kept[f"{POLICY}.{key}"]) for key, value in saved.items())


def pays_for_repeats(prompt, response):
    """A planted reward that pays for repeated words: PPO on it degenerates within a few steps."""
    from rlhf.eval.degeneration import repeated_transitions
    return repeated_transitions(response.split())


def test_the_default_never_ships_a_degenerated_policy(rm_run, tmp_path):
    """On a reward that pays for repeats the greedy answers degenerate and the degeneration stop fires; the shipped
    default (ppo.guards.keep_best as configs/demo.yaml and PPOStageConfig leave it) keeps a point within the guards or SFT
    (step 0: the policy adapter still at zero), never the degenerated last policy, and says so."""
    for stage in ("sft", "rm"):
        shutil.copytree(rm_run / stage, tmp_path / stage, ignore=shutil.ignore_patterns("checkpoints"))
    proc = run_stage("ppo", f"run_dir={tmp_path}", "ppo.steps=12", "ppo.sampling.rollout_batch_size=16",
                     "ppo.update.num_minibatches=2", "ppo.reward.norm_samples=16", "ppo.eval_samples=16",
                     "ppo.monitor.every=2", "ppo.monitor.prompts=16", "ppo.guards.patience=2", "ppo.kl.coef=0.01",
                     "ppo.update.lr=1e-3", 'ppo.reward.terms=[{source: "tests.test_ppo:pays_for_repeats", weight: 1}]')
    done = json.loads((tmp_path / "ppo" / "DONE").read_text())
    rows = {r["step"]: r for r in read_metrics(tmp_path / "ppo" / "metrics.jsonl") if "monitor/greedy/repeat" in r}
    repeat = {step: r["monitor/greedy/repeat"] for step, r in rows.items()}
    last = done["steps_run"]
    assert done["stopped_early"] and repeat[last] > repeat[0] + 0.1  # the planted collapse happened
    kept = done["kept_step"]
    assert kept != last and repeat[kept] <= repeat[0] + 0.1
    assert f"[ppo] stopped early at step {last}" in proc.stdout and done["kept_reason"] in proc.stdout
    saved = load_file(str(tmp_path / "ppo" / "policy" / "adapter_model.safetensors"))
    if kept == 0:  # SFT itself: every LoRA B of the policy adapter is still zero
        assert "kept SFT (step 0), no improvement" in done["kept_reason"]
        assert all(not v.any() for k, v in saved.items() if "lora_B" in k)
    snapshot = load_file(str(tmp_path / "ppo" / "best" / f"step-{kept}.safetensors"))
    assert all(torch.equal(value, snapshot[f"{POLICY}.{key}"]) for key, value in saved.items())
