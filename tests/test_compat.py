"""The trl/transformers internals rlhf relies on are checked before a stage runs, with one clear message."""

import transformers

from rlhf import compat
from rlhf.cli import stage_main


def test_installed_libraries_have_every_attribute_we_rely_on():
    assert [n.attr for n in compat.NEEDED if not n.present()] == []
    compat.check()


def test_a_missing_private_attribute_stops_the_stage_with_one_line_naming_the_supported_versions(monkeypatch,
                                                                                                 capsys):
    monkeypatch.delattr(transformers.Trainer, "_remove_unused_columns")
    ran = []
    assert stage_main("rm", ran.append, []) == 2
    assert ran == []  # nothing loaded
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith(f"error: transformers {transformers.__version__} has no Trainer._remove_unused_columns "
                          "(used by rlhf/rm/train.py")
    assert "rlhf supports transformers >=5.23,<5.25, trl >=1.16,<1.17" in err and "constraints.txt" in err


def test_an_instance_attribute_set_in_init_counts_as_present_and_its_absence_is_caught():
    class Old:
        def __init__(self):
            self.other = 1

    class New(Old):
        def __init__(self):
            super().__init__()
            self._train_batch_size = 8

    assert compat._set_in_init(New) >= {"_train_batch_size", "other"}
    assert "_train_batch_size" not in compat._set_in_init(Old)


def test_each_stage_imports_only_the_libraries_it_checks(tmp_path):
    """PPO never uses trl's trainers: checking them cost its process ~110 MB (their modules and datasets'),
    which is what moved `make bench`'s PPO / SFT peak memory on the large setup from 1.06 to 1.15. And a stage
    that loads no quantized model never imports bitsandbytes (`cli.skip_bitsandbytes`), which peft would."""
    import subprocess
    import sys
    (tmp_path / "config.json").write_text("{}")
    probe = ("import sys; from rlhf.compat import check; from rlhf.cli import skip_bitsandbytes\n"
             "from rlhf.config import load_config\n"
             f"print(skip_bitsandbytes(load_config(None, ['model.name_or_path={tmp_path}'])))\n"
             "for stage in ('ppo', 'rm'):\n"
             "    check(stage); print(sorted(m for m in ('trl.trainer.reward_trainer', 'trl.trainer.dpo_trainer', "
             "'transformers.trainer') if m in sys.modules))\n"
             "import peft, bitsandbytes\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.stdout.splitlines() == ["True", "[]", "['transformers.trainer', 'trl.trainer.reward_trainer']"]
    assert "ModuleNotFoundError: import of bitsandbytes halted; None in sys.modules" in out.stderr, out.stderr
    assert {n.attr for n in compat.NEEDED if "ppo" in n.stages} == {"_active_adapter", "_disable_adapters"}
