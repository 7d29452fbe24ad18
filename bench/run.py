"""make bench: time and memory of SFT, RM and PPO, written as JSON you can compare across commits and machines.

`make bench` (no arguments) answers in minutes: `demo-quick` and `large` with the RM's probes off (under 10
minutes on 2 CPU cores). `--full` (`make bench BENCH_ARGS=--full`) runs the full schedules: `demo`,
`greetings`, `large` and `large-4bit`, the RM's probes on (over 40 minutes on 2 CPU cores).

Setups:
  demo-quick  the embedded demo as `make demo` runs it (configs/demo-quick.yaml: its short schedule);
  demo   the embedded demo on configs/demo.yaml's full schedule (tiny model: the Python runtime dominates memory);
  greetings  the second task (configs/greetings.yaml: demo.yaml with only the paths changed) as `make all`
         runs it: a second small task of another kind, its own tokenizer and base (`make data-greetings`);
  large  a randomly initialised ~150M-parameter Llama built from a config (the demo's tokenizer and data),
         a few steps of each stage: the weights dominate memory, which is where sharing one base between
         the four PPO roles shows (PPO's peak memory / SFT's peak memory on the same base).
  smollm2  a real pre-trained chat model, SmolLM2-135M-Instruct (`make model-smollm2`), on the instruction task
         (configs/smollm2-instruct.yaml, `make demo-real`'s config), a few steps of each stage: where a 49k
         vocabulary and a real chat template show in the time split.
  large-4bit, large-8bit
         the same model and steps on a quantized frozen base (model.quantization); with `large` in the same
         run, `quantized_vs_full` gives each stage's peak memory and PPO's step time as a ratio to `large`'s.

Each stage runs in its own process (as `make` runs it); its peak memory is that process's peak
(resident set on CPU, allocated CUDA memory on a GPU), read from the stage's DONE marker.

On CPU, glibc's malloc raises its mmap threshold every time a large block is freed, after which freed
temporaries stay in the heap and the resident set grows with the *variety* of temporary sizes (PPO's
generation, four roles' forwards and two backwards make many) rather than with what is live. The
`large` setup, which is about memory, therefore pins MALLOC_MMAP_THRESHOLD_ for all its stages alike, so
that peak RSS measures memory in use (it also makes them about 2x slower: every big temporary becomes an
mmap). The `demo` setup, which is about speed, keeps the default. Both are recorded in the JSON;
BENCH_DEFAULT_MALLOC=1 keeps the default everywhere.

`--estimator grpo --estimator rloo` also runs the PPO stage with those advantage estimators (ppo.sampling.group_size 4,
no value adapter) on the same SFT and RM, recorded as stages `ppo-grpo`, ... next to `ppo` (GAE).

`--engine vllm` also runs the PPO stage with its rollouts from vLLM (ppo.sampling.engine=vllm: a server started by
the stage from the `make setup-vllm` environment) on the same SFT, RM, shapes and steps, recorded as `ppo-vllm`,
and `vllm_vs_hf`: its step time, generation time and generated tokens/s as ratios to `ppo`'s (transformers'
generate), with the engine/trainer log-prob mismatch. The stage's wall includes the server's start.

Usage: python bench/run.py [--full] [--setup demo] [--setup greetings] [--setup large] [--setup large-4bit] [--setup smollm2]
                           [--estimator grpo] [--engine vllm] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rlhf.runs import read_metrics  # noqa: E402

LARGE = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 12, "num_attention_heads": 16}
LARGE_ARGS = {
    "sft": ["sft.train.max_steps=4", "sft.train.batch_size=8", "sft.train.logging_steps=1", "sft.eval_file=null",
            "sft.eval_fraction=0.005"],
    "rm": ["rm.train.max_steps=4", "rm.train.batch_size=12", "rm.train.logging_steps=1"],
    "ppo": ["ppo.steps=3", "ppo.sampling.rollout_batch_size=16", "ppo.sampling.forward_batch_size=16",
            "ppo.update.num_minibatches=2",
            "ppo.update.epochs=1", "ppo.reward.norm_samples=16", "ppo.eval_samples=16", "ppo.checkpoint.every=100"],
}

SMOLLM2_ARGS = {
    "sft": ["sft.train.max_steps=4", "sft.train.batch_size=8", "sft.train.logging_steps=1"],
    "rm": ["rm.train.max_steps=4", "rm.train.batch_size=12", "rm.train.logging_steps=1", "rm.probes.samples=16"],
    "ppo": ["ppo.estimator.name=gae", "ppo.sampling.group_size=1",  # the reference's; --estimator rloo: the config's
            "ppo.steps=3", "ppo.sampling.rollout_batch_size=16", "ppo.update.num_minibatches=2",
            "ppo.reward.norm_samples=16", "ppo.eval_samples=16", "ppo.monitor.every=0", "ppo.checkpoint.every=100",
            "ppo.guards.accept_rm_warnings=true"],
}


def prepare_smollm2() -> None:
    """The real model and its task, as `make model-smollm2` and `make data-instruct` build them."""
    from rlhf.demo.build_instruct import build
    from rlhf.demo.packaged_model import prepare

    prepare(ROOT / "data" / "smollm2-135m-instruct")
    if not (ROOT / "data" / "instruct" / "DONE").is_file():
        build(ROOT / "data" / "instruct")


def build_large_model(out: Path) -> int:
    """A random Llama of ~150M parameters with the demo's tokenizer; returns its parameter count."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(ROOT / "data" / "demo" / "base")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), num_key_value_heads=LARGE["num_attention_heads"],
                                         max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                                         eos_token_id=tok.eos_token_id, bos_token_id=None, **LARGE))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def stage_env(setup: str) -> dict:
    env = dict(os.environ)
    if setup.startswith("large") and not env.get("BENCH_DEFAULT_MALLOC"):
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    return env


CONFIGS = {"demo-quick": "demo-quick.yaml", "demo": "demo.yaml", "greetings": "greetings.yaml", "large": "demo.yaml",
           "large-4bit": "demo.yaml", "large-8bit": "demo.yaml", "smollm2": "smollm2-instruct.yaml"}
QUICK_SETUPS = ("demo-quick", "large")
"""`make bench`'s default: the demo's short schedule and the large model's few steps."""
FULL_SETUPS = ("demo", "greetings", "large", "large-4bit")
"""`--full`: the demo's and the greetings task's full schedules, the large model in full precision and 4-bit."""
QUICK_ARGS = {"rm": ["rm.probes.enabled=false"]}
"""Without --full the large setups skip the RM's probes: forward passes on 1,000 damaged answers with a 154M
model, most of the RM stage's time and none of what the bench is about."""


def run_stage(stage: str, run_dir: Path, extra: list[str], setup: str) -> dict:
    cmd = [sys.executable, "-m", f"stages.{stage}", "--config", str(ROOT / "configs" / CONFIGS[setup]),
           f"run_dir={run_dir}", *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=stage_env(setup))
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    done = json.loads((run_dir / stage / "DONE").read_text())
    return {"wall_s": round(wall, 2), **{k.split("/")[1]: round(v, 1) for k, v in done.items() if k.startswith("perf/peak")},
            **throughput(stage, read_metrics(run_dir / stage / "metrics.jsonl"))}


def throughput(stage: str, rows: list[dict]) -> dict:
    if stage in ("sft", "rm"):
        end = [r for r in rows if "train/train_runtime" in r][-1]
        tokens = max(r.get("train/num_tokens", 0) for r in rows)
        return {"train_s": round(end["train/train_runtime"], 2), "train_tokens": int(tokens),
                "tokens_per_s": round(tokens / end["train/train_runtime"], 1)}
    steps = [r for r in rows if "time/step" in r]
    mean = lambda k: round(statistics.mean(r[k] for r in steps), 4)  # noqa: E731
    engine = {k.split("/")[1]: float(f"{statistics.mean(r[k] for r in steps):.3g}")
              for k in ("engine/mismatch_mean", "engine/mismatch_max", "engine/probe_diff_mean")
              if all(k in r for r in steps)}
    return {"steps": len(steps), "step_s": mean("time/step"),
            "time_split_s": {"generate": mean("time/generate"), "score": mean("time/score"), "train": mean("time/train"),
                             **({"sync": mean("time/sync")} if all("time/sync" in r for r in steps) else {})},
            "generated_tokens_per_s": mean("perf/generated_tokens_per_s"), **engine}


def engine_vs_hf(vllm: dict, hf: dict) -> dict:
    """The vLLM engine's PPO stage against transformers' on the same shapes: ratios (below 1: vLLM faster) and the
    mismatch of the two's log-probs of the sampled tokens."""
    return {"step_time": round(vllm["step_s"] / hf["step_s"], 3),
            "generate_time": round(vllm["time_split_s"]["generate"] / hf["time_split_s"]["generate"], 3),
            "generated_tokens_per_s": round(vllm["generated_tokens_per_s"] / hf["generated_tokens_per_s"], 3),
            "mismatch_mean": vllm.get("mismatch_mean"), "mismatch_max": vllm.get("mismatch_max")}


def bench(setup: str, work: Path, estimators: list[str] = (), full: bool = True, engines: list[str] = ()) -> dict:
    run_dir = work / setup
    extra: dict[str, list[str]] = {"sft": [], "rm": [], "ppo": []}
    info: dict = {}
    if setup.startswith("large"):
        model_dir = work / "large-model"
        info["parameters"] = build_large_model(model_dir)
        extra = large_args(setup, model_dir, full)
    if setup == "smollm2":
        prepare_smollm2()
        extra = {k: list(v) for k, v in SMOLLM2_ARGS.items()}
    result = {"setup": setup, **info, "malloc_mmap_threshold": stage_env(setup).get("MALLOC_MMAP_THRESHOLD_", "default"),
              "stages": {}}
    for stage in ("sft", "rm", "ppo"):
        print(f"[bench] {setup}: {stage}", flush=True)
        result["stages"][stage] = run_stage(stage, run_dir, extra[stage], setup)
    for name in estimators:  # the same SFT and RM, another PPO stage each
        other = work / f"{setup}-{name}"
        for stage in ("sft", "rm"):
            shutil.copytree(run_dir / stage, other / stage, ignore=shutil.ignore_patterns("checkpoints"))
        print(f"[bench] {setup}: ppo with ppo.estimator.name={name}", flush=True)
        result["stages"][f"ppo-{name}"] = run_stage("ppo", other, [*extra["ppo"], f"ppo.estimator.name={name}",
                                                                   "ppo.sampling.group_size=4"], setup)
    for name in engines:  # the same SFT, RM and PPO shapes, the rollouts from another engine
        other = work / f"{setup}-{name}"
        for stage in ("sft", "rm"):
            shutil.copytree(run_dir / stage, other / stage, ignore=shutil.ignore_patterns("checkpoints"))
        print(f"[bench] {setup}: ppo with ppo.sampling.engine={name}", flush=True)
        result["stages"][f"ppo-{name}"] = run_stage("ppo", other, [*extra["ppo"], f"ppo.sampling.engine={name}"], setup)
        result[f"{name}_vs_hf"] = engine_vs_hf(result["stages"][f"ppo-{name}"], result["stages"]["ppo"])
    key = "peak_cuda_mb" if "peak_cuda_mb" in result["stages"]["sft"] else "peak_rss_mb"
    result["ppo_over_sft_peak_memory"] = round(result["stages"]["ppo"][key] / result["stages"]["sft"][key], 3)
    for name in estimators:
        result[f"ppo-{name}_over_ppo_peak_memory"] = round(
            result["stages"][f"ppo-{name}"][key] / result["stages"]["ppo"][key], 3)
    return result


SETUPS = tuple(CONFIGS)


def large_args(setup: str, model_dir: Path, full: bool = True) -> dict[str, list[str]]:
    """Each stage's overrides for a `large` setup: the random model, few steps, and the base's quantization
    (without `full`, QUICK_ARGS too)."""
    quantization = setup.removeprefix("large").removeprefix("-") or "none"
    return {k: [f"model.name_or_path={model_dir}", f"model.quantization={quantization}", *v,
                *([] if full else QUICK_ARGS.get(k, []))]
            for k, v in LARGE_ARGS.items()}


def quantized_vs_full(results: list[dict]) -> dict:
    """Each quantized large setup against `large`: peak memory per stage and PPO's step time, as ratios."""
    by = {r["setup"]: r for r in results}
    if "large" not in by:
        return {}
    full = by["large"]["stages"]
    out = {}
    for name, r in by.items():
        if name.startswith("large-"):
            peak = lambda s: next(v for k, v in s.items() if k.startswith("peak_"))  # noqa: E731
            out[name] = {f"{stage}_peak_memory": round(peak(r["stages"][stage]) / peak(full[stage]), 3)
                         for stage in ("sft", "rm", "ppo")}
            out[name]["ppo_step_time"] = round(r["stages"]["ppo"]["step_s"] / full["ppo"]["step_s"], 3)
    return out


def machine() -> dict:
    import torch
    return {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "date": time.strftime("%Y-%m-%d")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; `setup` is filled in: the given setups, else FULL_SETUPS with --full, else QUICK_SETUPS."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true",
                   help="the full schedules (demo, greetings, large, large-4bit; the RM's probes on): over 40 minutes "
                        "on 2 CPU cores")
    p.add_argument("--setup", action="append", choices=SETUPS)
    p.add_argument("--estimator", action="append", default=[], choices=["grpo", "rloo", "reinforce_pp"],
                   help="also run the PPO stage with this advantage estimator (no value adapter)")
    p.add_argument("--engine", action="append", default=[], choices=["vllm"],
                   help="also run the PPO stage with its rollouts from this engine (make setup-vllm)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = p.parse_args(argv)
    a.setup = a.setup or list(FULL_SETUPS if a.full else QUICK_SETUPS)
    return a


def main() -> None:
    a = parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine(), "full": a.full, "results": []}
    with tempfile.TemporaryDirectory() as work:
        for setup in a.setup:
            report["results"].append(bench(setup, Path(work), a.estimator, a.full, a.engine))
    if quantized_vs_full(report["results"]):
        report["quantized_vs_full"] = quantized_vs_full(report["results"])
    path = out / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"[bench] wrote {path}")


if __name__ == "__main__":
    main()
