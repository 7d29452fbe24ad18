"""Tests for rlhf.data: every format, the bad-file corpus, the real HH sample, rendering."""

import json
import os
from pathlib import Path

import pytest

# huggingface_hub reads this when first imported, so set it before rlhf.data can pull
# datasets/transformers in: an accidental hub call then fails fast instead of downloading.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rlhf.data import (  # noqa: E402
    DataError,
    PreferencePair,
    PromptExample,
    SFTExample,
    check_prompt_lengths,
    load_preferences,
    load_prompts,
    load_sft,
    read_rows,
    render_completion,
    render_prompt,
)

BAD = Path(__file__).parent / "data_bad"
HH = Path(__file__).parent.parent / "data" / "hh" / "hh-harmless-sample.jsonl"
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # for code that reads it at call time


def tiny_tokenizer(chat_template: str | None = None):
    """A whitespace word-level tokenizer over a few words (unknown words -> [UNK]); no downloads."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "</s>", "hello", "world", "the", "quick", "brown", "fox", "dog"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="</s>")
    tok.chat_template = chat_template
    return tok


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# --- the bad-file corpus: one bad row per file, never row 1 ---


def too_long(path: str):
    check_prompt_lengths(load_prompts(path), tiny_tokenizer(), max_prompt_length=10)


# (file, what reads it, row, field (None: the row is not even JSON), words the problem must contain)
BAD_FILES = [
    ("missing_field.jsonl", load_preferences, 3, "rejected", "missing"),
    ("empty_text.jsonl", load_sft, 4, "completion", "empty"),
    ("wrong_type_completion.jsonl", load_sft, 2, "completion", "expected text, got number"),
    ("wrong_type_messages.jsonl", load_sft, 3, "messages", "expected a list"),
    ("unknown_role.jsonl", load_sft, 2, "messages", "unknown role 'bot'"),
    # line 2 is blank, so the broken line is line 4 although it is the third row
    ("malformed_json.jsonl", load_prompts, 4, None, "malformed JSON line"),
    ("chosen_equals_rejected.jsonl", load_preferences, 2, "rejected", "identical to 'chosen'"),
    ("ranking_duplicate.jsonl", load_preferences, 3, "ranking", "duplicate"),
    ("ranking_out_of_range.jsonl", load_preferences, 2, "ranking", "out of range"),
    ("ranking_wrong_length.jsonl", load_preferences, 3, "ranking", "wrong length"),
    ("ranking_too_few.jsonl", load_preferences, 2, "responses", "at least 2"),
    ("margin_not_number.jsonl", load_preferences, 3, "margin", "expected a number"),
    ("ranking_scores_disagree.jsonl", load_preferences, 2, "scores", "ranked below response 1 but scored higher"),
    ("ranking_scores_wrong_length.jsonl", load_preferences, 2, "scores", "wrong length: 2 scores for 3 responses"),
    ("hh_no_final_assistant.jsonl", load_preferences, 2, "chosen", "no final"),
    ("hh_prompt_mismatch.jsonl", load_preferences, 2, "rejected", "does not share the prompt of 'chosen'"),
    ("mixed_formats.jsonl", load_preferences, 3, "completion", "but the file is in"),
    ("empty_cell.csv", load_sft, 3, "completion", "missing"),
    ("prompt_too_long.jsonl", too_long, 3, "prompt", "prompt is 28 tokens, longer than max_prompt_length=10"),
]


# Files bad as a whole: (file, what reads it, the one line expected, from the start of the message)
BAD_WHOLE_FILES = [
    ("not_utf8.jsonl", load_sft, "not_utf8.jsonl: line 2, byte offset 50: not UTF-8 text (byte 0xe9: "
                                 "invalid continuation byte); save the file as UTF-8"),
    ("not_utf8.csv", load_sft, "not_utf8.csv: line 3, byte offset 32: not UTF-8 text (byte 0xef: "
                               "invalid continuation byte); save the file as UTF-8"),
]


@pytest.mark.parametrize("name, read, message", BAD_WHOLE_FILES, ids=[b[0] for b in BAD_WHOLE_FILES])
def test_bad_whole_file_gives_one_line_naming_file_line_and_byte(name, read, message):
    with pytest.raises(DataError) as info:
        read(str(BAD / name))
    assert str(info.value) == str(BAD / name) + ": " + message.split(": ", 1)[1]


def test_unreadable_file_gives_one_line(monkeypatch):
    real_open = Path.open

    def no_permission(self, *args, **kwargs):
        if self.name == "missing_field.jsonl":
            raise PermissionError(13, "Permission denied")
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", no_permission)
    with pytest.raises(DataError, match=r"^\S*missing_field\.jsonl: cannot read the file: Permission denied$"):
        load_preferences(str(BAD / "missing_field.jsonl"))


def test_missing_split_of_a_dataset_names_the_split(monkeypatch, tmp_path):
    """datasets' own error for a split that does not exist (a local json dataset stands in for the hub)."""
    import datasets

    real = datasets.load_dataset
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a"}])
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split=None: real("json", data_files={"train": path},
                                                                                   split=split))
    assert len(load_prompts("org/prompts", split="train")) == 1
    expected = r"^org/prompts: has no split 'tset': Unknown split \"tset\"\. Should be one of \['train'\]"
    with pytest.raises(DataError, match=expected):
        load_prompts("org/prompts", split="tset")


@pytest.mark.parametrize("name, read, row, field, words", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_file_names_file_row_and_field(name, read, row, field, words):
    with pytest.raises(DataError) as info:
        read(str(BAD / name))
    where = f"{name}: row {row}: " + (f"field '{field}': " if field else "")
    line = next(line for line in str(info.value).splitlines() if where in line)
    assert words in line
    assert len(info.value.problems) == 1, "exactly one bad row per corpus file"


def test_read_rows_reports_malformed_json_and_prompt_at_the_limit_passes():
    with pytest.raises(DataError, match=r"malformed_json\.jsonl: row 4: malformed JSON"):
        read_rows(str(BAD / "malformed_json.jsonl"))
    check_prompt_lengths(load_prompts(str(BAD / "prompt_too_long.jsonl")), tiny_tokenizer(), max_prompt_length=28)


def test_skip_invalid_drops_bad_rows_and_warns():
    with pytest.warns(UserWarning, match=r"(?s)skipped 1 invalid row of 4.*row 3: field 'rejected'"):
        pairs = load_preferences(str(BAD / "missing_field.jsonl"), skip_invalid=True)
    assert [p.source.rsplit(" ", 1)[1] for p in pairs] == ["1", "2", "4"]
    with pytest.warns(UserWarning, match="skipped 1 invalid row of 4"):
        assert len(load_prompts(str(BAD / "malformed_json.jsonl"), skip_invalid=True)) == 3


def test_skip_invalid_still_raises_when_every_row_is_bad(tmp_path):
    path = write_jsonl(tmp_path / "all_bad.jsonl", [{"prompt": "a", "completion": ""}] * 2)
    with pytest.raises(DataError, match="2 problems"):
        load_sft(path, skip_invalid=True)


def test_many_problems_are_cut_off_after_ten(tmp_path):
    path = write_jsonl(tmp_path / "many.jsonl", [{"prompt": "q", "completion": 7}] * 15)
    message = str(pytest.raises(DataError, load_sft, path).value)
    assert "row 10: field 'completion'" in message and "row 11:" not in message
    assert "... and 5 more" in message


def test_loader_rejects_a_format_of_another_stage():
    with pytest.raises(DataError, match="not SFT data"):
        load_sft(str(BAD / "prompt_too_long.jsonl"))
    with pytest.raises(DataError, match="not preference data"):
        load_preferences(str(BAD / "prompt_too_long.jsonl"))


# --- the real Anthropic HH-RLHF harmless sample ---


@pytest.fixture(scope="module")
def hh_pairs():
    # Row 87's chosen transcript ends in "\n\nAssistant: " with nothing after it: the only invalid row.
    with pytest.warns(UserWarning, match=r"(?s)skipped 1 invalid row of 400.*row 87: field 'chosen'.*empty"):
        return load_preferences(str(HH), skip_invalid=True)


def test_hh_sample_loads_as_preferences(hh_pairs):
    assert len(hh_pairs) == 399
    assert sorted({p.group for p in hh_pairs}) == [g for g in range(400) if g != 86]  # one group per row
    for p in hh_pairs:
        assert isinstance(p.prompt, list) and p.prompt[-1]["role"] == "user"
        assert p.chosen.strip() and p.rejected.strip() and p.chosen != p.rejected
        assert p.margin is None
    with pytest.raises(DataError, match="row 87: field 'chosen'"):
        load_preferences(str(HH))


def test_hh_prompts_match_the_preference_prompts(hh_pairs):
    prompts = load_prompts(str(HH))  # row 87's prompt is fine: only its chosen reply is empty
    assert len(prompts) == 400
    for pair in hh_pairs:
        assert (prompts[pair.group].prompt, prompts[pair.group].source) == (pair.prompt, pair.source)
    assert set(prompts[0].meta) == {"chosen", "rejected"}  # the reference transcripts, for judges


def test_hh_multi_turn_row_by_hand(hh_pairs):
    pair = hh_pairs[0]
    assert pair.source.endswith("hh-harmless-sample.jsonl row 1")
    assert [m["role"] for m in pair.prompt] == ["user", "assistant", "user", "assistant", "user"]
    assert pair.prompt[0]["content"] == "what are some pranks with a pen i can do?"
    assert pair.prompt[1]["content"] == "Are you looking for practical joke ideas?"
    assert pair.prompt[2]["content"] == "yep"
    assert pair.prompt[3]["content"].startswith("Ok, I’ll give you a couple examples")
    assert pair.prompt[3]["content"].endswith("you will find a new place to watch.")
    assert pair.prompt[4]["content"] == "okay some of these do not have anything to do with pens"
    assert pair.chosen.startswith("No, sorry!  All of these involve a pen")
    assert pair.rejected.startswith("There are lots of funny things you can do with pens")


def test_hh_reply_starting_with_human_is_not_a_new_turn(hh_pairs):
    # Row 30 has assistant turns whose text begins "Human: ..." with no blank line before it.
    pair = next(p for p in hh_pairs if p.group == 29)
    assert [m["role"] for m in pair.prompt] == ["user", "assistant"] * 3 + ["user"]
    assert pair.prompt[5]["content"].startswith("Human: So she doesn’t like rap music")


def test_hh_transcripts_round_trip_through_the_hh_layout(hh_pairs):
    rows = [row for _, row in read_rows(str(HH))]
    tok = tiny_tokenizer()
    for p in hh_pairs:
        text = render_prompt(tok, p.prompt) + render_completion(tok, p.prompt, p.chosen)
        assert text == rows[p.group]["chosen"]


# --- K-way rankings ---


def test_rankings_expand_to_every_better_worse_pair(tmp_path):
    path = write_jsonl(
        tmp_path / "rank.jsonl",
        [
            {"prompt": "p3", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]},
            {"prompt": "p4", "responses": ["a", "b", "c", "d"], "ranking": [3, 1, 0, 2], "id": 7},
            {"prompt": "p2", "responses": ["x", "y"], "ranking": [1, 0]},
        ],
    )
    pairs = load_preferences(path)
    assert [(p.chosen, p.rejected) for p in pairs[:3]] == [("c", "a"), ("c", "b"), ("a", "b")]
    assert [(p.chosen, p.rejected) for p in pairs[3:9]] == [
        ("d", "b"), ("d", "a"), ("d", "c"), ("b", "a"), ("b", "c"), ("a", "c"),
    ]
    assert [p.group for p in pairs] == [0] * 3 + [1] * 6 + [2]
    assert {p.prompt for p in pairs[3:9]} == {"p4"} and {p.source for p in pairs[:3]} == {f"{path} row 1"}
    assert all(p.margin is None for p in pairs)


def test_pairwise_rows_each_get_their_own_group(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": "good", "rejected": "bad"} for i in range(4)]
    assert [p.group for p in load_preferences(write_jsonl(tmp_path / "pw.jsonl", rows))] == [0, 1, 2, 3]


# --- every format round trip ---

MESSAGES = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
REPLY = [{"role": "assistant", "content": "Hello!"}]


def test_sft_prompt_completion_text_and_messages(tmp_path):
    path = write_jsonl(
        tmp_path / "sft.jsonl",
        [{"prompt": "2+2=", "completion": " 4"}, {"prompt": MESSAGES, "completion": REPLY, "extra": 1}],
    )
    assert load_sft(path) == [
        SFTExample("2+2=", " 4", f"{path} row 1"),
        SFTExample(MESSAGES, "Hello!", f"{path} row 2"),
    ]


def test_sft_messages(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": MESSAGES + REPLY}])
    assert load_sft(path) == [SFTExample(MESSAGES, "Hello!", f"{path} row 1")]
    assert load_prompts(path)[0].prompt == MESSAGES


def test_sft_messages_must_end_with_the_assistant(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": MESSAGES + REPLY}, {"messages": MESSAGES}])
    with pytest.raises(DataError, match="row 2: field 'messages': last message must be the assistant"):
        load_sft(path)
    assert load_prompts(path)[1].prompt == MESSAGES  # a chat without a reply is a fine prompt


def test_pairwise_with_margin_and_conversational_sides(tmp_path):
    rows = [
        {"prompt": "q", "chosen": "good", "rejected": "bad", "margin": 2},
        {"prompt": MESSAGES, "chosen": REPLY, "rejected": [{"role": "assistant", "content": "Go away."}]},
    ]
    path = write_jsonl(tmp_path / "pw.jsonl", rows)
    assert load_preferences(path) == [
        PreferencePair("q", "good", "bad", 2.0, 0, f"{path} row 1"),
        PreferencePair(MESSAGES, "Hello!", "Go away.", None, 1, f"{path} row 2"),
    ]


def test_trl_implicit_prompt_conversations(tmp_path):
    rows = [{"chosen": MESSAGES + REPLY, "rejected": MESSAGES + [{"role": "assistant", "content": "No."}]}]
    path = write_jsonl(tmp_path / "implicit.jsonl", rows)
    assert load_preferences(path) == [PreferencePair(MESSAGES, "Hello!", "No.", None, 0, f"{path} row 1")]
    rows[0]["rejected"] = [{"role": "user", "content": "Other"}, {"role": "assistant", "content": "No."}]
    with pytest.raises(DataError, match="field 'rejected': does not share the prompt of 'chosen'"):
        load_preferences(write_jsonl(tmp_path / "implicit2.jsonl", rows))


def test_prompts_keep_other_scalar_fields_as_meta(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi", "id": 3, "tags": ["a"], "reference": "Hello"}])
    assert load_prompts(path) == [PromptExample("Hi", f"{path} row 1", {"id": 3, "reference": "Hello"})]
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": MESSAGES, "completion": "Hello!"}])
    assert load_prompts(path) == [PromptExample(MESSAGES, f"{path} row 1", {"completion": "Hello!"})]


def test_json_list_and_data_object(tmp_path):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "obj.json").write_text(json.dumps({"data": rows}))
    for name in ("list.json", "obj.json"):
        path = str(tmp_path / name)
        assert load_sft(path) == [SFTExample("a", "b", f"{path} row 1"), SFTExample("c", "d", f"{path} row 2")]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"prompt": MESSAGES, "chosen": "good", "rejected": "bad", "margin": 0.5},
        {"prompt": MESSAGES, "chosen": "fine", "rejected": "awful", "margin": None},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "prefs.parquet")
    path = str(tmp_path / "prefs.parquet")
    assert load_preferences(path) == [
        PreferencePair(MESSAGES, "good", "bad", 0.5, 0, f"{path} row 1"),
        PreferencePair(MESSAGES, "fine", "awful", None, 1, f"{path} row 2"),
    ]


def test_csv(tmp_path):
    path = tmp_path / "prefs.csv"
    path.write_text('prompt,chosen,rejected,margin\n"Hi, you",Hello,Go,1.5\n"two\nlines",Yes,No,\n')
    assert load_preferences(str(path)) == [
        PreferencePair("Hi, you", "Hello", "Go", 1.5, 0, f"{path} row 1"),
        PreferencePair("two\nlines", "Yes", "No", None, 1, f"{path} row 2"),
    ]


# --- rendering ---


def test_render_with_a_chat_template():
    tok = tiny_tokenizer(TEMPLATE)
    text = render_prompt(tok, MESSAGES)
    assert text == "<|system|>Be kind.\n<|user|>Hi\n<|assistant|>"
    assert render_completion(tok, MESSAGES, "Hello!") == "Hello!"
    assert render_prompt(tok, "raw text") == "raw text"


def test_render_without_a_template_uses_the_hh_layout():
    tok = tiny_tokenizer()
    assert render_prompt(tok, MESSAGES + REPLY + [{"role": "user", "content": "Bye"}]) == (
        "\n\nSystem: Be kind.\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant:"
    )
    assert render_completion(tok, MESSAGES, "Hello!") == " Hello!"
    assert render_prompt(tok, "raw text") == "raw text"
    assert render_completion(tok, "raw text", "more") == "more"


def test_prompt_length_counts_the_rendered_template():
    # 3 template lines of 1 word each; the template markers are unknown words ([UNK]) to this tokenizer
    prompts = [PromptExample([{"role": "user", "content": "hello world"}], "f.jsonl row 5", {})]
    with pytest.raises(DataError, match=r"f\.jsonl: row 5: field 'prompt': prompt is \d+ tokens"):
        check_prompt_lengths(prompts, tiny_tokenizer(TEMPLATE), max_prompt_length=1)
    check_prompt_lengths(prompts, tiny_tokenizer(TEMPLATE), max_prompt_length=100)


# --- hub names and missing files ---


def test_hub_name_goes_to_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split=None):
        calls.append((name, split))
        return [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "d", "chosen": "e", "rejected": "f"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert read_rows("org/prefs", split="test") == [
        (1, {"prompt": "a", "chosen": "b", "rejected": "c"}),
        (2, {"prompt": "d", "chosen": "e", "rejected": "f"}),
    ]
    pairs = load_preferences("org/prefs")
    assert calls == [("org/prefs", "test"), ("org/prefs", "train")]
    assert pairs[1].source == "org/prefs[train] row 2"


def test_missing_local_path_is_not_a_hub_call(monkeypatch):
    import datasets

    def fail(*args, **kwargs):
        raise AssertionError("load_dataset must not be called for a local path")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    for path in ("nope/missing.jsonl", "missing.csv", "./data/missing", "/abs/missing"):
        with pytest.raises(DataError, match="file not found"):
            read_rows(path)


def test_hub_failure_becomes_a_data_error(monkeypatch):
    import datasets

    def offline(name, split=None):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="org/nothing.*offline"):
        load_prompts("org/nothing")


def test_sft_on_preference_data_takes_the_preferred_answer(tmp_path):
    with pytest.warns(UserWarning, match="row 87"):
        examples = load_sft(str(HH), skip_invalid=True)
    pairs = load_preferences(str(HH), skip_invalid=True)
    assert [(e.prompt, e.completion) for e in examples] == [(p.prompt, p.chosen) for p in pairs]
    path = write_jsonl(tmp_path / "rank.jsonl", [{"prompt": "q", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]}])
    assert [(e.prompt, e.completion) for e in load_sft(path)] == [("q", "c")]


def test_hh_split_keeps_every_row_once_and_is_reproducible(tmp_path):
    """make data-hh splits the sample by row: 40 test rows that no stage of configs/hh-sample.yaml trains on."""
    from rlhf.demo.hh_tiny import HH_SAMPLE, split_sample
    train, test = split_sample(tmp_path)
    rows = HH_SAMPLE.read_text().splitlines()
    a, b = train.read_text().splitlines(), test.read_text().splitlines()
    assert len(b) == 40 and sorted(a + b) == sorted(rows) and not set(a) & set(b)
    (tmp_path / "again").mkdir()
    assert split_sample(tmp_path / "again")[1].read_text() == test.read_text()


def test_ranking_scores_become_pair_margins(tmp_path):
    """K-way rows may rate each answer (UltraFeedback-style): a pair's margin is the difference of ratings."""
    path = tmp_path / "rated.jsonl"
    path.write_text(json.dumps({"prompt": "Pick a pet.", "responses": ["A rock.", "A cat.", "A dog."],
                                "ranking": [1, 2, 0], "scores": [0.5, 4, 3]}) + "\n")
    pairs = load_preferences(str(path))
    assert [(p.chosen, p.rejected, p.margin) for p in pairs] == [
        ("A cat.", "A dog.", 1.0), ("A cat.", "A rock.", 3.5), ("A dog.", "A rock.", 2.5)]
    assert {p.group for p in pairs} == {0}


def test_hold_out_draws_whole_groups_with_a_seed_and_keeps_the_order():
    from rlhf.data import hold_out
    items = list(range(40))
    held, rest = hold_out(items, 0.1, seed=0)
    assert len(held) == 4 and sorted(held + rest) == items and held == sorted(held) and rest == sorted(rest)
    assert hold_out(items, 0.1, seed=0) == (held, rest) and hold_out(items, 0.1, seed=1) != (held, rest)
    assert len(hold_out(items[:3], 0.1, seed=0)[0]) == 1  # at least one
    groups = [i // 4 for i in items]  # 10 groups of 4: whole groups on one side
    held, rest = hold_out(items, 0.2, seed=0, groups=groups)
    assert len(held) == 8 and not {i // 4 for i in held} & {i // 4 for i in rest}
