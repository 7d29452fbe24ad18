"""make export: merge a stage's adapters into the base, as a standalone Hugging Face model directory.

The result loads with plain `transformers` (`AutoModelForCausalLM.from_pretrained(dir)`) and serves in vLLM
or any other runtime that reads HF checkpoints; this package is not needed to use it. The tokenizer is
saved beside it, with the pad token and chat template the pipeline trained with, and a model card
(`README.md`, rlhf/model_card.py). With `export.push_to_hub: user/name` the directory is then uploaded.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from peft import PeftModel

from rlhf.chat import stop_token_ids
from rlhf.config import ExportConfig, PipelineConfig
from rlhf.model_card import card, push_to_hub
from rlhf.models import load_sft_model, load_tokenizer, resolve_dtype
from rlhf.runs import finish_stage, require_done

STAGES = ExportConfig.STAGES


def run(cfg: PipelineConfig) -> Path:
    e = cfg.export
    if e.stage not in STAGES:
        raise ValueError(f"export.stage must be one of {', '.join(STAGES)}, not {e.stage!r}")
    run_dir = Path(cfg.run_dir)
    sft_dir = require_done(run_dir / "sft", "sft")
    out = Path(e.out_dir or run_dir / f"export-{e.stage}")

    # 1. the SFT model (base + SFT adapter merged), then the PPO policy merged on top; always in full precision,
    # a run on a quantized base (model.quantization) included: its adapters merge into the unquantized weights
    tokenizer = load_tokenizer(str(sft_dir))
    model_cfg = dataclasses.replace(cfg.model, quantization="none", **({"dtype": e.dtype} if e.dtype else {}))
    model = load_sft_model(model_cfg, sft_dir, tokenizer)
    if e.stage == "ppo":
        policy = require_done(run_dir / "ppo", "ppo") / "policy"
        model = PeftModel.from_pretrained(model, str(policy)).merge_and_unload()

    # 2. write to a temporary directory, then swap it in: a crash never leaves half an export
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    # every token an answer ends at (end of turn, EOS, the family's own list): a server stops where PPO did
    model.generation_config.eos_token_id = stop_token_ids(tokenizer, model.generation_config)
    model.to(resolve_dtype(model_cfg.dtype)).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "README.md").write_text(card(cfg, e.stage))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    finish_stage(out, {"stage": e.stage, "parameters": sum(p.numel() for p in model.parameters())})
    print(f"[export] {e.stage} model merged into {out} (loads with AutoModelForCausalLM.from_pretrained)")

    # 3. optionally, the hub
    if e.push_to_hub:
        print(f"[export] pushed to {push_to_hub(out, e.push_to_hub, e.private)}")
    return out
