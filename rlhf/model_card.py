"""The model card (`README.md`) of an exported model, and the optional push to the Hugging Face hub.

The card is what the hub shows: YAML front matter (`license`, `base_model`, `tags`, `library_name`, the
fields the hub indexes) then the base, the data, the key settings and the resolved config, and the
evaluation figures the run wrote (`eval/metrics.json`, `ppo/eval.json`) when there are any.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from rlhf.config import PipelineConfig, to_yaml
from rlhf.eval.flags import win_rate_text

UNSET_LICENCE = " (not set: `export.license`; it must respect the base model's licence)"
_EVAL_COLUMNS = (("reward_mean", "RM score"), ("reward_win_rate", "RM win rate"), ("gold_mean", "gold"),
                 ("gold_win_rate", "gold win rate"), ("kl_mean", "KL"), ("length_mean", "length"))


def is_hub_id(name: str) -> bool:
    """`org/name` that is not a local path: what the hub's `base_model` field accepts."""
    return name.count("/") == 1 and not Path(name).exists() and not name.startswith((".", "/"))


def front_matter(cfg: PipelineConfig, stage: str) -> dict:
    meta = {"license": cfg.export.license or "other", "library_name": "transformers",
            "tags": ["rlhf", stage, "lora-merged", "trl", "peft"]}
    if is_hub_id(cfg.model.name_or_path):
        meta["base_model"] = cfg.model.name_or_path
    return meta


def data_files(cfg: PipelineConfig, stage: str) -> list[tuple[str, str]]:
    files = [("SFT demonstrations", cfg.sft.train_file)]
    if stage == "ppo":
        files += [("reward model preferences", cfg.rm.train_file), ("PPO prompts", cfg.ppo.prompts_file)]
        if cfg.ppo.ptx.coef > 0 and cfg.ppo.ptx.file:
            files.append(("PPO-ptx demonstrations", cfg.ppo.ptx.file))
    return files


def key_settings(cfg: PipelineConfig, stage: str) -> list[str]:
    s = cfg.sft
    out = [f"SFT: LoRA r {s.lora.r}, alpha {s.lora.alpha}, lr {s.train.lr}, {s.train.epochs} epochs, "
           f"max length {s.max_length}"]
    if stage == "ppo":
        p = cfg.ppo
        out += [f"reward model: LoRA r {cfg.rm.lora.r}, lr {cfg.rm.train.lr}, ensemble of {cfg.rm.ensemble}",
                f"PPO: {p.steps} steps x {p.sampling.rollout_batch_size} rollouts, lr {p.update.lr}, "
                f"kl coef {p.kl.coef} "
                f"({'adaptive' if p.kl.adaptive else 'fixed'}, {p.kl.estimator}), clip {p.update.clip_range}, "
                f"temperature {p.sampling.temperature}, max {p.sampling.max_new_tokens} new tokens, LoRA r {p.lora.r}"]
    return out


def eval_section(run_dir: Path) -> list[str]:
    lines = []
    metrics = run_dir / "eval" / "metrics.json"
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        lines += ["## Evaluation", "",
                  f"{m['n_prompts']} held-out prompts (`{m['prompts_file']}`); win rates against `{m['baseline']}`, "
                  "ties counting half (95% bootstrap interval in brackets).", ""]
        for decoding, rows in m["results"].items():
            lines += [f"**{decoding}**", "", "| checkpoint | " + " | ".join(t for _, t in _EVAL_COLUMNS) + " |",
                      "|---" * (len(_EVAL_COLUMNS) + 1) + "|"]
            for name, row in rows.items():
                lines.append(f"| {name} | " + " | ".join(_figure(row, key) for key, _ in _EVAL_COLUMNS) + " |")
            lines.append("")
    ppo_eval = run_dir / "ppo" / "eval.json"
    if ppo_eval.is_file():
        e = json.loads(ppo_eval.read_text())
        lines += ["## PPO policy vs SFT (end of training)", ""]
        lines += [f"- `{k}`: {v:.4g}" for k, v in e.items() if k.startswith("eval/") and isinstance(v, (int, float))]
        lines.append("")
    return lines


def _figure(row: dict, key: str) -> str:
    if key not in row:
        return "-"
    if row.get(key + "_low") is None or row.get(key + "_high") is None:
        return f"{row[key]:.3f}"
    return win_rate_text(row, key)


def card(cfg: PipelineConfig, stage: str) -> str:
    """The README.md of `make export`'s directory for `stage` (sft or ppo) of the run cfg.run_dir."""
    meta = front_matter(cfg, stage)
    what = "SFT, then PPO against a learned reward model" if stage == "ppo" else "supervised fine-tuning"
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# {Path(cfg.run_dir).name}: {stage.upper()} model", "",
             f"`{cfg.model.name_or_path}`" + (f" (revision `{cfg.model.revision}`)" if cfg.model.revision else "")
             + f" fine-tuned by {what} with the rlhf pipeline; the LoRA adapters are merged into the base, so it "
             "loads with `AutoModelForCausalLM.from_pretrained` alone.", "",
             f"Licence: `{meta['license']}`" + ("" if cfg.export.license else UNSET_LICENCE) + ".", "",
             "## Data", ""]
    lines += [f"- {kind}: `{path}`" for kind, path in data_files(cfg, stage)] + ["", "## Training", ""]
    lines += [f"- {line}" for line in key_settings(cfg, stage)] + [""]
    lines += eval_section(Path(cfg.run_dir))
    lines += ["## Resolved config", "", "```yaml", to_yaml(cfg).strip(), "```", ""]
    return "\n".join(lines)


def push_to_hub(folder: Path, repo_id: str, private: bool = True, api=None) -> str:
    """Upload the exported directory to the hub model repo `repo_id` (created if missing); returns its URL.
    Needs a token (`huggingface-cli login` or HF_TOKEN)."""
    if api is None:
        from huggingface_hub import HfApi
        api = HfApi()
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", ignore_patterns=["DONE"],
                      commit_message=f"rlhf export of {folder.name}")
    return f"https://huggingface.co/{repo_id}"
