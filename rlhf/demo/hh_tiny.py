"""A tiny randomly initialised model with a byte-level BPE tokenizer trained on the HH-RLHF sample, and the
sample split into training and test rows.

It lets the pipeline run on real Anthropic HH data from a config alone, on a CPU, with no download: the
tokenizer ships like a base model's (no chat template, no pad token), so the HH layout and the pad-token
fix of `rlhf.models.load_tokenizer` are exercised the way a real base model would exercise them. The split
(`hh_train.jsonl`, `hh_test.jsonl`, rows as they ship) keeps the prompts PPO and `make eval` are judged on
out of SFT, RM and PPO training, as HH-RLHF's own train/test splits do.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HH_SAMPLE = Path(__file__).resolve().parents[2] / "data" / "hh" / "hh-harmless-sample.jsonl"
EOS = "<|endoftext|>"


def hh_texts(path: Path = HH_SAMPLE) -> list[str]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row[key] for row in rows for key in ("chosen", "rejected")]


def split_sample(out: Path, test_fraction: float = 0.1, seed: int = 0, path: Path = HH_SAMPLE) -> tuple[Path, Path]:
    """Write the sample's rows, unchanged, into out/hh_train.jsonl and out/hh_test.jsonl (a seeded split by row)."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    order = list(range(len(lines)))
    random.Random(seed).shuffle(order)
    test = set(order[:round(len(lines) * test_fraction)])
    files = out / "hh_train.jsonl", out / "hh_test.jsonl"
    files[0].write_text("".join(line + "\n" for i, line in enumerate(lines) if i not in test))
    files[1].write_text("".join(line + "\n" for i, line in enumerate(lines) if i in test))
    return files


def build(out_dir: str | Path, vocab_size: int = 1024, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    (out / "DONE").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    split_sample(out, seed=seed)
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(hh_texts(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, bos_token=EOS)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=2048, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id, tie_word_embeddings=True))
    model.save_pretrained(out / "base")
    tok.save_pretrained(out / "base")
    (out / "DONE").write_text("ok\n")
    return out
