"""vLLM as the rollout and evaluation engine (rlhf/vllm_engine.py, rlhf/ppo/engine.py, rlhf/eval/engine.py).

The first tests need no vLLM: the combined adapter, the importance weights, the layout, the server's command
line and its failures. The rest run a real vLLM server (the environment `make setup-vllm` builds; `.ci/run`
builds it) on the demo's base, one for the module, and skip with the reason when that environment is missing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from conftest import DEMO_CONFIG, ROOT, accelerate_processes, kill_stage_once_written, run_stage
from rlhf import vllm_engine as ve
from rlhf.errors import EngineError
from rlhf.ppo import core

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
needs_vllm = pytest.mark.skipif(not VLLM_PYTHON.is_file(),
                                reason="no vLLM environment (.venv-vllm): `make setup-vllm` builds it")
# one vLLM server for the module (a fixture): its tests stay on one process
pytestmark = pytest.mark.xdist_group("vllm")


# --- without vLLM ---------------------------------------------------------------------------------------------

def _tiny_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32))


def _random_adapter(model, path: Path, r: int, alpha: int, targets: list[str], seed: int) -> Path:
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0))
    torch.manual_seed(seed)
    for name, p in peft.named_parameters():
        if "lora_" in name:
            p.data.normal_(0, 0.2)
    peft.save_pretrained(str(path))
    return path


def test_combined_adapter_answers_as_the_sft_model_with_the_role_adapter_on_it(tmp_path):
    """SFT merged into the base, a role adapter over it == the base with the one combined LoRA (ranks, alphas and
    target modules differ between the two parts; a module only one of them adapts gets zeros from the other)."""
    ids = torch.randint(0, 64, (3, 9))
    sft = _random_adapter(_tiny_lm(), tmp_path / "sft", r=4, alpha=8, targets=["q_proj", "v_proj"], seed=1)
    role = _random_adapter(_tiny_lm(), tmp_path / "role", r=2, alpha=16, targets=["v_proj", "down_proj"], seed=2)
    sft_model = PeftModel.from_pretrained(_tiny_lm(), str(sft)).merge_and_unload()
    expected = PeftModel.from_pretrained(sft_model, str(role)).eval()(input_ids=ids).logits
    combined = ve.combined_adapter([ve.read_adapter(sft), ve.read_adapter(role)], tmp_path / "combined")
    config = json.loads((combined / "adapter_config.json").read_text())
    assert config["r"] == 6 and config["lora_alpha"] == 6
    assert sorted(config["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    got = PeftModel.from_pretrained(_tiny_lm(), str(combined)).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not (tmp_path / "combined.tmp").exists()


def test_adapters_the_engine_cannot_serve_are_refused_in_one_line(tmp_path):
    sft = _random_adapter(_tiny_lm(), tmp_path / "sft", r=4, alpha=8, targets=["q_proj"], seed=1)
    config, weights = ve.read_adapter(sft)
    with pytest.raises(EngineError, match="plain LoRA adapters.*use_dora"):
        ve.combined_adapter([({**config, "use_dora": True}, weights)], tmp_path / "out")
    assert ve.engine_lora_rank(6) == 8 and ve.engine_lora_rank(32) == 32
    with pytest.raises(EngineError, match="lower the adapters' lora.r"):
        ve.engine_lora_rank(1024)


def test_truncated_importance_weights_are_capped_and_leave_padding_alone():
    old = torch.tensor([[-1.0, -2.0, -0.5, 0.0]])
    engine = torch.tensor([[-1.0, -3.0, 0.5, 5.0]])  # same, engine less likely (w = e), more likely, padding
    mask = torch.tensor([[True, True, True, False]])
    w = core.truncated_is_weights(old, engine, mask, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, 2.0, torch.exp(torch.tensor(-1.0)).item(), 1.0]]))
    assert not w.requires_grad


def test_importance_weights_scale_each_token_s_policy_gradient():
    """A synthetic engine mismatch: the weighted loss's gradient is each token's unweighted gradient times its
    weight (the clipped objective itself unchanged)."""
    torch.manual_seed(0)
    logp = torch.randn(2, 5, requires_grad=True)
    old, adv = logp.detach() + 0.05 * torch.randn(2, 5), torch.randn(2, 5)
    mask = torch.ones(2, 5, dtype=torch.bool)
    w = core.truncated_is_weights(old, old - 0.3 * torch.randn(2, 5), mask, cap=1.5)
    plain, _ = core.clipped_policy_loss(logp, old, adv, mask, 0.2, loss_agg="token_mean")
    g_plain, = torch.autograd.grad(plain, logp)
    weighted, _ = core.clipped_policy_loss(logp, old, adv, mask, 0.2, loss_agg="token_mean", weights=w)
    g_weighted, = torch.autograd.grad(weighted, logp)
    torch.testing.assert_close(g_weighted, g_plain * w)
    assert (w <= 1.5).all() and not torch.allclose(w, torch.ones_like(w))


def test_engine_answers_take_the_trainer_s_layout():
    ids, mask, width = ve.pack([[5, 6, 7], [8]], [[9, 2], [10, 11, 12]], pad_id=0)
    assert width == 3
    assert ids.tolist() == [[5, 6, 7, 9, 2, 0], [0, 0, 8, 10, 11, 12]]
    assert mask.tolist() == [[True, True, True, True, True, False], [False, False, True, True, True, True]]
    a, b = ve.row_seeds(0, 3, 0, 4), ve.row_seeds(0, 3, 0, 4)
    assert a == b and len(set(a)) == 4 and a != ve.row_seeds(0, 4, 0, 4)


def test_the_server_samples_as_the_trainer_would():
    """No penalties, the checkpoint's own generation_config ignored, log-probs of the sampled distribution,
    runtime adapter loading, and the trainer's packages kept out of the engine's environment."""
    spec = ve.ServerSpec(model="m", python="/x/python", max_lora_rank=32)
    cmd = ve.serve_command(spec, 8001)
    joined = " ".join(cmd)
    for part in ("--enable-lora", "--max-lora-rank 32", "--generation-config vllm",
                 "--logprobs-mode processed_logprobs", "--port 8001"):
        assert part in joined
    env = ve.server_env(spec)
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True" and "PYTHONPATH" not in env


def test_a_server_that_dies_is_one_line_naming_its_log(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'ValueError: no such model' >&2\nexit 3\n")
    fake.chmod(0o755)
    spec = ve.ServerSpec(model="m", python=str(fake), start_timeout=30)
    with pytest.raises(EngineError, match=r"exited with code 3: ValueError: no such model \(log: .*server.log\)"):
        ve.connect_or_start(None, spec, tmp_path / "server.log")
    with pytest.raises(EngineError, match="make setup-vllm"):
        ve.connect_or_start(None, ve.ServerSpec(model="m", python=str(tmp_path / "none")), tmp_path / "log")
    with pytest.raises(EngineError, match="no vLLM server answers"):
        ve.connect_or_start(f"http://127.0.0.1:{ve.free_port()}", spec, tmp_path / "log")


def test_bad_engine_settings_are_one_line_before_anything_loads(tmp_path):
    for override, message in (("ppo.sampling.engine=sglang", "ppo.sampling.engine must be one of hf, vllm"),
                              ("ppo.update.tis_cap=0.5", "ppo.update.tis_cap=0.5")):
        proc = run_stage("ppo", f"run_dir={tmp_path}", override, check=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]


# --- with a vLLM server ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(demo_dir, tmp_path_factory):
    """One vLLM server on the demo's base for the module (stages connect to it with vllm.url)."""
    if not VLLM_PYTHON.is_file():
        pytest.skip("no vLLM environment (.venv-vllm): `make setup-vllm` builds it")
    spec = ve.ServerSpec(model=str(demo_dir / "base"), python=str(VLLM_PYTHON), dtype="float32",
                         max_lora_rank=32, start_timeout=900)
    client, proc = ve.connect_or_start(None, spec, tmp_path_factory.mktemp("vllm") / "server.log")
    yield client
    proc.close()


STEPS = ("ppo.steps=3", "ppo.sampling.rollout_batch_size=16", "ppo.update.num_minibatches=2", "ppo.update.epochs=2",
         "ppo.checkpoint.every=1", "ppo.reward.norm_samples=16", "ppo.monitor.every=0", "ppo.eval_samples=0",
         "ppo.progress_bar=false", "ppo.guards.keep_best=none", "ppo.sampling.engine=vllm")


def _with_chain(rm_run, run: Path) -> Path:
    for stage in ("sft", "rm"):
        shutil.copytree(rm_run / stage, run / stage)
    return run


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "ppo" / "metrics.jsonl").read_text().splitlines()]


@needs_vllm
@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_ppo_samples_from_vllm_and_the_engine_agrees_with_the_trainer_every_step(server, rm_run, tmp_path, estimator):
    """PPO (GAE) on the module's server (vllm.url); GRPO on a server the stage starts and stops itself."""
    run = _with_chain(rm_run, tmp_path / "run")
    where = (f"vllm.url={server.url}",) if estimator == "gae" else (f"vllm.python={VLLM_PYTHON}",)
    extra = ("ppo.estimator.name=grpo", "ppo.sampling.group_size=4") if estimator == "grpo" else ()
    proc = run_stage("ppo", f"run_dir={run}", *where, *STEPS, *extra)
    assert "rollouts from vLLM" in proc.stderr
    if estimator == "grpo":  # started here, stopped at the end: its log says so
        assert "[vllm] server ready" in proc.stderr
        assert "shutdown" in (run / "ppo" / "engine" / "server.log").read_text()
    rows = [r for r in _metrics(run) if r["step"] > 0]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:  # float32 on both sides: the same numbers to ~1e-6
        assert r["engine/probe_diff_mean"] < 1e-4 and r["engine/mismatch_max"] < 1e-3, r
        assert r["engine/tis_weight"] == pytest.approx(1.0, abs=1e-3)
    assert (run / "ppo" / "DONE").is_file()
    versions = [p.name for p in (run / "ppo" / "engine").iterdir() if p.name.startswith("policy-")]
    assert len(versions) == 1 and versions[0].startswith("policy-2-")  # the last sync's; older ones removed


@needs_vllm
def test_a_stale_adapter_in_the_engine_stops_the_run_with_one_line(server, rm_run, tmp_path, monkeypatch):
    """The policy moves; the engine is handed the previous version under the new name (an adapter that never
    reached the engine, the peers' failure): the probe check names the step, the version and the difference."""
    from rlhf.config import load_config
    from rlhf.distributed import state
    from rlhf.generation import encode_prompt, model_stop_ids
    from rlhf.models import load_sft_model, load_tokenizer
    from rlhf.ppo.engine import VLLMEngine
    from rlhf.ppo.roles import POLICY, build_roles

    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"vllm.url={server.url}"])
    tok = load_tokenizer(str(rm_run / "sft"))
    roles = build_roles(load_sft_model(cfg.model, rm_run / "sft", tok), rm_run / "rm", tok, cfg.ppo.lora,
                        value_from_reward=False, critic=False)
    prompts = [json.loads(line)["prompt"] for line in (ROOT / "data" / "demo" / "prompts_eval.jsonl").open()][:4]
    engine = VLLMEngine(cfg, rm_run / "sft", tmp_path, tok, model_stop_ids(roles.model, tok), state(),
                        [encode_prompt(tok, p) for p in prompts])

    def update():  # what an optimiser step does to the policy adapter
        with torch.no_grad():
            for name, p in roles.model.named_parameters():
                if f"lora_B.{POLICY}." in name:
                    p.add_(0.05 * torch.randn_like(p))

    assert engine.sync(roles, 0)["engine/probe_diff_mean"] < 1e-4  # the policy starts as SFT
    update()
    assert engine.sync(roles, 1)["engine/probe_diff_mean"] < 1e-4
    stale = shutil.copytree(tmp_path / "engine" / engine.version, tmp_path / "stale")
    update()
    load = engine.client.load_adapter
    monkeypatch.setattr(engine.client, "load_adapter", lambda name, path: load(name, stale))
    with pytest.raises(EngineError, match=r"out of sync at step 2: adapter policy-2-\d+ gives log-probs .* away "
                                          r"from the trainer's .*vllm.probe_tolerance=0.001"):
        engine.sync(roles, 2)


@needs_vllm
def test_killed_vllm_run_resumes_to_the_same_result(server, rm_run, tmp_path):
    """SIGKILL after the 2nd checkpoint, then the rerun: it loads the restored policy into the engine (the probe
    check passes on it) and ends with the adapters and metrics of a run never interrupted (the engine samples
    each row with a seed of the step: the same answers)."""
    straight, killed = _with_chain(rm_run, tmp_path / "straight"), _with_chain(rm_run, tmp_path / "killed")
    args = [f"vllm.url={server.url}", *STEPS]
    run_stage("ppo", f"run_dir={straight}", *args)
    kill_stage_once_written("ppo", [f"run_dir={killed}", *args],
                            killed / "ppo" / "checkpoints" / "checkpoint-2" / "state.json")
    again = run_stage("ppo", f"run_dir={killed}", *args)
    assert "[ppo] resuming from" in again.stdout
    a = load_file(str(straight / "ppo" / "policy" / "adapter_model.safetensors"))
    b = load_file(str(killed / "ppo" / "policy" / "adapter_model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    ma, mb = _metrics(straight), _metrics(killed)
    assert [r["step"] for r in mb] == [1, 2, 3]
    for ra, rb in zip(ma, mb):
        assert rb["engine/probe_diff_mean"] < 1e-4
        for key in ("ppo/score", "ppo/kl", "ppo/policy_loss"):
            assert ra[key] == pytest.approx(rb[key], abs=1e-4), (ra["step"], key)


@needs_vllm
def test_eval_through_vllm_gives_the_figures_of_transformers(server, rm_run, tmp_path):
    """Greedy answers are the same answers (the same float32 logits); sampled ones are other draws of the same
    distributions: their figures agree within sampling noise."""
    run = _with_chain(rm_run, tmp_path / "run")
    args = ["eval.checkpoints=[base,sft]", "eval.samples=64", "eval.samples_per_prompt=2", "eval.plots=false",
            "eval.progress_bar=false", "eval.judge=rlhf.demo.task:gold_score"]
    figures = {}
    for engine in ("hf", "vllm"):
        run_stage("eval", f"run_dir={run}", f"vllm.url={server.url}", f"eval.engine={engine}", "--force", *args)
        figures[engine] = json.loads((run / "eval" / "metrics.json").read_text())["results"]
    hf, vl = figures["hf"], figures["vllm"]
    for name in ("base", "sft"):
        assert vl["greedy"][name]["gold_mean"] == pytest.approx(hf["greedy"][name]["gold_mean"], abs=1e-6)
        assert vl["greedy"][name]["reward_mean"] == pytest.approx(hf["greedy"][name]["reward_mean"], abs=1e-4)
        assert vl["sample"][name]["gold_mean"] == pytest.approx(hf["sample"][name]["gold_mean"], abs=0.1)
    assert vl["sample"]["base"]["kl_mean"] == pytest.approx(hf["sample"]["base"]["kl_mean"], abs=0.3)


@needs_vllm
def test_two_processes_sample_from_one_server_under_one_version(server, rm_run, tmp_path):
    """`accelerate launch` with 2 processes: the main process's server (here the module's, at vllm.url) serves
    both, the other process samples under the main process's version names after its probe check; both log the
    main process's probe figures and end with identical weights."""
    run = _with_chain(rm_run, tmp_path / "run")
    proc = accelerate_processes("ppo", ["--config", str(DEMO_CONFIG), f"run_dir={run}", f"vllm.url={server.url}",
                                        *STEPS], "configs/accelerate/cpu-2proc.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes hold identical trained weights" in proc.stdout
    rows = [r for r in _metrics(run) if r["step"] > 0]
    assert len(rows) == 3 and all(r["engine/probe_diff_mean"] < 1e-4 for r in rows)
