"""Tokenizer fixes (pad != EOS, chat template) and deterministic embedding growth."""

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
