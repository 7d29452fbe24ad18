"""PPO pieces on tiny models built in the test (fast): PPO-ptx batches, trainable parameters, logits of
the response positions only, gradient checkpointing, bf16 heads, non-finite checks."""

import json
from types import SimpleNamespace

import pytest
import torch

from rlhf.config import ConfigError
from rlhf.models import load_tokenizer
from rlhf.ppo.ptx import ptx_batches


@pytest.fixture(scope="module")
def tok(demo_dir):
    return load_tokenizer(str(demo_dir / "base"))


def demonstrations(path, n):
    path.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": "list 2 fruits"}],
                                        "completion": "apple pear"}) + "\n" for _ in range(n)))
    return str(path)


def test_ptx_share_smaller_than_a_batch_is_a_clear_error_not_an_endless_loop(tmp_path, tok):
    p = SimpleNamespace(ptx=SimpleNamespace(file=demonstrations(tmp_path / "demo.jsonl", 5), batch_size=3), seed=0,
                        skip_invalid=False)
    batches = ptx_batches(p, tok, "cpu", rank=0, world=2)  # 3 of 5 demonstrations: one batch per pass
    assert all(next(batches)[0].shape[0] == 3 for _ in range(3))
    with pytest.raises(ConfigError, match=r"demo\.jsonl: 2 demonstrations .*ppo\.ptx\.batch_size=3"):
        ptx_batches(p, tok, "cpu", rank=1, world=2)  # raised at the call, before any batch is asked for


def test_only_lora_parameters_of_policy_and_value_are_trainable_even_with_modules_named_so(tmp_path, tok):
    """A base model with modules literally named `value` and `policy` (some architectures name attention
    projections so): their base weights stay frozen; exactly the LoRA parameters of the two adapters train."""
    from peft import PeftModel
    from rlhf.models import lora_config
    from rlhf.ppo.roles import POLICY, VALUE, Roles, set_trainable
    from tiny import LORA, tiny_llama

    base = tiny_llama(len(tok))
    base.model.value = torch.nn.Linear(32, 32)   # all-linear wraps them in LoRA too: `value.base_layer.weight`
    base.model.layers[0].policy = torch.nn.Linear(32, 32)
    model = PeftModel(base, lora_config(LORA), adapter_name="reward")
    for name in (POLICY, VALUE):
        model.add_adapter(name, lora_config(LORA))
    set_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {n for n in dict(model.named_parameters()) if any(f"{k}.{a}." in n for k in ("lora_A", "lora_B")
                                                              for a in (POLICY, VALUE))}
    assert trainable == lora and "base_model.model.model.value.lora_A.value.weight" in trainable
    head = torch.nn.Linear(32, 1)
    params = Roles(model=model, value_head=head, scorer=None).trainable_parameters()
    assert {id(p) for p in params} == {id(p) for n, p in model.named_parameters() if n in lora} | \
        {id(p) for p in head.parameters()}


def test_value_head_learns_on_a_bf16_base(tmp_path, tok):
    """On a bf16 base the value and reward heads keep float32 weights and compute in float32: AdamW at lr 3e-4
    moves a bias near 1.5 (a bf16 bias there cannot move by less than 0.004: the update was lost whole)."""
    from rlhf.ppo.roles import calibrate_value_head, values
    from tiny import tiny_roles

    roles = tiny_roles(tmp_path, tok, dtype=torch.bfloat16)
    assert next(roles.model.get_base_model().parameters()).dtype == torch.bfloat16
    assert roles.value_head.weight.dtype == roles.scorer.head.weight.dtype == torch.float32
    calibrate_value_head(roles, shift=-1.5, scale=1.0)  # bias 1.5, as a reward shift puts it
    ids = torch.randint(3, len(tok), (4, 10))
    mask = torch.ones_like(ids, dtype=torch.bool)
    assert values(roles, ids, mask).dtype == roles.scorer.score_ids(ids, mask).dtype == torch.float32
    optimizer = torch.optim.AdamW(roles.trainable_parameters(), lr=3e-4)
    bias = roles.value_head.bias.detach().clone()
    for _ in range(3):
        optimizer.zero_grad()
        values(roles, ids, mask).square().mean().backward()  # pulls the values (~1.5) toward 0
        optimizer.step()
    assert (roles.value_head.bias.detach() - bias).item() == pytest.approx(-3 * 3e-4, rel=0.1)


def test_reward_classifier_head_is_float32_on_a_bf16_backbone(tok):
    """The RM stage's classifier (trl's RewardTrainer calls `self.score(hidden)`): a float32 head, float32 logits,
    gradients into the head, also under a bf16 autocast (the Trainer's bf16=True)."""
    from rlhf.rm.scoring import build_reward_model
    from tiny import tiny_llama

    clf = build_reward_model(tiny_llama(len(tok), torch.bfloat16, pad_token_id=tok.pad_token_id), seed=0)
    ids = torch.randint(3, len(tok), (2, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = clf(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert clf.score.weight.dtype == logits.dtype == torch.float32
    logits.sum().backward()
    assert clf.score.weight.grad.dtype == torch.float32 and clf.score.weight.grad.abs().sum() > 0


def tiny_rollout(roles, tok, seed=0):
    """A hand-made rollout of 3 rows on a tiny model: left-padded prompts (P = 5), right-padded responses
    (R = 4), old log-probs and values a little off the current ones, random advantages and returns."""
    from rlhf.ppo.roles import policy_logits, values
    from rlhf.ppo.rollout import Advantages, Rollout
    from rlhf.sequences import response_logprobs

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, len(tok), (3, 9), generator=g)
    mask = torch.tensor([[1] * 9, [0, 0] + [1] * 7, [0, 1, 1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    ids = torch.where(mask, ids, tok.pad_token_id)
    with torch.no_grad():
        old = response_logprobs(policy_logits(roles, ids, mask), ids, 5, 0.7)
        v = values(roles, ids, mask)[:, 4:-1]
    noise = lambda: 0.1 * torch.randn(3, 4, generator=g)  # noqa: E731
    r = Rollout(ids=ids, mask=mask, prompt_width=5, logprobs=old + noise(), ref_logprobs=old, values=v + noise(),
                scores=torch.zeros(3), ended=torch.ones(3, dtype=torch.bool))
    z = torch.zeros(3, 4)
    return r, Advantages(kl=z, non_score=z, rewards=z, advantages=torch.randn(3, 4, generator=g),
                         returns=v + torch.randn(3, 4, generator=g), scores=torch.zeros(3))


@pytest.fixture()
def roles32(tmp_path, tok):
    from tiny import randomize_lora_b, tiny_roles
    roles = tiny_roles(tmp_path, tok)
    randomize_lora_b(roles.model, seed=2)  # policy != reference, and gradients reach every LoRA A
    return roles


def test_logits_of_the_response_positions_only_give_the_full_logits_log_probs(roles32, tok):
    """policy/reference logits with keep = R + 1 (transformers' logits_to_keep): the LM head runs on the last
    R + 1 positions only, and the response log-probs are those of the full (B, T, V) logits."""
    from rlhf.ppo.roles import policy_logits, reference_logits
    from rlhf.sequences import response_logprobs, response_width

    r, _ = tiny_rollout(roles32, tok)
    keep = response_width(r.ids, r.prompt_width)
    with torch.no_grad():
        for logits in (policy_logits, reference_logits):
            full, kept = logits(roles32, r.ids, r.mask), logits(roles32, r.ids, r.mask, keep)
            assert full.shape[1] == 9 and kept.shape[1] == keep == 5
            assert torch.allclose(response_logprobs(kept, r.ids, 5, 0.7), response_logprobs(full, r.ids, 5, 0.7),
                                  atol=1e-6, rtol=0)


def test_gradient_checkpointing_gives_the_same_policy_and_value_gradients(roles32, tok):
    """With activation checkpointing the forward is recomputed during backward: the policy loss's backward must
    run under the policy adapter and the value loss's under the value adapter, or the gradients change."""
    from rlhf.models import enable_activation_checkpointing
    from rlhf.ppo.update import UpdateSpec, checkpointing_mode, micro_backward

    r, a = tiny_rollout(roles32, tok)
    spec = UpdateSpec(1, 1, 1, clip_range=0.2, clip_range_value=0.2, vf_coef=0.1, max_grad_norm=1.0, temperature=0.7)
    params = roles32.trainable_parameters()
    calls, mlp = [], roles32.model.get_base_model().model.layers[0].mlp
    forward = mlp.forward  # counted on the instance: module hooks do not run again in the recompute
    mlp.forward = lambda *args, **kwargs: calls.append(1) or forward(*args, **kwargs)

    def gradients():
        calls.clear()
        for p in params:
            p.grad = None
        with checkpointing_mode(roles32.model):
            micro_backward(roles32, r, a, torch.arange(3), spec, scale=1.0)
        return [p.grad.clone() for p in params]

    plain = gradients()
    assert len(calls) == 2 and all(g.abs().sum() > 0 for g in plain)  # policy and value forwards
    enable_activation_checkpointing(roles32.model.get_base_model())
    checkpointed = gradients()
    assert len(calls) == 4  # each forward recomputed in backward
    assert all(torch.allclose(p, c, atol=1e-6, rtol=1e-5) for p, c in zip(plain, checkpointed))
    assert not any(m.training for m in roles32.model.get_base_model().modules())  # eval mode again after the update


def test_unknown_reward_norm_is_a_config_error(tmp_path):
    from conftest import run_stage
    proc = run_stage("ppo", f"run_dir={tmp_path}", "ppo.reward.norm=std", check=False)
    assert proc.returncode == 2 and "ppo.reward.norm must be one of shift_scale, shift, none" in proc.stderr


def test_a_nan_loss_stops_the_update_before_the_optimizer_step(roles32, tok):
    from rlhf.ppo.rollout import Advantages
    from rlhf.ppo.update import UpdateSpec, ppo_update

    r, a = tiny_rollout(roles32, tok)
    a = Advantages(**{**a.__dict__, "advantages": torch.full_like(a.advantages, float("nan"))})
    params = roles32.trainable_parameters()
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    spec = UpdateSpec(1, 1, 1, clip_range=0.2, clip_range_value=0.2, vf_coef=0.1, max_grad_norm=1.0, temperature=0.7)
    with pytest.raises(FloatingPointError, match=r"^ppo step 3: ppo/policy_loss is nan$"):
        ppo_update(roles32, optimizer, scheduler, r, a, spec, where="ppo step 3")
    assert all(torch.equal(b, p) for b, p in zip(before, params))


def test_compare_with_sft_runs_evals_judging_path_on_the_roles_model(roles32, tok):
    """PPO's end-of-stage comparison is eval's judging path on the roles' one model: the policy's KL is the
    sequence log-ratio to the same model with its adapters off, the SFT model's own answers get none."""
    from rlhf.generation import SamplingSpec, encode_prompt
    from rlhf.ppo.evaluate import compare_with_sft, judged_answers

    prompts = [[{"role": "user", "content": "list 2 fruits"}], [{"role": "user", "content": "list 3 trees"}]]
    spec = SamplingSpec(max_new_tokens=4)
    out = compare_with_sft(roles32, tok, prompts, spec, batch_size=2, judge=lambda p, a: float(len(a)), seed=3)
    assert out["eval/n_prompts"] == 2 and len(out["samples"]) == 2
    assert out["eval/reward_win_rate_low"] <= out["eval/reward_win_rate"] <= out["eval/reward_win_rate_high"]
    ids = [encode_prompt(tok, p) for p in prompts]
    a, judged = judged_answers(roles32, tok, ids, spec, 2, 3)
    assert out["eval/kl"] == pytest.approx(sum(judged["kl"]) / 2)  # the same seed: the same answers and KL
    assert a.logprob is not None and out["eval/kl"] != 0.0  # randomised policy adapter: it differs from SFT
    _, sft = judged_answers(roles32, tok, ids, spec, 2, 3, view="sft")
    assert sft["kl"] is None and len(sft["reward"]) == 2


def fake_sampling(monkeypatch, n):
    """train.sample replaced: n answers whose first id is their row, so fake scorers can tell them apart."""
    from rlhf.ppo import train
    ids = torch.arange(n)[:, None].repeat(1, 3)
    monkeypatch.setattr(train, "sample", lambda roles, tok, prompts, spec, bs: (ids[:len(prompts)],
                                                                                 torch.ones(len(prompts), 3, dtype=torch.bool), 1))
    return ids


def test_reward_normalisation_of_an_all_zero_reward_falls_back_to_shift_and_says_so(monkeypatch, capsys):
    from conftest import ppo_settings
    from rlhf.ppo import train
    fake_sampling(monkeypatch, 8)
    roles = SimpleNamespace(scorer=SimpleNamespace(score_ids=lambda ids, mask, **_: torch.zeros(ids.shape[0])))
    p = ppo_settings("reward.norm_samples=8")
    assert train.measure_reward_normalisation(roles, None, [[1]] * 8, p) == (0.0, 1.0)
    assert "falls back to shift" in capsys.readouterr().err
    assert train.reward_norm_used("shift_scale", 1.0) == "shift" and train.reward_norm_used("shift_scale", 0.5) == "shift_scale"


def test_reward_normalisation_prompts_are_a_seeded_random_sample_not_the_first_rows():
    from rlhf.ppo.train import normalisation_prompts
    chosen = normalisation_prompts(1000, 10, seed=0)
    assert len(set(chosen)) == 10 and chosen != list(range(10)) and max(chosen) >= 10
    assert chosen == normalisation_prompts(1000, 10, seed=0) and chosen != normalisation_prompts(1000, 10, seed=1)
    assert normalisation_prompts(5, 10, seed=0) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("objective", ["min", "mean_minus_std"])
def test_a_constant_added_to_one_ensemble_member_changes_no_advantage(monkeypatch, objective):
    from conftest import ppo_settings
    from rlhf.ppo import train
    from rlhf.ppo.rollout import AdvantageSpec, Rollout, advantages
    from rlhf.rm.scoring import RewardEnsemble
    n = 8
    fake_sampling(monkeypatch, n)
    gen = torch.Generator().manual_seed(0)
    tables = [torch.randn(n, generator=gen) for _ in range(3)]  # each member's score of answer i (first id i)

    def member(table, offset):
        return SimpleNamespace(model=None, tokenizer=None, head=None, name="reward",
                               score_ids=lambda ids, mask, **_: table[ids[:, 0]] + offset)

    def run(offset):
        ensemble = RewardEnsemble([member(tables[0], 0.0), member(tables[1], offset), member(tables[2], 0.0)])
        roles = SimpleNamespace(scorer=ensemble.with_objective(objective, 1.0))
        p = ppo_settings(f"reward.norm_samples={n}", f"reward.ensemble_objective={objective}")
        shift, scale = train.measure_reward_normalisation(roles, None, [[1]] * n, p)
        rows = torch.tensor([3, 1, 4, 1])  # a rollout of 2 prompts x 2 answers
        ids = torch.stack([rows, rows, rows], 1)
        mask = torch.ones(4, 3, dtype=torch.bool)
        r = Rollout(ids=ids, mask=mask, prompt_width=1, logprobs=torch.zeros(4, 2), ref_logprobs=torch.zeros(4, 2),
                    values=None, scores=roles.scorer.score_ids(ids, mask), ended=torch.ones(4, dtype=torch.bool))
        return [advantages(r, 0.1, AdvantageSpec(shift, scale, estimator=e, group_size=2)).advantages
                for e in ("grpo", "rloo", "reinforce_pp")]

    for before, after in zip(run(0.0), run(5.0)):
        assert torch.allclose(before, after, atol=1e-5)


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                                      "seq_mean_token_sum_norm"])
def test_grad_accum_and_process_count_do_not_change_the_update(monkeypatch, loss_agg):
    """Rows of 6, 6 | 1, 1 tokens: split into micro-batches and processes, the step's gradient is the loss
    aggregated over all four rows (token_mean: every token weighs 1/14, not 1/24 and 1/4)."""
    from rlhf.ppo import core, update
    lengths = torch.tensor([6, 6, 1, 1])
    mask = torch.arange(6)[None] < lengths[:, None]
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def gradient(rows):  # d/dtheta of the policy (loss_agg) and value (token mean) aggregates of theta * x
        theta = torch.ones((), dtype=torch.float64, requires_grad=True)
        policy = core.aggregate_loss(theta * x[rows], mask[rows], loss_agg, max_tokens=8)
        value = core.aggregate_loss(theta * x[rows], mask[rows], "token_mean")
        return [torch.autograd.grad(loss, theta)[0].item() for loss in (policy, value)]

    whole = gradient(torch.arange(4))
    for split in ([[[0, 1], [2, 3]]], [[[0, 1]], [[2, 3]]], [[[0], [1]], [[2], [3]]], [[[0, 2]], [[1, 3]]]):
        processes = [[torch.tensor(micro) for micro in micros] for micros in split]  # processes -> micro-batches
        sums = [{"policy": sum(core.loss_units(mask[mb], loss_agg) for mb in micros),
                 "value": sum(core.loss_units(mask[mb], "token_mean") for mb in micros)} for micros in processes]
        mean = {k: sum(s[k] for s in sums) / len(sums) for k in ("policy", "value")}
        monkeypatch.setattr(update.distributed, "mean_over_processes", lambda values, device=None: mean)
        per_process = []
        for micros in processes:
            weights = update.micro_weights([mask[mb] for mb in micros], loss_agg)
            grads = [gradient(mb) for mb in micros]
            per_process.append([sum(w[i] * g[i] for w, g in zip(weights, grads)) for i in (0, 1)])
        averaged = [sum(g[i] for g in per_process) / len(per_process) for i in (0, 1)]  # average_gradients
        assert averaged == pytest.approx(whole, rel=1e-9), split


def test_value_head_starts_on_the_scale_of_the_reward_ppo_maximises(tmp_path, tok):
    """With the reward model alone, the copied head predicts the normalised reward at the last token; with a
    reward no head computes (here 2 x the RM, as a weighted ppo.reward.terms makes it), it starts at 0, the
    normalised reward's mean on SFT's answers, instead of member 0's reward on another scale."""
    from rlhf.ppo.roles import init_value_head, values
    from rlhf.reward_sources import WeightedRewards
    from tiny import tiny_roles

    ids = torch.randint(3, len(tok), (6, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids, dtype=torch.bool)
    roles = tiny_roles(tmp_path / "alone", tok)
    reward = roles.scorer.score_ids(ids, mask)
    shift, scale = reward.mean().item(), reward.std().item()
    init_value_head(roles, shift, scale)
    with torch.no_grad():
        assert torch.allclose(values(roles, ids, mask)[:, -1], (reward - shift) / scale, atol=1e-4)

    roles = tiny_roles(tmp_path / "weighted", tok)
    roles.scorer = WeightedRewards([(2.0, roles.scorer)])
    reward = roles.scorer.score_ids(ids, mask)
    init_value_head(roles, reward.mean().item(), reward.std().item())
    with torch.no_grad():
        assert torch.equal(values(roles, ids, mask), torch.zeros(6, 8))


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean"])
def test_grad_accum_gives_the_gradient_of_the_whole_minibatch_on_the_model(roles32, tok, loss_agg):
    """Responses of 4, 4 and 2 tokens: micro-batches [0, 1] | [2], weighted by update.micro_weights, give the
    policy and value gradients of the three rows in one micro-batch (a 1/grad_accum scale would not)."""
    from rlhf.ppo.update import UpdateSpec, micro_backward, micro_weights

    r, a = tiny_rollout(roles32, tok)
    spec = UpdateSpec(1, 1, 1, clip_range=0.2, clip_range_value=0.2, vf_coef=0.1, max_grad_norm=1.0, temperature=0.7,
                      loss_agg=loss_agg)
    params = roles32.trainable_parameters()

    def gradients(micros):
        for p in params:
            p.grad = None
        for micro, (w_policy, w_value) in zip(micros, micro_weights([r.response_mask[m] for m in micros], loss_agg)):
            micro_backward(roles32, r, a, micro, spec, scale=w_policy, value_scale=w_value)
        return [p.grad.clone() for p in params]

    assert r.response_mask.sum(1).tolist() == [4, 4, 2]
    whole = gradients([torch.arange(3)])
    split = gradients([torch.tensor([0, 1]), torch.tensor([2])])
    assert all(torch.allclose(w, s, atol=1e-6, rtol=1e-4) for w, s in zip(whole, split))
