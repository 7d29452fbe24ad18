"""Build the greetings task (rlhf/demo/greetings.py): data files, a word-level tokenizer, a small base.

The same recipe as the demo (rlhf/demo/build.py, whose tokenizer and pre-training it reuses): mixed-quality
demonstrations, K = 4 near-miss answers per prompt ranked by noisy simulated annotators, PPO prompts, and
held-out requests seen by no training stage. The base is smaller than the demo's and pre-trains in about a
minute on one core: it knows the words, the message layout and that a message copies a name, but answers
badly. Deterministic from one seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from rlhf.demo import greetings as task
from rlhf.demo.build import build_base_model, build_tokenizer, distinct, split_requests, task_datasets, write_jsonl


@dataclass(frozen=True)
class GreetingsSpec:
    seed: int = 0
    n_sft_train: int = 2000
    n_sft_eval: int = 200
    p_perfect: float = 0.25
    """The demonstrator's share of perfect answers (as the demo's): the rest have one or two flaws."""
    n_rank_prompts: int = 3000
    k: int = 4
    n_pairs_eval: int = 400
    annotator_noise: float = 0.1
    """Gumbel noise scale on gold scores when annotators rank answers (as the demo's)."""
    n_prompts_train: int = 1024
    n_prompts_eval: int = 200
    held_out_fraction: float = 0.2
    n_pretrain: int = 6000
    pretrain_epochs: int = 3
    """282 steps of 64 documents: about a minute on one idle core."""
    pretrain_lr: float = 1.5e-3
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    intermediate_size: int = 384


def chat(request: task.Request) -> list[dict]:
    return [{"role": "user", "content": request.text}]


def distinct_answers(rng: random.Random, request: task.Request, k: int, p_perfect: float, tries: int = 50) -> list[str]:
    """k different answers from one writer's draft, differing only by their flaws (near misses)."""
    draft = task.make_draft(rng, request)
    return distinct(lambda: task.write_answer(rng, request, task.sample_flaws(rng, p_perfect), draft=draft), k, tries,
                    request.text)


def make_datasets(spec: GreetingsSpec) -> dict[str, list[dict]]:
    rng = random.Random(spec.seed)
    train_req, eval_req = split_requests(rng, spec.held_out_fraction, task.all_requests())

    return task_datasets(
        rng, spec, train_req, eval_req, chat,
        demonstration=lambda r: task.write_answer(rng, r, task.sample_flaws(rng, spec.p_perfect)),
        near_misses=lambda r: distinct_answers(rng, r, spec.k, p_perfect=0.3), judge=task.gold_score)


def pretrain_corpus(spec: GreetingsSpec) -> list[str]:
    """Web text of the task's world: which wishes go with which occasion, messages headed by their
    addressee (the name copied), and dialogues whose answers are mostly poor (never a doubled word)."""
    rng = random.Random(spec.seed + 1)
    flawed = tuple(f for f in task.FLAWS if f != "doubled")
    docs = []
    for _ in range(spec.n_pretrain):
        r = rng.choice(task.all_requests())
        u = rng.random()
        if u < 0.3:
            docs.append(f"{r.occasion} : {' '.join(rng.sample(task.WISHES[r.occasion], rng.randint(1, 2)))}")
        elif u < 0.55:
            docs.append(f"to {r.name} : {task.write_answer(rng, r, ())}")
        else:
            flaws = tuple(f for f in task.sample_flaws(rng, p_perfect=0.05) if f in flawed)
            docs.append(f"<|user|> {r.text} <|assistant|> {task.write_answer(rng, r, flaws)} <|end|>")
    return docs


def build(out_dir: str | Path, spec: GreetingsSpec = GreetingsSpec()) -> Path:
    """Write the greetings task into `out_dir` (data files, base/ model dir); DONE is written last."""
    out = Path(out_dir)
    (out / "DONE").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in make_datasets(spec).items():
        write_jsonl(out / f"{name}.jsonl", rows)
    tokenizer = build_tokenizer(task.vocabulary())
    build_base_model(spec, tokenizer, pretrain_corpus(spec), out / "base")
    (out / "build_spec.json").write_text(json.dumps(spec.__dict__, indent=2))
    (out / "DONE").write_text("ok\n")
    return out
