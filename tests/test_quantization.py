"""model.quantization: the frozen base loaded 4-bit (bitsandbytes' CPU backend), the SFT adapter stacked under
every role's adapter, the reference exact, the reward up to the 4-bit kernels' rounding, the export in full
precision."""

import json

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from conftest import small_demo_files, small_pipeline
from rlhf.chat import encode_prompt
from rlhf.config import ConfigError, LoraSpec, ModelConfig, load_config
from rlhf.data import load_preferences
from rlhf.sequences import left_pad
from rlhf.models import (SFT_ADAPTER, keep_requires_grad, load_causal_lm, load_sft_model, load_tokenizer, lora_config,
                         set_active)
from rlhf.ppo.roles import POLICY, VALUE, build_roles, policy_logits, reference_logits, values
from rlhf.rm.scoring import pair_ids, save_head
from rlhf.rm.train import reward_classifier
from rlhf.runs import read_metrics

LORA = LoraSpec(r=4, alpha=8)


def randomize(model, adapter: str, seed: int, std: float = 0.1) -> None:
    """Nonzero LoRA B for one adapter (B starts at 0: an untrained adapter changes nothing)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and f".{adapter}." in name:
                p.normal_(std=std)


@pytest.fixture(scope="module")
def stacked(demo_dir, tmp_path_factory):
    """sft/ and rm/ on the 4-bit demo base, as the stages save them (random nonzero adapters, no training),
    and the RM stage's classifier they came from."""
    run = tmp_path_factory.mktemp("quant")
    tok = load_tokenizer(str(demo_dir / "base"))
    cfg = ModelConfig(name_or_path=str(demo_dir / "base"), quantization="4bit")
    sft = get_peft_model(load_causal_lm(cfg, tok), lora_config(LORA))
    randomize(sft, "default", seed=1)
    sft.save_pretrained(run / "sft")
    clf = reward_classifier(load_sft_model(cfg, run / "sft", tok), LORA, seed=0)
    randomize(clf, "default", seed=2)
    clf.save_pretrained(run / "rm")
    save_head(clf.base_model.model, run / "rm")
    return run, tok, cfg, clf.eval()


def batch(tok, demo_dir, n=6):
    pairs = load_preferences(str(demo_dir / "rm_pairs_eval.jsonl"))[:n]
    return left_pad([pair_ids(tok, p.prompt, p.chosen) for p in pairs], tok.pad_token_id)


def test_the_base_is_4bit_and_the_sft_adapter_is_stacked_frozen_not_merged(stacked):
    run, tok, cfg, _ = stacked
    model = load_sft_model(cfg, run / "sft", tok)
    assert isinstance(model, PeftModel) and list(model.peft_config) == [SFT_ADAPTER]
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    lm = model.get_base_model()  # the copies out of the mapped checkpoint keep the demo's tied embeddings tied
    assert lm.get_input_embeddings().weight is lm.get_output_embeddings().weight


def test_reference_is_exactly_the_sft_model_and_roles_sit_on_the_sft_adapter(stacked, demo_dir):
    run, tok, cfg, _ = stacked
    roles = build_roles(load_sft_model(cfg, run / "sft", tok), run / "rm", tok, LORA, value_from_reward=True)
    ids, mask = batch(tok, demo_dir)
    trainable = {n for n, p in roles.model.named_parameters() if p.requires_grad}
    assert trainable and all(f".{POLICY}." in n or f".{VALUE}." in n for n in trainable)
    # the model the SFT stage trained: the 4-bit base and its adapter
    sft = PeftModel.from_pretrained(load_causal_lm(cfg, tok), str(run / "sft"))
    raw = load_causal_lm(cfg, tok)
    with torch.no_grad():
        expected = sft(input_ids=ids, attention_mask=mask.long(), position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
        bare = raw(input_ids=ids, attention_mask=mask.long(), position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
        ref = reference_logits(roles, ids, mask)
        assert torch.allclose(ref[mask], expected[mask], atol=1e-5), (ref - expected)[mask].abs().max()
        assert (ref[mask] - bare[mask]).abs().max() > 0.1  # the SFT adapter is on: not the raw base
        assert torch.equal(policy_logits(roles, ids, mask)[mask], ref[mask])  # policy B = 0: exactly SFT
        randomize(roles.model, POLICY, seed=3)
        moved = policy_logits(roles, ids, mask)
        assert (moved[mask] - ref[mask]).abs().max() > 0.1
        assert torch.equal(reference_logits(roles, ids, mask), ref)  # a trained policy leaves the reference alone
        # the policy is SFT + policy, not policy alone: switching the SFT adapter off changes it
        with keep_requires_grad(roles.model):
            roles.model.base_model.set_adapter([POLICY], inference_mode=True)
        alone = roles.model(input_ids=ids, attention_mask=mask.long(),
                            position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
        set_active(roles.model, POLICY)
        assert (alone[mask] - moved[mask]).abs().max() > 0.1
    assert values(roles, ids, mask).shape == ids.shape
    assert {n for n, p in roles.model.named_parameters() if p.requires_grad} == trainable  # no flag changed


def test_reward_inside_ppo_equals_the_rm_stage_classifier(stacked, demo_dir):
    run, tok, cfg, clf = stacked
    pairs = load_preferences(str(demo_dir / "rm_pairs_eval.jsonl"))[:12]
    prompts, answers = [p.prompt for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs]
    seqs = [pair_ids(tok, p, a) for p, a in zip(prompts, answers)]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
    with torch.no_grad():
        trained = clf(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long()).logits.squeeze(-1)
    roles = build_roles(load_sft_model(cfg, run / "sft", tok), run / "rm", tok, LORA, value_from_reward=True)
    shared = roles.scorer.score(prompts, answers, batch_size=5)  # left padding, other batch boundaries
    # on AVX512-BF16 CPUs bitsandbytes' 4-bit matmul runs in bf16, tiled by batch shape: 2**-8 relative a layer
    tol = 2**-8 * clf.base_model.model.config.num_hidden_layers * trained.abs().max()
    assert (shared - trained).abs().max() <= tol, ((shared - trained).abs().max(), tol)
    assert shared.std() > 0.01


def test_rm_classifier_trains_its_adapter_over_the_frozen_sft_adapter(stacked):
    run, tok, cfg, _ = stacked
    model = reward_classifier(load_sft_model(cfg, run / "sft", tok), LORA, seed=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n for n in trainable)  # the RM's LoRA and score head
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.active_adapters == [SFT_ADAPTER, "default"]
    ids = torch.tensor([[5, 6, 7, 8]])
    model(input_ids=ids).logits.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_config_rejects_an_unknown_quantization_and_a_missing_backend(monkeypatch):
    with pytest.raises(ConfigError, match=r"^model.quantization must be one of none, 8bit, 4bit, not '3bit'$"):
        load_config(None, ["model.quantization=3bit"])
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"^model.quantization=4bit needs bitsandbytes, which is not installed"):
        load_config(None, ["model.quantization=4bit"])
    assert load_config(None, ["model.quantization=none"]).model.quantization == "none"


@pytest.mark.slow
def test_4bit_demo_pipeline_end_to_end_and_a_full_precision_export(demo_dir, tmp_path):
    run = tmp_path / "run"
    small_pipeline(run, small_demo_files(demo_dir, tmp_path / "data"), "model.quantization=4bit",
                   rm=("rm.probes.enabled=false",))
    for stage in ("sft", "rm", "ppo", "export-ppo", "eval"):
        assert (run / stage / "DONE").is_file(), stage
    rows = read_metrics(run / "ppo" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[-1]["ppo/value_loss"] > 0
    # the export: a plain full-precision model = the unquantized base with the SFT and policy adapters on it
    assert "quantization_config" not in json.loads((run / "export-ppo" / "config.json").read_text())
    exported = AutoModelForCausalLM.from_pretrained(run / "export-ppo")
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in exported.modules())
    assert all(p.dtype == torch.float32 for p in exported.parameters())
    tok = load_tokenizer(str(run / "sft"))
    full = PeftModel.from_pretrained(load_causal_lm(ModelConfig(name_or_path=str(demo_dir / "base")), tok),
                                     str(run / "sft"), adapter_name="sft")
    full.load_adapter(str(run / "ppo" / "policy"), adapter_name="policy")
    full.base_model.set_adapter(["sft", "policy"])
    ids = torch.tensor([encode_prompt(tok, load_preferences(str(demo_dir / "rm_pairs_eval.jsonl"))[0].prompt)])
    with torch.no_grad():
        assert torch.allclose(exported(input_ids=ids).logits, full(input_ids=ids).logits, atol=1e-4)
