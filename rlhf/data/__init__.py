"""Data layer: load SFT, preference and prompt data from local files or the hub, validated.

    load_sft(source)          -> list[SFTExample]      {"prompt","completion"} | {"messages"}
    load_preferences(source)  -> list[PreferencePair]  pairwise | HH transcripts | K-way rankings
    load_prompts(source)      -> list[PromptExample]   the prompt of any of the above, or {"prompt"}
    render_prompt / render_completion                   Prompt -> model text (chat template or HH layout)
    check_prompt_lengths                                DataError for prompts over max_prompt_length
    hold_out(items, fraction, seed[, groups])           (held out, rest): whole groups drawn with a seed
    as_chat(records, mode) / text_prompts_line          plain-text prompts as a user turn (model.text_prompts)
    for_model(records, tokenizer, mode, max_len, stage) both, said in one line, and the lengths checked

Bad rows raise DataError listing "<file>: row <N>: field '<field>': <problem>" lines.
"""

from rlhf.data.io import read_rows
from rlhf.data.loaders import as_chat, for_model, hold_out, load_preferences, load_prompts, load_sft, text_prompts_line
from rlhf.data.records import DataError, PreferencePair, Prompt, PromptExample, SFTExample
from rlhf.data.render import check_prompt_lengths, render_completion, render_prompt

__all__ = [
    "Prompt",
    "DataError",
    "SFTExample",
    "PreferencePair",
    "PromptExample",
    "read_rows",
    "load_sft",
    "load_preferences",
    "load_prompts",
    "hold_out",
    "as_chat",
    "text_prompts_line",
    "for_model",
    "check_prompt_lengths",
    "render_prompt",
    "render_completion",
]
