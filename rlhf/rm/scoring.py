"""The reward model on the shared base: a LoRA adapter plus a scalar head, read at the last real token.

Two views of the same weights:

* for training (`build_reward_model`), a standard `AutoModelForSequenceClassification` whose backbone is the
  SFT model's, so trl's RewardTrainer and peft treat it like any other reward model;
* for scoring (`RewardScorer`), the causal LM everybody shares, with the trained adapter loaded under the
  name "reward" and the head beside it. PPO and evaluation score through this one function, and a test
  shows it gives the training model's scores.

An RM stage may train an ensemble (`rm.ensemble` > 1): member 0 in `<rm_dir>/`, member i in
`<rm_dir>/member-i/`, each an adapter and a head trained with its own seed. `attach_reward` loads them all
onto the shared model (adapters "reward", "reward-1", ...) and scores with their mean (`RewardEnsemble`), or,
for PPO, with an uncertainty-aware objective (`combine`): K reward models for the memory of K LoRA adapters,
not K models.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from rlhf.chat import answer_ids, encode_prompt
from rlhf.models import active_adapter
from rlhf.sequences import backbone, last_hidden, last_token_index, left_pad
from rlhf.checks import ENSEMBLE_OBJECTIVES

HEAD_FILE = "score_head.safetensors"
REWARD_ADAPTER = "reward"


class ScalarHead(torch.nn.Linear):
    """hidden (..., H) -> (..., 1) float32: a reward or value head, with float32 weights and float32 maths
    whatever the backbone's dtype.

    On a bf16 base a bf16 head loses what it learns: AdamW without an fp32 master copy rounds an update of
    lr 3e-4 on a weight near 1 to nothing (bf16 keeps 8 bits), and a scalar read in bf16 has ~3 significant
    digits. Its state dict is a Linear's (`weight`, `bias`), so saved heads load either way.
    """

    def __init__(self, in_features: int, bias: bool = True, device=None):
        super().__init__(in_features, 1, bias=bias, device=device, dtype=torch.float32)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):  # a bf16 autocast (Trainer bf16=True) would cast back
            return super().forward(hidden.float())


def build_reward_model(sft_model: PreTrainedModel, seed: int) -> PreTrainedModel:
    """A sequence classifier (num_labels=1) around the SFT model's own backbone: no weights are copied.

    `sft_model` may be a stacked SFT model (a PeftModel, quantized base): the classifier then shares its layers,
    SFT adapter included (`rlhf.models.stack_under` keeps that adapter on beneath the RM's). The classifier is built on the meta device (no memory), then given the SFT backbone and a fresh float32
    head (`ScalarHead`: the classifier calls `self.score(hidden)`, and the head upcasts the hidden states).
    """
    if isinstance(sft_model, PeftModel):
        sft_model = sft_model.get_base_model()
    config = sft_model.config
    config.num_labels = 1
    with torch.device("meta"):
        clf = AutoModelForSequenceClassification.from_config(config, dtype=sft_model.dtype)
    setattr(clf, clf.base_model_prefix, backbone(sft_model))
    torch.manual_seed(seed)
    head = ScalarHead(config.hidden_size, bias=False, device=sft_model.device)
    torch.nn.init.normal_(head.weight, std=1.0 / (config.hidden_size + 1) ** 0.5)
    clf.score = head
    return clf


def pair_ids(tokenizer, prompt, response: str) -> list[int]:
    """The tokens a reward is computed on: the prompt as the policy sees it, the answer, then the token that
    ends an answer (a chat model's end of turn, e.g. `<|im_end|>`; EOS after a plain-text prompt).

    This is exactly what a PPO rollout produces (prompt ids + sampled ids ending in that token, where
    sampling stops), so the reward model is trained on the sequences it will score, read at that token.
    """
    prompt_ids = encode_prompt(tokenizer, prompt)
    return prompt_ids + answer_ids(tokenizer, prompt, response, prompt_ids)


def save_head(clf: PreTrainedModel, out_dir: str | Path) -> None:
    save_file({"weight": clf.score.weight.detach().float().cpu().contiguous()}, str(Path(out_dir) / HEAD_FILE))


class _ScoresText:
    """`score` (prompts and texts -> rewards) for anything with `score_ids`, `tokenizer` and `model`."""

    def score(self, prompts: list, responses: list[str], batch_size: int = 32) -> torch.Tensor:
        """Rewards of (prompt, response) pairs: (N,) float tensor."""
        out = []
        device = self.model.device
        for start in range(0, len(prompts), batch_size):
            seqs = [pair_ids(self.tokenizer, p, r) for p, r in
                    zip(prompts[start:start + batch_size], responses[start:start + batch_size])]
            ids, mask = left_pad(seqs, self.tokenizer.pad_token_id)
            out.append(self.score_ids(ids.to(device), mask.to(device)).cpu())
        return torch.cat(out) if out else torch.zeros(0)


class RewardScorer(_ScoresText):
    """Scores sequences with the "reward" adapter of a shared PeftModel and the score head.

    model: a PeftModel over the SFT causal LM (it may hold other adapters: policy, value).
    """

    def __init__(self, model: PeftModel, head: ScalarHead, tokenizer, name: str = REWARD_ADAPTER):
        self.model, self.head, self.tokenizer, self.name = model, head, tokenizer, name

    @classmethod
    def attach(cls, model: PreTrainedModel | PeftModel, rm_dir: str | Path, tokenizer,
               name: str = REWARD_ADAPTER) -> "RewardScorer":
        """Load the RM stage's adapter into `model` as `name` (wrapping it in a PeftModel if needed)."""
        rm_dir = Path(rm_dir)
        saved = LoraConfig.from_pretrained(str(rm_dir))
        lora = LoraConfig(r=saved.r, lora_alpha=saved.lora_alpha, target_modules=saved.target_modules,
                          lora_dropout=0.0, bias=saved.bias, use_rslora=saved.use_rslora, task_type="CAUSAL_LM")
        if isinstance(model, PeftModel):
            model.add_adapter(name, lora)
        else:
            model = PeftModel(model, lora, adapter_name=name)
        weights = {k: v for k, v in load_file(str(rm_dir / "adapter_model.safetensors")).items() if ".score." not in k}
        result = set_peft_model_state_dict(model, weights, adapter_name=name)
        missing = [k for k in result.missing_keys if f".{name}." in k and "lora_" in k]
        if missing:
            raise ValueError(f"{rm_dir}: reward adapter does not fit this model (missing {missing[:3]})")
        model.set_requires_grad(name, requires_grad=False)  # the reward model is frozen from here on
        weight = load_file(str(rm_dir / HEAD_FILE))["weight"]
        head = ScalarHead(weight.shape[1], bias=False, device=model.device)
        head.weight.data.copy_(weight)
        head.requires_grad_(False)
        return cls(model, head, tokenizer, name)

    @torch.no_grad()
    def score_ids(self, input_ids: torch.Tensor, mask: torch.Tensor, prompt_width: int | None = None) -> torch.Tensor:
        """(B, T) ids and bool mask (any padding side) -> (B,) rewards read at each row's last real token.
        prompt_width: where the answers start, for reward functions (`reward_sources.FunctionReward`); unused."""
        with active_adapter(self.model, self.name):
            hidden = last_hidden(self.model, input_ids, mask)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return self.head(hidden[rows, last_token_index(mask)]).squeeze(-1)


MEMBER_PREFIX = "member-"


def member_dir(rm_dir: str | Path, i: int) -> Path:
    """Where ensemble member i lives: member 0 is `rm_dir` itself, member i > 0 `rm_dir/member-i`."""
    return Path(rm_dir) if i == 0 else Path(rm_dir) / f"{MEMBER_PREFIX}{i}"


def member_index(path: Path) -> int | None:
    """i for a `member-i` directory, None for any other name."""
    suffix = path.name.removeprefix(MEMBER_PREFIX)
    return int(suffix) if path.name.startswith(MEMBER_PREFIX) and suffix.isdigit() else None


def member_dirs(rm_dir: str | Path) -> list[Path]:
    """The members of an RM stage's output: `rm_dir` itself, then `member-1`, `member-2`, ... in order.
    Each extra member is written DONE last; one without it is an error, not a member to skip."""
    rm_dir = Path(rm_dir)
    extra = sorted((d for d in rm_dir.glob(f"{MEMBER_PREFIX}*") if member_index(d) is not None), key=member_index)
    for d in extra:
        if not (d / "DONE").is_file():
            raise FileNotFoundError(f"{d}: an unfinished reward-model ensemble member (no DONE): run `make rm` again")
    return [rm_dir] + extra




def combine(scores: torch.Tensor, objective: str = "mean", std_coef: float = 0.0) -> torch.Tensor:
    """(M, B) scores of M ensemble members -> (B,) one score per sequence.

    mean: the members' mean. min: the worst case over members (WCO). mean_minus_std: mean - std_coef x std over
    members (the population std), which penalises answers the members disagree on: where the policy has left
    the data the RMs agree on (Coste et al. 2024, "Reward model ensembles help mitigate overoptimization").
    Coste et al.'s UWO subtracts lambda x the variance; the std is a deliberate departure: it is in the scores'
    units, so std_coef means the same whatever the RMs' scale, and it grows less on the few answers the
    members disagree on most.
    Bradley-Terry members are defined up to a constant each: centre them first (`centre_members`), or min
    picks the member with the lowest offset and the std measures the gap between offsets.
    """
    if objective == "mean":
        return scores.mean(dim=0)
    if objective == "min":
        return scores.min(dim=0).values
    if objective == "mean_minus_std":
        return scores.mean(dim=0) - std_coef * scores.std(dim=0, correction=0)
    raise ValueError(f"unknown ensemble objective {objective!r}: use one of {', '.join(ENSEMBLE_OBJECTIVES)}")


def centre_members(scores: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(M, B) member scores, (M,) offsets -> (M, B) scores - offsets: each member measured from its own mean on
    a reference set of answers (the SFT policy's, as Gao et al. 2022 do), so that `combine` does not depend on
    a constant added to one member."""
    return scores - offsets.to(scores.dtype)[:, None]


class RewardEnsemble(_ScoresText):
    """The combined score of several reward models (adapters and heads) on one shared model: their mean, or
    another `combine` objective (PPO may optimise the worst case or mean - k x std instead).

    Members trained alike on the same data agree on what the data teaches and differ, in part, on what it
    leaves open, and a policy optimised against one member finds and exploits those accidents; the mean
    keeps the signal and shrinks the part of the accidents that differs (Coste et al. 2024, "Reward model
    ensembles help mitigate overoptimization"). On the demo, members of different seeds like mostly the
    same items (that comes from the shared SFT model), so three members shrank the item effect by a third.
    """

    def __init__(self, members: list[RewardScorer], objective: str = "mean", std_coef: float = 0.0):
        if objective not in ENSEMBLE_OBJECTIVES:
            raise ValueError(f"unknown ensemble objective {objective!r}: use one of {', '.join(ENSEMBLE_OBJECTIVES)}")
        self.members, self.objective, self.std_coef = members, objective, std_coef
        self.model, self.tokenizer = members[0].model, members[0].tokenizer
        self.head, self.name = members[0].head, members[0].name  # what a value model copied from "the RM" starts from
        # (M,) subtracted from each member before combining (`centre_members`); PPO sets them on SFT's answers
        self.offsets = torch.zeros(len(members))

    def with_objective(self, objective: str, std_coef: float = 0.0) -> "RewardEnsemble":
        """The same members (no copy) and offsets, combined with another objective."""
        other = RewardEnsemble(self.members, objective, std_coef)
        other.offsets = self.offsets
        return other

    @torch.no_grad()
    def member_scores_ids(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids and bool mask -> (M, B) raw scores of each member."""
        return torch.stack([m.score_ids(input_ids, mask) for m in self.members])

    @torch.no_grad()
    def score_ids(self, input_ids: torch.Tensor, mask: torch.Tensor, prompt_width: int | None = None) -> torch.Tensor:
        scores = self.member_scores_ids(input_ids, mask)
        return combine(centre_members(scores, self.offsets.to(scores.device)), self.objective, self.std_coef)

    def member_scores(self, prompts: list, responses: list[str], batch_size: int = 32) -> torch.Tensor:
        """(members, N) scores of each member, for diagnostics."""
        return torch.stack([m.score(prompts, responses, batch_size) for m in self.members])


def attach_reward(model: PreTrainedModel | PeftModel, rm_dir: str | Path, tokenizer) -> RewardScorer | RewardEnsemble:
    """The RM stage's reward model on `model`: one scorer, or the mean of an ensemble's members."""
    members = []
    for i, d in enumerate(member_dirs(rm_dir)):
        members.append(RewardScorer.attach(model, d, tokenizer, name=REWARD_ADAPTER if i == 0 else f"{REWARD_ADAPTER}-{i}"))
        model = members[-1].model
    return members[0] if len(members) == 1 else RewardEnsemble(members)
