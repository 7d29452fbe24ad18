"""What a tokenizer's chat format says about answers: the token that ends one, and where sampling stops.

Real chat models end an assistant turn with a token of their own, often not `eos_token`: Llama-3
`<|eot_id|>` (the base model's EOS is `<|end_of_text|>`), ChatML `<|im_end|>` (Qwen base: EOS
`<|endoftext|>`), Gemma `<end_of_turn>`, Phi-3 `<|end|>`. SFT learns whatever the chat template writes
after an answer, so that token is what the policy emits, where generation must stop, and where the reward
model reads its score. It is read off the template itself (render a turn, look at what follows the answer),
not from a table of families, so a new family needs no code.
"""

from __future__ import annotations

import json
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable

from transformers import GenerationConfig, PreTrainedTokenizerBase

_MARK = "RLHFANSWERMARK"  # a plain word: survives `| trim` and every template's escaping


def special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Ids of every special token: the named ones (bos, eos, pad, ...) and added tokens marked special."""
    ids = set(tokenizer.all_special_ids)
    ids |= {i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special}
    return ids


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt) -> list[int]:
    """Token ids of a prompt: chat messages through the chat template (with the generation prompt),
    raw text as is. The same encoding the SFT trainer used for training."""
    if not isinstance(prompt, list):
        return tokenizer(prompt)["input_ids"]
    return _rendered(tokenizer, ("prompt", prompt), lambda: list(tokenizer.apply_chat_template(
        prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]))


_RENDERED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
RENDERED_CACHE_SIZE = 4096


def _rendered(tokenizer: PreTrainedTokenizerBase, what: tuple, make: Callable[[], list[int]]) -> list[int]:
    """`make()`, computed once per tokenizer for each of the last RENDERED_CACHE_SIZE distinct chat `what`s (a
    new list each call). The same prompt and answer are tokenized again and again, through a Jinja chat template
    that costs ~0.4 ms a render: a K-way ranking's answers sit in K - 1 pairs each, its prompt in K(K - 1),
    and evaluation samples k answers a prompt. The key holds what the ids depend on besides the text (the
    template, the vocabulary's size, EOS), so a tokenizer changed in place is rendered afresh."""
    cache = _RENDERED.get(tokenizer)
    if cache is None:
        cache = _RENDERED[tokenizer] = OrderedDict()
    key = (tokenizer.chat_template, len(tokenizer), tokenizer.eos_token_id, json.dumps(what, sort_keys=True, default=str))
    ids = cache.get(key)
    if ids is None:
        ids = cache[key] = make()
        while len(cache) > RENDERED_CACHE_SIZE:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return list(ids)


def answer_ids(tokenizer: PreTrainedTokenizerBase, prompt, response: str,
               prompt_ids: list[int] | None = None) -> list[int]:
    """The tokens of `response` written as the answer to `prompt`, through the token that closes it: what
    SFT trained the model to write after `encode_prompt(prompt)`, so what PPO samples and the reward model
    must score.

    Chat prompts: the chat template's rendering of the answer turn, i.e. the tokens that follow the
    prompt's generation prompt (a template may write more than the text: Qwen3 opens with an empty
    `<think></think>` block, Llama-3 trims the text), cut after the end of turn (ChatML's `\n` after
    `<|im_end|>` is never sampled). This is how trl's SFTTrainer splits prompt from completion.
    Plain-text prompts: the text, then EOS (trl appends EOS to those). `prompt_ids`: encode_prompt's, if
    the caller has them.
    """
    if not isinstance(prompt, list):
        return tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return _rendered(tokenizer, ("answer", prompt, response), lambda: _answer_ids(tokenizer, prompt, response, prompt_ids))


def _answer_ids(tokenizer: PreTrainedTokenizerBase, prompt: list, response: str, prompt_ids: list[int] | None) -> list[int]:
    prompt_ids = encode_prompt(tokenizer, prompt) if prompt_ids is None else prompt_ids
    full = list(tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}],
                                              tokenize=True, return_dict=True)["input_ids"])
    n = 0
    while n < min(len(prompt_ids), len(full)) and prompt_ids[n] == full[n]:
        n += 1
    if n < len(prompt_ids):
        raise ValueError(f"the chat template renders the prompt differently with an answer after it: "
                         f"{tokenizer.decode(prompt_ids[n:])!r} vs {tokenizer.decode(full[n:n + 8])!r}")
    rest, eot = full[n:], end_of_turn_id(tokenizer)
    return rest[:rest.index(eot) + 1] if eot in rest else rest + [eot]


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token the chat template writes right after an assistant's answer (its first special token), or
    EOS when the template writes none (or the tokenizer has no template). Cached per tokenizer and template."""
    key = (tokenizer.chat_template, tokenizer.eos_token_id)
    cached = _EOT_CACHE.get(tokenizer)
    if cached is None or cached[0] != key:
        cached = _EOT_CACHE[tokenizer] = (key, _find_end_of_turn(tokenizer))
    return cached[1]


_EOT_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _find_end_of_turn(tokenizer: PreTrainedTokenizerBase) -> int:
    if not tokenizer.chat_template:
        return tokenizer.eos_token_id
    turn = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": _MARK}]
    text = None
    for chat in (turn, [{"role": "system", "content": "Hi"}] + turn):  # some templates insist on a system turn
        try:
            text = tokenizer.apply_chat_template(chat, tokenize=False)
            break
        except Exception:  # noqa: BLE001 - jinja's TemplateError or the template's own raise_exception
            continue
    if text is None or _MARK not in text:  # a template that renders no chat: preflight reports it on the data
        return tokenizer.eos_token_id
    after = tokenizer(text.split(_MARK, 1)[1], add_special_tokens=False)["input_ids"]
    specials = special_ids(tokenizer)
    return next((i for i in after if i in specials), tokenizer.eos_token_id)


def _as_list(ids) -> list[int]:
    if ids is None:
        return []
    return [ids] if isinstance(ids, int) else list(ids)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, generation_config: GenerationConfig | None = None) -> list[int]:
    """Every token that ends an answer: the end of turn, EOS, and the EOS ids the model's own
    `generation_config.json` lists (Llama-3 instruct: `<|end_of_text|>`, `<|eom_id|>`, `<|eot_id|>`).

    Only special tokens count from the generation config (a stray word id there would cut answers), and
    never the pad token, which marks what is not part of an answer.
    """
    specials = special_ids(tokenizer)
    family = [i for i in _as_list(getattr(generation_config, "eos_token_id", None)) if i in specials]
    out: list[int] = []
    for i in [end_of_turn_id(tokenizer), tokenizer.eos_token_id, *family]:
        if i is not None and i not in out and i != tokenizer.pad_token_id:
            out.append(i)
    return out


def describe(tokenizer: PreTrainedTokenizerBase, ids: Iterable[int]) -> str:
    """`<|im_end|> (151645), <|endoftext|> (151643)`: stop tokens for a log line."""
    return ", ".join(f"{tokenizer.convert_ids_to_tokens(i)} ({i})" for i in ids)
