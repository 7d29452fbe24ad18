"""Every bad input is one line before anything loads or any stage directory changes (rlhf/preflight.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rlhf import cli, preflight  # noqa: E402
from rlhf.rm import train as rm  # noqa: E402
from rlhf.config import ConfigError, load_config  # noqa: E402

BAD = Path(__file__).parent / "data_bad"
ROOT = Path(__file__).resolve().parent.parent


def model_dir(path: Path, adapter: bool = False) -> Path:
    path.mkdir(parents=True)
    (path / ("adapter_config.json" if adapter else "config.json")).write_text("{}")
    return path


@pytest.mark.parametrize("name, message", [
    ("./models/qwen", "model.name_or_path='./models/qwen': no such directory"),
    ("runs/x/sft", "model.name_or_path='runs/x/sft': no such directory"),
    ("Qwen/Qwen 2.5", "model.name_or_path='Qwen/Qwen 2.5' is neither a local directory nor a valid hub id"),
    ("nobody-has/this-model-17", "no local directory of that name, and the hub model is not in the local cache"),
])
def test_a_bad_model_path_is_one_line(name, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as info:
        preflight.check_model_path(name)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_model_path_directories(tmp_path):
    preflight.check_model_path(str(model_dir(tmp_path / "base")))
    with pytest.raises(ConfigError, match="is a LoRA adapter directory, not a model"):
        preflight.check_model_path(str(model_dir(tmp_path / "sft", adapter=True)))
    with pytest.raises(ConfigError, match="a directory without a model in it"):
        preflight.check_model_path(str(tmp_path))


def test_a_chat_template_that_fails_to_render_is_one_line(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({"[UNK]": 0, "</s>": 1}, unk_token="[UNK]"))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="</s>")
    tok.chat_template = (BAD / "chat_template_fails.jinja").read_text()
    base = model_dir(tmp_path / "base")
    tok.save_pretrained(base)
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}], "completion": "hello"}) + "\n")
    cfg = load_config(None, [f"model.name_or_path={base}", f"train_file={data}", "eval_file=null"], stage="sft")
    with pytest.raises(ConfigError) as info:
        preflight.check_sft(cfg)
    assert str(info.value) == (f"the chat template of {base} fails to render {data} row 1: TemplateError: "
                               f"the first message must be a system message")


# --- a finished RM stage, run again with a file that is not UTF-8 ---

def finished_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    (run / "sft").mkdir(parents=True)
    (run / "sft" / "DONE").write_text("{}\n")
    (run / "rm").mkdir()
    (run / "rm" / "adapter_model.safetensors").write_bytes(b"trained reward model")
    (run / "rm" / "DONE").write_text('{"rm/accuracy": 0.8}\n')
    return run


def rm_main(run: Path, tmp_path: Path, *args: str) -> int:
    argv = [f"run_dir={run}", f"model.name_or_path={model_dir(tmp_path / 'base')}", *args]
    return cli.stage_main("rm", rm.run, argv, check=preflight.check_rm)


def files(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("force", [[], ["--force"]], ids=["plain", "force"])
def test_bad_file_on_a_finished_stage_changes_nothing_and_names_the_file(force, tmp_path, capsys):
    run = finished_run(tmp_path)
    before = files(run)
    assert rm_main(run, tmp_path, f"train_file={BAD / 'not_utf8.jsonl'}", *force) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not_utf8.jsonl: line 2, byte offset 50: not UTF-8 text" in err
    assert files(run) == before and sorted(p.name for p in run.iterdir()) == ["rm", "sft"]


def test_good_inputs_on_a_finished_stage_refuse_without_force(tmp_path, capsys):
    run = finished_run(tmp_path)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "a", "rejected": "b"}) + "\n" for i in range(2)))
    before = files(run)
    assert rm_main(run, tmp_path, f"train_file={data}", "eval_file=null") == 2
    err = capsys.readouterr().err
    assert err == (f"error: {run / 'rm'} holds a finished rm stage ({run / 'rm' / 'DONE'}); to train it again, add "
                   f"--force (the finished outputs stay until the new run finishes) or run `make clean-rm` first\n")
    assert files(run) == before


def test_bitsandbytes_is_skipped_only_when_nothing_can_load_a_quantized_model(tmp_path):
    """`cli.skip_bitsandbytes` hides bitsandbytes from a stage's process (2-4 s of imports) only when this says
    nothing can need it."""
    base = model_dir(tmp_path / "base")
    plain = [f"model.name_or_path={base}"]
    assert preflight.bitsandbytes_unused(load_config(None, plain))
    assert not preflight.bitsandbytes_unused(load_config(None, plain + ["model.quantization=4bit"]))
    # a user's judge or reward may load a quantized model; the shipped ones (rlhf.*) do not
    assert preflight.bitsandbytes_unused(load_config(None, plain + ["ppo.judge=rlhf.demo.task:gold_score"]))
    assert not preflight.bitsandbytes_unused(load_config(None, plain + ["eval.judge=mine.judge:score"]))
    assert not preflight.bitsandbytes_unused(load_config(None, plain + ["ppo.reward.terms=[{source: mine.r:f}]"]))
    # a pre-quantized checkpoint, as the base or as a model eval judges
    quantized = tmp_path / "quantized"
    quantized.mkdir()
    (quantized / "config.json").write_text(json.dumps({"quantization_config": {"load_in_4bit": True}}))
    assert not preflight.bitsandbytes_unused(load_config(None, [f"model.name_or_path={quantized}"]))
    assert not preflight.bitsandbytes_unused(load_config(None, plain + [f"eval.checkpoints=[sft, q={quantized}]"]))
    assert preflight.bitsandbytes_unused(load_config(None, plain + [f"eval.checkpoints=[sft, b={base}]"]))
    # a hub id not in the cache: unknown, so not skipped
    assert not preflight.bitsandbytes_unused(load_config(None, ["model.name_or_path=nobody-has/this-model-17"]))


def test_probe_pairs_share_and_a_warned_rm_under_an_unguarded_ppo_are_one_line(tmp_path):
    """rm.probes.train_share outside [0, 1]; the plateau schedule without early stopping; PPO with
    ppo.guards.keep_best=none on a reward model its stage warned about (rm/diagnostics.json): each stopped before
    anything loads, with one line naming the keys."""
    run = finished_run(tmp_path)
    base = [f"run_dir={run}", f"model.name_or_path={model_dir(tmp_path / 'base')}"]
    with pytest.raises(ConfigError) as info:
        preflight.check_rm(load_config(None, base + ["rm.probes.train_share=1.5"]))
    assert str(info.value) == "rm.probes.train_share must be between 0 and 1 (a share of the training answers), got 1.5"
    with pytest.raises(ConfigError, match="^rm.train.lr_scheduler=reduce_lr_on_plateau steps on the held-out"):
        preflight.check_rm(load_config(None, base + ["rm.early_stopping.enabled=false"]))
    (run / "rm" / "diagnostics.json").write_text(json.dumps({"warnings": ["the RM prefers a 'repeat' damaged answer"]}))
    with pytest.raises(ConfigError) as info:
        preflight.check_ppo(load_config(None, base + ["ppo.guards.keep_best=none"]))
    assert "ppo.guards.keep_best=none" in str(info.value) and "ppo.guards.accept_rm_warnings" in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError) as info:  # accepted: the next check is reached (the base is not a model)
        preflight.check_ppo(load_config(None, base + ["ppo.guards.keep_best=none", "ppo.guards.accept_rm_warnings=true"]))
    assert "accept_rm_warnings" not in str(info.value)


def test_every_stage_s_settings_are_checked_with_torch_blocked():
    """rlhf.checks (one check per stage, the cross-field rules) and rlhf.preflight import and run where torch
    cannot be imported at all: a bad key is reported in a second, before the heavy libraries."""
    code = """
import sys
sys.modules["torch"] = None  # any import of torch now fails
from rlhf import checks, preflight
from rlhf.config import ConfigError, load_config
cfg = load_config("configs/demo.yaml")
for stage in ("sft", "rm", "ppo", "dpo", "eval", "export"):
    getattr(checks, "check_" + stage)(cfg)
bad = {"sft": "sft.max_prompt_length=600", "rm": "rm.ensemble=0", "ppo": "ppo.estimator.name=ppo2",
       "dpo": "dpo.beta=0", "eval": "eval.engine=tgi", "export": "export.stage=rm"}
for stage, override in bad.items():
    try:
        getattr(checks, "check_" + stage)(load_config("configs/demo.yaml", [override]))
    except ConfigError as e:
        print(stage, "refused:", str(e).split(":")[0].split(" ")[0])
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    refused = dict(line.split(" refused: ") for line in proc.stdout.splitlines())
    assert refused == {"sft": "sft.max_prompt_length=600", "rm": "rm.ensemble", "ppo": "ppo.estimator.name",
                       "dpo": "dpo.beta", "eval": "eval.engine", "export": "export.stage"}
