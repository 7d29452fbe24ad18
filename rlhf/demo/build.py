"""Build the embedded demo: data files, a word-level tokenizer and a small pre-trained base model.

Everything is deterministic from one seed. The base model is pre-trained here on "web text" of the
task's world (category word lists and low-quality dialogues), so that it knows the words and the chat
layout but answers badly: SFT, RM and PPO then each have something to add. See data/README.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from rlhf.demo import task

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
# A chat template of the usual shape: role markers, an end token after each assistant turn.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} "
    "{% if m['role'] == 'assistant' %}<|end|> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True)
class BuildSpec:
    seed: int = 0
    n_sft_train: int = 2000
    n_sft_eval: int = 200
    p_perfect: float = 0.25
    """The demonstrator's share of perfect answers; the rest have one or two flaws. It sets the headroom RL has
    over imitation: a win rate over SFT (ties half) cannot pass 1 - (SFT's perfect share) / 2. 0.25 gives SFT
    33 % perfect answers, a ceiling of about 0.83 (why not 0.4: docs/results.md, "The full schedule")."""
    n_rank_prompts: int = 3000
    k: int = 4
    """Answers ranked per prompt (InstructGPT used K = 4..9)."""
    shared_draft: bool = True
    """The K answers of a ranking come from one writer's draft and differ only by their flaws, as K samples
    of one policy do: a repeated item is then told from its near miss ("oak elm oak" vs "oak elm ash").
    Independent answers (False) differ in many ways at once and left the RM blind to single repeats."""
    n_pairs_eval: int = 400
    annotator_noise: float = 0.1
    """Gumbel noise scale on gold scores when annotators rank answers (0: perfect annotators)."""
    n_prompts_train: int = 1024
    n_prompts_eval: int = 200
    held_out_fraction: float = 0.2
    """Share of the 200 distinct requests never seen in training (SFT, RM, PPO); eval uses only these."""
    n_pretrain: int = 12000
    pretrain_epochs: int = 8
    """3 epochs left "no repeats" half-learned: an item already listed kept P(listed) / P(new) = 0.27
    in a list and 0.55 after a chat prompt, even without repeats in the dialogues; 8 epochs: 0.13 after a chat
    prompt and 0.07 in a list (pre-training ~150 s on 2 CPU cores)."""
    pretrain_lr: float = 5e-4
    """At 3e-3 the base never learned that a list does not repeat its items: it gave an item
    already listed the same probability as a new one, so neither an RM nor a policy built on it could tell
    "a b a" from "a b c" (docs/design.md, "The demo task")."""
    pretrain_list_max: int = 12
    """Pre-training lists hold 2..this many items of a category (of 12): long lists make "no repeats" pay."""
    pretrain_chat_repeats: bool = False
    """Whether the pre-training dialogues' poor answers may repeat an item. They have the demonstrator's other
    flaws either way. With repeats the base learns that chat answers repeat, and SFT then repeats items more
    often than its demonstrations (docs/design.md, "The demo task")."""
    hidden_size: int = 192
    layers: int = 4
    heads: int = 4
    intermediate_size: int = 512


def split_requests(rng: random.Random, held_out_fraction: float, requests: list | None = None):
    """(training, held-out) requests, shuffled by `rng`: the demo's, or a task's `requests`."""
    requests = list(task.all_requests() if requests is None else requests)
    rng.shuffle(requests)
    n_held = round(len(requests) * held_out_fraction)
    return requests[n_held:], requests[:n_held]


def chat(request: task.Request) -> list[dict]:
    return [{"role": "user", "content": request.text}]


def noisy_ranking(rng: random.Random, request, answers: list[str], noise: float, judge=task.gold_score) -> list[int]:
    """Simulated annotator: sort by `judge` (a gold score) plus Gumbel noise (a Plackett-Luce ranking), best first."""
    def perturbed(i):
        g = -math.log(-math.log(rng.random() or 1e-12)) if noise > 0 else 0.0
        return judge(request.text, answers[i]) + noise * g
    return sorted(range(len(answers)), key=perturbed, reverse=True)


def distinct(write, k: int, tries: int, what: str) -> list[str]:
    """k different answers from `write()` (equal answers make no preference), at most tries * k calls."""
    answers: list[str] = []
    for _ in range(tries * k):
        a = write()
        if a not in answers:
            answers.append(a)
        if len(answers) == k:
            return answers
    raise RuntimeError(f"could not write {k} distinct answers to {what!r}")


def distinct_answers(rng, request, k, p_perfect, tries=50, shared_draft=False):
    """k different answers of mixed quality; see BuildSpec.shared_draft."""
    draft = rng.sample(task.CATEGORIES[request.category], len(task.CATEGORIES[request.category])) if shared_draft else None
    return distinct(lambda: task.write_answer(rng, request, task.sample_flaws(rng, p_perfect), draft=draft), k, tries,
                    request.text)


def make_datasets(spec: BuildSpec) -> dict[str, list[dict]]:
    rng = random.Random(spec.seed)
    train_req, eval_req = split_requests(rng, spec.held_out_fraction)
    return task_datasets(
        rng, spec, train_req, eval_req, chat,
        demonstration=lambda r: task.write_answer(rng, r, task.sample_flaws(rng, spec.p_perfect)),
        near_misses=lambda r: distinct_answers(rng, r, spec.k, p_perfect=0.3, shared_draft=spec.shared_draft),
        judge=task.gold_score, pairs_train=True)


def task_datasets(rng: random.Random, spec, train_req: list, eval_req: list, chat, demonstration, near_misses,
                  judge, pairs_train: bool = False) -> dict[str, list[dict]]:
    """A demo-style task's files, drawn from `rng` in a fixed order (the same seed gives the same files):
    SFT demonstrations (`demonstration(request)`), K-way rankings of `near_misses(request)` by a simulated
    annotator (`judge` plus Gumbel noise, spec.annotator_noise), best-vs-worst pairs (held-out; also for
    training with `pairs_train`), and prompt-only files for PPO and eval. `spec` gives the counts."""
    def sft_rows(n, pool):
        return [{"prompt": chat(r), "completion": demonstration(r)} for r in (rng.choice(pool) for _ in range(n))]

    def ranking_rows(n, pool):
        rows = []
        for _ in range(n):
            r = rng.choice(pool)
            answers = near_misses(r)
            rows.append({"prompt": chat(r), "responses": answers,
                         "ranking": noisy_ranking(rng, r, answers, spec.annotator_noise, judge=judge)})
        return rows

    def pair_rows(n, pool):
        return [{"prompt": row["prompt"], "chosen": row["responses"][row["ranking"][0]],
                 "rejected": row["responses"][row["ranking"][-1]]} for row in ranking_rows(n, pool)]

    files = {"sft_train": sft_rows(spec.n_sft_train, train_req), "sft_eval": sft_rows(spec.n_sft_eval, eval_req),
             "rm_rankings_train": ranking_rows(spec.n_rank_prompts, train_req)}
    if pairs_train:
        files["rm_pairs_train"] = pair_rows(spec.n_rank_prompts, train_req)
    files["rm_pairs_eval"] = pair_rows(spec.n_pairs_eval, eval_req)
    files["prompts_train"] = [{"prompt": chat(rng.choice(train_req))} for _ in range(spec.n_prompts_train)]
    files["prompts_eval"] = [{"prompt": chat(rng.choice(eval_req))} for _ in range(spec.n_prompts_eval)]
    return files


def pretrain_corpus(spec: BuildSpec) -> list[str]:
    """Web text of the task's world: category lists, and dialogues whose answers are mostly poor."""
    rng = random.Random(spec.seed + 1)
    docs = []
    for _ in range(spec.n_pretrain):
        r = rng.choice(task.all_requests())
        if rng.random() < 0.6:
            items = rng.sample(task.CATEGORIES[r.category], rng.randint(2, spec.pretrain_list_max))
            docs.append(f"{r.category} : {' '.join(items)}")
        else:
            flaws = task.sample_flaws(rng, p_perfect=0.05)
            if not spec.pretrain_chat_repeats:
                flaws = tuple(f for f in flaws if f != "repeat")
            answer = task.write_answer(rng, r, flaws)
            docs.append(f"<|user|> {r.text} <|assistant|> {answer} <|end|>")
    return docs


def build_tokenizer(words: list[str] | None = None):
    """A word-level tokenizer over `words` (default: the demo task's vocabulary) with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + (words or task.vocabulary()))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    core.add_special_tokens(SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", eos_token="<|end|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_base_model(spec: BuildSpec, tokenizer, corpus: list[str], out_dir: Path) -> None:
    """A small Llama-architecture model, pre-trained on `corpus` with the plain LM loss (transformers Trainer)."""
    import torch
    from datasets import Dataset
    from transformers import (DataCollatorForLanguageModeling, LlamaConfig, LlamaForCausalLM, Trainer,
                              TrainingArguments)

    torch.manual_seed(spec.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.heads,
        max_position_embeddings=128, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    data = Dataset.from_dict({"text": corpus}).map(
        lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"])
    args = TrainingArguments(
        output_dir=str(out_dir / "_pretrain"), num_train_epochs=spec.pretrain_epochs, per_device_train_batch_size=64,
        learning_rate=spec.pretrain_lr, warmup_steps=50, lr_scheduler_type="cosine", weight_decay=0.01, logging_steps=50,
        save_strategy="no", report_to=[], seed=spec.seed, use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=data,
            data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False)).train()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


# The built base as it ships in git (data/demo-base/): `make data` copies it instead of pre-training when its
# key matches the spec, the pre-training corpus and the tokenizer; otherwise it pre-trains (~2.5 min on 2 cores).
BASE_CACHE = Path(__file__).resolve().parents[2] / "data" / "demo-base"
BASE_FIELDS = ("seed", "n_pretrain", "pretrain_epochs", "pretrain_lr", "pretrain_list_max", "pretrain_chat_repeats",
               "hidden_size", "layers", "heads", "intermediate_size")
KEY_FILE = "base_key.json"


def base_key(spec: BuildSpec, tokenizer, corpus: list[str]) -> dict:
    """What the pre-trained base depends on: the spec's base fields and a digest of the corpus, the vocabulary
    and the chat template (the task's word lists and writer are in the corpus)."""
    h = hashlib.sha256()
    for part in (json.dumps(corpus), json.dumps(tokenizer.get_vocab(), sort_keys=True), tokenizer.chat_template):
        h.update(part.encode())
        h.update(b"\0")
    return {"spec": {f: asdict(spec)[f] for f in BASE_FIELDS}, "inputs_sha256": h.hexdigest()}


def cached_base(cache: Path | None, key: dict) -> Path | None:
    """The cache directory when it holds a base built under `key`, else None."""
    if cache is None or not (cache / KEY_FILE).is_file() or not (cache / "model.safetensors").is_file():
        return None
    return cache if json.loads((cache / KEY_FILE).read_text()) == key else None


def save_base_cache(base_dir: Path, cache: Path, key: dict) -> None:
    """Store a built base as the cache (`python data/build_demo.py --update-cache`; commit data/demo-base/)."""
    if cache.exists():
        shutil.rmtree(cache)
    shutil.copytree(base_dir, cache, ignore=shutil.ignore_patterns("_pretrain"))
    (cache / KEY_FILE).write_text(json.dumps(key, indent=2) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def build(out_dir: str | Path, spec: BuildSpec = BuildSpec(), cache: Path | None = BASE_CACHE,
          update_cache: bool = False) -> Path:
    """Write the demo into `out_dir` (data files, base/ model dir); DONE is written last. The base is copied
    from `cache` when the cache was built from the same spec, corpus and tokenizer, else pre-trained (and then
    stored as the cache with `update_cache`). cache=None: always pre-train."""
    out = Path(out_dir)
    (out / "DONE").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in make_datasets(spec).items():
        write_jsonl(out / f"{name}.jsonl", rows)
    tokenizer = build_tokenizer()
    corpus = pretrain_corpus(spec)
    key = base_key(spec, tokenizer, corpus)
    hit = None if update_cache else cached_base(cache, key)
    if (out / "base").exists():
        shutil.rmtree(out / "base")
    if hit is not None:
        shutil.copytree(hit, out / "base", ignore=shutil.ignore_patterns(KEY_FILE))
        print(f"[data] base model: copied from {hit} (built from this spec; --no-cache pre-trains it)")
    else:
        if cache is not None and not update_cache:
            print(f"[data] base model: {cache} was not built from this spec; pre-training (~2.5 min on 2 cores)")
        build_base_model(spec, tokenizer, corpus, out / "base")
        if update_cache and cache is not None:
            save_base_cache(out / "base", cache, key)
            print(f"[data] base model stored in {cache} (commit it)")
    (out / "build_spec.json").write_text(json.dumps(spec.__dict__, indent=2))
    (out / "DONE").write_text("ok\n")
    return out
