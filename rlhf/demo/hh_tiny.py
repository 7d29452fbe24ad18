"""A tiny randomly initialised model with a byte-level BPE tokenizer trained on the HH-RLHF sample.

It lets the pipeline run on real Anthropic HH data from a config alone, on a CPU, with no download: the
tokenizer ships like a base model's (no chat template, no pad token), so the HH layout and the pad-token
fix of `rlhf.models.load_tokenizer` are exercised the way a real base model would exercise them.
"""

from __future__ import annotations

import json
from pathlib import Path

HH_SAMPLE = Path(__file__).resolve().parents[2] / "data" / "hh" / "hh-harmless-sample.jsonl"
EOS = "<|endoftext|>"


def hh_texts(path: Path = HH_SAMPLE) -> list[str]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row[key] for row in rows for key in ("chosen", "rejected")]


def build(out_dir: str | Path, vocab_size: int = 1024, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    (out / "DONE").unlink(missing_ok=True)
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
