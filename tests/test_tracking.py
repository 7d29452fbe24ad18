"""report_to: TensorBoard by default, any Trainer tracker added by name, W&B in its offline mode."""

import importlib.util

import pytest
from transformers import TrainingArguments

from rlhf.cli import stage_main
from rlhf.config import ConfigError, TrainSpec, load_config
from rlhf.trainers import trainer_kwargs
from rlhf.tracking import Trackers


def test_tensorboard_is_the_default_and_the_trainer_gets_the_other_trackers(tmp_path):
    assert load_config().report_to == ["tensorboard"]
    assert trainer_kwargs(TrainSpec(), tmp_path / "sft", False, ["tensorboard"])["report_to"] == []
    kwargs = trainer_kwargs(TrainSpec(), tmp_path / "sft", False, ["tensorboard", "wandb"])
    args = TrainingArguments(**kwargs)
    assert args.report_to == ["wandb"] and args.run_name == f"{tmp_path.name}/sft"


def test_an_unknown_tracker_is_one_clear_error_before_anything_loads(capsys):
    with pytest.raises(ConfigError, match=r"report_to: unknown tracker 'wandbb'; supported: .*tensorboard.*wandb"):
        load_config(None, ["report_to=[tensorboard,wandbb]"])
    ran = []
    assert stage_main("sft", ran.append, ["report_to=[wandbb]"]) == 2 and ran == []
    assert capsys.readouterr().err.startswith("error: report_to: unknown tracker 'wandbb'")


def test_ppo_and_eval_trackers_write_tensorboard_and_nothing_else_by_default(tmp_path):
    t = Trackers(["tensorboard"], tmp_path, config={"lr": 1e-3})
    t.log({"ppo/kl": 0.5, "ppo/nan": float("nan")}, step=1)
    t.close()
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tb"]
    Trackers(["tensorboard"], tmp_path / "other", enabled=False).log({"ppo/kl": 1.0}, 1)  # not the main process
    assert not (tmp_path / "other").exists()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (the test extra has it)")
def test_wandb_offline_run_records_the_metrics_and_config_locally(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # no wrapping of the streams pytest captures
    out = tmp_path / "run" / "ppo"
    t = Trackers(["tensorboard", "wandb"], out, config={"ppo": {"lr": 3e-4}})
    for step in (1, 2):
        t.log({"ppo/kl": 0.1 * step, "ppo/score": 1.0 + step}, step=step)
    t.close()
    import wandb

    wandb.teardown()  # what the process's exit does: waits for wandb's service to flush and close the run's file
    assert any((out / "tb").glob("events.out.tfevents.*"))
    (run,) = (tmp_path / "wandb").glob("offline-run-*")  # offline: written here, nothing sent
    (records,) = run.glob("run-*.wandb")  # wandb's protobuf log: history, config and run name, as `wandb sync` reads it
    data = records.read_bytes()
    assert data.count(b"ppo/kl") >= 2 and b"ppo/score" in data  # one history row per step
    assert b"run/ppo" in data and b"0.0003" in data              # the run's name and its config
