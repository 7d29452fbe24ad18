"""Loading the one base model every stage shares, its tokenizer, and the LoRA adapters on it.

Every stage goes through the same `from_pretrained` path, whether `name_or_path` is a hub id or a local
directory (the demo's base is a local directory built by `make data`).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, prepare_model_for_kbit_training
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, GenerationConfig,
                          PreTrainedModel, PreTrainedTokenizerBase)

from rlhf.chat import end_of_turn_id
from rlhf.config import LoraSpec, ModelConfig

# For tokenizers that ship without a chat template (base models): the Anthropic HH layout, so that
# HH-RLHF transcripts and chat-format data render as the text those models were trained on. EOS follows
# only a final assistant turn (the answer being trained), so prompts read exactly like HH transcripts.
HH_CHAT_TEMPLATE = (  # strings inside {{ }}: transformers' Jinja trims the newline after a block tag
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '\\n\\nHuman: ' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ '\\n\\nAssistant: ' + m['content'] }}"
    "{% if loop.last %}{{ eos_token }}{% endif %}"
    "{% else %}{{ '\\n\\nSystem: ' + m['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n\\nAssistant:' }}{% endif %}"
)
PAD_TOKEN = "<|pad|>"
# The SFT adapter's name where it is stacked (a quantized base) instead of merged.
SFT_ADAPTER = "sft"


def load_tokenizer(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer, made fit for RLHF: a chat template and a pad token distinct from the tokens that end
    an answer (EOS and the chat format's end of turn, `rlhf.chat`).

    Pad must differ from them: reward models pool at the last non-pad token, so with pad == EOS the
    reward would be read at the token before EOS. Padding is left-sided for generation; trainers that
    need right padding set it themselves.
    """
    tok = AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    if tok.eos_token is None:
        raise ValueError(f"tokenizer of {name_or_path} has no EOS token; responses could never end")
    if not tok.chat_template:
        tok.chat_template = HH_CHAT_TEMPLATE
    ends = {tok.eos_token_id, end_of_turn_id(tok), *family_eos_ids(name_or_path, revision)}
    if tok.pad_token is None or tok.pad_token_id in ends:
        if tok.unk_token is not None and tok.unk_token_id not in ends:
            tok.pad_token = tok.unk_token
        else:
            tok.add_special_tokens({"pad_token": PAD_TOKEN})
    tok.padding_side = "left"
    return tok


def family_eos_ids(name_or_path: str, revision: str | None = None) -> list[int]:
    """The EOS ids of the checkpoint's own generation_config.json (Qwen2.5-Instruct lists `<|endoftext|>`,
    its pad token, beside `<|im_end|>`); none when it has no such file."""
    try:
        ids = GenerationConfig.from_pretrained(name_or_path, revision=revision).eos_token_id
    except (OSError, ValueError):
        return []
    return [ids] if isinstance(ids, int) else list(ids or [])


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"model.dtype must be auto, float32, bfloat16 or float16, not {name!r}") from None


def load_causal_lm(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """The base causal LM, in cfg.dtype, with dropout off and room for any token the tokenizer added.

    With cfg.quantization (8bit, 4bit) the linear layers of the body are loaded quantized by bitsandbytes (on
    this process's GPU, else on the CPU, whose backend bitsandbytes has too), computing in cfg.dtype, and the
    model is prepared for k-bit training as peft does it (frozen; norms and embeddings of a 16-bit base in
    float32). Embeddings and the output head stay unquantized (transformers skips them).
    """
    kwargs = {"revision": cfg.revision, "dtype": resolve_dtype(cfg.dtype), "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.quantization != "none":
        kwargs["quantization_config"] = quantization_config(cfg)
        kwargs["device_map"] = {"": torch.cuda.current_device() if torch.cuda.is_available() else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, **kwargs)
    if cfg.quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        release_checkpoint_mapping(model)
    fit_embeddings(model, tokenizer)
    disable_dropout(model)
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def release_checkpoint_mapping(model: PreTrainedModel) -> None:
    """Copy a quantized model's unquantized CPU tensors (norms, embeddings) out of the memory-mapped checkpoint.

    Those tensors are views into the mapped safetensors file, which keeps the whole float checkpoint resident
    (file pages the quantization read): on the 154M bench model 1,090 MB after loading 4-bit, 501 MB with the
    copies (float32: 1,003 MB, run off the mapping). Quantized weights and GPU tensors are copies already.
    """
    import bitsandbytes as bnb

    with torch.no_grad():
        for module in model.modules():
            for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                if t.device.type == "cpu" and not isinstance(t, (bnb.nn.Params4bit, bnb.nn.Int8Params)):
                    t.data = t.data.clone()


def quantization_config(cfg: ModelConfig) -> BitsAndBytesConfig:
    """bitsandbytes settings of model.quantization: 8bit (LLM.int8), or 4bit NF4 with double quantization (QLoRA)."""
    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if cfg.quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=resolve_dtype(cfg.dtype))
    raise ValueError(f"model.quantization must be none, 8bit or 4bit, not {cfg.quantization!r}")


def fit_embeddings(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Grow the embeddings when the tokenizer gained a pad token, deterministically.

    New rows are set to the mean of the old ones (not sampled), so every stage that reloads the base
    gets the same weights: the reference policy must be bit-identical across stages.
    """
    old = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= old:
        return
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
            if emb is not None:
                emb.weight[old:] = emb.weight[:old].mean(dim=0, keepdim=True)


# Config fields and module attributes that hold a dropout probability: GPT-2's resid_pdrop/embd_pdrop/attn_pdrop,
# Llama's and Qwen's attention_dropout, BERT-style hidden_dropout_prob, summary_first_dropout, layerdrop, ...
DROPOUT_SUFFIXES = ("dropout", "pdrop", "dropout_prob", "dropout_rate", "layerdrop")


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off everywhere: PPO's ratio must be exactly 1 before the first update (N+ details).

    Not only `nn.Dropout` modules: many attention classes keep their probability as a plain float read at
    forward time (Llama's `self.attention_dropout`, passed to SDPA), and the config keeps the probabilities a
    model built from it (the reward classifier, an export) would use. All three are zeroed.
    """
    configs = [getattr(model, "config", None)]
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        _zero_dropout_fields(module.__dict__)
        configs.append(getattr(module, "config", None))
    for config in {id(c): c for c in configs if c is not None}.values():
        _zero_dropout_fields(config.__dict__)
        for sub in config.__dict__.values():  # composite models: text_config, vision_config, ...
            if hasattr(sub, "to_dict") and hasattr(sub, "__dict__"):
                _zero_dropout_fields(sub.__dict__)


def _zero_dropout_fields(fields: dict) -> None:
    for name, value in fields.items():
        if name.endswith(DROPOUT_SUFFIXES) and isinstance(value, float) and value > 0:
            fields[name] = 0.0


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each layer's activations during backward instead of keeping them (model.gradient_checkpointing).
    Non-reentrant: it backpropagates into LoRA weights on a frozen base without inputs that require grad."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def lora_config(spec: LoraSpec, task_type: str = "CAUSAL_LM", modules_to_save: list[str] | None = None) -> LoraConfig:
    targets = spec.target_modules
    return LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, task_type=task_type, bias="none",
        target_modules="all-linear" if list(targets) == ["all-linear"] else list(targets),
        modules_to_save=modules_to_save,
    )


def load_sft_model(cfg: ModelConfig, sft_dir: str | Path, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """The SFT model InstructGPT starts RM and PPO from.

    Full precision: the base with the SFT adapter merged in (a plain model). Quantized base (model.quantization):
    a merge would round the SFT weights to the base's 4 or 8 bits, so the adapter is stacked instead: a PeftModel
    whose frozen adapter "sft" stays on beneath every adapter added later (`active_adapter`); the SFT model itself
    is that adapter alone (`sft_only`). LoRA sums its adapters' outputs, so SFT ⊕ role = merged SFT + role.
    """
    base = load_causal_lm(cfg, tokenizer)
    if cfg.quantization == "none":
        return PeftModel.from_pretrained(base, str(sft_dir)).merge_and_unload()
    model = PeftModel.from_pretrained(base, str(sft_dir), adapter_name=SFT_ADAPTER, is_trainable=False)
    disable_dropout(model)  # the SFT adapter's own lora_dropout: the stacked SFT model must be deterministic
    return model


def stacked_adapters(model: torch.nn.Module) -> list[str]:
    """The adapters that stay on beneath any other: ["sft"] on a stacked SFT model (quantized base), else []."""
    return [SFT_ADAPTER] if isinstance(model, PeftModel) and SFT_ADAPTER in model.peft_config else []


def over_stacked(model: torch.nn.Module, name: str) -> list[str]:
    """The adapters that are on when `name` is active: the stacked ones (`stacked_adapters`), then `name`."""
    below = stacked_adapters(model)
    return below if name in below else below + [name]


def set_active(model: PeftModel, name: str) -> None:
    """Make `name` the active adapter, on top of the stacked ones; requires_grad flags never change."""
    with keep_requires_grad(model):
        if not stacked_adapters(model):
            model.set_adapter(name, inference_mode=True)
            return
        model.base_model.set_adapter(over_stacked(model, name), inference_mode=True)
        model.active_adapter = name  # PeftModel's own record (one name); the layers hold the list


def stack_under(model: PeftModel, sft_model: torch.nn.Module) -> None:
    """For a PeftModel built around `sft_model`'s layers (the RM classifier): keep the stacked SFT adapter on,
    frozen, beneath `model`'s own adapter. Nothing to do when the SFT adapter was merged."""
    below = stacked_adapters(sft_model)
    if below:
        with keep_requires_grad(model):
            model.base_model.set_adapter(below + [a for a in model.active_adapters if a not in below])


@contextmanager
def keep_requires_grad(model: torch.nn.Module):
    """Put every requires_grad flag back as it was on exit.

    peft's set_adapter and disable_adapter also change which adapters are trainable (they mark only the
    active one): with two trainable adapters on one model (policy and value) that would silently drop
    one from training.
    """
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])


def _tuner_layers(model: PeftModel) -> list[BaseTunerLayer] | None:
    """The model's LoRA layers, listed once per set of adapters (the list is kept on the model); None when the model
    also has layers a plain switch cannot handle (modules_to_save wrappers, merged adapters): those go through peft."""
    key = tuple(model.peft_config)
    cached = model.__dict__.get("_rlhf_tuner_layers")
    if cached is None or cached[0] != key:
        modules = list(model.modules())
        plain = not any(isinstance(m, AuxiliaryTrainingWrapper) for m in modules)
        cached = (key, [m for m in modules if isinstance(m, BaseTunerLayer)] if plain else None)
        model.__dict__["_rlhf_tuner_layers"] = cached
    layers = cached[1]
    if layers is None or any(layer.merged_adapters for layer in layers):
        return None
    return layers


@contextmanager
def _switched(model: PeftModel, names: list[str], disabled: bool = False):
    """Run with exactly `names` active in every LoRA layer (every layer bypassed if `disabled`), then put each layer
    back as it was: what peft's set_adapter and disable_adapter do to the forward pass, without their walks over
    every module and parameter (to set requires_grad flags, which are left alone here). PPO switches adapters about
    a hundred times a step, and those walks took ~17 ms each on the demo's small model. Falls back to peft (flags
    kept) where `_tuner_layers` says so."""
    layers = _tuner_layers(model)
    if layers is None:
        yield from _switched_by_peft(model, names, disabled)
        return
    saved = [(layer._active_adapter, layer._disable_adapters) for layer in layers]
    saved_tuner = model.base_model.active_adapter
    for layer in layers:
        layer._active_adapter = list(names)
        layer._disable_adapters = disabled
    model.base_model.active_adapter = list(names)
    try:
        yield model
    finally:
        for layer, (active, off) in zip(layers, saved):
            layer._active_adapter = active
            layer._disable_adapters = off
        model.base_model.active_adapter = saved_tuner


def _switched_by_peft(model: PeftModel, names: list[str], disabled: bool):
    """`_switched` through peft's own calls, every requires_grad flag put back after each."""
    if disabled:
        with keep_requires_grad(model), model.disable_adapter():
            yield model
        return
    previous, previous_name = list(model.active_adapters), model.active_adapter
    with keep_requires_grad(model):
        model.base_model.set_adapter(names, inference_mode=True)
    try:
        yield model
    finally:
        with keep_requires_grad(model):
            model.base_model.set_adapter(previous, inference_mode=True)
            model.active_adapter = previous_name


@contextmanager
def active_adapter(model: PeftModel, name: str):
    """Run with adapter `name` active (over the stacked SFT adapter, if any), then restore the previous
    adapters; requires_grad flags never change."""
    with _switched(model, over_stacked(model, name)):
        yield model


@contextmanager
def sft_only(model: torch.nn.Module):
    """The SFT model (the KL reference): every role adapter off. A stacked SFT adapter stays on, alone."""
    if stacked_adapters(model):
        with _switched(model, [SFT_ADAPTER]):
            yield model
    elif isinstance(model, PeftModel):
        with _switched(model, list(model.active_adapters), disabled=True):
            yield model
    else:
        yield model
