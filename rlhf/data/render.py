"""Prompt -> model text, the same way for every stage, and the prompt-length check built on it.

Base models without a chat template get the Anthropic HH layout, the text they
most likely saw for dialogue, and the layout HH transcripts round-trip through:
render_prompt(prompt) + render_completion(prompt, reply) rebuilds the transcript.
"""

from __future__ import annotations

from collections.abc import Sequence

from rlhf.data.records import DataError, Problem, Prompt, split_source

HH_SPEAKERS = {"user": "Human", "assistant": "Assistant", "system": "System"}


def render_prompt(tokenizer, prompt: Prompt) -> str:
    """Text the model sees before its reply.

    str -> unchanged. messages -> the tokenizer's chat template with the generation
    prompt when it has one, else "\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nAssistant:".
    """
    if isinstance(prompt, str):
        return prompt
    if uses_template(tokenizer):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    turns = "".join(f"\n\n{HH_SPEAKERS[m['role']]}: {m['content']}" for m in prompt)
    return turns + "\n\nAssistant:"


def render_completion(tokenizer, prompt: Prompt, completion: str) -> str:
    """Text appended after render_prompt(tokenizer, prompt); no EOS (the trainers add it).

    The HH layout ends in "Assistant:" with no space, as HH transcripts do, so the
    reply carries its leading space; templates and raw text prompts take it as is.
    """
    if isinstance(prompt, list) and not uses_template(tokenizer):
        return " " + completion
    return completion


def uses_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def check_prompt_lengths(examples: Sequence, tokenizer, max_prompt_length: int) -> None:
    """Raise DataError naming each example whose rendered prompt exceeds max_prompt_length tokens.

    examples: records with ``.prompt`` and ``.source`` (SFTExample, PreferencePair, PromptExample).
    Long prompts would otherwise be truncated silently by the trainers, cutting off
    the question the reward depends on.
    """
    problems, seen = [], set()
    for example in examples:
        # pairs expanded from one ranking share a source; report (and tokenize) each row once
        if example.source in seen:
            continue
        seen.add(example.source)
        length = prompt_length(tokenizer, example.prompt)
        if length > max_prompt_length:
            file, row = split_source(example.source)
            why = f"prompt is {length} tokens, longer than max_prompt_length={max_prompt_length}"
            problems.append(Problem(file, row, "prompt", why))
    if problems:
        raise DataError.from_problems(problems)


def prompt_length(tokenizer, prompt: Prompt) -> int:
    """Tokens of the rendered prompt. Chat templates write their own BOS, so special tokens
    are counted only for raw-text and HH-layout prompts (erring towards a longer count)."""
    text = render_prompt(tokenizer, prompt)
    special = not (isinstance(prompt, list) and uses_template(tokenizer))
    return len(tokenizer(text, add_special_tokens=special)["input_ids"])
