"""The PPO checks that need the real model: the four roles on one base, rollouts, the update loop.

The pure formulas (GAE, whitening, losses, KL estimators, controllers, EOS truncation) are in test_ppo_core.py.
"""

import pytest
import torch

from rlhf.config import LoraSpec, ModelConfig
from rlhf.data import load_prompts
from rlhf.generation import SamplingSpec, decode_responses, encode_prompt, generate_ids
from rlhf.models import active_adapter, load_causal_lm, load_sft_model, load_tokenizer
from rlhf.ppo import core
from rlhf.ppo.roles import POLICY, build_roles, policy_logits, reference_logits, values
from rlhf.ppo.rollout import AdvantageSpec, Rollout, advantages, sample, score
from rlhf.sequences import response_logprobs
from rlhf.ppo.train import step_metrics
from rlhf.checks import check_batch_sizes
from rlhf.config import ConfigError
from rlhf.ppo.update import UpdateSpec, policy_loss, ppo_update, ptx_loss

pytestmark = pytest.mark.slow
T = 0.7
SPEC = SamplingSpec(max_new_tokens=12, temperature=T)


@pytest.fixture()
def setup(rm_run, demo_dir):
    torch.manual_seed(0)
    tok = load_tokenizer(str(rm_run / "sft"))
    model_cfg = ModelConfig(name_or_path=str(demo_dir / "base"))
    roles = build_roles(load_sft_model(model_cfg, rm_run / "sft", tok), rm_run / "rm", tok, LoraSpec(), True)
    prompts = [p.prompt for p in load_prompts(str(demo_dir / "prompts_train.jsonl"))[:16]]
    return roles, tok, prompts, model_cfg, rm_run


def rollout(roles, tok, prompts):
    ids, mask, width = sample(roles, tok, [encode_prompt(tok, p) for p in prompts], SPEC, 8)
    return score(roles, ids, mask, width, T, 8, tok.eos_token_id)


def default_advantages(r, kl_coef=0.05, penalty=None, shift=0.0, scale=1.0):
    return advantages(r, kl_coef, AdvantageSpec(reward_shift=shift, reward_scale=scale, missing_eos_penalty=penalty))


def test_start_policy_equals_reference_kl_zero_ratio_one(setup):
    roles, tok, prompts, *_ = setup
    r = rollout(roles, tok, prompts)
    assert torch.equal(r.logprobs, r.ref_logprobs)  # exactly: LoRA B = 0 adds exact zeros
    assert core.masked_sum(default_advantages(r).kl.abs(), r.response_mask) == 0
    spec = UpdateSpec(1, 2, 1, 0.2, 0.2, 0.1, 1.0, T)
    _, stats = policy_loss(roles, r, default_advantages(r), torch.arange(8), spec)
    assert stats["ppo/ratio"] == 1.0 and stats["ppo/clipfrac"] == 0.0


def test_reference_is_the_sft_model_not_the_raw_base(setup):
    roles, tok, prompts, model_cfg, run = setup
    ids, mask, _ = generate_ids(roles.model, tok, [encode_prompt(tok, p) for p in prompts[:4]], SPEC)
    with torch.no_grad():
        sft = load_sft_model(model_cfg, run / "sft", tok)(input_ids=ids, attention_mask=mask.long()).logits
        raw = load_causal_lm(model_cfg, tok)(input_ids=ids, attention_mask=mask.long()).logits
    ref = reference_logits(roles, ids, mask)
    assert torch.allclose(ref[mask], sft[mask], atol=1e-5)
    assert (ref[mask] - raw[mask]).abs().max() > 0.1


def test_old_logprobs_equal_the_sampler_distribution_at_temperature(setup):
    """Log-probs PPO computes by a fresh forward = what generate sampled from (scores after temperature)."""
    roles, tok, prompts, *_ = setup
    ids = [encode_prompt(tok, p) for p in prompts[:6]]
    from rlhf.generation import bare_generation_config, model_stop_ids
    from rlhf.sequences import left_pad
    x, m = left_pad(ids, tok.pad_token_id)
    torch.manual_seed(3)
    config = SPEC.generation_config(tok, model_stop_ids(roles.model, tok))
    with active_adapter(roles.model, POLICY), bare_generation_config(roles.model), torch.no_grad():
        out = roles.model.generate(input_ids=x, attention_mask=m.long(), generation_config=config,
                                   output_scores=True, return_dict_in_generate=True)
    gen = out.sequences[:, x.shape[1]:]
    sampler_lp = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], 1).gather(-1, gen[..., None])[..., 0]
    resp, resp_mask = core.truncate_after_eos(gen, tok.eos_token_id, tok.pad_token_id)
    full, full_mask = torch.cat([x, resp], 1), torch.cat([m, resp_mask], 1)
    r = score(roles, full, full_mask, x.shape[1], T, 8, tok.eos_token_id)
    assert torch.allclose(r.logprobs[resp_mask], sampler_lp[resp_mask], atol=1e-4)


def test_pad_is_not_eos_and_left_padding_changes_nothing(setup):
    roles, tok, prompts, *_ = setup
    assert tok.pad_token_id != tok.eos_token_id and tok.padding_side == "left"
    longer = [{"role": "system", "content": "name 2 colors"}, {"role": "user", "content": "list 3 fruits"}]
    r = rollout(roles, tok, [longer] + prompts[:7])
    assert (r.mask[:, :r.prompt_width].sum(1) < r.prompt_width).any(), "the batch should need padding"
    for i in range(4):  # each row alone, without any padding, gives the same log-probs and values
        n = int(r.mask[i].sum())
        row = r.ids[i][r.mask[i]][None]
        p = int(r.mask[i, :r.prompt_width].sum())
        alone = response_logprobs(policy_logits(roles, row, torch.ones_like(row, dtype=torch.bool)), row, p, T)
        k = n - p
        assert torch.allclose(alone[0, :k], r.logprobs[i][r.response_mask[i]], atol=1e-5)
        v_alone = values(roles, row, torch.ones_like(row, dtype=torch.bool))[0, p - 1:-1]
        assert torch.allclose(v_alone[:k], r.values[i][r.response_mask[i]], atol=1e-5)


def test_responses_cut_at_eos_and_scored_as_the_rm_stage_scores(setup):
    roles, tok, prompts, *_ = setup
    r = rollout(roles, tok, prompts)
    resp, resp_mask = r.ids[:, r.prompt_width:], r.response_mask
    for row, m, ended in zip(resp, resp_mask, r.ended):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()  # valid tokens are a prefix
        assert (row[n:] == tok.pad_token_id).all()
        assert ended == (row[n - 1] == tok.eos_token_id) and (row[:n - 1] != tok.eos_token_id).all()
    texts = decode_responses(tok, r.ids, r.mask, r.prompt_width)
    rm_side = roles.scorer.score(prompts, texts)  # the RM stage's tokenization: prompt + answer + EOS
    assert r.ended.any()
    assert torch.allclose(r.scores[r.ended], rm_side[r.ended], atol=1e-4)


def test_missing_eos_penalty_and_reward_normalisation(setup):
    roles, tok, prompts, *_ = setup
    r = rollout(roles, tok, prompts)
    r = Rollout(**{**r.__dict__, "ended": torch.arange(len(prompts)) % 2 == 0})
    a = default_advantages(r, penalty=-1.0, shift=2.0, scale=4.0)
    assert torch.allclose(a.scores[r.ended], (r.scores[r.ended] - 2.0) / 4.0)
    assert (a.scores[~r.ended] == -1.0).all()


def test_score_enters_at_the_last_response_token(setup):
    roles, tok, prompts, *_ = setup
    r = rollout(roles, tok, prompts)
    a = default_advantages(r, kl_coef=0.0)
    last = r.response_mask.sum(1) - 1
    for i in range(len(prompts)):
        nonzero = a.rewards[i].nonzero().flatten().tolist()
        assert nonzero in ([last[i].item()], []) and a.rewards[i, last[i]] == a.scores[i]


def counting(optimizer):
    calls = []
    original = optimizer.step

    def step(*args, **kwargs):
        calls.append(torch.nn.utils.get_total_norm([p.grad for g in optimizer.param_groups for p in g["params"]
                                                    if p.grad is not None]).item())
        return original(*args, **kwargs)
    optimizer.step = step
    return calls


def test_exact_steps_optimizer_set_frozen_roles_clipping_and_schedule(setup):
    roles, tok, prompts, *_ = setup
    r = rollout(roles, tok, prompts)
    a = default_advantages(r)
    params = roles.trainable_parameters()
    names = [n for n, p in roles.model.named_parameters() if any(p is q for q in params)]
    assert names and all(".policy." in n or ".value." in n for n in names)
    assert len(params) == len(names) + 2  # + value head weight and bias
    frozen = {n: p.detach().clone() for n, p in roles.model.named_parameters() if not p.requires_grad}
    assert any(".reward." in n for n in frozen) and any("base_layer" in n for n in frozen)
    head = roles.scorer.head.weight.detach().clone()

    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / 100)
    norms = counting(optimizer)
    spec = UpdateSpec(ppo_epochs=3, num_minibatches=2, grad_accum=4, clip_range=0.2, clip_range_value=0.2,
                      vf_coef=0.1, max_grad_norm=1e-3, temperature=T)
    before = [p.detach().clone() for p in params]
    stats = ppo_update(roles, optimizer, scheduler, r, a, spec)
    assert len(norms) == stats["ppo/optimizer_steps"] == 3 * 2  # not 3 * 2 * 4
    assert max(norms) <= 1e-3 * 1.01 < stats["ppo/grad_norm"]  # clipped before every step
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-3 * (1 - 6 / 100))
    assert all(not torch.equal(b, p) for b, p in zip(before, params) if b.abs().sum() > 0)  # policy/value moved
    for n, p in roles.model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n  # reward adapter and base never change
    assert torch.equal(roles.scorer.head.weight, head)
    assert all(p.requires_grad for p in params)  # adapter switches did not freeze policy or value
    with pytest.raises(ConfigError, match="multiple of ppo.update.num_minibatches"):
        check_batch_sizes(10, 4, 1)
    with pytest.raises(ConfigError, match="multiple of ppo.update.grad_accum"):
        check_batch_sizes(16, 2, 3)


def test_ptx_loss_is_the_sft_loss_on_answer_tokens(setup):
    roles, tok, prompts, *_ = setup
    prompt = encode_prompt(tok, prompts[0])
    answer = tok("apple pear", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([prompt + answer])
    mask = torch.ones_like(ids, dtype=torch.bool)
    labels = torch.tensor([[False] * len(prompt) + [True] * len(answer)])
    with torch.no_grad():
        logp = torch.log_softmax(policy_logits(roles, ids, mask)[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
        hand = -logp[len(prompt) - 1:].mean()
        assert ptx_loss(roles, ids, mask, labels).item() == pytest.approx(hand.item(), rel=1e-5)


def test_logged_statistics_by_hand():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    r = Rollout(ids=torch.zeros(2, 4, dtype=torch.long), mask=torch.cat([torch.ones(2, 1, dtype=torch.bool), mask], 1),
                prompt_width=1, logprobs=torch.zeros(2, 3), ref_logprobs=torch.zeros(2, 3),
                values=torch.tensor([[1.0, 2.0, 9.0], [0.0, 1.0, 2.0]]), scores=torch.tensor([1.0, 3.0]),
                ended=torch.tensor([True, False]))
    kl = torch.tensor([[0.1, 0.2, 5.0], [0.3, -0.1, 0.4]])
    non_score = torch.where(mask, -0.5 * kl, 0.0)
    from rlhf.ppo.rollout import Advantages
    a = Advantages(kl=kl, non_score=non_score, rewards=non_score, advantages=torch.zeros(2, 3),
                   returns=torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 2.0]]), scores=torch.tensor([0.5, 1.5]))
    m = step_metrics(r, a, kl_coef=0.5, lr=0.1)
    assert m["ppo/score"] == 2.0 and m["ppo/score_normalized"] == 1.0
    assert m["ppo/kl"] == pytest.approx((0.3 + 0.6) / 2)  # per-sequence sums, padding ignored
    assert m["ppo/non_score_reward"] == pytest.approx(-0.5 * 0.45)
    assert m["ppo/reward"] == pytest.approx(1.0 - 0.225)
    assert m["ppo/response_length"] == 2.5 and m["ppo/eos_rate"] == 0.5
    assert m["ppo/explained_variance"] == pytest.approx(1.0)


def test_ptx_joins_every_optimizer_step_without_adding_steps(setup, demo_dir):
    from types import SimpleNamespace
    from rlhf.ppo.ptx import ptx_batches
    roles, tok, prompts, *_ = setup
    r = rollout(roles, tok, prompts)
    p = SimpleNamespace(ptx=SimpleNamespace(file=str(demo_dir / "sft_train.jsonl"), batch_size=4), seed=0,
                        skip_invalid=False)
    batches = ptx_batches(p, tok)
    ids, mask, labels = next(batches)
    assert ids.shape[0] == 4 and (labels <= mask).all() and labels.any(1).all()
    optimizer = torch.optim.AdamW(roles.trainable_parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    norms = counting(optimizer)
    spec = UpdateSpec(2, 2, 1, 0.2, 0.2, 0.1, 1.0, T, ptx_coef=0.5)
    stats = ppo_update(roles, optimizer, scheduler, r, default_advantages(r), spec, batches)
    assert len(norms) == stats["ppo/optimizer_steps"] == 4
    assert stats["ppo/ptx_loss"] > 0


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_pp"])
def test_critic_free_estimators_hold_no_value_role_and_train_the_policy_alone(rm_run, demo_dir, estimator):
    """Without GAE: no value adapter on the model, no value head, only the policy adapter in the optimiser; the
    update runs the clipped loss (plus GRPO's KL term) with exactly epochs x minibatches steps; a checkpoint
    holds the policy only and refuses to load into a run with a critic."""
    from rlhf.ppo.roles import VALUE, adapter_state, load_adapter_state
    from rlhf.ppo.rollout import repeat_prompts
    torch.manual_seed(0)
    tok = load_tokenizer(str(rm_run / "sft"))
    model_cfg = ModelConfig(name_or_path=str(demo_dir / "base"))
    roles = build_roles(load_sft_model(model_cfg, rm_run / "sft", tok), rm_run / "rm", tok, LoraSpec(), True,
                        critic=False)
    assert roles.value_head is None and VALUE not in roles.model.peft_config and roles.trained == (POLICY,)
    params = roles.trainable_parameters()
    names = [n for n, p in roles.model.named_parameters() if p.requires_grad]
    assert names and all(".policy." in n for n in names) and len(params) == len(names)
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for n, p in roles.model.named_parameters() if ".policy." in n and "lora_" in n}

    prompts = [p.prompt for p in load_prompts(str(demo_dir / "prompts_train.jsonl"))[:4]]
    r = rollout(roles, tok, repeat_prompts(prompts, 4))
    assert r.values is None
    a = advantages(r, 0.05, AdvantageSpec(estimator=estimator, group_size=4))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    norms = counting(optimizer)
    spec = UpdateSpec(2, 2, 2, 0.2, 0.2, 0.1, 1.0, T, kl_loss_coef=0.05 if estimator == "grpo" else 0.0)
    before = [p.detach().clone() for p in params]
    stats = ppo_update(roles, optimizer, scheduler, r, a, spec)
    assert len(norms) == stats["ppo/optimizer_steps"] == 4
    assert "ppo/value_loss" not in stats and ("ppo/kl_loss" in stats) == (estimator == "grpo")
    assert any(not torch.equal(b, p) for b, p in zip(before, params))
    state = adapter_state(roles)
    assert state and all(k.startswith(POLICY + ".") for k in state)
    critic = build_roles(load_sft_model(model_cfg, rm_run / "sft", tok), rm_run / "rm", tok, LoraSpec(), True)
    with pytest.raises(ValueError, match="written without a value adapter and this run has one"):
        load_adapter_state(critic, state)
