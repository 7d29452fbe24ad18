"""The four PPO roles on ONE copy of the SFT weights.

    policy    = SFT ⊕ adapter "policy"   trainable; LoRA's B starts at 0, so the policy starts as exactly SFT
    reference = SFT with adapters off    exact, and costs no memory

On a quantized base (model.quantization) "SFT" is the frozen adapter "sft" stacked beneath the others rather
than merged into the base (`rlhf.models.load_sft_model`): each role is base ⊕ sft ⊕ its adapter, and the
reference is base ⊕ sft.
    value     = SFT ⊕ adapter "value" + value head   trainable; may start as a copy of the reward model
    reward    = SFT ⊕ adapter "reward" + score head  frozen, loaded from the RM stage (an ensemble: adapters
                                                   "reward", "reward-1", ... and the mean of their scores)

Critic-free estimators (GRPO, RLOO, REINFORCE++: `build_roles(..., critic=False)`) have no value role at all:
no value adapter, no value head, nothing of them in the optimiser or in a checkpoint.

Peers keep four models (policy, reference, value, reward): four copies of the base weights. Here the base
is held once, and each role adds only its LoRA matrices (and a hidden_size-long head).

Forward passes take `(B, T)` ids and a bool mask (True = real token, any padding side) and compute the
position ids from the mask, so a left-padded prompt sees the positions it would see unpadded.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer

from rlhf.config import LoraSpec
from rlhf.models import active_adapter, lora_config, set_active, sft_only
from rlhf.rm.scoring import REWARD_ADAPTER, RewardEnsemble, RewardScorer, ScalarHead, attach_reward
from rlhf.sequences import last_hidden, lm_logits

POLICY, VALUE = "policy", "value"


@dataclass
class Roles:
    """The shared model and the two heads. `model` holds the adapters policy, value (with a critic) and reward."""

    model: PeftModel
    value_head: ScalarHead | None  # float32 whatever the base's dtype; None without a critic
    scorer: RewardScorer | RewardEnsemble

    @property
    def trained(self) -> tuple[str, ...]:
        """The trained adapters: policy, and value when there is a critic."""
        return (POLICY, VALUE) if self.value_head is not None else (POLICY,)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Exactly the policy adapter, the value adapter and the value head (those with a critic): what the
        optimiser holds."""
        lora = [p for n, p in self.model.named_parameters() if is_adapter_parameter(n, self.trained)]
        return lora + (list(self.value_head.parameters()) if self.value_head is not None else [])


def build_roles(sft_model, rm_dir: str | Path, tokenizer, lora: LoraSpec, value_from_reward: bool,
                critic: bool = True) -> Roles:
    """Attach the reward adapter (frozen), a fresh policy adapter and (critic=True) a value adapter to the SFT
    model."""
    scorer = attach_reward(sft_model, rm_dir, tokenizer)
    model = scorer.model
    policy_cfg = lora_config(lora)
    policy_cfg.lora_dropout = 0.0  # dropout would make the first ratio differ from 1
    model.add_adapter(POLICY, policy_cfg)
    if not critic:
        set_trainable(model, (POLICY,))
        model.set_adapter(POLICY, inference_mode=True)
        set_trainable(model, (POLICY,))
        return Roles(model=model, value_head=None, scorer=scorer)
    if value_from_reward:
        # InstructGPT and N+ start the value function from the reward model: same adapter, same head
        # (of an ensemble, member 0's).
        model.add_adapter(VALUE, copy.deepcopy(model.peft_config[REWARD_ADAPTER]))
        reward_weights = get_peft_model_state_dict(model, adapter_name=REWARD_ADAPTER)
        set_peft_model_state_dict(model, reward_weights, adapter_name=VALUE)
        head = ScalarHead(scorer.head.in_features, device=model.device)
        head.weight.data.copy_(scorer.head.weight.data)
    else:
        value_cfg = lora_config(lora)
        value_cfg.lora_dropout = 0.0  # as the policy's; the model is in train mode during checkpointed updates
        model.add_adapter(VALUE, value_cfg)
        head = ScalarHead(scorer.head.in_features, device=model.device)
        torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    set_trainable(model)
    set_active(model, POLICY)
    return Roles(model=model, value_head=head, scorer=scorer)


def calibrate_value_head(roles: Roles, shift: float, scale: float) -> None:
    """Put a value head copied from the reward head on the scale of the normalised rewards it will predict:
    V = (r - shift) / scale. Without this the first updates only chase the offset (value loss ~ shift^2)."""
    with torch.no_grad():
        roles.value_head.weight.div_(scale)
        roles.value_head.bias.copy_((roles.value_head.bias - shift) / scale)


def init_value_head(roles: Roles, shift: float, scale: float) -> str:
    """Start the value head on the scale of the normalised reward PPO maximises, V = (r - shift) / scale: the
    head copied from the reward head is calibrated when that reward IS the reward model (`calibrate_value_head`);
    when it is not (an ensemble's objective, reward functions, a weighted sum), no head computes it, and the
    head starts at 0, the normalised reward's mean on the SFT policy's answers. Returns what it did, for the log."""
    if isinstance(roles.scorer, RewardScorer):
        calibrate_value_head(roles, shift, scale)
        return "the reward model's head, on the normalised scale"
    with torch.no_grad():
        roles.value_head.weight.zero_()
        roles.value_head.bias.zero_()
    return "zero (the reward maximised is not one reward model's head)"


def set_trainable(model: PeftModel, trained: tuple[str, ...] = (POLICY, VALUE)) -> None:
    """requires_grad: True for the `trained` adapters (policy and value), False for everything else (base, reward)."""
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter_parameter(name, trained))


def is_adapter_parameter(name: str, adapters: tuple[str, ...]) -> bool:
    """True for a LoRA parameter of one of `adapters`: peft names them `<module>.lora_A.<adapter>.weight`,
    `lora_B.<adapter>.weight`, `lora_embedding_A.<adapter>`, `lora_magnitude_vector.<adapter>.weight`.
    Matching `.value.` alone would also take the base weights of any module named `value` or `policy`."""
    parts = name.split(".")
    return any(kind in LoraLayer.adapter_layer_names and adapter in adapters for kind, adapter in zip(parts, parts[1:]))


def policy_logits(roles: Roles, ids: torch.Tensor, mask: torch.Tensor, keep: int = 0) -> torch.Tensor:
    """(B, T, V) logits of the policy (adapter "policy"); (B, keep, V), the last `keep` positions, if keep > 0."""
    with active_adapter(roles.model, POLICY):
        return lm_logits(roles.model, ids, mask, keep)


@torch.no_grad()
def reference_logits(roles: Roles, ids: torch.Tensor, mask: torch.Tensor, keep: int = 0) -> torch.Tensor:
    """(B, T, V) logits of the reference: the SFT model, every role adapter off (a stacked SFT adapter on, alone);
    (B, keep, V) if keep > 0."""
    with sft_only(roles.model):
        return lm_logits(roles.model, ids, mask, keep)


def values(roles: Roles, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) value estimates: the value head on the last hidden state, with adapter "value"."""
    with active_adapter(roles.model, VALUE):
        hidden = last_hidden(roles.model, ids, mask)
    return roles.value_head(hidden).squeeze(-1)  # float32 (ScalarHead), on a bf16 base too


def adapter_state(roles: Roles) -> dict[str, torch.Tensor]:
    """The trainable state of the roles (policy and, with a critic, value adapter and value head) as one flat dict."""
    state = {}
    for name in roles.trained:
        state |= {f"{name}.{k}": v for k, v in get_peft_model_state_dict(roles.model, adapter_name=name).items()}
    if roles.value_head is not None:
        state["value_head.weight"] = roles.value_head.weight.detach()
        state["value_head.bias"] = roles.value_head.bias.detach()
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def load_adapter_state(roles: Roles, state: dict[str, torch.Tensor]) -> None:
    has_value = any(k.startswith(VALUE + ".") for k in state)
    if has_value != (roles.value_head is not None):
        raise ValueError("the checkpoint was written " + ("with" if has_value else "without") + " a value adapter "
                         "and this run has " + ("none" if has_value else "one") + ": ppo.estimator.name changed "
                         "(gae has a critic, the others have none); resume with the estimator it was written with")
    for name in roles.trained:
        part = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
        result = set_peft_model_state_dict(roles.model, part, adapter_name=name)
        missing = [k for k in result.missing_keys if is_adapter_parameter(k, (name,))]
        if missing:
            raise ValueError(f"checkpoint lacks {name} adapter weights, e.g. {missing[:2]}")
    if roles.value_head is None:
        return
    roles.value_head.weight.data.copy_(state["value_head.weight"])
    roles.value_head.bias.data.copy_(state["value_head.bias"])
