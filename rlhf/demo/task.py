"""The embedded demo task: "list N things of a category", judged by a program.

A prompt asks for `n` items of one category ("list 3 fruits"); an answer is a space-separated list of
words. The gold judge (`gold_score`) scores an answer in [0, 1] as the product of three factors:

* relevance: the fraction of items that belong to the asked category;
* count: 1 - |len - n| / n (floored at 0): the right number of items;
* uniqueness: distinct items / items: no repeats.

So a perfect answer scores 1, one intruder or one repeat among three items scores 2/3, and an empty
answer scores 0. The judge is used to label preferences (with noise, as human annotators would) and to
evaluate; never inside SFT, RM or PPO training.

`write_answer` is the simulated demonstrator: it writes answers of mixed quality, so that an SFT model
that imitates it makes the same mistakes and RL has headroom to fix them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

CATEGORIES: dict[str, list[str]] = {
    "fruits": "apple pear plum kiwi mango lemon lime grape peach cherry melon fig".split(),
    "animals": "cat dog horse cow sheep goat mouse lion tiger bear wolf fox".split(),
    "colors": "red blue green yellow purple orange pink brown black white gray gold".split(),
    "tools": "hammer saw drill wrench chisel pliers axe shovel rake file clamp level".split(),
    "drinks": "water tea coffee milk juice soda cocoa cider wine beer broth smoothie".split(),
    "vehicles": "car bus truck bike train tram boat ship plane van taxi scooter".split(),
    "instruments": "piano guitar violin drum flute harp cello trumpet organ banjo tuba oboe".split(),
    "trees": "oak pine maple birch willow elm ash cedar palm spruce beech poplar".split(),
}
VERBS = ["list", "name", "give", "suggest", "write"]
COUNTS = [1, 2, 3, 4, 5]
WORD_TO_CATEGORY = {w: c for c, words in CATEGORIES.items() for w in words}
FLAWS = ("intruder", "repeat", "too_few", "too_many", "off_topic")


@dataclass(frozen=True)
class Request:
    verb: str
    n: int
    category: str

    @property
    def text(self) -> str:
        return f"{self.verb} {self.n} {self.category}"


def all_requests() -> list[Request]:
    return [Request(v, n, c) for c in CATEGORIES for v in VERBS for n in COUNTS]


def parse_request(prompt) -> Request:
    """Read the request from a prompt: a string or chat messages (the last user message is used)."""
    if isinstance(prompt, list):
        prompt = [m["content"] for m in prompt if m["role"] == "user"][-1]
    words = prompt.split()
    if len(words) != 3 or not words[1].isdigit() or words[2] not in CATEGORIES:
        raise ValueError(f"not a demo-task prompt: {prompt!r}")
    return Request(words[0], int(words[1]), words[2])


def judge_parts(request: Request, response: str) -> dict[str, float]:
    items = response.split()
    if not items:
        return {"relevance": 0.0, "count": 0.0, "unique": 0.0}
    on_topic = sum(WORD_TO_CATEGORY.get(w) == request.category for w in items)
    return {
        "relevance": on_topic / len(items),
        "count": max(0.0, 1.0 - abs(len(items) - request.n) / request.n),
        "unique": len(set(items)) / len(items),
    }


def gold_score(prompt, response: str) -> float:
    """The gold judge: quality of `response` to `prompt` in [0, 1] (1 = perfect). See module doc."""
    parts = judge_parts(parse_request(prompt), response)
    return parts["relevance"] * parts["count"] * parts["unique"]


def flaws_of(prompt, response: str) -> list[str]:
    """Names of the flaws an answer has (empty for a perfect answer); used for per-flaw diagnostics."""
    request = parse_request(prompt)
    items = response.split()
    found = []
    off = [w for w in items if WORD_TO_CATEGORY.get(w) != request.category]
    if items and len(off) == len(items):
        found.append("off_topic")
    elif off:
        found.append("intruder")
    if len(set(items)) < len(items):
        found.append("repeat")
    if len(items) < request.n:
        found.append("too_few")
    if len(items) > request.n:
        found.append("too_many")
    return found


def write_answer(rng: random.Random, request: Request, flaws: tuple[str, ...] = (),
                 draft: list[str] | None = None) -> str:
    """An answer to `request` with the given flaws (see FLAWS); no flaws gives a perfect answer.

    `draft`: the category's items in the order this writer lists them (a shuffle of the category);
    answers written from one draft differ only by their flaws. None: a fresh random choice of items.
    """
    words = CATEGORIES[request.category]
    n = request.n
    if "too_few" in flaws and n > 1:
        n -= rng.randint(1, n - 1)  # down to one item: an RM that never saw "oak" for 5 trees scored it best
    if "too_many" in flaws:
        n += rng.randint(1, 3)
    if "off_topic" in flaws:
        other = rng.choice([c for c in CATEGORIES if c != request.category])
        words = CATEGORIES[other]
    if draft is not None and "off_topic" not in flaws:
        items = list(draft[:n])
    else:
        items = rng.sample(words, min(n, len(words)))
    if "intruder" in flaws:
        other = rng.choice([c for c in CATEGORIES if c != request.category])
        items[rng.randrange(len(items))] = rng.choice(CATEGORIES[other])
    if "repeat" in flaws and len(items) > 1:
        i, j = rng.sample(range(len(items)), 2)
        items[j] = items[i]
    elif "repeat" in flaws:
        items.append(items[0])
    return " ".join(items)


def sample_flaws(rng: random.Random, p_perfect: float) -> tuple[str, ...]:
    """The demonstrator's mistakes: none with probability p_perfect, else one or two flaws."""
    if rng.random() < p_perfect:
        return ()
    return tuple(rng.sample(FLAWS, rng.choice([1, 1, 2])))


def vocabulary() -> list[str]:
    """Every word the task uses (the demo tokenizer's vocabulary, special tokens apart)."""
    words = VERBS + [str(n) for n in COUNTS] + list(CATEGORIES) + list(WORD_TO_CATEGORY) + [":"]
    return list(dict.fromkeys(words))
