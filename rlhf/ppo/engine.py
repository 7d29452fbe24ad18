"""Where PPO's rollouts are sampled (ppo.sampling.engine): `hf`, transformers' generate on the trainer's own model,
or `vllm`, a vLLM server fed the policy adapter after every update (rlhf/vllm_engine.py).

With vllm, each step begins with a sync: the policy adapter, with the SFT adapter beneath it as one LoRA, is
written to <ppo>/engine/ and loaded into the engine under a new name (the step and this process's start); then
the engine's log-probs of a fixed probe set of answers are compared with the trainer's, and a difference above
vllm.probe_tolerance stops the run with one line. The engine's log-probs of the sampled tokens come back with
the rollout: the trainer still computes the old log-probs itself; the two give the mismatch metric and the
truncated importance weights of the update (ppo.update.tis_cap).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from peft import get_peft_model_state_dict

from rlhf import distributed
from rlhf.config import PipelineConfig
from rlhf.errors import EngineError
from rlhf.generation import SamplingSpec
from rlhf.ppo.roles import POLICY, Roles, policy_logits
from rlhf.ppo.rollout import sample as hf_sample
from rlhf.sequences import response_logprobs, response_width
from rlhf import vllm_engine as ve


class HFEngine:
    """Rollouts from the trainer's own model (transformers' generate)."""

    name = "hf"

    def sync(self, roles: Roles, step: int) -> dict[str, float]:
        return {}

    def sample(self, roles: Roles, tokenizer, prompts: list[list[int]], spec: SamplingSpec, batch_size: int,
               step: int) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None]:
        ids, mask, width = hf_sample(roles, tokenizer, prompts, spec, batch_size)
        return ids, mask, width, None

    def close(self) -> None:
        pass


def probe_tolerance(cfg: PipelineConfig) -> float:
    """vllm.probe_tolerance, or by the compute dtype: in float32 the engine's kernels and the trainer's agree to
    ~1e-6 per token (the demo), in bfloat16 to ~6e-2 (SmolLM2-135M-Instruct on a CPU, before any update)."""
    if cfg.vllm.probe_tolerance is not None:
        return cfg.vllm.probe_tolerance
    return 1e-3 if cfg.model.dtype == "float32" else 0.15


class VLLMEngine:
    """Rollouts from a vLLM server: started here (the main process; the others connect to it) or at vllm.url."""

    name = "vllm"

    def __init__(self, cfg: PipelineConfig, sft_dir: Path, out: Path, tokenizer, stop_ids: list[int], procs,
                 prompt_ids: list[list[int]]):
        self.cfg, self.out, self.tokenizer, self.stop_ids = cfg, Path(out), tokenizer, list(stop_ids)
        self.rank, self.main = procs.process_index, procs.is_main_process
        self.sft = ve.read_adapter(sft_dir)
        self.tolerance = probe_tolerance(cfg)
        # SFT and policy as one LoRA; every process samples from the main process's server, under its names
        self.client, self.server, self.token = ve.shared_engine(cfg, cfg.sft.lora.r + cfg.ppo.lora.r,
                                                                self.out / "engine" / "server.log")
        self.version: str | None = None  # the adapter the engine holds: the last sync's
        self.probe_prompts = prompt_ids[:max(1, cfg.vllm.probe_answers)]
        self.probes: list[list[int]] | None = None

    def sync(self, roles: Roles, step: int) -> dict[str, float]:
        """Write the policy as it is now, load it into the engine under a new name, and check the engine against
        the trainer on the probe answers. Returns the probe's figures (engine/...)."""
        name = f"policy-{step}-{self.token}"
        if self.main:
            state = {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(roles.model,
                                                                                     adapter_name=POLICY).items()}
            self.client.publish(name, [self.sft, (roles.model.peft_config[POLICY].to_dict(), state)],
                                self.out / "engine")
            if self.version is not None:  # the engine and the disk hold the current version and nothing older
                self.client.retire(self.version, self.out / "engine")
        self.version = name
        checked = self.check_probes(roles, step) if self.main else {}
        # every process logs the main process's figures; and the others sample only after the check: not beside
        # its prompt log-probs (vLLM 0.32's CPU LoRA kernels fail on the two in one batch; docs/engines.md)
        return distributed.gather_objects(checked)[0]

    @torch.no_grad()
    def check_probes(self, roles: Roles, step: int) -> dict[str, float]:
        """The engine's and the trainer's log-probs of the probe answers (drawn once, at the first sync, greedy
        from the engine) under the current version; EngineError when they differ by more than the tolerance."""
        if self.probes is None:
            drawn = self.client.sample(self.probe_prompts, self.version, self.cfg.ppo.sampling.max_new_tokens, 1.0,
                                       [0] * len(self.probe_prompts), self.stop_ids, greedy=True)
            self.probes = [s.tokens or [self.stop_ids[0]] for s in drawn]
        engine = self.client.answer_logprobs(list(zip(self.probe_prompts, self.probes)), self.version)
        ids, mask, width = ve.pack(self.probe_prompts, self.probes, self.tokenizer.pad_token_id)
        device = next(roles.model.parameters()).device
        ids, mask = ids.to(device), mask.to(device)
        trainer = response_logprobs(policy_logits(roles, ids, mask, response_width(ids, width)), ids, width, 1.0)
        diffs = torch.cat([(trainer[i, :len(e)].float().cpu() - torch.tensor(e)).abs() for i, e in enumerate(engine)])
        mean, worst = diffs.mean().item(), diffs.max().item()
        if not mean <= self.tolerance:
            raise EngineError(f"vLLM engine out of sync at step {step}: adapter {self.version} gives log-probs of the "
                              f"probe answers {mean:.3g} per token away from the trainer's (max {worst:.3g}; "
                              f"vllm.probe_tolerance={self.tolerance:g})")
        return {"engine/probe_diff_mean": mean, "engine/probe_diff_max": worst}

    def sample(self, roles: Roles, tokenizer, prompts: list[list[int]], spec: SamplingSpec, batch_size: int,
               step: int) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
        seeds = ve.row_seeds(self.cfg.ppo.seed, step, self.rank, len(prompts))
        got = self.client.sample(prompts, self.version, spec.max_new_tokens, spec.temperature, seeds, self.stop_ids)
        ids, mask, width = ve.pack(prompts, [s.tokens for s in got], tokenizer.pad_token_id)
        logprobs = torch.zeros(ids.shape[0], ids.shape[1] - width)
        for i, s in enumerate(got):
            logprobs[i, :len(s.logprobs)] = torch.tensor(s.logprobs)
        device = next(roles.model.parameters()).device
        return ids.to(device), mask.to(device), width, logprobs.to(device)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None


def build_engine(cfg: PipelineConfig, sft_dir: Path, out: Path, tokenizer, stop_ids: list[int], procs,
                 prompt_ids: list[list[int]]):
    if cfg.ppo.sampling.engine == "vllm":
        engine = VLLMEngine(cfg, sft_dir, out, tokenizer, stop_ids, procs, prompt_ids)
        if procs.is_main_process:
            print(f"[ppo] rollouts from vLLM at {engine.client.url}; probe tolerance {engine.tolerance:g} per token",
                  file=sys.stderr)
        return engine
    return HFEngine()


def mismatch(trainer: torch.Tensor, engine: torch.Tensor | None, mask: torch.Tensor) -> dict[str, float]:
    """Engine vs trainer log-probs of the sampled tokens: mean and max absolute difference per token."""
    if engine is None:
        return {}
    d = (trainer.float() - engine.float()).abs()[mask]
    return {"engine/mismatch_mean": d.mean().item(), "engine/mismatch_max": d.max().item()} if d.numel() else {}
