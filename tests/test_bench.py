"""The benchmark's bookkeeping (the timings themselves are never asserted: see `make bench`)."""

import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import run as bench  # noqa: E402


def test_throughput_from_trainer_and_ppo_metrics():
    sft = [{"step": 1, "train/num_tokens": 100.0}, {"step": 2, "train/num_tokens": 300.0},
           {"step": 2, "train/train_runtime": 3.0}]
    assert bench.throughput("sft", sft) == {"train_s": 3.0, "train_tokens": 300, "tokens_per_s": 100.0}
    ppo = [{"step": s, "time/step": 2.0 * s, "time/generate": 1.0, "time/score": 0.5, "time/train": s,
            "perf/generated_tokens_per_s": 10.0 * s} for s in (1, 2, 3)]
    out = bench.throughput("ppo", ppo)
    assert out["steps"] == 3 and out["step_s"] == 4.0 and out["generated_tokens_per_s"] == 20.0
    assert out["time_split_s"] == {"generate": 1.0, "score": 0.5, "train": 2.0}


def test_memory_setup_pins_the_allocator_and_speed_setup_does_not(monkeypatch):
    monkeypatch.delenv("BENCH_DEFAULT_MALLOC", raising=False)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert bench.stage_env("large")["MALLOC_MMAP_THRESHOLD_"] == "131072"
    assert "MALLOC_MMAP_THRESHOLD_" not in bench.stage_env("demo")
    monkeypatch.setenv("BENCH_DEFAULT_MALLOC", "1")
    assert "MALLOC_MMAP_THRESHOLD_" not in bench.stage_env("large")


def test_the_second_task_is_benched_on_its_own_config():
    assert bench.CONFIGS["greetings"] == "greetings.yaml"
    assert all((ROOT / "configs" / name).is_file() for name in bench.CONFIGS.values())


def test_estimators_run_the_ppo_stage_again_on_the_same_sft_and_rm(monkeypatch, tmp_path):
    calls = []

    def fake_stage(stage, run_dir, extra, setup):
        (run_dir / stage).mkdir(parents=True, exist_ok=True)
        calls.append((stage, run_dir.name, [x for x in extra if "estimator" in x or "group_size" in x]))
        return {"peak_rss_mb": 800.0 if "ppo.estimator.name=grpo" in extra else 1000.0}
    monkeypatch.setattr(bench, "run_stage", fake_stage)
    result = bench.bench("demo", tmp_path, ["grpo"])
    assert calls == [("sft", "demo", []), ("rm", "demo", []), ("ppo", "demo", []),
                     ("ppo", "demo-grpo", ["ppo.estimator.name=grpo", "ppo.sampling.group_size=4"])]
    assert (tmp_path / "demo-grpo" / "rm").is_dir() and result["ppo-grpo_over_ppo_peak_memory"] == 0.8


def test_quantized_large_setups_load_the_base_quantized_and_compare_with_full_precision(tmp_path):
    assert "model.quantization=4bit" in bench.large_args("large-4bit", tmp_path)["ppo"]
    assert "model.quantization=none" in bench.large_args("large", tmp_path)["sft"]
    stages = lambda peak, step: {"sft": {"peak_rss_mb": peak}, "rm": {"peak_rss_mb": peak},  # noqa: E731
                                 "ppo": {"peak_rss_mb": peak, "step_s": step}}
    results = [{"setup": "large", "stages": stages(1000.0, 2.0)}, {"setup": "large-4bit", "stages": stages(400.0, 3.0)}]
    assert bench.quantized_vs_full(results) == {"large-4bit": {"sft_peak_memory": 0.4, "rm_peak_memory": 0.4,
                                                               "ppo_peak_memory": 0.4, "ppo_step_time": 1.5}}
    assert bench.quantized_vs_full(results[1:]) == {}


def test_make_bench_answers_in_minutes_by_default_and_runs_the_full_schedules_with_full(tmp_path):
    quick = bench.parse_args([])
    assert quick.setup == ["demo-quick", "large"] and not quick.full
    assert bench.CONFIGS["demo-quick"] == "demo-quick.yaml"  # make demo's short schedule
    assert "rm.probes.enabled=false" in bench.large_args("large", tmp_path, full=False)["rm"]
    full = bench.parse_args(["--full"])
    assert full.setup == ["demo", "greetings", "large", "large-4bit"] and full.full
    assert "rm.probes.enabled=false" not in bench.large_args("large", tmp_path, full=True)["rm"]
    assert bench.parse_args(["--setup", "large", "--setup", "large-4bit"]).setup == ["large", "large-4bit"]


def test_the_real_model_setup_runs_its_config_with_few_steps_on_the_prepared_model(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(bench, "prepare_smollm2", lambda: calls.append("prepared"))
    monkeypatch.setattr(bench, "run_stage", lambda stage, run_dir, extra, setup: calls.append((stage, setup, extra))
                        or {"peak_rss_mb": 2000.0 if stage == "ppo" else 1800.0})
    result = bench.bench("smollm2", tmp_path)
    assert calls[0] == "prepared" and [c[0] for c in calls[1:]] == ["sft", "rm", "ppo"]
    assert bench.CONFIGS["smollm2"] == "smollm2-instruct.yaml"
    assert "sft.train.max_steps=4" in calls[1][2] and "ppo.steps=3" in calls[3][2]
    assert result["ppo_over_sft_peak_memory"] == round(2000 / 1800, 3)


def test_the_vllm_engine_runs_the_ppo_stage_again_and_is_compared_with_transformers(monkeypatch, tmp_path):
    calls = []

    def fake_stage(stage, run_dir, extra, setup):
        (run_dir / stage).mkdir(parents=True, exist_ok=True)
        calls.append((stage, run_dir.name, [x for x in extra if "engine" in x]))
        vllm = "ppo.sampling.engine=vllm" in extra
        return {"peak_rss_mb": 1000.0, "step_s": 3.0 if vllm else 4.0, "generated_tokens_per_s": 50.0 if vllm else 20.0,
                "time_split_s": {"generate": 0.5 if vllm else 2.0}, **({"mismatch_mean": 1e-6} if vllm else {})}
    monkeypatch.setattr(bench, "run_stage", fake_stage)
    result = bench.bench("demo", tmp_path, engines=["vllm"])
    assert calls[-1] == ("ppo", "demo-vllm", ["ppo.sampling.engine=vllm"])
    assert (tmp_path / "demo-vllm" / "sft").is_dir()
    assert result["vllm_vs_hf"] == {"step_time": 0.75, "generate_time": 0.25, "generated_tokens_per_s": 2.5,
                                    "mismatch_mean": 1e-6, "mismatch_max": None}
    ppo = [{"step": 1, "time/step": 2.2, "time/sync": 0.2, "time/generate": 1.0, "time/score": 0.5, "time/train": 0.5,
            "perf/generated_tokens_per_s": 10.0, "engine/mismatch_mean": 2e-6, "engine/mismatch_max": 1e-5,
            "engine/probe_diff_mean": 1e-7}]
    assert bench.throughput("ppo", ppo)["mismatch_max"] == 1e-5
    assert bench.throughput("ppo", ppo)["time_split_s"]["sync"] == 0.2  # the engine's adapter sync, apart
    assert bench.parse_args(["--engine", "vllm"]).engine == ["vllm"]
