"""The demo task's gold judge, its builder and the base model it ships."""

import random

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.demo import task
from rlhf.demo.build import BuildSpec, make_datasets, noisy_ranking

P = [{"role": "user", "content": "list 3 fruits"}]


@pytest.mark.parametrize("answer,score", [
    ("apple pear plum", 1.0),
    ("apple pear cat", 2 / 3),          # one intruder
    ("apple pear apple", 2 / 3),        # one repeat
    ("apple pear", 2 / 3),              # one missing: count = 1 - 1/3
    ("apple pear plum kiwi", 2 / 3),    # one too many
    ("cat dog cow", 0.0),               # off topic
    ("", 0.0),
    ("apple apple", (1 - 1 / 3) * 0.5),  # too few and repeated
])
def test_gold_score_hand_values(answer, score):
    assert task.gold_score(P, answer) == pytest.approx(score)
    assert task.gold_score("list 3 fruits", answer) == pytest.approx(score)  # raw-text prompt too


def test_flaws_named():
    assert task.flaws_of(P, "apple pear plum") == []
    assert task.flaws_of(P, "apple pear cat") == ["intruder"]
    assert task.flaws_of(P, "cat dog") == ["off_topic", "too_few"]
    assert task.flaws_of(P, "apple apple pear plum") == ["repeat", "too_many"]


def test_parse_request_rejects_other_prompts():
    with pytest.raises(ValueError, match="not a demo-task prompt"):
        task.parse_request("what is the weather")


def test_writer_makes_the_flaws_it_is_asked_for():
    rng = random.Random(0)
    for request in task.all_requests()[:40]:
        assert task.gold_score(request.text, task.write_answer(rng, request)) == 1.0
        for flaw in task.FLAWS:
            answer = task.write_answer(rng, request, (flaw,))
            if request.n == 1 and flaw in ("too_few", "repeat", "intruder"):
                continue  # one item cannot be cut; its repeat is a too_many, its intruder is off topic
            assert flaw in task.flaws_of(request.text, answer), (request, flaw, answer)


def test_noisy_ranking_is_gold_order_without_noise():
    request = task.Request("list", 3, "fruits")
    answers = ["cat dog cow", "apple pear plum", "apple pear cat"]
    assert noisy_ranking(random.Random(0), request, answers, noise=0.0) == [1, 2, 0]


def test_builder_is_deterministic_and_holds_requests_out():
    spec = BuildSpec(n_sft_train=50, n_sft_eval=20, n_rank_prompts=20, n_pairs_eval=20,
                     n_prompts_train=30, n_prompts_eval=30)
    a, b = make_datasets(spec), make_datasets(spec)
    assert a == b
    assert make_datasets(BuildSpec(**{**spec.__dict__, "seed": 1})) != a

    def requests(rows):
        return {r["prompt"][0]["content"] for r in rows}
    train = requests(a["sft_train"]) | requests(a["rm_rankings_train"]) | requests(a["prompts_train"])
    held_out = requests(a["prompts_eval"]) | requests(a["rm_pairs_eval"]) | requests(a["sft_eval"])
    assert train and held_out and not (train & held_out)


def test_built_rankings_are_valid_permutations(demo_dir):
    from rlhf.data import load_preferences
    pairs = load_preferences(str(demo_dir / "rm_rankings_train.jsonl"))
    assert len(pairs) == 1500 * 6  # K = 4 -> 6 pairs per prompt
    # Annotators are noisy but mostly agree with the gold judge.
    agree = sum(task.gold_score(p.prompt, p.chosen) >= task.gold_score(p.prompt, p.rejected) for p in pairs)
    assert 0.7 < agree / len(pairs) < 1.0


def test_base_model_loads_with_plain_transformers(demo_dir):
    tok = AutoTokenizer.from_pretrained(demo_dir / "base")
    model = AutoModelForCausalLM.from_pretrained(demo_dir / "base")
    assert 1e6 < sum(p.numel() for p in model.parameters()) < 5e6
    assert tok.pad_token_id != tok.eos_token_id
    text = tok.apply_chat_template(P, tokenize=False, add_generation_prompt=True)
    assert text == "<|user|> list 3 fruits <|assistant|>"
    ids = tok(text + " apple pear plum <|end|>")["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == "list 3 fruits apple pear plum"
