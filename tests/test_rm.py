"""Stage 2 end to end: accuracy on the demo, the scoring equality PPO relies on, real HH data, resume."""

import json
import os
import shutil
import subprocess

import pytest
import torch

from checks import ppo_scorer_and_rm_classifier
from conftest import ROOT, kill_stage_once_written, run_stage, small_demo_files, small_file_args
from rlhf.config import ModelConfig
from rlhf.data import load_preferences
from rlhf.models import load_sft_model, load_tokenizer
from rlhf.rm.scoring import RewardScorer
from rlhf.runs import last_complete_checkpoint

pytestmark = pytest.mark.slow


def test_rm_on_demo_is_accurate_and_reports_diagnostics(rm_run):
    out = rm_run / "rm"
    for name in ("adapter_model.safetensors", "adapter_config.json", "score_head.safetensors", "tokenizer.json",
                 "config.yaml", "metrics.jsonl", "diagnostics.json", "DONE"):
        assert (out / name).is_file(), name
    diag = json.loads((out / "diagnostics.json").read_text())
    print({k: v for k, v in diag.items() if k.startswith("rm/")})
    assert diag["rm/n_pairs"] == 400
    assert diag["rm/accuracy"] >= 0.85
    assert diag["rm/margin_mean"] > 0 and 0 <= diag["rm/ece"] < 0.5
    assert abs(diag["rm/length_corr"]) < 0.3  # the demo's answers differ by their flaws, not their length
    assert {"intruder", "repeat", "off_topic", "too_few", "too_many"} <= set(diag["accuracy_by_tag"])
    assert set(diag["probes"]) == {"repeat", "truncate", "empty", "shuffle", "other_prompt"}
    assert all(row["n"] > 0 and 0 <= row["win_rate"] <= 1 for row in diag["probes"].values())
    assert isinstance(diag["warnings"], list) and "kept the best checkpoint" in diag["selection"]
    assert json.loads((out / "DONE").read_text())["rm/accuracy"] == diag["rm/accuracy"]


def test_ppo_side_scorer_equals_the_rm_stage_model(rm_run, demo_dir):
    """The score PPO and eval use (shared causal LM + "reward" adapter, any padding) equals the score of the
    model the RM stage trained (a sequence classifier, right-padded, HF's own pooling) on the same texts."""
    shared, trained = ppo_scorer_and_rm_classifier(rm_run, str(demo_dir / "base"), demo_dir / "rm_pairs_eval.jsonl")
    assert torch.allclose(shared, trained, atol=1e-4), (shared - trained).abs().max()
    assert shared.std() > 0.1  # not a constant head


def test_rm_needs_a_finished_sft_stage(tmp_path):
    proc = run_stage("rm", f"run_dir={tmp_path}", check=False)
    assert proc.returncode == 2 and "no finished sft stage" in proc.stderr and "make sft" in proc.stderr


def test_killed_rm_resumes(rm_run, demo_dir, tmp_path):
    """Small files (a stage tokenizes and evaluates all of them) and no probes: the resume is what counts.
    (tests/test_sft.py kills `make sft` and reruns make; here the stage itself is killed and run again.)"""
    run, f = tmp_path / "run", small_demo_files(demo_dir, tmp_path / "data")
    shutil.copytree(rm_run / "sft", run / "sft")
    args = [f"run_dir={run}", *small_file_args(f, "rm", prefixed=False), "probes.enabled=false",
            "train.max_steps=30", "train.save_steps=10", "train.eval_steps=100"]
    kill_stage_once_written("rm", args, run / "rm" / "checkpoints" / "checkpoint-10" / "trainer_state.json")
    assert not (run / "rm" / "DONE").exists()
    killed_at = last_complete_checkpoint(run / "rm" / "checkpoints")

    again = run_stage("rm", *args)
    assert f"resuming from {killed_at}" in again.stdout
    assert (run / "rm" / "DONE").exists()
    state = json.loads((run / "rm" / "checkpoints" / "checkpoint-30" / "trainer_state.json").read_text())
    assert state["global_step"] == 30


def test_rm_trains_on_probe_pairs_and_probes_after(rm_run, demo_dir, tmp_path):
    """rm.probes.train_share: the damaged copies of a share of the training answers join the training pairs (the
    kinds in rm.probes.no_warning left out), and the probes run on the held-out answers as before."""
    run, f = tmp_path / "run", small_demo_files(demo_dir, tmp_path / "data")
    shutil.copytree(rm_run / "sft", run / "sft")
    args = [f"run_dir={run}", *small_file_args(f, "rm", prefixed=False), "probes.samples=8", "probes.train_share=0.5",
            "train.max_steps=3", "train.eval_steps=100"]
    proc = run_stage("rm", *args)
    line = next(l for l in proc.stdout.splitlines() if "probe pairs" in l)
    assert line.endswith("join the training pairs (rm.probes.train_share=0.5)")
    n = int(line.split()[1])
    pairs = load_preferences(f["rm_rankings_train"])
    distinct = len({(repr(q.prompt), q.chosen) for q in pairs})
    assert 0 < n <= 4 * round(0.5 * distinct)  # shuffle is in the demo's no_warning: 4 kinds at most
    assert f"{len(pairs) + n} training pairs" in proc.stdout
    assert set(json.loads((run / "rm" / "diagnostics.json").read_text())["probes"]) >= {"repeat", "empty"}


@pytest.mark.parametrize("name,where", [
    ("chosen_equals_rejected.jsonl", "row 2: field 'rejected'"),        # pairwise
    ("hh_prompt_mismatch.jsonl", "row 2: field 'rejected'"),            # HH transcripts
    ("hh_no_final_assistant.jsonl", "row 2: field 'chosen'"),
    ("ranking_duplicate.jsonl", "row 3: field 'ranking'"),              # K-way rankings
    ("margin_not_number.jsonl", "row 3: field 'margin'"),
])
def test_bad_preference_file_stops_rm_before_the_model_loads(name, where, sft_run, tmp_path, monkeypatch, capsys):
    from rlhf.rm import train as rm
    from rlhf.cli import stage_main
    from conftest import DEMO_CONFIG

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded although the data is invalid")
    monkeypatch.setattr(rm, "load_sft_model", no_model)
    (tmp_path / "sft").symlink_to(sft_run / "sft")
    bad = ROOT / "tests" / "data_bad" / name
    code = stage_main("rm", rm.run, ["--config", str(DEMO_CONFIG), f"run_dir={tmp_path}", f"train_file={bad}"])
    assert code == 2
    assert f"{name}: {where}" in capsys.readouterr().err


def test_reward_ensemble_scores_with_the_mean_of_its_members(rm_run, demo_dir, tmp_path):
    """attach_reward loads rm/ and every rm/member-i/ as frozen adapters of one model and averages them."""
    from safetensors.torch import load_file, save_file
    from rlhf.rm.scoring import RewardEnsemble, attach_reward, member_dirs

    rm = tmp_path / "rm"
    shutil.copytree(rm_run / "rm", rm, ignore=shutil.ignore_patterns("checkpoints", "tb"))
    for i, factor in ((1, 3.0), (2, -1.0)):  # members whose heads are multiples of member 0's
        member = rm / f"member-{i}"
        member.mkdir()
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy(rm / name, member / name)
        save_file({"weight": load_file(str(rm / "score_head.safetensors"))["weight"] * factor},
                  str(member / "score_head.safetensors"))
        (member / "DONE").write_text("{}\n")
    (rm / "member-x").mkdir()  # not a member
    (rm / "member-10").mkdir()  # a member killed before it finished: an error, not a member to skip
    with pytest.raises(FileNotFoundError, match="member-10: .*make rm"):
        member_dirs(rm)
    (rm / "member-10").rmdir()
    assert [d.name for d in member_dirs(rm)] == ["rm", "member-1", "member-2"]

    tokenizer = load_tokenizer(str(rm_run / "sft"))
    model_cfg = ModelConfig(name_or_path=str(demo_dir / "base"))
    prompts, answers = ["list 3 fruits"] * 3, ["apple pear plum", "apple apple pear", "cat"]
    single = RewardScorer.attach(load_sft_model(model_cfg, rm_run / "sft", tokenizer), rm_run / "rm", tokenizer)
    expected = single.score(prompts, answers) * (1 + 3 - 1) / 3
    ensemble = attach_reward(load_sft_model(model_cfg, rm_run / "sft", tokenizer), rm, tokenizer)
    assert isinstance(ensemble, RewardEnsemble) and len(ensemble.members) == 3
    assert set(ensemble.model.peft_config) == {"reward", "reward-1", "reward-2"}
    assert torch.allclose(ensemble.score(prompts, answers), expected, atol=1e-5)
    assert torch.allclose(ensemble.member_scores(prompts, answers)[1], 3 * single.score(prompts, answers), atol=1e-5)
    assert not any(p.requires_grad for p in ensemble.model.parameters())
    # a plain rm/ stays a single scorer
    assert isinstance(attach_reward(load_sft_model(model_cfg, rm_run / "sft", tokenizer), rm_run / "rm", tokenizer),
                      RewardScorer)


def test_rm_ensemble_trains_each_member_with_its_own_seed_and_ppo_scores_with_all(rm_run, demo_dir, tmp_path):
    from safetensors.torch import load_file
    from rlhf.config import LoraSpec
    from rlhf.ppo.roles import build_roles
    from rlhf.rm.scoring import RewardEnsemble

    run, f = tmp_path / "run", small_demo_files(demo_dir, tmp_path / "data")
    shutil.copytree(rm_run / "sft", run / "sft")
    # small files (a stage tokenizes and evaluates all of them), no probes: the members are what counts
    small = (*small_file_args(f, "rm", prefixed=False), "probes.enabled=false",
             "train.max_steps=3", "train.eval_steps=100")
    proc = run_stage("rm", f"run_dir={run}", "ensemble=2", *small)
    assert "ensemble member 2 of 2 (seed 1)" in proc.stdout
    member = run / "rm" / "member-1"
    for name in ("adapter_model.safetensors", "score_head.safetensors", "DONE"):
        assert (member / name).is_file(), name
    assert (run / "rm" / "DONE").is_file()
    diag = json.loads((run / "rm" / "diagnostics.json").read_text())
    assert len(diag["member_accuracy"]) == 2 and "ensemble of 2" in proc.stdout
    heads = [load_file(str(d / "score_head.safetensors"))["weight"] for d in (run / "rm", member)]
    assert not torch.equal(*heads)  # another seed, another member

    tokenizer = load_tokenizer(str(run / "sft"))
    cfg = ModelConfig(name_or_path=str(ROOT / "data" / "demo" / "base"))
    roles = build_roles(load_sft_model(cfg, run / "sft", tokenizer), run / "rm", tokenizer, LoraSpec(r=4, alpha=8),
                        value_from_reward=True)
    assert isinstance(roles.scorer, RewardEnsemble)
    trainable = {id(p) for p in roles.trainable_parameters()}
    frozen = [p for n, p in roles.model.named_parameters() if ".reward" in n]
    assert frozen and not any(id(p) in trainable or p.requires_grad for p in frozen)

    # a rerun keeps the finished member (its DONE) and does not train it again
    (run / "rm" / "DONE").unlink()
    again = run_stage("rm", f"run_dir={run}", "ensemble=2", *small)
    assert "ensemble member 2 of 2" not in again.stdout and (run / "rm" / "DONE").is_file()
    # a smaller ensemble removes the members it no longer has: PPO must not score with them
    (run / "rm" / "DONE").unlink()
    single = run_stage("rm", f"run_dir={run}", "ensemble=1", *small)
    assert f"removing {member}" in single.stdout and not member.exists()
    assert "member_accuracy" not in json.loads((run / "rm" / "diagnostics.json").read_text())


@pytest.mark.early(4)  # one of the longest single tests: not last
def test_hh_sample_runs_every_stage_from_a_config_alone(tmp_path):
    """Real Anthropic HH data: every stage of `make all CONFIG=configs/hh-sample.yaml` from that config alone
    (SFT, RM and its report, PPO on HH prompts, eval on held-out HH prompts, the report). `make data-hh` builds
    the data as a user's make would; the stages run as the Makefile runs them (the Makefile's chain itself is
    tested on the demo: tests/test_compare.py, tests/test_sft.py), each in a process of its own."""
    subprocess.run(["make", "data-hh", "-o", ".venv/.installed", f"PY={os.sys.executable}"], cwd=ROOT, check=True,
                   capture_output=True)
    config = ROOT / "configs" / "hh-sample.yaml"
    # few steps; PPO's reward normalisation from 16 SFT answers (not 256), no held-out monitor, no RM probes, eval
    # sampled only: what takes the time on HH's 1,024-token prompts; no PPO comparison at its end, as under make
    # all (eval follows)
    args = (f"run_dir={tmp_path}", "sft.train.max_steps=2", "rm.train.max_steps=2", "rm.probes.enabled=false",
            "ppo.steps=2", "ppo.reward.norm_samples=16", "ppo.monitor.every=0", "ppo.eval_samples=0",
            "eval.samples=6", "eval.decoding=[sample]", "eval.plots=false")
    out = {stage: run_stage(stage, *args, config=config).stdout for stage in ("sft", "rm", "ppo", "eval")}
    assert "[ppo] 360 prompts" in out["ppo"]  # the HH training prompts, not the demo's
    diag = json.loads((tmp_path / "rm" / "diagnostics.json").read_text())
    assert diag["rm/n_pairs"] == 40  # data/hh-tiny/hh_test.jsonl, split from the sample by `make data-hh`
    assert "accuracy" in out["rm"] and "calibration error" in out["rm"]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["prompts_file"] == "data/hh-tiny/hh_test.jsonl" and metrics["n_prompts"] == 6
    ppo = metrics["results"]["sample"]["ppo"]
    assert ppo["reward_win_rate_low"] <= ppo["reward_win_rate"] <= ppo["reward_win_rate_high"]
    assert "gold_win_rate" not in ppo  # HH has no gold judge
    assert "No gold judge is configured" in (tmp_path / "eval" / "report.md").read_text()
