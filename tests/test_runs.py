"""Stage directories: a finished stage is never lost (refusal, --force into <stage>.rerun, downstream moved aside)."""

import json
from pathlib import Path

import pytest

from rlhf import cli
from rlhf.runs import DONE, StageFinished, begin_stage, finish_stage, is_done, require_done


def finished(run_dir: Path, stage: str, adapter: bytes = b"old weights") -> Path:
    """A finished stage directory, made cheaply: DONE, an adapter file, checkpoints."""
    out = run_dir / stage
    (out / "checkpoints" / "checkpoint-8").mkdir(parents=True)
    (out / "adapter_model.safetensors").write_bytes(adapter)
    (out / DONE).write_text(json.dumps({"stage": stage}) + "\n")
    return out


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_finished_stage_refuses_without_force_and_touches_nothing(tmp_path):
    rm = finished(tmp_path, "rm")
    before = snapshot(tmp_path)
    with pytest.raises(StageFinished, match=rf"{rm} holds a finished rm stage .*--force.*make clean-rm"):
        begin_stage(rm)
    assert snapshot(tmp_path) == before and not (tmp_path / "rm.rerun").exists()


def test_forced_rerun_trains_aside_and_a_failure_leaves_everything(tmp_path):
    finished(tmp_path, "sft")
    rm, ppo = finished(tmp_path, "rm"), finished(tmp_path, "ppo")
    before = snapshot(tmp_path)
    out = begin_stage(rm, force=True)
    assert out == tmp_path / "rm.rerun" and out.is_dir() and not (out / "checkpoints").exists()  # from scratch
    (out / "adapter_model.safetensors").write_bytes(b"half written")  # ... and then the rerun dies
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("rm.rerun")} == before
    assert is_done(rm) and is_done(ppo)
    # a rerun started again continues in rm.rerun (resume), the finished rm/ still untouched
    assert begin_stage(rm, force=True) == out and (out / "adapter_model.safetensors").read_bytes() == b"half written"


def test_finished_rerun_replaces_the_stage_and_moves_later_stages_aside(tmp_path, capsys):
    finished(tmp_path, "sft")
    rm, ppo, ev = finished(tmp_path, "rm"), finished(tmp_path, "ppo"), finished(tmp_path, "eval")
    sft_before = snapshot(tmp_path / "sft")
    out = begin_stage(rm, force=True)
    (out / "adapter_model.safetensors").write_bytes(b"new weights")
    finish_stage(out, {"rm/accuracy": 0.9})
    assert not out.exists() and json.loads((rm / DONE).read_text())["rm/accuracy"] == 0.9
    assert (rm / "adapter_model.safetensors").read_bytes() == b"new weights"
    assert not (rm / "checkpoints").exists() and not (tmp_path / "rm.replaced").exists()
    # PPO and eval were built on the old reward model: moved aside, so `make ppo` trains PPO again
    assert not ppo.exists() and not ev.exists()
    assert is_done(tmp_path / "ppo.stale") and is_done(tmp_path / "eval.stale")
    assert snapshot(tmp_path / "sft") == sft_before  # upstream untouched
    assert "moved to" in capsys.readouterr().err


def test_stage_finished_in_place_moves_later_stages_aside_and_drops_a_stale_rerun(tmp_path):
    """`make clean-sft && make sft`: SFT trains in place; RM and PPO on the old SFT are no longer valid."""
    finished(tmp_path, "rm")
    (tmp_path / "ppo.rerun").mkdir()
    out = begin_stage(tmp_path / "sft")
    assert out == tmp_path / "sft"
    finish_stage(out, {})
    assert is_done(out) and is_done(tmp_path / "rm.stale") and not (tmp_path / "rm").exists()
    assert not (tmp_path / "ppo.rerun").exists()


def test_unfinished_stage_resumes_in_place(tmp_path):
    out = tmp_path / "sft"
    (out / "checkpoints" / "checkpoint-4").mkdir(parents=True)
    (out / "PREEMPTED").write_text("{}")
    assert begin_stage(out) == out and (out / "checkpoints" / "checkpoint-4").is_dir()
    assert not (out / "PREEMPTED").exists()


def test_a_kill_between_the_two_renames_is_recovered(tmp_path):
    rerun = finished(tmp_path, "rm.rerun", b"new weights")
    assert require_done(tmp_path / "rm", "rm") == tmp_path / "rm" and not rerun.exists()
    assert (tmp_path / "rm" / "adapter_model.safetensors").read_bytes() == b"new weights"


def test_markers_of_other_directories_move_nothing(tmp_path):
    """rm/member-1 (an ensemble member) and export dirs write DONE too: no swap, nothing moved."""
    finished(tmp_path, "ppo")
    member = tmp_path / "rm" / "member-1"
    member.mkdir(parents=True)
    finish_stage(member, {})
    assert is_done(member) and is_done(tmp_path / "ppo")


def test_cli_refuses_a_finished_stage_in_one_line_and_force_reaches_the_config(tmp_path, capsys):
    finished(tmp_path, "sft")
    seen = []
    run = lambda cfg: seen.append(cfg.force) or begin_stage(Path(cfg.run_dir) / "sft", cfg.force)  # noqa: E731
    assert cli.stage_main("sft", run, [f"run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'sft'} holds a finished sft stage" in err
    # make passes ARGS after the overrides: the flag may come anywhere
    assert cli.stage_main("sft", run, [f"run_dir={tmp_path}", "--force", "train.lr=1e-3"]) == 0
    assert seen == [False, True] and (tmp_path / "sft.rerun").is_dir()


def test_make_force_reruns_only_the_stage_named(tmp_path):
    import os
    import subprocess
    root = Path(__file__).resolve().parent.parent
    for stage in ("sft", "rm"):
        finished(tmp_path, stage)
    os.utime(tmp_path / "sft" / DONE, (1, 1))  # older than rm/DONE: rm is up to date
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    make = ["make", "-n", "--no-print-directory", "-o", ".venv/.installed", "-o", "data/demo/DONE", "rm",
            f"RUN={tmp_path}", "PY=python"]
    plain = subprocess.run(make, cwd=root, capture_output=True, text=True, check=True, env=env).stdout
    assert "stages" not in plain
    forced = subprocess.run(make + ["FORCE=1"], cwd=root, capture_output=True, text=True, check=True, env=env).stdout
    expected = f"python -m stages.rm --config configs/demo.yaml run_dir={tmp_path}  --force"
    assert forced.strip().splitlines() == [expected]


def test_disk_full_while_saving_keeps_the_last_complete_checkpoint_and_says_so(tmp_path, monkeypatch, capsys):
    """PPO writes a checkpoint into .tmp-checkpoint-N and renames it when complete: ENOSPC in the middle of
    the save leaves checkpoint-N-1 the one a rerun resumes from, and the stage prints one line."""
    import errno

    import torch

    from rlhf.ppo import state as ppo_state

    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([weight])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    monkeypatch.setattr(ppo_state, "adapter_state", lambda roles: {"w": weight.detach().clone()})
    ckpts = tmp_path / "ppo" / "checkpoints"
    ppo_state.save_checkpoint(ckpts, 1, None, optimizer, scheduler, {"note": "step 1"})

    def disk_full(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"half")  # part of the file made it to disk
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ppo_state.torch, "save", disk_full)
    run = lambda cfg: ppo_state.save_checkpoint(ckpts, 2, None, optimizer, scheduler, {"note": "step 2"})  # noqa: E731
    assert cli.stage_main("ppo", run, [f"run_dir={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: the disk is full" in err and "optimizer.pt" in err and "resumes" in err
    monkeypatch.undo()
    monkeypatch.setattr(ppo_state, "load_adapter_state", lambda roles, state: None)
    restored = ppo_state.load_checkpoint(ckpts, None, optimizer, scheduler)
    assert restored["note"] == "step 1" and restored["path"].endswith("checkpoint-1")
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-1"]  # the half-written save is gone
