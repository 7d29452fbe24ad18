"""A stage asked to stop (SIGTERM: preemption, scancel, kill; SIGUSR1: SLURM's time-limit warning) saves a
checkpoint at the end of the current step, exits 75 and leaves PREEMPTED; running it again resumes."""

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import DEMO_CONFIG, ForkedStage, small_demo_files, small_file_args
from rlhf import cli
from rlhf.preempt import EXIT_PREEMPTED, PREEMPTED, Preempted, StopSignal, mark_preempted
from rlhf.runs import begin_stage, read_metrics


# --- fast: the pieces ----------------------------------------------------------------------------------

def test_stop_signal_records_instead_of_dying_and_restores_the_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    with StopSignal() as stop:
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGUSR1)  # would end the process under the default handler
        time.sleep(0.05)
        assert stop.received == "SIGUSR1" and stop.requested()
    assert signal.getsignal(signal.SIGUSR1) is before


def test_preempted_stage_exits_75_with_its_message(tmp_path, capsys):
    def run(cfg):
        raise mark_preempted(tmp_path, "ppo", 7, "SIGTERM")

    assert cli.stage_main("ppo", run, []) == EXIT_PREEMPTED == 75
    assert "stopped on SIGTERM after saving the checkpoint of step 7" in capsys.readouterr().err
    assert json.loads((tmp_path / PREEMPTED).read_text())["step"] == 7
    begin_stage(tmp_path)  # the next run of the stage clears the marker
    assert not (tmp_path / PREEMPTED).exists()
    assert isinstance(mark_preempted(tmp_path, "sft", 1, None), Preempted)


# --- slow: real stages, real signals ---------------------------------------------------------------------

def start_stage(stage: str, run_dir: Path, overrides: str) -> ForkedStage:
    """The stage as a process of its own (forked from the suite's pre-imported server), which the test signals."""
    return ForkedStage(stage, ["--config", str(DEMO_CONFIG), f"run_dir={run_dir}", *overrides.split()])


def signal_after(proc: ForkedStage, metrics: Path, rows: int, sig: int, timeout: float = 300) -> None:
    """Send `sig` once `metrics` has `rows` rows (training is under way, between two regular checkpoints)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(read_metrics(metrics)) >= rows:
            proc.send_signal(sig)
            return
        time.sleep(0.05)
    raise AssertionError(f"{metrics} did not reach {rows} rows (process ended: {proc.poll()})")


PPO_ARGS = ("ppo.steps=5 ppo.sampling.rollout_batch_size=8 ppo.update.num_minibatches=2 ppo.update.epochs=2 ppo.checkpoint.every=100 "
            "ppo.reward.norm_samples=8 ppo.eval_prompts_file=null")


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_sigterm_during_ppo_checkpoints_that_step_and_the_rerun_ends_as_an_uninterrupted_run(rm_run, demo_dir,
                                                                                            tmp_path, estimator):
    """PPO (gae) and a critic-free estimator (grpo: 2 prompts x 4 answers a step, no value adapter)."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    for run in (straight, stopped):
        for stage in ("sft", "rm"):
            shutil.copytree(rm_run / stage, run / stage)
    prompts = small_demo_files(demo_dir, tmp_path / "data")["prompts_train"]  # a stage reads all of its file
    PPO = (PPO_ARGS + f" ppo.prompts_file={prompts}"
           + ("" if estimator == "gae" else f" ppo.estimator.name={estimator} ppo.sampling.group_size=4"))
    proc = start_stage("ppo", straight, PPO)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]

    proc = start_stage("ppo", stopped, PPO)
    signal_after(proc, stopped / "ppo" / "metrics.jsonl", 2, signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    marker = json.loads((stopped / "ppo" / PREEMPTED).read_text())
    assert marker["signal"] == "SIGTERM" and 2 <= marker["step"] < 5
    # save_steps=100: the only checkpoint is the one the signal asked for, at the step it arrived
    assert [p.name for p in (stopped / "ppo" / "checkpoints").iterdir()] == [f"checkpoint-{marker['step']}"]
    assert not (stopped / "ppo" / "DONE").exists()
    assert f"stopped on SIGTERM after saving the checkpoint of step {marker['step']}" in err

    again = start_stage("ppo", stopped, PPO)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    assert f"resuming from {stopped / 'ppo' / 'checkpoints' / ('checkpoint-%d' % marker['step'])}" in out
    assert (stopped / "ppo" / "DONE").exists() and not (stopped / "ppo" / PREEMPTED).exists()
    a = load_file(str(straight / "ppo" / "policy" / "adapter_model.safetensors"))
    b = load_file(str(stopped / "ppo" / "policy" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    rows = read_metrics(stopped / "ppo" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    same = [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))} for r in rows]
    expected = [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))}
                for r in read_metrics(straight / "ppo" / "metrics.jsonl")]
    assert len(same) == len(expected) and all(a == pytest.approx(b, rel=1e-5, abs=1e-6) for a, b in zip(same, expected))
    assert (stopped / "ppo" / "value").exists() == (estimator == "gae")
    assert ("ppo/value_loss" in rows[-1]) == (estimator == "gae") and ("ppo/kl_loss" in rows[-1]) == (estimator == "grpo")


@pytest.mark.slow
def test_sigusr1_during_sft_checkpoints_the_current_step_and_the_rerun_resumes(demo_dir, tmp_path):
    """The Trainer-based stages (SFT here, RM alike) stop through a TrainerCallback: checkpoint, exit 75."""
    run, f = tmp_path / "run", small_demo_files(demo_dir, tmp_path / "data")
    args = (" ".join(small_file_args(f, "sft")) + " sft.train.max_steps=40 "
            "sft.train.save_steps=1000 sft.train.logging_steps=5 sft.train.eval_steps=1000")
    proc = start_stage("sft", run, args)
    signal_after(proc, run / "sft" / "metrics.jsonl", 2, signal.SIGUSR1)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    step = json.loads((run / "sft" / PREEMPTED).read_text())["step"]
    assert 0 < step < 40
    ckpt = run / "sft" / "checkpoints" / f"checkpoint-{step}"
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == step
    assert not (run / "sft" / "DONE").exists() and not (run / "sft" / "adapter_model.safetensors").exists()

    again = start_stage("sft", run, args)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    assert f"resuming from {ckpt}" in out
    assert (run / "sft" / "DONE").exists()
    steps = [r["step"] for r in read_metrics(run / "sft" / "metrics.jsonl") if "train/loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 40


class SlowEvaluationAfterSignal:
    """Trainer callbacks for the test below: SIGTERM to this process during step `at`, and every held-out
    evaluation after it made `SLOW` seconds long, as a real model's held-out set can take longer than the grace
    period a cluster gives a job to leave."""

    SLOW = 30

    def __init__(self, at: int):
        from transformers import TrainerCallback

        test = self
        self.at, self.signalled, self.evaluated_after = at, None, []

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step + 1 == test.at and test.signalled is None:
                    test.signalled = time.monotonic()
                    os.kill(os.getpid(), signal.SIGTERM)

            def on_evaluate(self, args, state, control, **kwargs):
                if test.signalled is not None:
                    test.evaluated_after.append(state.global_step)
                    time.sleep(test.SLOW)

        self.callback = Callback()


@pytest.mark.parametrize("when", ["eval_steps", "epoch_end"])
def test_a_trainer_stage_leaves_right_after_its_checkpoint_without_the_evaluation_due(demo_dir, tmp_path,
                                                                                      monkeypatch, when):
    """A signal during the step at which the Trainer evaluates (an eval_steps multiple, or the last step of an
    epoch): the stage saves that step, skips the evaluation and exits 75 within seconds."""
    from rlhf import sft, trainers

    run, f = tmp_path / "run", small_demo_files(demo_dir, tmp_path / "data")
    step = 2 if when == "eval_steps" else 4  # 64 rows in batches of 16: 4 steps an epoch
    slow = SlowEvaluationAfterSignal(step)
    add = trainers.trainer_callbacks
    monkeypatch.setattr(trainers, "trainer_callbacks", lambda *a: add(*a) + [slow.callback])
    args = [*small_file_args(f, "sft"), "sft.train.epochs=2", "sft.train.batch_size=16", "sft.train.save_steps=1000",
            f"sft.train.eval_steps={2 if when == 'eval_steps' else 0}", "sft.train.progress_bar=false"]
    code = cli.stage_main("sft", sft.run, ["--config", str(DEMO_CONFIG), f"run_dir={run}", *args])
    took = time.monotonic() - slow.signalled
    assert code == EXIT_PREEMPTED
    assert slow.evaluated_after == [] and took < 10, (slow.evaluated_after, took)
    assert json.loads((run / "sft" / PREEMPTED).read_text())["step"] == step
    ckpt = run / "sft" / "checkpoints" / f"checkpoint-{step}"
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == step
    assert (ckpt / "adapter_model.safetensors").is_file() and not (run / "sft" / "DONE").exists()


def test_sigterm_in_the_last_ppo_step_leaves_the_comparison_with_sft_to_the_rerun(demo_dir, tmp_path, monkeypatch):
    """PPO's last step is no exception: its checkpoint, then exit 75; the rerun compares the policy with SFT."""
    from rlhf import sft
    from rlhf.ppo import train as ppo
    from rlhf.rm import train as rm

    run, f = tmp_path / "run", small_demo_files(demo_dir, tmp_path / "data")
    common = ["--config", str(DEMO_CONFIG), f"run_dir={run}"]
    short = ["max_steps=2", "logging_steps=1", "eval_steps=2", "save_steps=2", "progress_bar=false"]
    for stage, run_stage in (("sft", sft.run), ("rm", rm.run)):
        args = [*common, *small_file_args(f, stage), *(f"{stage}.train.{k}" for k in short)]
        assert cli.stage_main(stage, run_stage, args) == 0
    updates, compared = [], []
    update, compare = ppo.ppo_update, ppo.compare_with_sft

    def signalled_update(*args, **kwargs):
        updates.append(time.monotonic())
        if len(updates) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return update(*args, **kwargs)

    monkeypatch.setattr(ppo, "ppo_update", signalled_update)
    monkeypatch.setattr(ppo, "compare_with_sft", lambda *a, **k: compared.append(1) or compare(*a, **k))
    args = [*common, *small_file_args(f, "ppo"), "ppo.steps=2", "ppo.sampling.rollout_batch_size=8", "ppo.update.num_minibatches=2",
            "ppo.update.epochs=1", "ppo.reward.norm_samples=8", "ppo.checkpoint.every=100", "ppo.eval_samples=8",
            "ppo.progress_bar=false"]
    assert cli.stage_main("ppo", ppo.run, args) == EXIT_PREEMPTED
    assert time.monotonic() - updates[1] < 10 and compared == []
    assert json.loads((run / "ppo" / PREEMPTED).read_text())["step"] == 2
    assert not (run / "ppo" / "DONE").exists() and not (run / "ppo" / "eval.json").exists()

    monkeypatch.setattr(ppo, "ppo_update", update)
    assert cli.stage_main("ppo", ppo.run, args) == 0
    assert compared == [1] and (run / "ppo" / "eval.json").is_file() and (run / "ppo" / "DONE").is_file()
