"""The shipped configs for real checkpoints (configs/models/*.yaml) load and validate with their tiny
offline stand-ins: the tokenizer with the family's chat template renders every HH prompt, answers end at the
family's end of turn, and the PPO settings pass PPO's checks. (The real checkpoints and Anthropic/hh-rlhf
cannot be downloaded here: the model path is pointed at the stand-in and the data at the HH sample.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf import data as rdata
from rlhf.chat import answer_ids, encode_prompt, end_of_turn_id
from rlhf.config import load_config
from rlhf.demo.families import FAMILIES, build_family
from rlhf.models import load_tokenizer
from rlhf import checks

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs" / "models").glob("*.yaml"))
HH_SAMPLE = ROOT / "data" / "hh" / "hh-harmless-sample.jsonl"
BY_CHECKPOINT = {f.checkpoint: f for f in FAMILIES.values()}


def test_every_family_has_a_config():
    named = {load_config(c).model.name_or_path for c in CONFIGS}
    assert named == set(BY_CHECKPOINT)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_validates_with_its_stand_in(config, tmp_path):
    cfg = load_config(config)
    family = BY_CHECKPOINT[cfg.model.name_or_path]
    sample = rdata.load_preferences(str(HH_SAMPLE), skip_invalid=True)
    texts = [m["content"] for p in sample[:200] for m in p.prompt] + [p.chosen for p in sample[:200]]
    stand_in = build_family(family.name, tmp_path / "model", texts)
    files = [f"{s}.{k}={HH_SAMPLE}" for s, k in (("sft", "train_file"), ("sft", "eval_file"), ("rm", "train_file"),
                                                 ("rm", "eval_file"), ("ppo", "prompts_file"),
                                                 ("ppo", "eval_prompts_file"), ("eval", "prompts_file"))]
    cfg = load_config(config, [f"model.name_or_path={stand_in}", *files])
    assert cfg.model.dtype == "auto" and cfg.model.gradient_checkpointing

    tok = load_tokenizer(cfg.model.name_or_path)
    assert tok.convert_ids_to_tokens(end_of_turn_id(tok)) == family.turn_end
    assert tok.pad_token_id not in (tok.eos_token_id, end_of_turn_id(tok))
    prompts = rdata.load_prompts(cfg.ppo.prompts_file, split=cfg.ppo.prompts_split, skip_invalid=True)
    pairs = rdata.load_preferences(cfg.rm.train_file, split=cfg.rm.train_split, skip_invalid=cfg.rm.skip_invalid)
    demos = rdata.load_sft(cfg.sft.train_file, split=cfg.sft.train_split, skip_invalid=cfg.sft.skip_invalid)
    assert len(prompts) >= len(pairs) > 300 and len(demos) > 300
    for p in pairs[:50]:  # every stage renders the same prompt, and answers end at the end of turn
        ids = encode_prompt(tok, p.prompt)
        assert tok.decode(ids).count(p.prompt[-1]["content"].strip()[:20]) >= 1
        assert answer_ids(tok, p.prompt, p.chosen)[-1] == end_of_turn_id(tok)
    for stage in ("sft", "rm", "ppo", "dpo", "eval", "export"):  # every setting that is wrong on its own
        getattr(checks, f"check_{stage}")(cfg)
    assert cfg.ppo.sampling.forward_batch_size <= cfg.ppo.sampling.rollout_batch_size
