"""make eval: judge checkpoints on held-out prompts, then write the report.

Every checkpoint answers the same prompts with the same seed, once per decoding (sampled, greedy). Each
answer is scored by the run's reward model and, when the task has one, by the gold judge; sampled answers
also get their sequence KL to the SFT model, log pi(y|x) - log pi_sft(y|x) (mean: KL(pi || pi_sft)).
Every checkpoint is compared with the baseline prompt by prompt: win rate (ties half) and its 95 %
bootstrap interval.

Output `<run_dir>/eval/`: `metrics.json` (the summary, for machines; per checkpoint also the algorithm, wall
time and peak memory of the stage that produced it), `samples.jsonl` (every answer and its
scores), `report.md` with `plots/` (rlhf.eval.report), `config.yaml` and `DONE`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from accelerate import PartialState

from rlhf import data as rdata
from rlhf import distributed
from rlhf.config import ConfigError, EvalConfig, PipelineConfig, save_config
from rlhf.eval import degeneration as dg
from rlhf.eval.checkpoints import (Checkpoint, SharedSFTModel, parse_checkpoints, provenance, same_vocabulary,
                                    standalone)
from rlhf.eval.engine import EvalEngine
from rlhf.eval.flags import flags, win_rate_text
from rlhf.eval.judging import Answers, answer, judgements, prompt_text, summarize
from rlhf.eval.report import render
from rlhf.generation import SamplingSpec, encode_prompt, model_stop_ids
from rlhf.models import load_tokenizer
from rlhf.plugins import import_callable
from rlhf.runs import begin_stage, finish_stage, is_done, require_done
from rlhf.tracking import Trackers



def sampling(e: EvalConfig, decoding: str) -> SamplingSpec:
    if decoding == "greedy":
        return SamplingSpec(max_new_tokens=e.max_new_tokens, do_sample=False)
    return SamplingSpec(max_new_tokens=e.max_new_tokens, temperature=e.temperature, top_k=e.top_k, top_p=e.top_p)


def check_baseline(e: EvalConfig, checkpoints: list[Checkpoint]) -> None:
    """The baseline among the checkpoints found (an optional one, `dpo?`, is absent when its stage has not run);
    the rest of eval's settings are checked before (rlhf.checks.check_eval, by preflight)."""
    names = [c.name for c in checkpoints]
    if e.baseline not in names:
        raise ConfigError(f"eval.baseline {e.baseline!r} is not one of the checkpoints found {names}")


def answers_per_prompt(e: EvalConfig, decoding: str) -> int:
    return e.samples_per_prompt if decoding == "sample" else 1  # greedy answers would all be the same


def run(cfg: PipelineConfig) -> Path:
    e, run_dir = cfg.eval, Path(cfg.run_dir)

    # 1. everything that can be wrong is checked before a model loads
    checkpoints = parse_checkpoints(list(e.checkpoints), run_dir)
    check_baseline(e, checkpoints)
    rm_dir = require_done(run_dir / "rm", "rm") if e.reward_model else None
    needs_sft = rm_dir is not None or any(c.kind in ("sft", "adapter") for c in checkpoints)
    sft_dir = require_done(run_dir / "sft", "sft") if needs_sft or is_done(run_dir / "sft") else None
    tokenizer = load_tokenizer(str(sft_dir) if sft_dir else cfg.model.name_or_path, cfg.model.revision,
                               cfg.model.trust_remote_code)
    examples = rdata.load_prompts(e.prompts_file, split=e.prompts_split, skip_invalid=e.skip_invalid)
    examples = examples[:e.samples] if e.samples > 0 else examples
    examples = rdata.for_model(examples, tokenizer, cfg.model.text_prompts, e.max_prompt_length, "eval")
    prompts = [x.prompt for x in examples]
    judge = import_callable(e.judge) if e.judge else None
    state = distributed.state()  # PartialState; on a CPU-only machine it must be asked for the CPU to form a group
    out = begin_stage(run_dir / "eval", cfg.force)
    if state.is_main_process:
        save_config(cfg, out)
    print(f"[eval] {len(prompts)} prompts; checkpoints {', '.join(c.name for c in checkpoints)}; "
          f"baseline {e.baseline}; decoding {', '.join(e.decoding)}")

    # 2. answers: the SFT weights once (reference, reward adapter, adapter checkpoints); others one at a time.
    #    Under `accelerate launch`, each process answers every num_processes-th prompt. With k answers per
    #    prompt, answer j of prompt i is item i * k + j.
    mine = distributed.shard(list(range(len(prompts))), state.process_index, state.num_processes)
    shared = SharedSFTModel(cfg, sft_dir, tokenizer, rm_dir, [c for c in checkpoints if c.kind == "adapter"]) \
        if sft_dir else None
    answers: dict[str, dict[str, Answers]] = {d: {} for d in e.decoding}
    engine = EvalEngine(cfg, sft_dir, checkpoints, out, state) if e.engine == "vllm" else None
    try:
        for ckpt in checkpoints:
            if engine is not None and not engine.serves(ckpt) and state.is_main_process:
                print(f"[eval] {ckpt.name}: a full model directory, not the engine's base: it answers through "
                      f"transformers")
            view = shared.view(ckpt) if ckpt.kind in ("sft", "adapter") else standalone(cfg, ckpt, tokenizer)
            with view as (model, tok):
                for decoding in e.decoding:
                    k = answers_per_prompt(e, decoding)
                    prompt_ids = [encode_prompt(tok, prompts[i]) for i in mine for _ in range(k)]
                    generated = None
                    if engine is not None and engine.serves(ckpt):
                        generated = engine.answer(ckpt, prompt_ids, [i * k + j for i in mine for j in range(k)],
                                                  sampling(e, decoding), e.seed, tok.pad_token_id,
                                                  model_stop_ids(model, tok))
                    answers[decoding][ckpt.name] = answer(
                        model, tok, prompt_ids, sampling(e, decoding), e.batch_size, e.seed,
                        comparable=shared is not None and same_vocabulary(tok, tokenizer),
                        desc=f"eval {ckpt.name} ({decoding})" if e.progress_bar else None, generated=generated)
    finally:
        if engine is not None:
            engine.close()

    # 3. judgements: reward model, KL to the SFT model, gold judge; then every process's share in prompt order
    rows, results = [], {}
    for decoding, by_name in answers.items():
        k = answers_per_prompt(e, decoding)
        items = [i * k + j for i in mine for j in range(k)]
        scorer = shared.scorer if shared else None
        reference = shared.reference if shared else None
        scores = {name: {"response": a.texts, **judgements(a, scorer, reference, [prompts[i // k] for i in items],
                                                           judge, e.batch_size)}
                  for name, a in by_name.items()}
        scores = gather_in_order(scores, items, len(prompts) * k, state)
        results[decoding] = summarize({name: {key: v for key, v in s.items() if key != "response"}
                                       for name, s in scores.items()}, e.baseline, k)
        for name, s in scores.items():  # answers that are all alike: a collapse no per-answer measure sees
            results[decoding][name]["distinct_answers"] = dg.distinct_answers(s["response"])
        for name, s in scores.items():
            for item in range(len(prompts) * k):
                rows.append({"decoding": decoding, "checkpoint": name, "prompt_index": item // k,
                             "sample_index": item % k, "prompt": prompt_text(prompts[item // k]),
                             **{key: v[item] for key, v in s.items() if v is not None}})
    if not state.is_main_process:
        state.wait_for_everyone()
        return out

    metrics = {
        "run_dir": str(run_dir), "n_prompts": len(prompts), "prompts_file": e.prompts_file,
        "baseline": e.baseline, "judge": e.judge, "reward_model": rm_dir is not None,
        "checkpoints": [{"name": c.name, "kind": c.kind, "path": c.path, **provenance(c, run_dir)}
                        for c in checkpoints],
        "decoding": {d: vars(sampling(e, d)) | {"answers_per_prompt": answers_per_prompt(e, d)} for d in e.decoding},
        "seed": e.seed, "examples": e.examples,
        "results": results,
    }
    metrics["warnings"] = [line.replace("**", "") for line in flags(metrics)]  # also at the top of report.md
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    trackers = Trackers(cfg.report_to, out, config=dataclasses.asdict(cfg), stage="eval")
    trackers.log(headline(metrics), step=0)  # the summary figures, in TensorBoard (eval/tb/) and report_to
    trackers.close()
    (out / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = render(run_dir, out, plots=e.plots)
    print(format_results(metrics))
    for line in metrics["warnings"]:
        print(f"[eval] WARNING: {line}")
    print(f"[eval] report: {report}")
    finish_stage(out, {"n_prompts": len(prompts), **headline(metrics), "warnings": metrics["warnings"]})
    state.wait_for_everyone()
    return out


def gather_in_order(scores: dict, mine: list[int], n: int, state: PartialState) -> dict:
    """Every process's lists scores[checkpoint][key], for its items `mine`, -> the full lists in item order,
    on every process."""
    if state.num_processes == 1:
        return scores
    return merge_in_order(distributed.gather_objects((mine, scores)), n)


def merge_in_order(parts: list[tuple[list[int], dict]], n: int) -> dict:
    """[(item indices, scores[checkpoint][key] = values for those items), ...] -> full lists of n items."""
    out: dict = {}
    for name, keys in parts[0][1].items():
        out[name] = {}
        for key, values in keys.items():
            full = None
            if values is not None:
                full = [None] * n
                for indices, part in parts:
                    for i, v in zip(indices, part[name][key], strict=True):
                        full[i] = v
            out[name][key] = full
    return out


def headline(metrics: dict) -> dict[str, float]:
    """Flat `eval/<decoding>/<checkpoint>/<metric>` entries of the win rates and KL (for DONE and logs)."""
    flat = {}
    for decoding, by_name in metrics["results"].items():
        for name, row in by_name.items():
            for key in ("reward_win_rate", "gold_win_rate", "kl_mean", "gold_mean", "reward_mean", "repeat_mean"):
                if key in row:
                    flat[f"eval/{decoding}/{name}/{key}"] = row[key]
    return flat


def format_results(metrics: dict) -> str:
    lines = []
    for decoding, by_name in metrics["results"].items():
        lines.append(f"[eval] {decoding}: vs {metrics['baseline']} on {metrics['n_prompts']} prompts")
        for name, row in by_name.items():
            parts = [f"{name:>12}"]
            for key, label in (("reward", "RM"), ("gold", "gold")):
                if f"{key}_mean" in row:
                    parts.append(f"{label} {row[f'{key}_mean']:.3f}")
                if f"{key}_win_rate" in row:
                    parts.append(f"win {win_rate_text(row, f'{key}_win_rate')}")
            if "kl_mean" in row:
                parts.append(f"KL {row['kl_mean']:.3f}")
            parts.append(f"len {row['length_mean']:.1f}")
            if "repeat_mean" in row:
                parts.append(f"repeat {row['repeat_mean']:.3f}")
            lines.append("  ".join(parts))
    return "\n".join(lines)

