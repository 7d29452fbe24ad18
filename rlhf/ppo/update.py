"""Phase 4 of a PPO step: several epochs of clipped policy and value updates over shuffled minibatches.

Exactly `ppo_epochs * num_minibatches` optimiser steps per rollout batch; gradient accumulation splits a
minibatch into micro-batches but never adds steps (a peer gets this wrong when the two combine).
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from rlhf import distributed
from rlhf.ppo import core, estimators
from rlhf.models import active_adapter
from rlhf.ppo.roles import POLICY, VALUE, Roles, policy_logits, values
from rlhf.ppo.rollout import Advantages, Rollout
from rlhf.runs import check_finite
from rlhf.sequences import response_logits, response_logprobs, response_width


@dataclass(frozen=True)
class UpdateSpec:
    ppo_epochs: int
    num_minibatches: int
    grad_accum: int
    clip_range: float
    clip_range_value: float
    vf_coef: float
    max_grad_norm: float
    temperature: float
    ptx_coef: float = 0.0
    kl_loss_coef: float = 0.0
    """beta of GRPO's KL loss term (`estimators.kl_loss`); 0 for the estimators that put the KL in the reward."""
    kl_loss_estimator: str = "k3+"
    """The estimator of that term (`kl.KL_LOSS_KINDS`)."""
    loss_agg: str = "token_mean"
    """How the policy loss is aggregated over an optimiser step's tokens (`core.aggregate_loss`)."""
    max_new_tokens: int | None = None
    """The sampling budget: the constant of loss_agg seq_mean_token_sum_norm (None: the rollout's width)."""
    tis_cap: float | None = None
    """Truncated importance sampling of rollouts from another engine (`core.truncated_is_weights`); None: off."""


def ppo_update(roles: Roles, optimizer: torch.optim.Optimizer, scheduler, r: Rollout, a: Advantages,
               spec: UpdateSpec, ptx_batches=None, where: str = "ppo update") -> dict[str, float]:
    """Run the PPO epochs on one rollout batch; returns the mean of each statistic over all micro-batches.

    ptx_batches: optional iterator of (ids, mask, labels_mask) demonstration batches for PPO-ptx.
    A nan or inf loss or gradient norm raises FloatingPointError ("<where>: ppo/value_loss is nan") before
    the optimiser step that would spread it into the weights.
    """
    with checkpointing_mode(roles.model):
        return _ppo_epochs(roles, optimizer, scheduler, r, a, spec, ptx_batches, where)


@contextmanager
def checkpointing_mode(model):
    """Train mode for the update when activation checkpointing is on: transformers recomputes activations only
    in train mode. Everywhere else (and without checkpointing) the model stays in eval mode; dropout is off in
    every role (disable_dropout, LoRA dropout 0), so the mode changes nothing but the checkpointing."""
    base = model.get_base_model()  # the modules that run (the PeftModel wrapper's own flag means nothing)
    was_training = base.training
    if base.is_activation_checkpointing:
        base.train()
    try:
        yield
    finally:
        base.train(was_training)


def _ppo_epochs(roles: Roles, optimizer, scheduler, r: Rollout, a: Advantages, spec: UpdateSpec, ptx_batches,
                where: str):
    n = r.ids.shape[0]
    minibatch = n // spec.num_minibatches
    params = roles.trainable_parameters()
    stats: dict[str, list[float]] = defaultdict(list)
    steps = 0
    for _ in range(spec.ppo_epochs):
        order = torch.randperm(n, device=r.ids.device)
        for start in range(0, n, minibatch):
            optimizer.zero_grad(set_to_none=True)
            micros = order[start:start + minibatch].chunk(spec.grad_accum)
            weights = micro_weights([r.response_mask[m] for m in micros], spec.loss_agg)
            for micro, (w_policy, w_value) in zip(micros, weights):
                micro_stats = micro_backward(roles, r, a, micro, spec, scale=w_policy, value_scale=w_value)
                check_finite({k: micro_stats[k] for k in ("ppo/policy_loss", "ppo/value_loss") if k in micro_stats},
                             where)
                for k, v in micro_stats.items():
                    stats[k].append(v)
            if spec.ptx_coef > 0 and ptx_batches is not None:
                with active_adapter(roles.model, POLICY):  # backward recomputes under the policy (checkpointing)
                    ptx = ptx_loss(roles, *next(ptx_batches))
                    (spec.ptx_coef * ptx).backward()
                stats["ppo/ptx_loss"].append(ptx.item())
                check_finite({"ppo/ptx_loss": ptx}, where)
            distributed.average_gradients(params)  # several processes: the mean gradient (no-op alone)
            stats["ppo/grad_norm"].append(torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm).item())
            check_finite({"ppo/grad_norm": stats["ppo/grad_norm"][-1]}, where)
            optimizer.step()
            scheduler.step()
            steps += 1
    out = {k: sum(v) / len(v) for k, v in stats.items()}
    out["ppo/optimizer_steps"] = steps
    return out


def micro_weights(masks: list[torch.Tensor], loss_agg: str) -> list[tuple[float, float]]:
    """(policy, value) loss weight of each micro-batch of one optimiser step, from their (b, R) bool response masks:
    its units (`core.loss_units`: tokens for token_mean, rows otherwise; tokens for the value loss) x the number
    of processes (their gradients are averaged) / the step's units on all processes. The step's loss is then its
    aggregate over all its tokens or rows, however they are split into micro-batches and processes (trl's
    num_items_in_batch, verl's global token count). Every process must call it (it reduces over them)."""
    units = [(core.loss_units(m, loss_agg), core.loss_units(m, "token_mean")) for m in masks]
    # the mean over processes of their units = the step's units / the number of processes
    mean = distributed.mean_over_processes({"policy": sum(u for u, _ in units), "value": sum(v for _, v in units)},
                                           masks[0].device)
    return [(u / mean["policy"], v / mean["value"]) for u, v in units]


def policy_loss(roles: Roles, r: Rollout, a: Advantages, rows: torch.Tensor, spec: UpdateSpec):
    """Clipped policy loss on some rows of the rollout (plus GRPO's KL term when spec.kl_loss_coef > 0), and its
    statistics. The clipped surrogate is the same for every estimator; only the advantages differ."""
    ids, mask = r.rows(rows)
    resp_mask = mask[:, r.prompt_width:]
    logits = policy_logits(roles, ids, mask, keep=response_width(ids, r.prompt_width))  # response positions only
    logprobs = response_logprobs(logits, ids, r.prompt_width, spec.temperature)
    tis = None
    if spec.tis_cap is not None and r.engine_logprobs is not None:  # the rollout was sampled by another engine
        tis = core.truncated_is_weights(r.logprobs[rows], r.engine_logprobs[rows], resp_mask, spec.tis_cap)
    loss, pg = core.clipped_policy_loss(logprobs, r.logprobs[rows], a.advantages[rows], resp_mask, spec.clip_range,
                                        spec.loss_agg, spec.max_new_tokens, weights=tis)
    stats = {"ppo/policy_loss": loss.item()}
    if tis is not None:
        stats |= {"engine/tis_weight": core.masked_mean(tis, resp_mask).item(),
                  "engine/tis_capped": core.masked_mean((tis >= spec.tis_cap).float(), resp_mask).item()}
    if spec.kl_loss_coef > 0:  # the reference's log-probs do not change: the rollout's are exact
        kl = estimators.kl_loss(logprobs, r.ref_logprobs[rows], resp_mask, spec.kl_loss_estimator, spec.loss_agg,
                                spec.max_new_tokens)
        loss = loss + spec.kl_loss_coef * kl
        stats["ppo/kl_loss"] = kl.item()
    with torch.no_grad():
        entropy = core.masked_mean(core.entropy_from_logits(response_logits(logits, ids, r.prompt_width),
                                                            spec.temperature), resp_mask)
    return loss, stats | {"ppo/entropy": entropy.item(), "ppo/clipfrac": float(pg["clipfrac"]),
                          "ppo/approx_kl": float(pg["approx_kl"]), "ppo/ratio": float(pg["ratio_mean"])}


def value_loss(roles: Roles, r: Rollout, a: Advantages, rows: torch.Tensor, spec: UpdateSpec):
    """Clipped value loss on some rows of the rollout, and its statistics."""
    ids, mask = r.rows(rows)
    vpred = values(roles, ids, mask)[:, r.prompt_width - 1:-1]
    loss, vf = core.clipped_value_loss(vpred, r.values[rows], a.returns[rows], mask[:, r.prompt_width:],
                                       spec.clip_range_value)
    return loss, {"ppo/value_loss": loss.item(), "ppo/vf_clipfrac": float(vf["vf_clipfrac"])}


def micro_backward(roles: Roles, r: Rollout, a: Advantages, rows: torch.Tensor, spec: UpdateSpec, scale: float,
                   value_scale: float | None = None):
    """Gradients of policy loss x scale + vf_coef x value loss x value_scale (default: scale) on some rows (the
    policy loss alone without a critic). The two losses use different adapters and share no graph, so each is
    backpropagated at once: only one graph is alive at a time.

    Each backward runs with its own adapter active: with activation checkpointing the forward is recomputed
    during backward, and peft reads the active adapter then, not at the first forward."""
    with active_adapter(roles.model, POLICY):
        pg_loss, stats = policy_loss(roles, r, a, rows, spec)
        (scale * pg_loss).backward()
    if roles.value_head is None:
        return stats
    with active_adapter(roles.model, VALUE):
        vf_loss, vf_stats = value_loss(roles, r, a, rows, spec)
        ((scale if value_scale is None else value_scale) * spec.vf_coef * vf_loss).backward()
    return stats | vf_stats


def ptx_loss(roles: Roles, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """PPO-ptx (InstructGPT): the SFT loss, next-token NLL on demonstration answer tokens, under the policy.

    ids, mask: (B, T) demonstrations (prompt + answer + EOS); labels: (B, T) bool, True on answer tokens."""
    logits = policy_logits(roles, ids, mask)[:, :-1]
    logprobs = core.logprobs_from_logits(logits, ids[:, 1:])
    return -core.masked_mean(logprobs, labels[:, 1:])
