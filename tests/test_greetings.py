"""The second gold-judged task (greeting messages): its judge, its builder, its config (demo.yaml with only
paths and the task's own references changed) and the pipeline's stages on it."""

import json
import random

import pytest
import yaml
from conftest import ROOT, run_stage

from rlhf.demo import greetings as g
from rlhf.demo.build_greetings import GreetingsSpec, build, make_datasets, pretrain_corpus
from rlhf.runs import read_metrics

P = "write card birthday anna"


@pytest.mark.parametrize("answer, score", [
    ("dear anna enjoy your cake ! love", 1.0),
    ("hi anna hooray for your candles ! yours", 1.0),
    ("dear anna enjoy your cake! love", 1.0),                  # as the tokenizer decodes it
    ("dear ben enjoy your cake ! love", 0.0),                  # the wrong name: worthless
    ("dear enjoy your cake ! love", 0.0),                      # no name
    ("dear anna enjoy your rings ! love", 0.0),                # another occasion's wish
    ("dear anna enjoy your ! love", 0.5),                      # no wish: bland
    ("anna enjoy your cake ! love", 0.75),                     # no opener
    ("dear anna enjoy your cake !", 0.75),                     # no closer
    ("dear anna enjoy enjoy your cake ! love", 7 / 8),         # a doubled word
    ("dear anna enjoy your cake ! so very truly love", 0.5),     # rambling: 2 words too many
    # degenerate answers
    ("", 0.0),
    ("anna anna anna", 0.5 * 1 / 3 * 0.75 * 0.75 * 0.5),
    ("cake cake cake cake", 0.0),                               # no name
    ("dear anna , cake , cake , cake !", 0.5 * 5 / 9 * 0.75 * 0.75),  # the wish thrice, 9 words, no closer
    ("love love love love love love love love love love love love", 0.0),
])
def test_gold_score_hand_values(answer, score):
    assert g.gold_score(P, answer) == pytest.approx(score)


def test_gold_score_reads_chat_prompts_and_refuses_others():
    assert g.gold_score([{"role": "user", "content": P}], "dear anna enjoy your cake ! love") == 1.0
    for bad in ("list 3 fruits", "write card birthday nobody", "write card party anna"):
        with pytest.raises(ValueError, match="greetings-task prompt"):
            g.parse_request(bad)


def test_flaws_named():
    assert g.flaws_of(P, "dear anna enjoy your cake ! love") == []
    assert g.flaws_of(P, "dear ben enjoy your rings rings ! love") == ["wrong_name", "wrong_wish", "doubled"]
    assert g.flaws_of(P, "") == ["no_name", "no_wish", "no_opener", "no_closer"]


def test_writer_makes_the_flaws_it_is_asked_for():
    rng = random.Random(0)
    for r in rng.sample(g.all_requests(), 40):
        assert g.gold_score(r.text, g.write_answer(rng, r, ())) == 1.0
        for flaw in g.FLAWS:
            answer = g.write_answer(rng, r, (flaw,))
            assert flaw in g.flaws_of(r.text, answer), (flaw, answer)
            assert g.gold_score(r.text, answer) < 1.0


def test_builder_is_deterministic_holds_requests_out_and_ranks_by_the_judge():
    spec = GreetingsSpec(n_sft_train=50, n_sft_eval=10, n_rank_prompts=40, n_pairs_eval=10, n_prompts_train=20,
                         n_prompts_eval=10)
    a, b = make_datasets(spec), make_datasets(spec)
    assert a == b
    seen = {json.dumps(r["prompt"]) for k in ("sft_train", "rm_rankings_train", "prompts_train") for r in a[k]}
    assert seen.isdisjoint(json.dumps(r["prompt"]) for r in a["prompts_eval"])
    for row in a["rm_rankings_train"]:
        assert sorted(row["ranking"]) == [0, 1, 2, 3] and len(set(row["responses"])) == 4
    # the annotators' noise is small: the best-ranked answer is (nearly always) at least as good as the worst
    good = [g.gold_score(r["prompt"], r["chosen"]) >= g.gold_score(r["prompt"], r["rejected"]) for r in a["rm_pairs_eval"]]
    assert sum(good) >= 8
    # the pre-training text never doubles a word in a chat answer, and shows names being copied
    corpus = pretrain_corpus(GreetingsSpec(n_pretrain=300))
    chats = [d for d in corpus if d.startswith("<|user|>")]
    assert chats and all("doubled" not in g.flaws_of(" ".join(d.split()[1:5]), " ".join(d.split()[6:-1]))
                         for d in chats)
    assert any(d.startswith("to ") for d in corpus)


def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


# What a new task may change in a copy of configs/demo.yaml: where its files are, and references to its own
# code (the gold judge, the per-flaw tagger) and to the probes its judge does not care about.
TASK_KEYS = {"ppo.judge", "eval.judge", "rm.pair_tags", "rm.probes.no_warning"}


def test_greetings_config_is_the_demo_config_with_only_paths_changed():
    demo = flat(yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text()))
    other = flat(yaml.safe_load((ROOT / "configs" / "greetings.yaml").read_text()))
    assert demo.keys() == other.keys()
    changed = {k for k in demo if demo[k] != other[k]}
    paths = {k for k in changed if isinstance(demo[k], str) and demo[k].startswith(("data/demo", "runs/demo"))}
    assert changed - paths <= TASK_KEYS, f"settings tuned per task: {sorted(changed - paths - TASK_KEYS)}"
    assert all(other[k] == demo[k].replace("demo", "greetings", 1) for k in paths)


@pytest.mark.slow
def test_greetings_pipeline_end_to_end_small(tmp_path):
    """Build the task small, then SFT -> RM -> PPO (a few steps) -> eval through the stage CLIs on its config."""
    data, run = tmp_path / "data", tmp_path / "run"
    build(data, GreetingsSpec(n_sft_train=64, n_sft_eval=16, n_rank_prompts=24, n_pairs_eval=16, n_prompts_train=32,
                              n_prompts_eval=8, n_pretrain=200, pretrain_epochs=1, hidden_size=32, layers=2,
                              intermediate_size=64))
    cfg = ROOT / "configs" / "greetings.yaml"
    paths = [f"run_dir={run}", f"model.name_or_path={data / 'base'}"]
    stage = {"sft": [f"sft.train_file={data / 'sft_train.jsonl'}", f"sft.eval_file={data / 'sft_eval.jsonl'}",
                     "sft.train.max_steps=2", "sft.train.progress_bar=false"],
             "rm": [f"rm.train_file={data / 'rm_rankings_train.jsonl'}", f"rm.eval_file={data / 'rm_pairs_eval.jsonl'}",
                    "rm.train.max_steps=2", "rm.probes.samples=8", "rm.train.progress_bar=false"],
             "ppo": [f"ppo.prompts_file={data / 'prompts_train.jsonl'}", f"ppo.eval_prompts_file={data / 'prompts_eval.jsonl'}",
                     "ppo.steps=2", "ppo.sampling.rollout_batch_size=8", "ppo.update.num_minibatches=2", "ppo.update.epochs=1",
                     "ppo.reward.norm_samples=8", "ppo.checkpoint.every=2", "ppo.monitor.every=1", "ppo.progress_bar=false"],
             "eval": [f"eval.prompts_file={data / 'prompts_eval.jsonl'}", "eval.samples_per_prompt=1",
                      "eval.decoding=[sample]", "eval.progress_bar=false", "eval.plots=false"]}
    for name in ("sft", "rm", "ppo", "eval"):
        run_stage(name, *paths, *stage[name], config=cfg)
        assert (run / name / "DONE").is_file(), name
    diag = json.loads((run / "rm" / "diagnostics.json").read_text())
    assert "probes" in diag
    rows = read_metrics(run / "ppo" / "metrics.jsonl")
    assert [r["step"] for r in rows][:3] == [0, 1, 2]
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert "gold" in json.dumps(metrics)  # the greetings judge scored the answers
