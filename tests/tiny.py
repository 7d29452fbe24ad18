"""Tiny random models built in the test process, for fast unit tests of the roles on one shared base."""

from pathlib import Path

import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf.config import LoraSpec
from rlhf.models import disable_dropout, lora_config
from rlhf.ppo.roles import build_roles
from rlhf.rm.scoring import build_reward_model, save_head

LORA = LoraSpec(r=4, alpha=8)


def tiny_llama(vocab_size: int, dtype: torch.dtype = torch.float32, seed: int = 0, **config) -> LlamaForCausalLM:
    """A 2-layer Llama with hidden size 32, in `dtype`, in eval mode with dropout off (as load_causal_lm leaves it)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **config)
    model = LlamaForCausalLM(cfg).to(dtype).eval()  # as from_pretrained leaves it
    disable_dropout(model)
    return model


def randomize_lora_b(model, seed: int = 1, std: float = 0.05) -> None:
    """LoRA B starts at 0 (adapter = identity); give every B some weight so the adapters change outputs."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=std)


def tiny_rm_dir(out: Path, sft_model_factory, seed: int = 0) -> Path:
    """An RM stage's output for the model `sft_model_factory()` builds: a trained-looking SEQ_CLS adapter and
    score head, written as the RM stage writes them (adapter_model.safetensors + score_head.safetensors)."""
    clf = build_reward_model(sft_model_factory(), seed=seed)
    model = get_peft_model(clf, lora_config(LORA, task_type="SEQ_CLS", modules_to_save=["score"]))
    randomize_lora_b(model, seed)
    model.save_pretrained(out)
    save_head(model.base_model.model, out)
    return Path(out)


def tiny_roles(tmp_path: Path, tokenizer, dtype: torch.dtype = torch.float32, value_from_reward: bool = True):
    """The four PPO roles on a tiny Llama whose vocabulary fits `tokenizer`."""
    factory = lambda: tiny_llama(len(tokenizer), dtype, pad_token_id=tokenizer.pad_token_id)  # noqa: E731
    rm_dir = tiny_rm_dir(tmp_path / "rm", factory)
    return build_roles(factory(), rm_dir, tokenizer, LORA, value_from_reward)
