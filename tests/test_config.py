import subprocess
import sys

import pytest

from rlhf.config import ConfigError, LoraSpec, PipelineConfig, load_config, save_config
from conftest import DEMO_CONFIG, ROOT


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_then_yaml_then_overrides(tmp_path):
    path = write(tmp_path, "run_dir: runs/x\nsft:\n  lora: {r: 4}\n  train: {lr: 0.5}\n")
    cfg = load_config(path, ["sft.train.lr=0.25"])
    assert isinstance(cfg, PipelineConfig) and isinstance(cfg.sft.lora, LoraSpec)
    assert cfg.run_dir == "runs/x"
    assert cfg.sft.lora.r == 4  # from YAML
    assert cfg.sft.lora.alpha == LoraSpec().alpha  # default kept
    assert cfg.sft.train.lr == 0.25  # override wins over YAML


def test_stage_relative_overrides():
    cfg = load_config(None, ["lora.r=8", "train.lr=1e-4", "model.dtype=bfloat16", "run_dir=r"], stage="sft")
    assert (cfg.sft.lora.r, cfg.sft.train.lr, cfg.model.dtype, cfg.run_dir) == (8, 1e-4, "bfloat16", "r")


def test_null_and_list_overrides():
    cfg = load_config(None, ["sft.eval_file=null", "sft.lora.target_modules=[q_proj,v_proj]"])
    assert cfg.sft.eval_file is None
    assert cfg.sft.lora.target_modules == ["q_proj", "v_proj"]


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = write(tmp_path, "sft:\n  lora: {rank: 4}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: key 'sft\.lora\.rank'"):
        load_config(path)


def test_unknown_override_names_key():
    with pytest.raises(ConfigError, match=r"override: key 'sft\.train\.lrr'"):
        load_config(None, ["train.lrr=1"], stage="sft")


def test_wrong_type_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"key 'sft\.lora\.r'.*could not be converted"):
        load_config(write(tmp_path, "sft:\n  lora: {r: many}\n"))
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(None, ["sft.lora.r"])


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config("nope.yaml")


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(DEMO_CONFIG, ["lora.r=3"], stage="sft")
    path = save_config(cfg, tmp_path)
    assert load_config(path) == cfg


def test_shipped_configs_load():
    for path in (ROOT / "configs").glob("*.yaml"):
        load_config(path)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "stages.sft", *args], cwd=ROOT, capture_output=True, text=True)


def test_cli_print_config_and_clean_errors():
    ok = cli("--config", str(DEMO_CONFIG), "--print-config", "lora.r=5")
    assert ok.returncode == 0 and "r: 5" in ok.stdout
    bad = cli("--config", str(DEMO_CONFIG), "lora.bogus=1")
    assert bad.returncode == 2
    assert "error: command-line override: key 'sft.lora.bogus'" in bad.stderr
    assert "Traceback" not in bad.stderr
