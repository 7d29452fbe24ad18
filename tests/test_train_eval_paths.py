"""The Trainer stages read a row the same way when they train on it and when they evaluate it: for the same
rows, the loss through the training path (the train dataloader, `compute_loss` in training mode) equals the
held-out evaluation's (`evaluate`), and the RM's reward margins are the same either way. On the demo's model and
on a real chat model (49k vocabulary, pad = EOS = end of turn in its config, a chat template with a default
system prompt), where a difference between the two would show as held-out metrics far from the training ones."""

from dataclasses import replace

import pytest
import torch
from peft import get_peft_model

from conftest import DEMO_CONFIG, REAL_CONFIG
from rlhf import data as rdata
from rlhf import dpo, sft
from rlhf.config import load_config
from rlhf.models import load_causal_lm, load_sft_model, load_tokenizer, lora_config
from rlhf.rm import train as rm

pytestmark = pytest.mark.slow
ROWS = 4  # a real model's forward on 2 CPU cores is seconds per row


@pytest.fixture(params=["demo", "smollm2"])
def case(request):
    """(config, tokenizer) of one model, its files pointed at the task it is shipped with."""
    if request.param == "demo":
        config, data = DEMO_CONFIG, request.getfixturevalue("demo_dir")
        base = data / "base"
    else:
        config, data = REAL_CONFIG, request.getfixturevalue("instruct_dir")
        base = request.getfixturevalue("smollm2_dir")
    files = {"sft.train_file": "sft_train", "sft.eval_file": "sft_eval", "rm.train_file": "rm_rankings_train",
             "rm.eval_file": "rm_pairs_eval", "dpo.train_file": "rm_rankings_train", "dpo.eval_file": "rm_pairs_eval"}
    cfg = load_config(config, [f"model.name_or_path={base}", *(f"{k}={data / v}.jsonl" for k, v in files.items())])
    return cfg, load_tokenizer(cfg.model.name_or_path)


def one_batch(spec):
    return replace(spec, train=replace(spec.train, batch_size=2 * ROWS))


def train_path_loss(trainer, **kwargs):
    """The loss of the training dataloader's first batch (every row: one batch), as `training_step` takes it."""
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, batch, **kwargs)


def sft_adapter(cfg, tokenizer, out):
    """A freshly initialised SFT adapter (LoRA B = 0: the SFT model is the base), saved as the SFT stage saves it."""
    model = get_peft_model(load_causal_lm(cfg.model, tokenizer), lora_config(cfg.sft.lora))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_sft_loss_is_the_same_in_training_and_in_evaluation(case, tmp_path):
    cfg, tok = case
    rows = rdata.load_sft(cfg.sft.eval_file)[:ROWS]
    cfg = replace(cfg, sft=one_batch(cfg.sft))
    trainer = sft.build_trainer(cfg, load_causal_lm(cfg.model, tok), tok, rows, rows, tmp_path)
    trained = float(train_path_loss(trainer))
    evaluated = trainer.evaluate()["eval_loss"]
    assert trained == pytest.approx(evaluated, rel=1e-4)


def test_rm_margins_are_the_same_in_training_and_in_evaluation(case, tmp_path):
    cfg, tok = case
    cfg = replace(cfg, rm=one_batch(cfg.rm))
    ds = rm.tokenize_pairs(rdata.load_preferences(cfg.rm.eval_file)[:ROWS], tok, cfg.rm.max_length, False, "held-out pairs")
    clf = rm.reward_classifier(load_sft_model(cfg.model, sft_adapter(cfg, tok, tmp_path / "sft"), tok), cfg.rm.lora, 0)
    trainer = rm.build_trainer(cfg, clf, tok, ds, ds, tmp_path / "rm", cfg.rm.train)
    loss, outputs = train_path_loss(trainer, return_outputs=True)
    batch = trainer._prepare_inputs(next(iter(trainer.get_eval_dataloader())))
    trainer.model.eval()  # as evaluate() runs it
    eval_loss, logits, _ = trainer.prediction_step(trainer.model, batch, prediction_loss_only=False)
    # chosen rows first, then rejected; the training sampler shuffles the pairs, so compare them in sorted order
    margins = lambda r: (r.reshape(2, -1)[0] - r.reshape(2, -1)[1]).sort().values  # noqa: E731
    assert torch.allclose(margins(outputs.logits.flatten()), margins(logits.flatten()), atol=1e-4)
    assert float(loss) == pytest.approx(float(eval_loss), rel=1e-4)


def test_dpo_loss_is_the_same_in_training_and_in_evaluation(case, tmp_path):
    cfg, tok = case
    cfg = replace(cfg, dpo=one_batch(cfg.dpo))
    ds = dpo.tokenize_preferences(rdata.load_preferences(cfg.dpo.eval_file)[:ROWS], tok, cfg.dpo.max_length, "held-out pairs")
    model = load_sft_model(cfg.model, sft_adapter(cfg, tok, tmp_path / "sft"), tok)
    trainer = dpo.build_trainer(cfg, model, tok, ds, ds, tmp_path / "dpo")
    trained = float(train_path_loss(trainer))
    assert trained == pytest.approx(trainer.evaluate()["eval_loss"], rel=1e-4)
