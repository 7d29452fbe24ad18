import subprocess
import sys
from pathlib import Path

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


def leaves(tree, prefix=""):
    """{"a.b": value} for every leaf of a nested dict."""
    out = {}
    for k, v in tree.items():
        out |= leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_mean_what_they_say_and_fit_together(path, tmp_path):
    """Every value a shipped config sets arrives in the typed config unchanged; its sizes, dtype, plug-ins and
    checkpoint names are ones the stages accept; and it saves and reloads to the same config."""
    import dataclasses
    import yaml
    from omegaconf import OmegaConf
    from rlhf.models import resolve_dtype
    from rlhf.plugins import import_callable
    from rlhf.checks import check_batch_sizes

    cfg = load_config(path)
    loaded = leaves(OmegaConf.to_container(OmegaConf.structured(cfg)))
    written = leaves(yaml.safe_load(path.read_text()))
    assert written and {k: loaded[k] for k in written} == written
    assert cfg.run_dir != PipelineConfig().run_dir or path.name == "demo.yaml"  # examples do not share a run dir
    resolve_dtype(cfg.model.dtype)
    p = cfg.ppo
    check_batch_sizes(p.sampling.rollout_batch_size, p.update.num_minibatches, p.update.grad_accum)
    assert p.ptx.coef == 0 or p.ptx.file
    for spec in (p.judge, cfg.eval.judge, cfg.rm.pair_tags):
        assert spec is None or callable(import_callable(spec))
    assert cfg.eval.baseline in cfg.eval.checkpoints
    data_dir = str(Path(cfg.model.name_or_path).parent)  # the directory `make data` / `make data-hh` builds
    files = [cfg.sft.train_file, cfg.sft.eval_file, cfg.rm.train_file, cfg.rm.eval_file, p.prompts_file,
             p.eval_prompts_file, cfg.eval.prompts_file]
    assert all(f is None or f.startswith(data_dir + "/") for f in files), (data_dir, files)
    assert dataclasses.asdict(load_config(save_config(cfg, tmp_path))) == dataclasses.asdict(cfg)


@pytest.mark.parametrize("name", ["demo.yaml", "demo-quick.yaml", "greetings.yaml"])
def test_shipped_configs_keep_the_default_guards(name):
    """What a new task copies acts on what the guards detect, as the defaults do: the guarded choice of the kept
    policy, the RM's high epoch cap with early stopping, the probes' warnings gating unguarded PPO."""
    from rlhf.config import PPOStageConfig, RMStageConfig
    cfg, ppo, rm = load_config(ROOT / "configs" / name), PPOStageConfig(), RMStageConfig()
    assert (cfg.ppo.guards.keep_best, cfg.ppo.guards.accept_rm_warnings) == (ppo.guards.keep_best, ppo.guards.accept_rm_warnings)
    assert cfg.ppo.guards.keep_best == "monitor_reward_guarded" and cfg.ppo.monitor.every > 0 and cfg.ppo.eval_prompts_file
    assert (cfg.rm.train.epochs, cfg.rm.early_stopping) == (rm.train.epochs, rm.early_stopping)
    assert cfg.rm.probes.train_share == rm.probes.train_share


# The demo's variants: configs/demo.yaml with only run_dir (runs/<name>) and these keys changed, so that their
# figures (docs/results.md) compare with the demo's PPO and differ by what the name says.
DEMO_VARIANTS = {
    "demo-grpo.yaml": {"ppo.estimator.name", "ppo.sampling.group_size", "ppo.estimator.grpo_kl"},
    "demo-rloo.yaml": {"ppo.estimator.name", "ppo.sampling.group_size"},
    "demo-gold-reward.yaml": {"ppo.reward.terms"},
    "demo-quick.yaml": {"sft.train.epochs", "rm.train.max_steps", "rm.train.lr_scheduler", "rm.train.warmup",
                        "ppo.steps", "ppo.sampling.rollout_batch_size"},
}


@pytest.mark.parametrize("name", sorted(DEMO_VARIANTS))
def test_demo_variants_change_only_what_their_name_says(name):
    import yaml

    demo = leaves(yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text()))
    other = leaves(yaml.safe_load((ROOT / "configs" / name).read_text()))
    changed = {k for k in demo.keys() | other.keys() if demo.get(k, "<unset>") != other.get(k, "<unset>")}
    assert changed - {"run_dir"} <= DEMO_VARIANTS[name], f"{name}: also changes {sorted(changed - DEMO_VARIANTS[name])}"
    assert other["run_dir"] == "runs/" + name.removesuffix(".yaml")


def test_gold_reward_config_trains_on_the_gold_judge():
    from rlhf.checks import check_ppo
    from rlhf.plugins import reward_function
    from rlhf.reward_sources import uses_functions

    cfg = load_config(ROOT / "configs" / "demo-gold-reward.yaml")
    assert [t.source for t in cfg.ppo.reward.terms] == [cfg.eval.judge] == ["rlhf.demo.task:gold_score"]
    assert cfg.ppo.estimator.name == "gae" and uses_functions(cfg.ppo.reward.terms)
    check_ppo(cfg)
    reward_function(cfg.ppo.reward.terms[0].source, "ppo.reward.terms[0]")  # importable and callable as f(prompt, response)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "stages.sft", *args], cwd=ROOT, capture_output=True, text=True)


def test_cli_print_config_and_clean_errors():
    ok = cli("--config", str(DEMO_CONFIG), "--print-config", "lora.r=5")
    assert ok.returncode == 0 and "r: 5" in ok.stdout
    bad = cli("--config", str(DEMO_CONFIG), "lora.bogus=1")
    assert bad.returncode == 2
    assert "error: command-line override: key 'sft.lora.bogus'" in bad.stderr
    assert "Traceback" not in bad.stderr


ENTRY = """import runpy, sys
sys.argv = ["stages.{stage}", *{args!r}]
try:
    runpy.run_module("stages.{stage}", run_name="__main__")
except SystemExit as e:
    print("exit", e.code, "torch loaded:", "torch" in sys.modules)
"""


@pytest.mark.parametrize("stage,args,message", [
    ("sft", ["lora.bogus=1"], "key 'sft.lora.bogus'"),
    ("rm", ["run_dir={tmp}"], "has no finished sft stage"),
    ("export", ["run_dir={tmp}"], "has no finished"),
    ("ppo", ["ppo.bogus=1"], "key 'ppo.bogus'"),
    ("eval", ["run_dir={tmp}", "eval.prompts_file={tmp}/none.jsonl"], "none.jsonl"),
])
def test_bad_input_is_reported_before_torch_loads(stage, args, message, tmp_path, demo_dir):
    """A mistyped key or a missing stage costs a second, not the ten that loading torch and transformers takes:
    the entry points import the stage only once the config and the inputs are checked. The demo's base is built
    first, so that each case fails on its own bad input and not on a missing model."""
    args = ["--config", str(DEMO_CONFIG)] + [a.format(tmp=tmp_path) for a in args]
    proc = subprocess.run([sys.executable, "-c", ENTRY.format(stage=stage, args=args)], cwd=ROOT,
                          capture_output=True, text=True)
    assert "exit 2 torch loaded: False" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_every_config_field_has_a_docstring():
    """Each field of every config dataclass is followed by its docstring (what it does, its unit, its special
    values): the YAML keys are the user's interface."""
    import ast

    from rlhf import config as config_module

    tree = ast.parse(Path(config_module.__file__).read_text())
    missing = []
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        for field_node, after in zip(cls.body, cls.body[1:] + [None]):
            if isinstance(field_node, ast.AnnAssign):
                documented = isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) \
                    and isinstance(after.value.value, str)
                if not documented:
                    missing.append(f"{cls.name}.{field_node.target.id}")
    assert missing == [], f"config fields without a docstring: {missing}"


def test_the_ppo_settings_are_grouped_and_an_old_flat_key_names_its_new_place(tmp_path):
    """ppo.kl.coef from YAML and from the command line (stage-relative too); a flat key of before the sections is
    one error line naming where it went, before anything loads."""
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["kl.coef=0.2", "ppo.sampling.group_size=2"], stage="ppo")
    assert (cfg.ppo.kl.coef, cfg.ppo.sampling.group_size, cfg.ppo.update.epochs) == (0.2, 2, 4)
    for override, moved in (("ppo.kl_coef=0.2", "ppo.kl_coef is now ppo.kl.coef"),
                            ("rollout_batch_size=8", "ppo.rollout_batch_size is now ppo.sampling.rollout_batch_size"),
                            ("ppo.estimator=grpo", "ppo.estimator is now ppo.estimator.name")):
        with pytest.raises(ConfigError, match=moved.replace(".", r"\.")):
            load_config(ROOT / "configs" / "demo.yaml", [override], stage="ppo")
    old = tmp_path / "old.yaml"
    old.write_text("ppo:\n  steps: 5\n  monitor_every: 2\n")
    with pytest.raises(ConfigError, match=r"old\.yaml: ppo\.monitor_every is now ppo\.monitor\.every"):
        load_config(old)
    proc = subprocess.run([sys.executable, "-m", "stages.ppo", "--config", str(old), f"run_dir={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True)  # the stage's command line, before torch loads
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {old}: ppo.monitor_every is now ppo.monitor.every (the PPO settings are grouped in sections)"]
