"""The demo's base ships built (data/demo-base/): `make data` copies it when it was built from the same spec,
corpus and tokenizer, and pre-trains otherwise."""

import json
from dataclasses import replace

import pytest
from safetensors.torch import load_file

from rlhf.demo import build as b

# A base small enough to pre-train in a few seconds (one optimiser step).
TINY = b.BuildSpec(n_sft_train=8, n_sft_eval=4, n_rank_prompts=4, n_pairs_eval=4, n_prompts_train=4, n_prompts_eval=4,
                   n_pretrain=64, pretrain_epochs=1, hidden_size=16, layers=1, heads=2, intermediate_size=32)


def weights(demo_dir):
    return load_file(str(demo_dir / "base" / "model.safetensors"))


def same_weights(a, b_):
    return a.keys() == b_.keys() and all((a[k] == b_[k]).all() for k in a)


def refuse_to_pretrain(*args, **kwargs):
    raise AssertionError("pre-trained although the cache matches")


def fake_pretrain(spec, tokenizer, corpus, out_dir):
    out_dir.mkdir(parents=True)
    (out_dir / "model.safetensors").write_text("x")


class Recorder:
    def __init__(self):
        self.calls = 0

    def __call__(self, spec, tokenizer, corpus, out_dir):
        self.calls += 1
        raise RuntimeError("pre-training")


def test_the_cache_is_used_when_the_spec_matches_and_equals_a_fresh_build(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = b.build(tmp_path / "first", TINY, cache=cache, update_cache=True)   # pre-trains, stores the cache
    assert json.loads((cache / b.KEY_FILE).read_text())["spec"]["n_pretrain"] == 64
    fresh = b.build(tmp_path / "fresh", TINY, cache=None)                      # pre-trains again, no cache
    assert same_weights(weights(first), weights(fresh))                         # the build is deterministic
    monkeypatch.setattr(b, "build_base_model", refuse_to_pretrain)
    copied = b.build(tmp_path / "copied", TINY, cache=cache)
    assert same_weights(weights(copied), weights(fresh))
    assert not (copied / "base" / b.KEY_FILE).exists() and (copied / "DONE").is_file()
    assert (copied / "base" / "tokenizer.json").read_text() == (fresh / "base" / "tokenizer.json").read_text()


@pytest.mark.parametrize("change", [{"pretrain_epochs": 2}, {"hidden_size": 32}, {"seed": 1}])
def test_a_change_of_the_base_recipe_forces_a_rebuild(tmp_path, monkeypatch, change):
    cache = tmp_path / "cache"
    monkeypatch.setattr(b, "build_base_model", fake_pretrain)
    b.build(tmp_path / "first", TINY, cache=cache, update_cache=True)
    pretrain = Recorder()
    monkeypatch.setattr(b, "build_base_model", pretrain)
    b.build(tmp_path / "same", TINY, cache=cache)                     # the data files' sizes are not in the key
    assert pretrain.calls == 0
    with pytest.raises(RuntimeError, match="pre-training"):
        b.build(tmp_path / "changed", replace(TINY, **change), cache=cache)
    assert pretrain.calls == 1


def test_the_key_covers_the_corpus_and_the_tokenizer():
    tok = b.build_tokenizer()
    corpus = b.pretrain_corpus(TINY)
    key = b.base_key(TINY, tok, corpus)
    assert key == b.base_key(TINY, b.build_tokenizer(), b.pretrain_corpus(TINY))
    assert key != b.base_key(TINY, tok, corpus[:-1] + [corpus[-1] + " oak"])   # the task's text changed
    tok.chat_template = tok.chat_template.replace("<|end|>", "<|end|> ")
    assert key != b.base_key(TINY, tok, corpus)


def test_the_shipped_base_matches_the_default_spec():
    """Otherwise `make data` pre-trains (2.5 min): after changing the base's recipe, `make data-base` and
    commit data/demo-base/."""
    spec = b.BuildSpec()
    key = b.base_key(spec, b.build_tokenizer(), b.pretrain_corpus(spec))
    assert b.cached_base(b.BASE_CACHE, key) == b.BASE_CACHE
