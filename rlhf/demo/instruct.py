"""A gold-judged task for a real chat model: verifiable instruction following.

A prompt asks, in plain English, for a number of things of a category written in a given format:

    List 3 fruits, in lowercase, separated by commas. Write nothing else.

and a good answer follows every part of the instruction: `apple, pear, plum`. An instruct model answers
such a request in its own verbose style ("Here are three fruits that are perfect for a healthy diet:
1. Bananas: ..."), which fails the format, so SFT has something to teach and RL something to sharpen:
the right count, no repeats, no intruders, the asked separator, lowercase, no chatter around the list.

The gold judge (`gold_score`) gives a score in [0, 1], the product of

* relevance: the share of items that are one word of the asked category (an item with extra words,
  "here are 3 fruits: apple", is not);
* count: `1 - |items - n| / n`, floored at 0;
* uniqueness: distinct items / items;
* form: times 0.75 when an item has a capital letter (lowercase was asked), times 0.75 when the answer
  uses another separator than the asked one.

A perfect answer scores 1; the empty answer 0. The judge labels preferences (with noise) and evaluates;
no training stage calls it.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

CATEGORIES: dict[str, list[str]] = {
    "fruits": "apple banana orange grape mango pear peach cherry lemon lime plum kiwi melon apricot fig "
              "strawberry coconut papaya pineapple raspberry".split(),
    "colors": "red blue green yellow orange purple pink black white brown gray violet gold silver beige "
              "cyan magenta maroon navy teal".split(),
    "animals": "dog cat horse cow lion tiger elephant bear wolf fox rabbit monkey deer sheep goat pig mouse "
               "zebra giraffe camel".split(),
    "vegetables": "carrot potato tomato onion broccoli spinach lettuce cabbage pepper cucumber pea bean corn "
                  "garlic celery pumpkin radish beet kale zucchini".split(),
    "countries": "france spain italy germany japan china india brazil canada mexico egypt kenya peru chile "
                 "norway sweden greece turkey poland argentina".split(),
    "sports": "soccer football tennis golf basketball baseball hockey rugby cricket swimming boxing cycling "
              "running volleyball skiing surfing rowing archery fencing wrestling".split(),
    "instruments": "piano guitar violin drums flute trumpet cello harp saxophone clarinet banjo organ "
                   "ukulele trombone oboe tuba accordion harmonica bass xylophone".split(),
    "birds": "eagle owl parrot sparrow robin pigeon crow duck swan penguin flamingo hawk falcon seagull "
             "peacock ostrich heron pelican goose turkey".split(),
    "metals": "iron gold silver copper aluminum zinc tin lead nickel platinum titanium steel bronze brass "
              "mercury chromium cobalt tungsten magnesium lithium".split(),
    "drinks": "water tea coffee milk juice soda lemonade wine beer cocoa smoothie cider kefir espresso "
              "latte kombucha tonic punch milkshake whiskey".split(),
}
WORD_TO_CATEGORIES: dict[str, set[str]] = {}
for _c, _ws in CATEGORIES.items():
    for _w in _ws:
        WORD_TO_CATEGORIES.setdefault(_w, set()).add(_c)
VERBS = ["List", "Name", "Give", "Write down"]
COUNTS = [2, 3, 4, 5]
SEPARATORS = {"commas": ", ", "semicolons": "; "}
PREAMBLES = ["Sure! Here are some {c}: ", "Here is the list: ", "Of course. ", "Great question! "]
CHATTER = [" I hope this helps!", " Let me know if you need more.", " Enjoy!"]
FLAWS = ("intruder", "repeat", "too_few", "too_many", "capitals", "preamble", "chatter", "wrong_separator")


@dataclass(frozen=True)
class Request:
    verb: str
    n: int
    category: str
    separator: str

    @property
    def text(self) -> str:
        return f"{self.verb} {self.n} {self.category}, in lowercase, separated by {self.separator}. Write nothing else."


REQUEST_RE = re.compile(r"^(?P<verb>.+) (?P<n>\d+) (?P<category>\w+), in lowercase, separated by "
                        r"(?P<separator>\w+)\. Write nothing else\.$")


def all_requests() -> list[Request]:
    return [Request(v, n, c, s) for c in CATEGORIES for n in COUNTS for v in VERBS for s in SEPARATORS]


def parse_request(prompt) -> Request:
    """Read the request from a prompt: a string or chat messages (the last user message is used)."""
    if isinstance(prompt, list):
        prompt = [m["content"] for m in prompt if m["role"] == "user"][-1]
    m = REQUEST_RE.match(prompt.strip())
    if not m or m["category"] not in CATEGORIES or m["separator"] not in SEPARATORS:
        raise ValueError(f"not an instruction-task prompt: {prompt!r}")
    return Request(m["verb"], int(m["n"]), m["category"], m["separator"])


def split_items(request: Request, response: str) -> tuple[list[str], bool]:
    """The answer's items by the asked separator (or, failing that, by any of the others), and whether the
    asked separator was the one used."""
    text = response.strip().rstrip(".").strip()
    if not text:
        return [], True
    asked = SEPARATORS[request.separator].strip()
    used = asked if asked in text else next((s.strip() for s in SEPARATORS.values() if s.strip() in text), asked)
    items = [i.strip() for i in text.split(used) if i.strip()]
    return items, used == asked or len(items) == 1


def judge_parts(request: Request, response: str) -> dict[str, float]:
    items, right_separator = split_items(request, response)
    if not items:
        return {"relevance": 0.0, "count": 0.0, "uniqueness": 0.0, "form": 0.0}
    words = [i.lower() for i in items]
    relevance = sum(request.category in WORD_TO_CATEGORIES.get(w, ()) for w in words) / len(words)
    count = max(0.0, 1.0 - abs(len(words) - request.n) / request.n)
    uniqueness = len(set(words)) / len(words)
    form = (1.0 if all(i == i.lower() for i in items) else 0.75) * (1.0 if right_separator else 0.75)
    return {"relevance": relevance, "count": count, "uniqueness": uniqueness, "form": form}


def gold_score(prompt, response: str) -> float:
    """The gold judge: quality of `response` to `prompt` in [0, 1] (1 = perfect). See the module doc."""
    p = judge_parts(parse_request(prompt), response)
    return p["relevance"] * p["count"] * p["uniqueness"] * p["form"]


def flaws_of(prompt, response: str) -> list[str]:
    """Names of the flaws an answer has (empty for a perfect answer); used for per-flaw diagnostics."""
    request = parse_request(prompt)
    items, right_separator = split_items(request, response)
    words = [i.lower() for i in items]
    found = []
    single = [w for w in words if " " not in w and ":" not in w]
    if any(request.category not in WORD_TO_CATEGORIES.get(w, ()) for w in single):
        found.append("intruder")
    if len(single) < len(words):
        found.append("chatter")
    if len(set(words)) < len(words):
        found.append("repeat")
    if len(words) < request.n:
        found.append("too_few")
    if len(words) > request.n:
        found.append("too_many")
    if any(i != i.lower() for i in items):
        found.append("capitals")
    if not right_separator:
        found.append("wrong_separator")
    return found


def make_draft(rng: random.Random, request: Request) -> list[str]:
    """A writer's choice of items, in order (answers written from one draft differ only by their flaws)."""
    return rng.sample(CATEGORIES[request.category], len(CATEGORIES[request.category]))


def write_answer(rng: random.Random, request: Request, flaws: tuple[str, ...] = (), draft: list[str] | None = None) -> str:
    """An answer to `request` with the given flaws (see FLAWS); no flaws gives a perfect answer."""
    pool = draft or make_draft(rng, request)
    n = request.n - 1 if "too_few" in flaws else request.n + rng.randint(1, 2) if "too_many" in flaws else request.n
    items = list(pool[:max(1, n)])
    if "intruder" in flaws:
        other = rng.choice([c for c in CATEGORIES if c != request.category])
        items[rng.randrange(len(items))] = rng.choice([w for w in CATEGORIES[other]
                                                       if request.category not in WORD_TO_CATEGORIES[w]])
    if "repeat" in flaws and len(items) > 1:
        i = rng.randrange(1, len(items))
        items[i] = items[rng.randrange(i)]
    if "capitals" in flaws:
        items = [w.capitalize() for w in items]
    sep = SEPARATORS[request.separator]
    if "wrong_separator" in flaws:
        sep = rng.choice([s for s in SEPARATORS.values() if s != sep])
    text = sep.join(items)
    if "preamble" in flaws:
        text = rng.choice(PREAMBLES).format(c=request.category) + text
    if "chatter" in flaws:
        text += "." + rng.choice(CHATTER)
    return text


def sample_flaws(rng: random.Random, p_perfect: float) -> tuple[str, ...]:
    """The demonstrator's mistakes: none with probability p_perfect, else one or two flaws."""
    if rng.random() < p_perfect:
        return ()
    flaws = rng.sample(FLAWS, rng.choice([1, 1, 2]))
    if "too_few" in flaws and "too_many" in flaws:
        flaws.remove("too_many")
    return tuple(flaws)
