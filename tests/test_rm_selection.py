"""Best-checkpoint selection of the RM stage on hand-made numbers."""

import pytest

from rlhf.rm.selection import best_checkpoint_args, cap_warning, describe_selection, selection_score


def test_selection_prefers_accuracy_then_lower_loss():
    assert selection_score(0.81, 0.9) > selection_score(0.80, 0.1)
    assert selection_score(0.80, 0.3) > selection_score(0.80, 0.4)
    assert selection_score(0.8000000001, 0.4) < selection_score(0.80, 0.3)  # float noise in accuracy is a tie


def test_evaluation_and_checkpoint_go_together():
    assert best_checkpoint_args("accuracy", 0, 0)["save_strategy"] == "epoch"
    steps = best_checkpoint_args("loss", 100, 20)  # a kill-safe checkpoint every 20 steps is evaluated too
    assert (steps["eval_steps"], steps["save_steps"], steps["metric_for_best_model"]) == (20, 20, "eval_loss")
    assert best_checkpoint_args("accuracy", 30, 0)["save_steps"] == 30


def _evals(*rows):
    return [{"loss": 1.0, "step": 1}] + [{"eval_loss": l, "eval_accuracy": a, "epoch": e, "step": 10 * e}
                                         for e, (a, l) in enumerate(rows, start=1)]


def test_describe_selection_says_what_was_kept_and_why():
    stopped = describe_selection(_evals((0.7, 0.6), (0.8, 0.5), (0.78, 0.5), (0.79, 0.5)), 20, 8, True, 2)
    assert stopped["rm/best_step"] == 20 and stopped["rm/best_eval_accuracy"] == 0.8 and stopped["rm/stopped_early"]
    assert stopped["selection"] == ("kept the best checkpoint (held-out accuracy 0.800, loss 0.500) at epoch 2 "
                                    "(step 20) of at most 8 epochs; stopped at epoch 4 after 2 evaluations without "
                                    "improvement (patience 2)")
    last = describe_selection(_evals((0.7, 0.6), (0.8, 0.5)), 20, 2, False, 2)
    assert last["rm/best_epoch"] == 2 and "still improving at the last evaluation" in last["selection"]
    assert describe_selection([{"eval_loss": 0.6, "eval_accuracy": 0.7, "epoch": 0.053333, "step": 40}], 40, 2, False,
                              2)["selection"].endswith("at epoch 0.05 (step 40) of at most 2 epochs (the only evaluation)")
    assert "no held-out evaluation" in describe_selection([{"loss": 1.0}], None, 2, False, 2)["selection"]
    assert "early_stopping is off" in describe_selection(_evals((0.7, 0.6)), None, 2, False, 2)["selection"]


def test_a_cap_that_stops_a_run_still_improving_is_a_warning_that_says_what_to_raise():
    """Patience ends the run once it stops improving; the cap ending it while its last evaluation is its best is
    one warning line naming the key to raise."""
    from rlhf.config import RMStageConfig
    capped = describe_selection(_evals((0.7, 0.6), (0.75, 0.55), (0.8, 0.5)), 30, 3, False, 2)
    assert capped["rm/still_improving"] and capped["selection"].endswith(
        "still improving at the last evaluation when rm.train.epochs stopped it: raise rm.train.epochs")
    [line] = cap_warning(capped, "rm.train.epochs")
    assert line.startswith("the reward model was still improving when rm.train.epochs stopped it (best held-out "
                           "epoch 3 was the last): raise rm.train.epochs") and "\n" not in line
    stopped = describe_selection(_evals((0.7, 0.6), (0.8, 0.5), (0.78, 0.5), (0.79, 0.5)), 20, 8, True, 2)
    after_best = describe_selection(_evals((0.7, 0.6), (0.8, 0.5), (0.78, 0.5)), 20, 3, False, 2)
    assert cap_warning(stopped, "rm.train.epochs") == cap_warning(after_best, "rm.train.epochs") == []
    steps = describe_selection(_evals((0.7, 0.6), (0.8, 0.5)), 20, 2, False, 2, cap="rm.train.max_steps")
    assert cap_warning(steps, "rm.train.max_steps")[0].endswith("keeps the best epoch") and "raise rm.train.max_steps" \
        in steps["selection"]
    r = RMStageConfig()
    assert r.early_stopping.enabled and r.early_stopping.patience == 3 and r.train.epochs == 20
    assert r.train.lr_scheduler == "reduce_lr_on_plateau"  # the schedule follows the evaluations, not the cap


@pytest.mark.parametrize("scheduler", ["linear", "reduce_lr_on_plateau"])
def test_rm_trainer_stops_early_and_restores_the_best_checkpoint(tmp_path, scheduler):
    """The RM stage's trainer and callbacks on a tiny PEFT reward model, with the held-out figures forced to
    (accuracy, loss) per epoch: best at epoch 3 (a tie on accuracy with epoch 2, lower loss), two epochs without
    improvement, stop after epoch 5 of at most 8; the model saved at the end is epoch 3's checkpoint. With
    reduce_lr_on_plateau the learning rate follows the evaluations, not the cap."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast, TrainerCallback

    from rlhf.config import RMStageConfig, TrainSpec
    from rlhf.rm.train import GroupedRewardTrainer, trainer_args
    from rlhf.rm.selection import selection_callbacks

    figures = iter([(0.6, 1.0), (0.8, 0.7), (0.8, 0.6), (0.7, 0.5), (0.75, 0.5), (0.9, 0.1)])

    class Forced(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            metrics["eval_accuracy"], metrics["eval_loss"] = next(figures)

    torch.manual_seed(0)
    clf = LlamaForSequenceClassification(LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                                     num_attention_heads=1, num_labels=1, pad_token_id=0))
    model = get_peft_model(clf, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS",
                                           modules_to_save=["score"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[PAD]": 0, "a": 1}, unk_token="a")),
                                  pad_token="[PAD]", eos_token="a")
    rows = [{"chosen_ids": [1, 2, i], "rejected_ids": [3, i], "group": i} for i in range(4, 8)]
    cfg = RMStageConfig(train=TrainSpec(lr=1e-2, epochs=8, batch_size=2, logging_steps=1, progress_bar=False,
                                        lr_scheduler=scheduler))
    trainer = GroupedRewardTrainer(model=model, args=trainer_args(cfg, tmp_path, bf16=False), processing_class=tok,
                                   train_dataset=Dataset.from_list(rows),
                                   eval_dataset=Dataset.from_list(rows).remove_columns("group"),
                                   callbacks=[Forced()] + selection_callbacks(2))
    trainer.train()
    state = trainer.state
    assert state.global_step == 10 and state.best_global_step == 6  # 2 steps per epoch
    lrs = [row["learning_rate"] for row in state.log_history if "learning_rate" in row]  # one per step
    if scheduler == "reduce_lr_on_plateau":  # halved after the evaluation that did not improve (epoch 4)
        assert lrs == pytest.approx([1e-2] * 8 + [5e-3] * 2)
    kept = describe_selection(state.log_history, state.best_global_step, 8, state.global_step < state.max_steps, 2)
    assert kept["rm/best_epoch"] == 3 and kept["rm/stopped_early"]
    # (the log history holds the real held-out figures: the forced ones reach only the selection)
    assert "at epoch 3 (step 6) of at most 8 epochs; stopped at epoch 5 after 2 evaluations" in kept["selection"]
    trainer.model.save_pretrained(tmp_path / "final")
    final = load_file(str(tmp_path / "final" / "adapter_model.safetensors"))
    best = load_file(str(tmp_path / "checkpoints" / "checkpoint-6" / "adapter_model.safetensors"))
    last = load_file(str(tmp_path / "checkpoints" / "checkpoint-10" / "adapter_model.safetensors"))
    assert final.keys() == best.keys() and any("score" in k for k in final)
    assert all(torch.equal(final[k], best[k]) for k in final)
    assert not all(torch.equal(final[k], last[k]) for k in final)
