"""A second gold-judged task, of another kind than the demo: short greeting messages.

A prompt asks for a message for an occasion to a person: `write card birthday anna`. A good answer is a
short message in a fixed shape that **copies the name from the prompt** and **picks a wish word that fits
the occasion** (a birthday gets `cake` or `candles`, a wedding `rings` or `vows`):

    dear anna enjoy your cake ! love

Where the demo's answer is a set of category words (order free), here the answer has a layout (opener,
name, wish, `!`, closer), one slot must be copied from the prompt (24 names, none of them learnable from
the occasion), and one must be chosen by meaning. Its failure modes differ too: the wrong name, a
missing name, another occasion's wish, a doubled word, a dropped opener or closer, rambling filler.

The gold judge (`gold_score`) gives a score in [0, 1], the product of

* name: 1 if the prompt's name appears once and no other name does; 0.5 if it appears more than once;
  0 if it is missing or another name appears (a card to the wrong person is worthless);
* wish: 1 if there is exactly one wish word and it fits the occasion; 0.5 if there is none (a bland
  card); 0 if any wish word of another occasion appears; 0.5 for a fitting one said twice or more;
* form: distinct words / words, times 0.75 without an opener first, times 0.75 without a closer last,
  times max(0, 1 - 0.25 x (words beyond 8)).

A perfect answer scores 1; the empty answer 0. The judge labels preferences (with noise) and
evaluates; no training stage calls it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

NAMES = ("anna ben carl dora emil fay gus hana ivan jade kai lena milo nina otto pia quinn rosa sam tara "
         "uma vic wes zoe").split()
WISHES: dict[str, list[str]] = {
    "birthday": ["cake", "candles"],
    "wedding": ["rings", "vows"],
    "graduation": ["diploma", "degree"],
    "recovery": ["rest", "healing"],
    "retirement": ["leisure", "pension"],
    "newborn": ["baby", "cradle"],
    "housewarming": ["keys", "garden"],
    "thanks": ["kindness", "help"],
}
WISH_TO_OCCASION = {w: o for o, ws in WISHES.items() for w in ws}
VERBS = ["write", "send", "compose"]
KINDS = ["card", "note", "message"]
OPENERS = ["dear", "hi", "hello"]
CLOSERS = ["love", "best", "yours"]
PHRASES = [["enjoy", "your"], ["cheers", "to", "your"], ["hooray", "for", "your"]]
FILLER = ["so", "very", "really", "truly", "much", "indeed"]
FLAWS = ("wrong_name", "no_name", "wrong_wish", "no_wish", "doubled", "no_opener", "no_closer", "rambling")
MAX_WORDS = 8


@dataclass(frozen=True)
class Request:
    verb: str
    kind: str
    occasion: str
    name: str

    @property
    def text(self) -> str:
        return f"{self.verb} {self.kind} {self.occasion} {self.name}"


def all_requests() -> list[Request]:
    return [Request(v, k, o, n) for o in WISHES for n in NAMES for v in VERBS for k in KINDS]


def parse_request(prompt) -> Request:
    """Read the request from a prompt: a string or chat messages (the last user message is used)."""
    if isinstance(prompt, list):
        prompt = [m["content"] for m in prompt if m["role"] == "user"][-1]
    words = prompt.split()
    if len(words) != 4 or words[2] not in WISHES or words[3] not in NAMES:
        raise ValueError(f"not a greetings-task prompt: {prompt!r}")
    return Request(*words)


def split_words(response: str) -> list[str]:
    """The answer's words; "!" is a word of its own (a tokenizer's decode writes "cake!" for "cake !")."""
    return response.replace("!", " ! ").split()


def judge_parts(request: Request, response: str) -> dict[str, float]:
    words = split_words(response)
    if not words:
        return {"name": 0.0, "wish": 0.0, "form": 0.0}
    names = [w for w in words if w in NAMES]
    if request.name not in names or any(w != request.name for w in names):
        name = 0.0
    else:
        name = 1.0 if len(names) == 1 else 0.5
    wishes = [w for w in words if w in WISH_TO_OCCASION]
    if any(WISH_TO_OCCASION[w] != request.occasion for w in wishes):
        wish = 0.0
    else:
        wish = 1.0 if len(wishes) == 1 else 0.5
    form = len(set(words)) / len(words)
    form *= 1.0 if words[0] in OPENERS else 0.75
    form *= 1.0 if words[-1] in CLOSERS else 0.75
    form *= max(0.0, 1.0 - 0.25 * max(0, len(words) - MAX_WORDS))
    return {"name": name, "wish": wish, "form": form}


def gold_score(prompt, response: str) -> float:
    """The gold judge: quality of `response` to `prompt` in [0, 1] (1 = perfect). See module doc."""
    parts = judge_parts(parse_request(prompt), response)
    return parts["name"] * parts["wish"] * parts["form"]


def flaws_of(prompt, response: str) -> list[str]:
    """Names of the flaws an answer has (empty for a perfect answer); used for per-flaw diagnostics."""
    request = parse_request(prompt)
    words = split_words(response)
    found = []
    names = [w for w in words if w in NAMES]
    if any(w != request.name for w in names):
        found.append("wrong_name")
    elif not names:
        found.append("no_name")
    wishes = [w for w in words if w in WISH_TO_OCCASION]
    if any(WISH_TO_OCCASION[w] != request.occasion for w in wishes):
        found.append("wrong_wish")
    elif not wishes:
        found.append("no_wish")
    if len(set(words)) < len(words):
        found.append("doubled")
    if not words or words[0] not in OPENERS:
        found.append("no_opener")
    if not words or words[-1] not in CLOSERS:
        found.append("no_closer")
    if len(words) > MAX_WORDS:
        found.append("rambling")
    return found


def write_answer(rng: random.Random, request: Request, flaws: tuple[str, ...] = (),
                 draft: dict | None = None) -> str:
    """A message for `request` with the given flaws (see FLAWS); no flaws gives a perfect answer.

    `draft`: this writer's choices (opener, phrase, wish, closer); answers written from one draft differ
    only by their flaws. None: a fresh random draft.
    """
    d = draft or make_draft(rng, request)
    name = request.name
    if "wrong_name" in flaws:
        name = rng.choice([n for n in NAMES if n != request.name])
    wish = d["wish"]
    if "wrong_wish" in flaws:
        wish = rng.choice(WISHES[rng.choice([o for o in WISHES if o != request.occasion])])
    words = [d["opener"]] if "no_opener" not in flaws else []
    words += [name] if "no_name" not in flaws else []
    words += list(d["phrase"]) + ([wish] if "no_wish" not in flaws else []) + ["!"]
    words += [d["closer"]] if "no_closer" not in flaws else []
    if "rambling" in flaws:
        at = rng.randrange(1, len(words))
        words[at:at] = rng.sample(FILLER, max(1, MAX_WORDS + 1 - len(words)) + rng.randint(0, 2))
    if "doubled" in flaws:
        i = rng.randrange(len(words))
        words.insert(i, words[i])
    return " ".join(words)


def make_draft(rng: random.Random, request: Request) -> dict:
    return {"opener": rng.choice(OPENERS), "phrase": tuple(rng.choice(PHRASES)),
            "wish": rng.choice(WISHES[request.occasion]), "closer": rng.choice(CLOSERS)}


def sample_flaws(rng: random.Random, p_perfect: float) -> tuple[str, ...]:
    """The demonstrator's mistakes: none with probability p_perfect, else one or two flaws."""
    if rng.random() < p_perfect:
        return ()
    flaws = rng.sample(FLAWS, rng.choice([1, 1, 2]))
    if "wrong_name" in flaws and "no_name" in flaws:
        flaws.remove("no_name")
    if "wrong_wish" in flaws and "no_wish" in flaws:
        flaws.remove("no_wish")
    return tuple(flaws)


def vocabulary() -> list[str]:
    """Every word the task uses (the tokenizer's vocabulary, special tokens apart)."""
    words = (VERBS + KINDS + list(WISHES) + NAMES + list(WISH_TO_OCCASION) + OPENERS + CLOSERS
             + [w for p in PHRASES for w in p] + FILLER + ["!", ":", "to", "for"])
    return list(dict.fromkeys(words))
