"""Build the instruction task's files (rlhf/demo/instruct.py) for a real chat model: `make data-instruct`.

The same recipe as the demo's (rlhf/demo/build.py): mixed-quality demonstrations, K = 4 near-miss answers per
prompt ranked by noisy simulated annotators, PPO prompts, and held-out requests seen by no training stage.
Prompts are chat messages, so every stage renders them through the model's own chat template (its default
system prompt included). No base model is built: the task is meant for a pre-trained instruct model
(`make model-smollm2`). Deterministic from one seed; a few seconds.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from rlhf.demo import instruct as task
from rlhf.demo.build import chat, distinct, split_requests, task_datasets, write_jsonl


@dataclass(frozen=True)
class InstructSpec:
    seed: int = 0
    n_sft_train: int = 1000
    n_sft_eval: int = 100
    p_perfect: float = 0.25
    """The demonstrator's share of perfect answers (as the demo's): the rest have one or two flaws."""
    n_rank_prompts: int = 1500
    k: int = 4
    n_pairs_eval: int = 100
    annotator_noise: float = 0.1
    """Gumbel noise scale on gold scores when annotators rank answers (as the demo's)."""
    n_prompts_train: int = 512
    n_prompts_eval: int = 100
    held_out_fraction: float = 0.2


def make_datasets(spec: InstructSpec) -> dict[str, list[dict]]:
    rng = random.Random(spec.seed)
    train_req, eval_req = split_requests(rng, spec.held_out_fraction, task.all_requests())

    def near_misses(r: task.Request) -> list[str]:
        draft = task.make_draft(rng, r)
        return distinct(lambda: task.write_answer(rng, r, task.sample_flaws(rng, 0.3), draft=draft), spec.k, 50, r.text)

    return task_datasets(
        rng, spec, train_req, eval_req, chat,
        demonstration=lambda r: task.write_answer(rng, r, task.sample_flaws(rng, spec.p_perfect)),
        near_misses=near_misses, judge=task.gold_score)


def build(out_dir: str | Path, spec: InstructSpec = InstructSpec()) -> Path:
    """Write the task's data files into `out_dir`; DONE is written last."""
    out = Path(out_dir)
    (out / "DONE").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in make_datasets(spec).items():
        write_jsonl(out / f"{name}.jsonl", rows)
    (out / "build_spec.json").write_text(json.dumps(spec.__dict__, indent=2))
    (out / "DONE").write_text("ok\n")
    return out
