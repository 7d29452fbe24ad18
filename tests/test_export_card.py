"""make export's model card and the optional hub push (never run for real: HfApi is replaced)."""

import json
from types import SimpleNamespace

import huggingface_hub
import pytest
import yaml

from rlhf import export
from rlhf.config import load_config
from rlhf.model_card import card, push_to_hub


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.fixture()
def run(tmp_path):
    (tmp_path / "eval").mkdir()
    row = {"n": 200, "reward_mean": -1.685, "reward_win_rate": 0.886, "reward_win_rate_low": 0.863,
           "reward_win_rate_high": 0.907, "gold_mean": 0.939, "kl_mean": 1.575, "length_mean": 4.2}
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps({
        "n_prompts": 200, "prompts_file": "data/demo/prompts_eval.jsonl", "baseline": "sft",
        "results": {"sample": {"sft": {"n": 200, "reward_mean": -5.094}, "ppo": row}}}))
    (tmp_path / "ppo").mkdir()
    (tmp_path / "ppo" / "eval.json").write_text(json.dumps({"eval/n_prompts": 200, "eval/kl": 1.4321}))
    return tmp_path


def test_card_has_hub_front_matter_data_settings_eval_figures_and_the_config(run):
    cfg = load_config(None, [f"run_dir={run}", "model.name_or_path=Qwen/Qwen2.5-0.5B-Instruct",
                             "export.license=apache-2.0", "ppo.kl.coef=0.07"])
    text = card(cfg, "ppo")
    assert front_matter(text) == {"license": "apache-2.0", "library_name": "transformers",
                                  "tags": ["rlhf", "ppo", "lora-merged", "trl", "peft"],
                                  "base_model": "Qwen/Qwen2.5-0.5B-Instruct"}
    for expected in ("- SFT demonstrations: `data/demo/sft_train.jsonl`",
                     "- reward model preferences: `data/demo/rm_rankings_train.jsonl`",
                     "- PPO prompts: `data/demo/prompts_train.jsonl`",
                     "kl coef 0.07 (fixed, k1)",
                     "| ppo | -1.685 | 0.886 (0.863–0.907) | 0.939 | - | 1.575 | 4.200 |",
                     "| sft | -5.094 | - | - | - | - | - |",
                     "- `eval/kl`: 1.432",
                     "```yaml\nrun_dir: " + str(run)):
        assert expected in text


def test_card_of_a_local_base_has_no_base_model_and_says_the_licence_is_unset(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}", f"model.name_or_path={tmp_path}"])
    text = card(cfg, "sft")
    meta = front_matter(text)
    assert meta["license"] == "other" and "base_model" not in meta and meta["tags"][:2] == ["rlhf", "sft"]
    assert "not set: `export.license`" in text
    assert "PPO prompts" not in text and "## Evaluation" not in text  # SFT only, no eval ran


class FakeApi:
    calls: list = []

    def __init__(self, *a, **k):
        FakeApi.calls.append(("HfApi", k))

    def create_repo(self, **kwargs):
        FakeApi.calls.append(("create_repo", kwargs))

    def upload_folder(self, **kwargs):
        FakeApi.calls.append(("upload_folder", kwargs))


def test_push_creates_the_repo_and_uploads_the_folder(tmp_path, monkeypatch):
    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert push_to_hub(tmp_path, "me/tiny-ppo", private=False) == "https://huggingface.co/me/tiny-ppo"
    assert FakeApi.calls[1:] == [
        ("create_repo", {"repo_id": "me/tiny-ppo", "repo_type": "model", "private": False, "exist_ok": True}),
        ("upload_folder", {"folder_path": str(tmp_path), "repo_id": "me/tiny-ppo", "repo_type": "model",
                           "ignore_patterns": ["DONE"], "commit_message": f"rlhf export of {tmp_path.name}"})]


def fake_model_io(monkeypatch):
    """export.run without models: a fake tokenizer and model that just write a file when saved."""
    def saver(name):
        return lambda path: (path.mkdir(parents=True, exist_ok=True), (path / name).write_text("x"))
    tok = SimpleNamespace(pad_token_id=0, eos_token_id=1, save_pretrained=saver("tokenizer.json"))
    model = SimpleNamespace(generation_config=SimpleNamespace(), parameters=lambda: [],
                            save_pretrained=saver("model.safetensors"))
    model.to = lambda dtype: model
    monkeypatch.setattr(export, "require_done", lambda path, stage: path)
    monkeypatch.setattr(export, "load_tokenizer", lambda path: tok)
    monkeypatch.setattr(export, "load_sft_model", lambda *a: model)
    monkeypatch.setattr(export, "stop_token_ids", lambda tokenizer, generation_config: [tokenizer.eos_token_id])


@pytest.mark.parametrize("push", [None, "me/tiny-sft"])
def test_export_writes_the_card_and_pushes_only_when_asked(tmp_path, monkeypatch, push):
    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    fake_model_io(monkeypatch)
    overrides = [f"run_dir={tmp_path}", "export.stage=sft"] + ([f"export.push_to_hub={push}"] if push else [])
    out = export.run(load_config(None, overrides))
    assert front_matter((out / "README.md").read_text())["tags"][1] == "sft"
    assert (out / "model.safetensors").exists() and (out / "DONE").exists()
    assert [c[0] for c in FakeApi.calls] == ([] if push is None else ["HfApi", "create_repo", "upload_folder"])
