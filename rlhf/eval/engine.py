"""eval.engine: the checkpoints' answers from transformers' generate (hf) or from a vLLM server (vllm).

With vllm, the server holds the base; `sft` is the SFT adapter, an adapter checkpoint (the PPO or DPO policy)
the SFT adapter and it as one LoRA (rlhf/vllm_engine.py), and `base` no adapter. A full model directory (an
export) is other weights: it answers through transformers, and the stage says so. Every checkpoint samples
with the same seeds (one per answer, from eval.seed), so identical models give identical answers, as with hf.
Log-probs, scores and the KL are the trainer's own in both cases (rlhf/eval/judging.py).
"""

from __future__ import annotations

from pathlib import Path

from rlhf import distributed
from rlhf import vllm_engine as ve
from rlhf.config import PipelineConfig
from rlhf.eval.checkpoints import Checkpoint
from rlhf.generation import SamplingSpec


class EvalEngine:
    """A vLLM server for one evaluation: started by the main process (or at vllm.url), closed at the end."""

    def __init__(self, cfg: PipelineConfig, sft_dir: Path | None, checkpoints: list[Checkpoint], out: Path, state):
        self.cfg, self.out, self.main = cfg, Path(out), state.is_main_process
        self.sft = ve.read_adapter(sft_dir) if sft_dir else None
        ranks = [ve.read_adapter(c.path)[0]["r"] for c in checkpoints if c.kind == "adapter"]
        rank = (self.sft[0]["r"] if self.sft else 0) + max(ranks, default=0)
        self.client, self.server, self.token = ve.shared_engine(cfg, max(rank, 8), self.out / "engine" / "server.log")
        self.loaded: str | None = None

    def serves(self, ckpt: Checkpoint) -> bool:
        return ckpt.kind in ("base", "sft", "adapter")

    def load(self, ckpt: Checkpoint) -> str | None:
        """The name the engine answers `ckpt` under (None: the base itself), its adapter loaded if it has one."""
        if ckpt.kind == "base":
            return None
        name = f"eval-{ckpt.name}-{self.token}"
        if self.main:
            parts = [self.sft] + ([ve.read_adapter(ckpt.path)] if ckpt.kind == "adapter" else [])
            self.client.publish(name, parts, self.out / "engine")
        distributed.state().wait_for_everyone()
        self.loaded = name
        return name

    def unload(self) -> None:
        if self.loaded and self.main:
            self.client.retire(self.loaded, self.out / "engine")
        self.loaded = None

    def answer(self, ckpt: Checkpoint, prompt_ids: list[list[int]], items: list[int], spec: SamplingSpec, seed: int,
               pad_id: int, stop_ids: list[int]):
        """generate_ids' (ids, mask, P) for `prompt_ids`, item `items[i]` sampled with its own seed."""
        name = self.load(ckpt)
        try:
            seeds = ve.row_seeds(seed, 0, 0, max(items) + 1)
            got = self.client.sample(prompt_ids, name, spec.max_new_tokens, spec.temperature or 1.0,
                                     [seeds[i] for i in items], stop_ids, greedy=not spec.do_sample,
                                     top_k=spec.top_k or 0, top_p=spec.top_p if spec.top_p is not None else 1.0)
        finally:
            self.unload()
        return ve.pack(prompt_ids, [s.tokens for s in got], pad_id)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
