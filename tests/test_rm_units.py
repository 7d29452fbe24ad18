"""Reward-model pieces on hand-made numbers: diagnostics, the trainer's loss, grouped batches, tokenization."""

import math

import pytest
import torch

from rlhf.rm import diagnostics as d
from rlhf.data import PreferencePair
from rlhf.sequences import last_token_index, position_ids
from rlhf.rm.train import GroupBatchSampler, tokenize_pairs


def t(*xs):
    return torch.tensor(xs, dtype=torch.float)


def test_accuracy_counts_ties_half():
    assert d.pairwise_accuracy(t(2, 0, 1, 5), t(1, 1, 1, 4)) == pytest.approx((1 + 0 + 0.5 + 1) / 4)


def test_ece_by_hand():
    # margins +ln3 (p = .75, right), -ln3 (conf .75, wrong), +ln9 (p = .9, right): bins [.7,.75) / [.75,.8) / [.9,.95)
    chosen, rejected = t(math.log(3), 0, math.log(9)), t(0, math.log(3), 0)
    ece, rows = d.expected_calibration_error(chosen, rejected)
    # the two .75 pairs share a bin: accuracy .5 vs confidence .75; the .9 pair: accuracy 1 vs .9
    assert ece == pytest.approx(2 / 3 * 0.25 + 1 / 3 * 0.1)
    assert [(r["n"], round(r["accuracy"], 3)) for r in rows] == [(2, 0.5), (1, 1.0)]


def test_pearson_and_tags():
    assert d.pearson(t(1, 2, 3), t(2, 4, 6)) == pytest.approx(1.0)
    assert d.pearson(t(1, 2, 3), t(3, 2, 1)) == pytest.approx(-1.0)
    assert d.pearson(t(1, 1, 1), t(1, 2, 3)) == 0.0
    by_tag = d.accuracy_by_tag(t(1, 1, 0), t(0, 2, 1), [["repeat"], ["repeat", "intruder"], []])
    assert by_tag == {"(none)": {"n": 1, "accuracy": 0.0}, "intruder": {"n": 1, "accuracy": 0.0},
                      "repeat": {"n": 2, "accuracy": 0.5}}


def test_summary_keys():
    s = d.summarize(t(1, 2), t(0, 0), t(3, 4), t(5, 6))
    assert s["rm/accuracy"] == 1.0 and s["rm/margin_mean"] == 1.5 and s["rm/reward_mean"] == 0.75
    assert s["rm/length_corr"] < 0  # longer answers got lower rewards here


def test_reward_trainer_loss_with_margin_and_centring(tmp_path):
    """The loss the RM stage trains with: -log sigmoid(rc - rr - m) + c * mean((rc + rr)^2)."""
    from rlhf.config import RMStageConfig, TrainSpec
    from rlhf.rm.train import GroupedRewardTrainer, trainer_args
    from transformers import LlamaConfig, LlamaForSequenceClassification
    from datasets import Dataset

    model = LlamaForSequenceClassification(LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
                                                       num_hidden_layers=1, num_attention_heads=1, num_labels=1,
                                                       pad_token_id=0))
    cfg = RMStageConfig(center_rewards_coefficient=0.01, train=TrainSpec(batch_size=2))
    data = Dataset.from_list([{"chosen_ids": [1, 2], "rejected_ids": [3], "margin": 0.5, "group": 0}])
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[PAD]": 0, "a": 1}, unk_token="a")),
                                  pad_token="[PAD]", eos_token="a")
    trainer = GroupedRewardTrainer(model=model, args=trainer_args(cfg, tmp_path, bf16=False), processing_class=tok,
                                   train_dataset=data, eval_dataset=data)
    logits = t(2, 0, 1, 1).unsqueeze(-1)  # chosen rewards [2, 0], rejected [1, 1]
    trainer.model.forward = lambda **kw: type("Out", (), {"logits": logits})()
    trainer.model.train()
    inputs = {"input_ids": torch.arange(8).view(4, 2), "attention_mask": torch.ones(4, 2, dtype=torch.long),
              "margin": t(0.5, 0.0)}
    loss = trainer.compute_loss(trainer.model, inputs)
    hand = (-math.log(1 / (1 + math.exp(-0.5))) - math.log(1 / (1 + math.exp(1)))) / 2 + 0.01 * (9 + 1) / 2
    assert loss.item() == pytest.approx(hand, rel=1e-6)
    assert trainer._metrics["train"]["accuracy"] == [0.5]


def test_each_distinct_answer_runs_once_with_the_same_loss_and_gradients(tmp_path):
    """A K = 3 ranking as its 3 pairs: 6 rows, 3 distinct answers; the grouped trainer runs 3 rows and
    gets trl's loss and gradients."""
    from rlhf.config import RMStageConfig, TrainSpec
    from rlhf.rm.train import GroupedRewardTrainer, trainer_args
    from trl import RewardTrainer
    from transformers import LlamaConfig, LlamaForSequenceClassification
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
                                                       num_hidden_layers=1, num_attention_heads=1, num_labels=1,
                                                       pad_token_id=0))
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[PAD]": 0, "a": 1}, unk_token="a")),
                                  pad_token="[PAD]", eos_token="a")
    data = Dataset.from_list([{"chosen_ids": [1, 2], "rejected_ids": [3], "group": 0}])
    a, b, c = [1, 2, 5], [1, 3, 0], [4, 6, 7]  # best, middle (padded), worst
    inputs = {"input_ids": torch.tensor([a, a, b, b, c, c]), "attention_mask": (torch.tensor([a, a, b, b, c, c]) > 0).long()}
    rows_seen, losses, grads = [], [], []
    hook = model.register_forward_pre_hook(lambda m, args, kw: rows_seen.append(kw["input_ids"].shape[0]), with_kwargs=True)
    for cls in (RewardTrainer, GroupedRewardTrainer):
        args = trainer_args(RMStageConfig(train=TrainSpec(batch_size=6)), tmp_path / cls.__name__, bf16=False)
        trainer = cls(model=model, args=args, processing_class=tok, train_dataset=data, eval_dataset=data)
        trainer.model.train()
        model.zero_grad()
        loss = trainer.compute_loss(trainer.model, {k: v.clone() for k, v in inputs.items()})
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    hook.remove()
    assert rows_seen == [6, 3]
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_group_batches_keep_prompts_whole():
    groups = [0] * 6 + [1] * 6 + [2] * 3 + [3] + [4] * 10  # K=4, K=4, K=3, a pair, and a big group
    sampler = GroupBatchSampler(groups, max_pairs=12, seed=0)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(groups)))  # every pair exactly once
    for batch in batches:
        in_batch = {groups[i] for i in batch}
        assert all(groups.count(g) == sum(groups[i] == g for i in batch) for g in in_batch)  # whole groups
        assert len(batch) <= 12
    assert len(sampler) == len(batches)
    first = [list(b) for b in sampler]
    sampler.set_epoch(1)
    assert [list(b) for b in sampler] != first  # reshuffled per epoch, deterministically
    sampler.set_epoch(0)
    assert [list(b) for b in sampler] == first


class Tok:
    """Word-per-token stand-in: enough to check what tokenize_pairs builds."""
    eos_token_id, pad_token_id = 99, 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [len(w) for w in text.split()]}


def test_tokenize_pairs_ends_in_eos_and_drops_long_pairs_out_loud(capsys):
    pairs = [PreferencePair("q", "aa b", "c", 1.5, 0, "f row 1"), PreferencePair("q", "a " * 20, "b", None, 1, "f row 2")]
    ds = tokenize_pairs(pairs, Tok(), max_length=8, use_margin=True, name="f")
    assert ds[0]["chosen_ids"] == [1, 2, 1, 99] and ds[0]["rejected_ids"] == [1, 1, 99]
    assert ds[0]["margin"] == 1.5 and len(ds) == 1
    assert "dropped 1 of 2 pairs longer than max_length=8" in capsys.readouterr().err


def test_pooling_index_and_positions_under_left_and_right_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert last_token_index(mask).tolist() == [4, 2, 4]
    assert position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2], [0, 1, 2, 3, 4]]


def test_ensemble_objectives_by_hand():
    from rlhf.rm.scoring import combine
    # 3 members x 2 answers: answer 0 the members agree on (1, 1, 1); answer 1 they do not (0, 3, 6)
    scores = t(1, 0, 1, 3, 1, 6).reshape(3, 2)
    assert combine(scores, "mean").tolist() == [1.0, 3.0]
    assert combine(scores, "min").tolist() == [1.0, 0.0]
    # population std of (0, 3, 6) = sqrt(6); of (1, 1, 1) = 0
    assert torch.allclose(combine(scores, "mean_minus_std", 0.5), t(1.0, 3 - 0.5 * math.sqrt(6)))
    assert combine(t(2, 5).reshape(1, 2), "mean_minus_std", 1.0).tolist() == [2.0, 5.0]  # one member: its score
    with pytest.raises(ValueError, match="unknown ensemble objective 'max'"):
        combine(scores, "max")


def test_ensemble_scores_with_its_objective():
    from types import SimpleNamespace
    from rlhf.rm.scoring import RewardEnsemble

    def member(*rewards):
        return SimpleNamespace(model=None, tokenizer=None, head=None, name="reward",
                               score_ids=lambda ids, mask: t(*rewards))
    ensemble = RewardEnsemble([member(1, 0), member(1, 3), member(1, 6)])
    ids = torch.zeros(2, 3, dtype=torch.long)
    assert ensemble.score_ids(ids, ids.bool()).tolist() == [1.0, 3.0]
    worst = ensemble.with_objective("min")
    assert worst.members is ensemble.members and worst.score_ids(ids, ids.bool()).tolist() == [1.0, 0.0]
    ensemble.offsets = torch.tensor([0.0, 3.0, 6.0])  # centred members: (1, 0), (-2, 0), (-5, 0)
    assert ensemble.with_objective("min").score_ids(ids, ids.bool()).tolist() == [-5.0, 0.0]
    with pytest.raises(ValueError, match="unknown ensemble objective"):
        ensemble.with_objective("median")
