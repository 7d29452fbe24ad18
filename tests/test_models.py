"""Tokenizer fixes (pad != EOS, chat template), deterministic embedding growth, and switching adapters."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rlhf.config import ModelConfig
from rlhf.models import HH_CHAT_TEMPLATE, PAD_TOKEN, load_causal_lm, load_tokenizer


def save_tiny(tmp_path, pad_is_eos: bool, with_unk: bool):
    """A tokenizer that ships like GPT-2's (pad missing or equal to EOS, no chat template) and a model."""
    words = ["</s>", "[UNK]", "hello", "world", "Human:", "Assistant:"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kwargs = {"eos_token": "</s>"}
    if with_unk:
        kwargs["unk_token"] = "[UNK]"
    if pad_is_eos:
        kwargs["pad_token"] = "</s>"
    PreTrainedTokenizerFast(tokenizer_object=core, **kwargs).save_pretrained(tmp_path)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path)
    return tmp_path


def test_pad_equal_to_eos_is_replaced_by_unk(tmp_path):
    tok = load_tokenizer(str(save_tiny(tmp_path, pad_is_eos=True, with_unk=True)))
    assert tok.pad_token == "[UNK]" and tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "left"


def test_missing_pad_is_added_and_embeddings_grow_deterministically(tmp_path):
    path = save_tiny(tmp_path, pad_is_eos=False, with_unk=False)
    tok = load_tokenizer(str(path))
    assert tok.pad_token == PAD_TOKEN and tok.pad_token_id == 6
    a = load_causal_lm(ModelConfig(name_or_path=str(path)), tok)
    b = load_causal_lm(ModelConfig(name_or_path=str(path)), tok)
    assert a.get_input_embeddings().weight.shape[0] == 7
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(pa, pb)  # the reference policy must be identical in every stage
    assert a.config.pad_token_id == 6


def test_hh_template_for_tokenizers_without_one(tmp_path):
    tok = load_tokenizer(str(save_tiny(tmp_path, pad_is_eos=True, with_unk=True)))
    assert tok.chat_template == HH_CHAT_TEMPLATE
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "ok"}]
    prompt = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert prompt == "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: ok\n\nAssistant:"  # exactly an HH transcript
    full = tok.apply_chat_template(chat + [{"role": "assistant", "content": "fine"}], tokenize=False)
    assert full == prompt + " fine</s>"  # EOS after the trained answer only
    from rlhf.data import render_prompt
    assert render_prompt(tok, chat) == prompt


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_dropout_is_off(tmp_path, family):
    """Models that really have dropout (GPT-2's nn.Dropout modules, Llama's attention_dropout float read by
    the attention function) give identical outputs twice in train mode once loaded, and configs say 0."""
    save_tiny(tmp_path, pad_is_eos=False, with_unk=True)
    torch.manual_seed(0)
    if family == "gpt2":
        config = GPT2Config(vocab_size=6, n_embd=16, n_layer=1, n_head=2, n_positions=16,
                            resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
        GPT2LMHeadModel(config).save_pretrained(tmp_path)
    else:
        config = LlamaConfig(vocab_size=6, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2, attention_dropout=0.5)
        LlamaForCausalLM(config).save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    model = load_causal_lm(ModelConfig(name_or_path=str(tmp_path), attn_implementation="eager"), tok).train()
    ids = torch.tensor([[0, 2, 3, 4, 5, 2, 3]])
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    fields = {k: v for k, v in model.config.to_dict().items() if k.endswith(("dropout", "pdrop"))}
    assert fields and all(v == 0.0 for v in fields.values()), fields


def _two_adapter_model(modules_to_save=None):
    """A tiny Llama with LoRA adapters "first" and "second" (B randomised: each changes the logits); only
    "first" trainable."""
    from peft import get_peft_model

    from rlhf.config import LoraSpec
    from rlhf.models import lora_config
    from tiny import randomize_lora_b, tiny_llama

    model = get_peft_model(tiny_llama(50), lora_config(LoraSpec(r=4, alpha=8), modules_to_save=modules_to_save),
                           adapter_name="first")
    model.add_adapter("second", lora_config(LoraSpec(r=4, alpha=8), modules_to_save=modules_to_save))
    randomize_lora_b(model)
    for name, p in model.named_parameters():
        p.requires_grad_(".first." in name)
    return model


@pytest.mark.parametrize("modules_to_save", [None, ["lm_head"]], ids=["lora-layers", "peft-fallback"])
def test_adapter_switch_gives_peft_outputs_restores_the_active_adapter_and_never_touches_requires_grad(modules_to_save):
    from rlhf.models import _tuner_layers, active_adapter, sft_only

    model = _two_adapter_model(modules_to_save)
    assert (_tuner_layers(model) is None) == (modules_to_save is not None)  # the plain switch, or peft's
    ids = torch.randint(0, 50, (2, 7))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    def logits_by_peft(name=None):
        if name is None:
            with model.disable_adapter():
                return model(ids).logits
        model.set_adapter(name)
        out = model(ids).logits
        model.set_adapter("first")
        return out

    expected = {name: logits_by_peft(name) for name in ("first", "second", None)}
    for n, p in model.named_parameters():
        p.requires_grad_(flags[n])
    assert not torch.allclose(expected["first"], expected["second"]) and not torch.allclose(expected["first"], expected[None])
    with torch.no_grad():
        with active_adapter(model, "second"):
            assert torch.equal(model(ids).logits, expected["second"])
            with sft_only(model):  # nested: the base alone, then "second" again
                assert torch.equal(model(ids).logits, expected[None])
            assert torch.equal(model(ids).logits, expected["second"])
        assert model.active_adapters == ["first"]
        assert torch.equal(model(ids).logits, expected["first"])
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_adapter_switch_is_undone_when_the_body_raises():
    from rlhf.models import active_adapter, sft_only

    model = _two_adapter_model()
    ids = torch.randint(0, 50, (1, 5))
    with torch.no_grad():
        before = model(ids).logits
        for switch in (lambda: active_adapter(model, "second"), lambda: sft_only(model)):
            with pytest.raises(KeyError), switch():
                raise KeyError("boom")
            assert torch.equal(model(ids).logits, before)
