"""The checkpoints `make eval` judges, and the models that produce their answers.

A checkpoint is named in `eval.checkpoints` as
    base | sft | ppo | dpo     this run's base model, SFT model, PPO policy, DPO policy
    <stage>?                   that stage of this run if it has finished, else nothing (the default list ends
                               with `dpo?`: `make eval` judges the DPO policy whenever `make dpo` has run)
    [name=]DIR                 a full model directory (e.g. from `make export`: loads with plain transformers)
                               or a PEFT adapter directory over the SFT model (e.g. <run>/ppo/policy)

The SFT weights are held once (`SharedSFTModel`): the SFT model itself, the reward adapter that scores answers, and
every adapter checkpoint (the PPO policy...) are views of that one model, and the reference of the KL is
the same model with its adapters off. Only `base` and full model directories load weights of their own,
one at a time, while their answers are generated.

Each checkpoint is traced to the stage that produced it (`provenance`): its algorithm and the wall time and
peak memory that stage's DONE marker recorded, for the report's comparison of quality and cost.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from peft import PeftModel
from transformers import AutoModelForCausalLM

from rlhf import distributed
from rlhf.checks import EVAL_STAGES
from rlhf.config import ConfigError, PipelineConfig
from rlhf.models import (active_adapter, disable_dropout, load_causal_lm, load_sft_model, load_tokenizer,
                         resolve_dtype, sft_only)
from rlhf.rm.scoring import attach_reward
from rlhf.runs import done_summary, is_done, require_done

OPTIONAL = "?"  # `dpo?`: judged when this run's dpo stage has finished


@dataclass(frozen=True)
class Checkpoint:
    name: str
    kind: str
    """base | sft | adapter (a PEFT adapter over the SFT model, the PPO policy included) | model (a full model dir)"""
    path: str | None = None


def parse_checkpoints(entries: list[str], run_dir: Path) -> list[Checkpoint]:
    """eval.checkpoints -> Checkpoints, every path checked before any model loads."""
    out: list[Checkpoint] = []
    for entry in entries:
        name, sep, where = entry.partition("=")
        if not sep:
            name, where = "", entry
        if where in EVAL_STAGES and not name:
            out.append(_stage_checkpoint(where, run_dir))
            continue
        if where.endswith(OPTIONAL) and where[:-1] in EVAL_STAGES and not name:
            if where[:-1] in ("base", "sft") or is_done(run_dir / where[:-1]):
                out.append(_stage_checkpoint(where[:-1], run_dir))
            continue
        path = Path(where)
        if not path.is_dir():
            raise ConfigError(f"eval.checkpoints: {entry!r} is neither {', '.join(EVAL_STAGES)} (or one with `?`) "
                              f"nor a directory")
        if (path / "adapter_config.json").is_file():
            kind = "adapter"
            _check_adapter_run(entry, path, run_dir)
        elif (path / "config.json").is_file():
            kind = "model"
        else:
            raise ConfigError(f"eval.checkpoints: {path} holds neither a model (config.json) "
                              f"nor a PEFT adapter (adapter_config.json)")
        out.append(Checkpoint(name or path.name, kind, str(path)))
    if not out:  # the names are checked before (rlhf/checks.check_eval): distinct, the baseline among them
        raise ConfigError("eval.checkpoints is empty")
    return out


def _check_adapter_run(entry: str, path: Path, run_dir: Path) -> None:
    """An adapter checkpoint goes over this run's SFT weights: refuse one that a pipeline trained over others.

    An SFT adapter is over the base model, and another run's PPO policy over that run's SFT model; stacked on
    this run's SFT model either would answer as no trained model does. Adapters from outside a run are not
    checked."""
    path = path.resolve()
    run = next((d for d in list(path.parents)[:4] if is_done(d / "sft")), None)
    if run is None:
        return
    if path.is_relative_to(run / "sft"):
        raise ConfigError(f"eval.checkpoints: {entry!r} is an SFT adapter, trained over the base model, and "
                          f"would be stacked on this run's SFT model: name `sft` for this run's SFT model, or "
                          f"judge that run with run_dir={run}")
    if run != run_dir.resolve() and _sft_weights(run) != _sft_weights(run_dir):
        raise ConfigError(f"eval.checkpoints: {entry!r} was trained over the SFT model of {run}, not over this "
                          f"run's ({run_dir / 'sft'}): judge it with run_dir={run}, or `make export` it and name "
                          f"the exported directory")


def _sft_weights(run: Path) -> bytes | None:
    weights = run / "sft" / "adapter_model.safetensors"
    return weights.read_bytes() if weights.is_file() else None


def _stage_checkpoint(stage: str, run_dir: Path) -> Checkpoint:
    if stage == "base":
        return Checkpoint("base", "base")
    if stage == "sft":
        return Checkpoint("sft", "sft", str(require_done(run_dir / "sft", "sft")))
    if stage == "dpo":  # the DPO stage's directory is its adapter, over the SFT model as PPO's policy is
        return Checkpoint("dpo", "adapter", str(require_done(run_dir / "dpo", "dpo")))
    return Checkpoint("ppo", "adapter", str(require_done(run_dir / "ppo", "ppo") / "policy"))


# ppo.estimator.name -> the algorithm's usual name (docs/algorithms.md, "Which estimator")
ALGORITHMS = {"gae": "PPO (GAE)", "grpo": "GRPO", "rloo": "RLOO", "reinforce_pp": "REINFORCE++"}
PERF = {"wall_s": "perf/wall_s", "peak_rss_mb": "perf/peak_rss_mb", "peak_cuda_mb": "perf/peak_cuda_mb"}


def producer(ckpt: Checkpoint, run_dir: Path) -> Path | None:
    """The finished stage directory that produced `ckpt`: this run's sft stage; an adapter or model directory
    that is a stage itself (<run>/dpo, an export) or sits directly in one (<run>/ppo/policy -> <run>/ppo).
    None for the base model and for directories no finished stage wrote."""
    if ckpt.kind == "base":
        return None
    if ckpt.kind == "sft":
        return run_dir / "sft"
    path = Path(ckpt.path)
    return next((d for d in (path, path.parent) if is_done(d)), None)


def provenance(ckpt: Checkpoint, run_dir: Path) -> dict:
    """{"stage": the producing stage's directory, "algorithm": e.g. "GRPO", "wall_s", "peak_rss_mb",
    "peak_cuda_mb"} as far as they are known; a key is absent when not (no stage, no DONE summary, no GPU)."""
    if ckpt.kind == "base":
        return {"algorithm": "base"}
    stage = producer(ckpt, run_dir)
    summary = done_summary(stage) if stage else None
    if summary is None:
        return {}
    out = {"stage": str(stage), "algorithm": _algorithm(stage, summary)}
    return out | {key: summary[name] for key, name in PERF.items() if isinstance(summary.get(name), (int, float))}


def _algorithm(stage: Path, summary: dict) -> str:
    if isinstance(summary.get("stage"), str):  # an export (rlhf/export.py): what was merged
        return f"{summary['stage']} export"
    if stage.name == "ppo":  # the estimator it was trained with, from the config saved beside it
        try:
            ppo = OmegaConf.to_container(OmegaConf.load(stage / "config.yaml").ppo)
        except Exception:  # no readable config beside it: the stage's name is all that is known
            return "ppo"
        # the sections' keys (ppo.estimator.name); a run of before them kept them flat (ppo.estimator, ppo.grpo_kl)
        section = ppo.get("estimator") if isinstance(ppo.get("estimator"), dict) else {
            "name": ppo.get("estimator", "gae"), "std_norm": ppo.get("grpo_std_norm"), "grpo_kl": ppo.get("grpo_kl")}
        estimator = section.get("name", "gae")
        name = ALGORITHMS.get(estimator, estimator)
        if estimator == "grpo":
            name = "Dr. GRPO" if section.get("std_norm") is False else name
            name += ", KL in reward" if section.get("grpo_kl") == "reward" else ""
        return name
    return stage.name.upper() if stage.name in ("sft", "dpo") else stage.name


def device() -> torch.device:
    """This process's device: cuda:<local rank> under `accelerate launch` on GPUs, else cuda or cpu."""
    return distributed.state().device


class SharedSFTModel:
    """The SFT model, held once, with the reward adapter (if scoring) and the adapter checkpoints on it."""

    def __init__(self, cfg: PipelineConfig, sft_dir: Path, tokenizer, rm_dir: Path | None,
                 adapters: list[Checkpoint]):
        model = load_sft_model(cfg.model, sft_dir, tokenizer).to(device()).eval()
        self.scorer = attach_reward(model, rm_dir, tokenizer) if rm_dir else None
        model = self.scorer.model if self.scorer else model
        for ckpt in adapters:
            if isinstance(model, PeftModel):
                model.load_adapter(ckpt.path, adapter_name=ckpt.name, is_trainable=False)
            else:
                model = PeftModel.from_pretrained(model, ckpt.path, adapter_name=ckpt.name)
        model.requires_grad_(False)
        self.model, self.tokenizer = model, tokenizer

    @contextmanager
    def reference(self):
        """The SFT model: every adapter off (a stacked SFT adapter on, alone)."""
        with sft_only(self.model):
            yield self.model

    @contextmanager
    def view(self, ckpt: Checkpoint):
        """(model, tokenizer): the shared model as checkpoint `ckpt` (sft: the reference; adapter: that adapter on)."""
        if ckpt.kind == "sft":
            with self.reference() as model:
                yield model, self.tokenizer
        else:
            with active_adapter(self.model, ckpt.name) as model:
                yield model, self.tokenizer


@contextmanager
def standalone(cfg: PipelineConfig, ckpt: Checkpoint, pipeline_tokenizer):
    """A checkpoint with weights of its own (base, full model dir): loaded, yielded with its tokenizer, freed."""
    if ckpt.kind == "base":
        tokenizer = pipeline_tokenizer
        model = load_causal_lm(cfg.model, tokenizer)
    else:
        tokenizer = load_tokenizer(ckpt.path, trust_remote_code=cfg.model.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(ckpt.path, dtype=resolve_dtype(cfg.model.dtype),
                                                     trust_remote_code=cfg.model.trust_remote_code)
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            raise ValueError(f"{ckpt.path}: the tokenizer has {len(tokenizer)} tokens but the model only "
                             f"{model.get_input_embeddings().weight.shape[0]} embeddings (was a pad token added "
                             f"after export?)")
        disable_dropout(model)
    model.to(device()).eval().requires_grad_(False)
    try:
        yield model, tokenizer
    finally:
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def same_vocabulary(a, b) -> bool:
    """Two tokenizers that map every string to the same ids (then token ids and log-probs compare)."""
    return (a.get_vocab() == b.get_vocab() and a.pad_token_id == b.pad_token_id
            and a.eos_token_id == b.eos_token_id and a.chat_template == b.chat_template)
