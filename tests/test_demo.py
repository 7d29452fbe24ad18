"""The demo task's gold judge, its builder and the base model it ships."""

import random

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.demo import task
from rlhf.demo.build import BuildSpec, make_datasets, noisy_ranking, pretrain_corpus

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


def test_answers_from_one_draft_differ_only_by_their_flaws():
    rng = random.Random(0)
    request = task.Request("list", 4, "trees")
    draft = rng.sample(task.CATEGORIES["trees"], 12)
    perfect = task.write_answer(rng, request, (), draft=draft)
    assert perfect.split() == draft[:4]
    for _ in range(20):
        repeat = task.write_answer(rng, request, ("repeat",), draft=draft).split()
        assert task.flaws_of(request.text, " ".join(repeat)) == ["repeat"]
        assert len(set(repeat) & set(draft[:4])) == 3 and len(repeat) == 4  # a near miss: one item doubled
        too_many = task.write_answer(rng, request, ("too_many",), draft=draft).split()
        assert too_many[:4] == draft[:4]
    off = task.write_answer(rng, request, ("off_topic",), draft=draft)
    assert task.flaws_of(request.text, off) == ["off_topic"]  # another category's items, not the draft's


def test_shared_draft_rankings_are_near_misses():
    rows = make_datasets(BuildSpec(n_rank_prompts=200, shared_draft=True))["rm_rankings_train"]
    independent = make_datasets(BuildSpec(n_rank_prompts=200, shared_draft=False))["rm_rankings_train"]

    def shared_items(rows):  # mean share of the best answer's items found in the other answers
        shares = []
        for row in rows:
            best = set(row["responses"][row["ranking"][0]].split())
            for i in row["ranking"][1:]:
                shares.append(len(best & set(row["responses"][i].split())) / len(best))
        return sum(shares) / len(shares)
    assert shared_items(rows) > 2 * shared_items(independent)  # measured: 0.43 vs 0.15


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
    assert len(pairs) == BuildSpec().n_rank_prompts * 6  # K = 4 -> 6 pairs per prompt
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


def test_base_model_knows_a_list_does_not_repeat(demo_dir):
    """The base gives an item already listed a much lower probability than a new one of the category, in a
    list and in a chat answer.

    A base without this (pre-trained at lr 3e-3: both probabilities equal) left the RM
    unable to tell "oak elm oak" from "oak elm ash" and the PPO policy repeating items; one that knew it in
    lists only (P(listed) / P(new) 0.29 in a list, 0.77 after a chat prompt) gave an SFT model that repeated
    more than its demonstrations and a PPO policy that kept the repeats."""
    import torch
    tok = AutoTokenizer.from_pretrained(demo_dir / "base")
    model = AutoModelForCausalLM.from_pretrained(demo_dir / "base")
    for layout, bound in (("list", 0.15), ("chat", 0.25)):  # this base: 0.07, 0.13
        rng = random.Random(0)
        seen, unseen = [], []
        for _ in range(100):
            category = rng.choice(list(task.CATEGORIES))
            items = rng.sample(task.CATEGORIES[category], 12)
            k = rng.randint(2, 5)
            listed = " ".join(items[:k])
            text = (f"{category} : {listed}" if layout == "list"
                    else f"<|user|> list {k + 1} {category} <|assistant|> {listed}")
            ids = tok(text, return_tensors="pt").input_ids
            with torch.no_grad():
                p = model(ids).logits[0, -1].softmax(-1)
            prob = {w: p[tok.convert_tokens_to_ids(w)].item() for w in items}
            seen.append(sum(prob[w] for w in items[:k]) / k)
            unseen.append(sum(prob[w] for w in items[k:]) / (12 - k))
        assert sum(seen) < bound * sum(unseen), layout


def test_pretraining_dialogues_do_not_repeat_items_unless_asked():
    """The base learns from its dialogues whether a chat answer repeats items (BuildSpec.pretrain_chat_repeats);
    the other flaws of the dialogues' poor answers stay."""
    def dialogue_flaws(spec):
        found = []
        for doc in pretrain_corpus(spec):
            if doc.startswith("<|user|>"):
                prompt, answer = doc.removeprefix("<|user|> ").removesuffix(" <|end|>").split(" <|assistant|> ")
                found += task.flaws_of(prompt, answer)
        return set(found)

    assert dialogue_flaws(BuildSpec(n_pretrain=600)) == {"intruder", "too_few", "too_many", "off_topic"}
    assert "repeat" in dialogue_flaws(BuildSpec(n_pretrain=600, pretrain_chat_repeats=True))
