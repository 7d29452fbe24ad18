"""PPO checkpoints hold no code: optimizer.pt loads with weights_only=True, a pickled object is refused."""

import pytest
import torch
from transformers import get_scheduler

from rlhf.ppo import state as ppo_state
from rlhf.ppo.state import UnsafeCheckpointError, load_checkpoint, save_checkpoint

RAN = []


class Payload:
    """What an attacker would plant: unpickling it calls RAN.append (any callable would do)."""

    def __reduce__(self):
        return (RAN.append, ("code ran",))


@pytest.fixture()
def tiny(monkeypatch):
    """A linear layer stands in for the roles (the adapter weights are safetensors, not under test here)."""
    monkeypatch.setattr(ppo_state, "adapter_state", lambda roles: {k: v.clone() for k, v in roles.state_dict().items()})
    monkeypatch.setattr(ppo_state, "load_adapter_state", lambda roles, sd: roles.load_state_dict(sd))

    def make(seed=0):
        torch.manual_seed(seed)
        layer = torch.nn.Linear(3, 2)
        opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
        sched = get_scheduler("linear", opt, num_warmup_steps=1, num_training_steps=10)
        return layer, opt, sched
    return make


def train_step(layer, opt, sched):
    layer(torch.randn(4, 3)).pow(2).sum().backward()
    opt.step(), sched.step(), opt.zero_grad()


def test_checkpoint_round_trip_is_exact_and_loads_with_weights_only(tiny, tmp_path, monkeypatch):
    layer, opt, sched = tiny()
    train_step(layer, opt, sched)
    save_checkpoint(tmp_path, 1, layer, opt, sched, {"kl": {"value": 0.1}})
    train_step(layer, opt, sched)
    expected = layer.weight.detach().clone()

    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    layer2, opt2, sched2 = tiny(seed=1)
    run_state = load_checkpoint(tmp_path, layer2, opt2, sched2)
    assert calls == [{"weights_only": True}]
    assert run_state["step"] == 1 and run_state["kl"] == {"value": 0.1}
    train_step(layer2, opt2, sched2)  # same RNG, optimiser moments and schedule: the same next step
    assert torch.equal(layer2.weight, expected)


def test_checkpoint_carrying_a_pickled_object_is_refused_and_nothing_runs(tiny, tmp_path):
    layer, opt, sched = tiny()
    save_checkpoint(tmp_path, 1, layer, opt, sched, {})
    torch.save({"optimizer": Payload()}, tmp_path / "checkpoint-1" / "optimizer.pt")
    layer2, opt2, sched2 = tiny(seed=1)
    before = layer2.weight.detach().clone()
    with pytest.raises(UnsafeCheckpointError, match=r"optimizer\.pt holds a pickled .*refusing to load it"):
        load_checkpoint(tmp_path, layer2, opt2, sched2)
    assert RAN == []
    assert torch.equal(layer2.weight, before)  # refused before anything was restored
