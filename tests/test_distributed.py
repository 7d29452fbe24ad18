"""Several processes: the helpers in rlhf.distributed (fast, two gloo processes where a collective is involved)
and every stage with two CPU processes (slow): SFT as `make sft LAUNCHER=accelerate` (make, `accelerate launch`,
torchrun), the others with the same two ranks forked from the suite's pre-imported server
(`conftest.accelerate_processes`: accelerate's own environment for the ranks, without the launch's fresh
interpreters)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rlhf import distributed
from rlhf.config import ConfigError
from conftest import DEMO_CONFIG, ROOT, accelerate_processes, run_make, run_stage, small_demo_files, small_file_args

# the 2-process runs build on each other (module fixtures): one process, started early (minutes)
pytestmark = [pytest.mark.xdist_group("distributed"), pytest.mark.early(2)]

TWO_CPU_CONFIG = "configs/accelerate/cpu-2proc.yaml"
TWO_CPU = ["LAUNCHER=accelerate", f"ACCELERATE_CONFIG={TWO_CPU_CONFIG}", "NPROC=2"]


# --- fast: the pieces ----------------------------------------------------------------------------------

def test_shards_are_disjoint_and_cover_every_prompt():
    items = list(range(10))
    shares = [distributed.shard(items, rank, 3) for rank in range(3)]
    assert shares == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert distributed.shard(items, 0, 1) == items  # one process: everything, in order


def test_rollout_batch_must_divide_by_the_number_of_processes():
    assert distributed.per_process(16, 2, "ppo.sampling.rollout_batch_size") == 8
    with pytest.raises(ConfigError, match=r"rollout_batch_size=16 must be a multiple of the number of processes \(3\)"):
        distributed.per_process(16, 3, "ppo.sampling.rollout_batch_size")


@pytest.mark.parametrize("env", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_ppo_refuses_sharded_engines_with_a_clear_error(monkeypatch, env):
    monkeypatch.setenv(env, "true")
    with pytest.raises(ConfigError, match="PPO runs data-parallel only .*MULTI_GPU.*ddp.yaml"):
        distributed.check_ppo_supported()


def test_group_batches_are_split_by_whole_groups_across_processes():
    """The RM's grouped batches under DDP: accelerate shards our batch sampler batch by batch, so each process
    gets different whole groups, every group is used once, and the epoch reshuffles (the Trainer reaches our
    sampler's set_epoch through accelerate's wrapper)."""
    from accelerate.data_loader import BatchSamplerShard
    from rlhf.rm.train import GroupBatchSampler  # here, not at the top: the spawned processes below import this module

    groups = [g for g in range(9) for _ in range(6)]  # 9 prompts x 6 pairs
    sampler = GroupBatchSampler(groups, max_pairs=12, seed=0)
    shards = [BatchSamplerShard(sampler, num_processes=2, process_index=r) for r in range(2)]
    seen = [[b for b in s] for s in shards]
    assert len(seen[0]) == len(seen[1])  # same number of steps on every process
    for batch in seen[0] + seen[1]:
        assert len({groups[i] for i in batch}) * 6 == len(batch)  # whole groups only
    used = [{groups[i] for b in part for i in b} for part in seen]
    assert used[0] | used[1] == set(range(9))
    first_epoch = [list(b) for b in shards[0]]
    shards[0].batch_sampler.set_epoch(1)
    assert [list(b) for b in shards[0]] != first_epoch


def _collectives(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(rank)
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in [(3, 2), (4,), (1,)]]
    grads = [torch.randn(3, 2), torch.randn(4), None if rank == 0 else torch.randn(1)]  # rank 0: no grad at all
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()
    distributed.average_gradients(params)
    logs = distributed.mean_over_processes({"a": float(rank), "b": 10.0 * (rank + 1)})
    gathered = distributed.gather_tensor(torch.arange(rank + 1, dtype=torch.float32) + 10 * rank)  # lengths 1, 2
    try:
        distributed.check_in_sync([torch.full((2,), float(rank))], "test weights")
        diverged = ""
    except RuntimeError as e:
        diverged = str(e)
    stop = [distributed.any_process(rank == 1), distributed.any_process(False)]  # a signal that reached rank 1 only
    torch.save({"grads": grads, "averaged": [p.grad for p in params], "logs": logs, "gathered": gathered, "stop": stop,
                "in_sync": distributed.check_in_sync([params[0].grad], "gradients"), "diverged": diverged},
               f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_collectives_with_two_gloo_processes(tmp_path):
    """Two real processes: gradients become their mean (a missing one counts as zero) and are bitwise equal
    on both; logged statistics are averaged; unequal-length score tensors gather in rank order; diverged
    weights are detected; a stop request seen by one process is agreed by both."""
    mp.spawn(_collectives, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for i in range(3):
        g0 = r0["grads"][i] if r0["grads"][i] is not None else torch.zeros_like(r1["grads"][i])
        expected = (g0 + r1["grads"][i]) / 2
        assert torch.allclose(r0["averaged"][i], expected, atol=1e-7)
        assert torch.equal(r0["averaged"][i], r1["averaged"][i])
    assert r0["logs"] == r1["logs"] == {"a": 0.5, "b": 15.0}
    assert r0["gathered"].tolist() == r1["gathered"].tolist() == [0.0, 10.0, 11.0]
    assert r0["stop"] == r1["stop"] == [True, False]  # both processes stop when either received a signal
    assert r0["in_sync"] == r1["in_sync"]
    assert "different test weights" in r0["diverged"] and "different test weights" in r1["diverged"]


def test_one_process_leaves_everything_as_it_is():
    """No process group: the helpers are no-ops (the single-process path stays bit-identical)."""
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.tensor([1.0, 2.0])
    distributed.average_gradients([p])
    assert p.grad.tolist() == [1.0, 2.0]
    assert distributed.mean_over_processes({"x": 3.0}) == {"x": 3.0}
    t = torch.tensor([1.0, 2.0])
    assert distributed.gather_tensor(t) is t


def test_makefile_runs_stages_under_accelerate_launch():
    """The command line LAUNCHER=accelerate builds; the default launcher's line is unchanged."""
    base = ["make", "-n", "--no-print-directory", "-o", ".venv/.installed", "-o", "data/demo/DONE", "sft",
            "RUN=/tmp/x", "PY=python"]
    # Under `make test` the parent make's MAKELEVEL/MAKEFLAGS would leak in (and add "Entering directory" lines).
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    local = subprocess.run(base, cwd=ROOT, capture_output=True, text=True, check=True, env=env).stdout
    assert local.strip().splitlines()[-1] == "python -m stages.sft --config configs/demo.yaml run_dir=/tmp/x"
    launched = subprocess.run(base + TWO_CPU, cwd=ROOT, capture_output=True, text=True, check=True, env=env).stdout
    assert ("python -m accelerate.commands.launch --config_file configs/accelerate/cpu-2proc.yaml --num_processes 2 "
            "-m stages.sft --config configs/demo.yaml run_dir=/tmp/x") in launched


# --- slow: every stage as two CPU processes ----------------------------------------------------------

def make_two_processes(target: str, run_dir: Path, args: str) -> subprocess.CompletedProcess:
    """`make <target> LAUNCHER=accelerate ...` as a user types it: make, `accelerate launch`, torchrun, two fresh
    interpreters (the SFT test; ~25 s of CPU more than `two_processes`)."""
    cmd = run_make(target, run_dir, args=args) + TWO_CPU
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def two_processes(stage: str, run_dir: Path, args: str) -> subprocess.CompletedProcess:
    """The stage line `make_two_processes` runs (`make <stage>` runs it on the demo config with the run directory
    first), with the two ranks forked from the pre-imported server and accelerate's environment
    (`conftest.accelerate_processes`)."""
    proc = accelerate_processes(stage, ["--config", str(DEMO_CONFIG), f"run_dir={run_dir}", *args.split()],
                                TWO_CPU_CONFIG)
    assert proc.returncode == 0, f"{' '.join(proc.args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_forked_ranks_report_a_rank_that_fails(tmp_path):
    """`two_processes`' launcher: each rank runs the stage and the first nonzero exit code is the result. (The
    first rank to fail stops the other, as torchrun does: the other may be killed before it prints its error.)"""
    proc = accelerate_processes("ppo", ["--config", str(DEMO_CONFIG), f"run_dir={tmp_path}"], TWO_CPU_CONFIG)
    assert proc.returncode == 2 and proc.stderr.count("no finished sft stage") in (1, 2), proc.stderr


def files(stage_dir: Path) -> set[str]:
    return {p.name for p in stage_dir.iterdir() if p.name != "checkpoints"}


@pytest.fixture(scope="module")
def two_process_run(demo_dir, tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("two-proc")


@pytest.fixture(scope="module")
def small_files(demo_dir, tmp_path_factory) -> dict[str, str]:
    """The first rows of the demo's files: each of the two processes tokenizes a stage's whole file (the RM's
    18000 training pairs) and scores its whole held-out file."""
    return small_demo_files(demo_dir, tmp_path_factory.mktemp("two-proc-data"))


@pytest.mark.slow
def test_sft_with_two_processes(two_process_run, sft_run, small_files):
    from peft import PeftModel
    from rlhf.config import ModelConfig
    from rlhf.models import load_causal_lm, load_tokenizer

    make_two_processes("sft", two_process_run, " ".join(small_file_args(small_files, "sft"))
                       + " sft.train.max_steps=6 sft.train.logging_steps=3")
    out = two_process_run / "sft"
    assert (out / "DONE").is_file() and files(out) == files(sft_run / "sft")
    assert len(list((out / "tb").iterdir())) == 1  # one event file: only the main process writes
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [3, 6]  # one row per log, not one per process
    # 6 steps x 16 examples x 2 processes of the 64 demonstrations: each process took its own batches
    assert rows[-2]["train/epoch"] == pytest.approx(6 * 16 * 2 / 64, rel=0.02)
    tok = load_tokenizer(str(out))
    PeftModel.from_pretrained(load_causal_lm(ModelConfig(name_or_path="data/demo/base"), tok), str(out))


@pytest.mark.slow
def test_rm_with_two_processes(two_process_run, rm_run, small_files):
    from rlhf.config import ModelConfig
    from rlhf.models import load_sft_model, load_tokenizer
    from rlhf.rm.scoring import RewardScorer

    if not (two_process_run / "sft" / "DONE").is_file():  # run alone: the demo's SFT stage will do
        shutil.copytree(rm_run / "sft", two_process_run / "sft", dirs_exist_ok=True)
    two_processes("rm", two_process_run, " ".join(small_file_args(small_files, "rm"))
                  + " rm.train.max_steps=6 rm.train.logging_steps=3")
    out = two_process_run / "rm"
    assert (out / "DONE").is_file() and files(out) == files(rm_run / "rm")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [3, 6]
    assert json.loads((out / "diagnostics.json").read_text())["rm/n_pairs"] == 16  # every held-out pair, once
    tok = load_tokenizer(str(out))
    sft = load_sft_model(ModelConfig(name_or_path="data/demo/base"), two_process_run / "sft", tok)
    assert RewardScorer.attach(sft, out, tok).score(["list two fruits"], ["apple pear"]).shape == (1,)


def ppo_args(estimator: str, files: dict[str, str]) -> str:
    args = (" ".join(small_file_args(files, "ppo")) + " ppo.steps=2 ppo.checkpoint.every=1 ppo.sampling.rollout_batch_size=16 "
            "ppo.eval_samples=8 ppo.monitor.prompts=8 ppo.reward.norm_samples=16")
    return args if estimator == "gae" else args + f" ppo.estimator.name={estimator} ppo.sampling.group_size=4"


@pytest.fixture(scope="module")
def two_process_ppo(rm_run, small_files, tmp_path_factory):
    """`two_process_ppo(estimator)`: a finished 2-process PPO run of 2 steps on the demo's SFT and RM (run on
    first use, once per module): its run directory and make's stdout. The PPO test checks it, then resumes it
    from its step-1 checkpoint (ending where it ended); the eval test evaluates its policy."""
    runs = {}

    def get(estimator: str) -> tuple[Path, str]:
        if estimator not in runs:
            run = tmp_path_factory.mktemp(f"two-proc-ppo-{estimator}")
            for stage in ("sft", "rm"):
                shutil.copytree(rm_run / stage, run / stage, ignore=shutil.ignore_patterns("checkpoints"))
            runs[estimator] = run, two_processes("ppo", run, ppo_args(estimator, small_files)).stdout
        return runs[estimator]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["gae", "rloo"])
def test_ppo_with_two_processes_splits_the_work_and_resumes_exactly(two_process_ppo, small_files, estimator):
    """Two processes, 8 rollouts each per step: identical weights on both processes, every process's random
    state in the checkpoint, and a rerun from the step-1 checkpoint ends bit-for-bit where the uninterrupted
    run ended. rloo: 2 prompts x 4 answers per process (whole groups), no value adapter."""
    from peft import PeftModel
    from rlhf.config import ModelConfig
    from rlhf.models import load_sft_model, load_tokenizer

    run, stdout = two_process_ppo(estimator)
    out = run / "ppo"
    assert "2 steps of 16 rollouts (8 per process, 2 processes)" in stdout
    assert "2 processes hold identical trained weights" in stdout
    done = json.loads((out / "DONE").read_text())
    assert done["num_processes"] == 2 and done["eval/n_prompts"] == 8
    assert {"policy", "eval.json", "metrics.jsonl", "tb", "config.yaml", "DONE"} <= files(out)
    assert ("value" in files(out)) == (estimator == "gae")
    assert len(list((out / "tb").iterdir())) == 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]  # 0: the held-out monitor on the SFT policy
    rest = torch.load(out / "checkpoints" / "checkpoint-2" / "optimizer.pt", weights_only=False)
    rngs = rest["rng_per_process"]
    assert len(rngs) == 2 and not torch.equal(rngs[0]["torch"], rngs[1]["torch"])  # each process samples its own
    tok = load_tokenizer(str(out))
    PeftModel.from_pretrained(load_sft_model(ModelConfig(name_or_path="data/demo/base"), run / "sft", tok),
                              str(out / "policy"))

    # "killed" after the step-1 checkpoint: the rerun resumes there and ends exactly where the run ended
    policy = (out / "policy" / "adapter_model.safetensors").read_bytes()
    shutil.rmtree(out / "checkpoints" / "checkpoint-2")
    (out / "DONE").unlink()
    proc = two_processes("ppo", run, ppo_args(estimator, small_files))
    assert "resuming from" in proc.stdout and "checkpoint-1" in proc.stdout
    again = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [without_timings(r) for r in again] == [without_timings(r) for r in rows]
    assert (out / "policy" / "adapter_model.safetensors").read_bytes() == policy


def without_timings(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(("time/", "perf/"))}


@pytest.mark.slow
def test_eval_with_two_processes_answers_every_prompt_once_in_order(two_process_ppo, tmp_path):
    """Each process answers its share of the prompts (7: 4 and 3); the main one gathers them back in prompt
    order and writes the same files as one process. Greedy answers do not depend on the split: they equal one
    process's. The policy: the 2-process PPO run above (any finished PPO adapter will do)."""
    run, _ = two_process_ppo("gae")
    for stage in ("sft", "rm", "ppo"):
        shutil.copytree(run / stage, tmp_path / "two" / stage, ignore=shutil.ignore_patterns("checkpoints"))
    shutil.copytree(tmp_path / "two", tmp_path / "one")
    args = "eval.samples=7 eval.samples_per_prompt=2 eval.checkpoints=[sft,ppo] eval.max_new_tokens=8 eval.plots=false"
    run_stage("eval", f"run_dir={tmp_path / 'one'}", *args.split())  # one process: the stage as `make eval` runs it
    two_processes("eval", tmp_path / "two", args)
    out1, out2 = tmp_path / "one" / "eval", tmp_path / "two" / "eval"
    assert files(out2) == files(out1) and (out2 / "DONE").is_file()
    rows1, rows2 = ([json.loads(line) for line in (d / "samples.jsonl").read_text().splitlines()] for d in (out1, out2))
    key = [(r["decoding"], r["checkpoint"], r["prompt_index"], r["prompt"]) for r in rows1]
    assert [(r["decoding"], r["checkpoint"], r["prompt_index"], r["prompt"]) for r in rows2] == key
    assert len(rows2) == 2 * 7 * 2 + 2 * 7  # sampled: 2 answers per prompt; greedy: 1, for sft and ppo
    greedy = [(r["response"], round(r["reward"], 4)) for r in rows1 if r["decoding"] == "greedy"]
    assert [(r["response"], round(r["reward"], 4)) for r in rows2 if r["decoding"] == "greedy"] == greedy
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (out1, out2))
    assert m2["results"].keys() == m1["results"].keys() and m2["n_prompts"] == m1["n_prompts"] == 7


def test_makefile_run_dir_in_args_is_the_directory_make_checks():
    """`make sft ARGS="run_dir=x"` used to check the config's run_dir for DONE and write to x."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    cmd = ["make", "-n", "--no-print-directory", "-o", ".venv/.installed", "-o", "data/demo/DONE", "sft", "PY=python",
           "ARGS=lora.r=8 run_dir=/tmp/elsewhere"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip().splitlines()[-1] == ("python -m stages.sft --config configs/demo.yaml run_dir=/tmp/elsewhere "
                                             "lora.r=8 run_dir=/tmp/elsewhere")
    shown = subprocess.run(["make", "-p", "-n", "--no-print-directory", "-o", ".venv/.installed", "-o",
                            "data/demo/DONE", "sft", "PY=python", "ARGS=run_dir=/tmp/elsewhere"],
                           cwd=ROOT, capture_output=True, text=True, env=env).stdout
    assert "/tmp/elsewhere/sft/DONE:" in shown
