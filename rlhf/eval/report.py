"""The report a person reads instead of logs: `<run_dir>/eval/report.md` and its PNG plots.

Rendered only from files the stages saved, so `make report` redraws it at any time without a model:

    eval/metrics.json      the evaluation summary (required), with the algorithm, wall time and peak memory of
                           the stage that produced each checkpoint (from that stage's DONE, at eval time)
    eval/samples.jsonl     every answer with its scores (distributions, sample table)
    ppo/metrics.jsonl      PPO's per-step statistics (reward and KL curves, held-out monitor curves)
    ppo/DONE               PPO's wall time, the kept step and why
    rm/diagnostics.json    the reward model's held-out accuracy and calibration
    sft/metrics.jsonl      SFT's loss curves

Any of the optional files may be missing (an evaluation of exported models alone has none of them);
their sections are left out.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rlhf.eval.flags import flags, win_rate_text
from rlhf.runs import done_summary, read_metrics

PLOTS = "plots"


def render(run_dir: str | Path, eval_dir: str | Path | None = None, plots: bool = True) -> Path:
    """Write `<run_dir>/eval/report.md` and `<run_dir>/eval/plots/*.png`; returns the report's path.
    eval_dir: the evaluation's directory when it is not <run_dir>/eval (a rerun, in eval.rerun/).
    plots=False: the report's text alone (matplotlib draws the six figures in ~3 s of CPU)."""
    run_dir = Path(run_dir)
    out = Path(eval_dir) if eval_dir else run_dir / "eval"
    metrics_file = out / "metrics.json"
    if not metrics_file.is_file():
        raise FileNotFoundError(f"{metrics_file} not found: run `make eval` first")
    metrics = json.loads(metrics_file.read_text())
    samples = _jsonl(out / "samples.jsonl")
    ppo = read_metrics(run_dir / "ppo" / "metrics.jsonl") if (run_dir / "ppo" / "metrics.jsonl").is_file() else []
    rm = _json(run_dir / "rm" / "diagnostics.json")
    sft = read_metrics(run_dir / "sft" / "metrics.jsonl") if (run_dir / "sft" / "metrics.jsonl").is_file() else []
    ppo_done = done_summary(run_dir / "ppo")

    figures: dict[str, Path | None] = {}  # a figure's name -> its PNG; none drawn with plots=False
    if plots:
        (out / PLOTS).mkdir(parents=True, exist_ok=True)
        figures = {
            "ppo": plot_ppo(ppo, out / PLOTS / "ppo_training.png") if ppo else None,
            "monitor": plot_monitor(ppo, out / PLOTS / "ppo_monitor.png") if ppo else None,
            "distributions": plot_distributions(samples, metrics, out / PLOTS / "score_distributions.png") if samples else None,
            "rm": plot_rm(rm, out / PLOTS / "rm_calibration.png") if rm else None,
            "sft": plot_sft(sft, out / PLOTS / "sft_loss.png") if sft else None,
            "comparison": plot_comparison(metrics, out / PLOTS / "comparison.png"),
        }
    text = "\n".join(part for part in (
        summary_section(metrics, ppo_done),
        comparison_section(metrics, figures.get("comparison")),
        results_section(metrics),
        _figure("Scores of each checkpoint's answers", figures.get("distributions")),
        ppo_section(ppo, ppo_done, figures.get("ppo"), figures.get("monitor")),
        rm_section(rm, figures.get("rm")),
        _figure("SFT loss", figures.get("sft"), "## SFT"),
        samples_section(samples, metrics),
        method_section(metrics),
    ) if part)
    path = out / "report.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- text

def verdict(low: float, high: float) -> str:
    if low > 0.5:
        return "better"
    if high < 0.5:
        return "worse"
    return "no clear difference"


def per_prompt(m: dict, decoding: str) -> str:
    k = m.get("decoding", {}).get(decoding, {}).get("answers_per_prompt", 1)
    return "one answer" if k == 1 else f"{k} answers"


def _rate(row: dict, key: str) -> str:
    return win_rate_text(row, key + "_win_rate")


def verdict_line(m: dict, done: dict | None, name: str = "ppo") -> str | None:
    """One line: whether the kept PPO policy beats the baseline on sampled and on greedy answers (by the gold
    judge where there is one, else the reward model), and which step was kept; None without a PPO row."""
    base, parts, beats = m["baseline"], [], []
    for decoding, rows in m["results"].items():
        row = rows.get(name, {})
        key = next((k for k in ("gold", "reward") if f"{k}_win_rate" in row), None)
        if key is None or name == base:
            continue
        v = verdict(row[f"{key}_win_rate_low"], row[f"{key}_win_rate_high"])
        beats.append((decoding, v == "better"))
        parts.append(f"{decoding}: {'gold-judge' if key == 'gold' else 'reward-model'} win rate {_rate(row, key)}, {v}")
    if not beats:
        return None
    better, other = [d for d, b in beats if b], [d for d, b in beats if not b]
    if done and done.get("kept_step") == 0:
        head = f"no improvement: the PPO stage kept {base}'s weights (step 0)"
    else:
        kept = f" (step {done['kept_step']} of {done.get('steps_run', '?')} kept)" if done and "kept_step" in done else ""
        outcome = (f"beats {base} on {' and '.join(better)} answers" if better
                   else f"does not beat {base} on {' or '.join(other)} answers")
        if better and other:
            outcome += f", not on {' or '.join(other)} answers"
        head = f"the kept {name} policy{kept} {outcome}"
    why = f" Kept: {done['kept_reason']}." if done and done.get("kept_reason") else ""
    return f"**Verdict: {head}.** " + "; ".join(parts) + "." + why


def summary_section(m: dict, done: dict | None = None) -> str:
    decoding = next(iter(m["results"]))
    rows = m["results"][decoding]
    base = m["baseline"]
    line = verdict_line(m, done)
    lines = [f"# Evaluation report: `{m['run_dir']}`", "", *([line, ""] if line else []),
             *[f"> **Warning:** {line}" for line in flags(m)], *([""] if flags(m) else []),
             f"{m['n_prompts']} held-out prompts from `{m['prompts_file']}`; every checkpoint answers them with the "
             f"same seed ({per_prompt(m, decoding)} per prompt in {decoding} decoding). Win rates are over **{base}**, "
             f"answer j against the baseline's answer j, ties counting half, averaged per prompt, with 95 % "
             f"bootstrap intervals over prompts.", "", f"## Summary ({decoding} decoding)", ""]
    for name, row in rows.items():
        if name == base:
            continue
        parts = []
        if "gold_win_rate" in row:
            parts.append(f"gold-judge win rate **{_rate(row, 'gold')}**, "
                         f"{verdict(row['gold_win_rate_low'], row['gold_win_rate_high'])}")
        if "reward_win_rate" in row:
            parts.append(f"reward-model win rate {_rate(row, 'reward')}")
        if "kl_mean" in row:
            parts.append(f"KL to SFT {row['kl_mean']:.2f} nats")
        parts.append(f"length {row['length_mean']:.1f} vs {rows[base]['length_mean']:.1f} tokens")
        lines.append(f"- **{name}** vs {base}: " + "; ".join(parts) + ".")
    if len(rows) == 1:
        lines.append("Only the baseline was evaluated.")
    if m.get("judge") is None:
        lines += ["", "No gold judge is configured (`eval.judge`): the reward model is the only judge, and it is "
                      "the model PPO optimised against, so its win rates overstate real gains."]
    return "\n".join(lines) + "\n"


def comparison_section(m: dict, plot: Path | None) -> str:
    """One row per checkpoint: its win rates over the baseline (first decoding) beside the algorithm, wall
    time and peak memory of the stage that produced it (blank where no finished stage recorded them)."""
    decoding = next(iter(m["results"]))
    rows, base = m["results"][decoding], m["baseline"]
    info = {c["name"]: c for c in m.get("checkpoints", [])}
    quality = [(key, label) for key, label in (("gold", "gold win rate"), ("reward", "RM win rate"))
               if any(f"{key}_win_rate" in r for r in rows.values())]
    kl = any("kl_mean" in r for r in rows.values())
    gpu = any("peak_cuda_mb" in c for c in info.values())
    header = (["checkpoint", "algorithm"] + [label for _, label in quality] + ["KL to SFT"] * kl
              + ["length", "stage wall time", "peak RSS"] + ["peak GPU memory"] * gpu)
    lines = [f"## Comparison: quality and cost ({decoding} decoding)", "",
             f"Win rates over **{base}** (95 % intervals); wall time and peak memory are those of the stage that "
             "produced the checkpoint, as its `DONE` recorded them (blank: the base model, or no finished stage "
             "wrote the directory; an exported model shows the export's).", "",
             "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for name, row in rows.items():
        c = info.get(name, {})
        cells = [name, c.get("algorithm", "")]
        for key, _ in quality:
            cells.append(_rate(row, key) if f"{key}_win_rate" in row else "(baseline)" if name == base else "")
        if kl:
            cells.append(f"{row['kl_mean']:.2f}" if "kl_mean" in row else "")
        cells.append(f"{row['length_mean']:.1f}")
        cells.append(f"{c['wall_s']:,.0f} s" if "wall_s" in c else "")
        cells += [f"{c[key]:,.0f} MB" if key in c else "" for key in ("peak_rss_mb",) + ("peak_cuda_mb",) * gpu]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if plot:
        lines += [f"![Win rate against the cost of the stage]({PLOTS}/{plot.name})", ""]
    return "\n".join(lines)


def results_section(m: dict) -> str:
    lines = ["## All results", ""]
    for decoding, rows in m["results"].items():
        spec = m.get("decoding", {}).get(decoding, {})
        how = "greedy" if not spec.get("do_sample", decoding == "sample") else \
            f"sampled at temperature {spec.get('temperature')}, top_k {spec.get('top_k')}, top_p {spec.get('top_p')}"
        lines += [f"### {decoding} ({how}, at most {spec.get('max_new_tokens', '?')} new tokens, "
                  f"{per_prompt(m, decoding)} per prompt)", ""]
        cols = [("reward_mean", "RM score"), ("reward_win_rate", "RM win rate"), ("gold_mean", "gold score"),
                ("gold_win_rate", "gold win rate"), ("kl_mean", "KL to SFT"), ("length_mean", "length"),
                ("repeat_mean", "repeat"), ("dominated_mean", "dominated"), ("distinct_answers", "distinct answers")]
        cols = [(k, label) for k, label in cols if any(k in r for r in rows.values())]
        lines.append("| checkpoint | " + " | ".join(label for _, label in cols) + " |")
        lines.append("|---" * (len(cols) + 1) + "|")
        for name, row in rows.items():
            cells = []
            for key, _ in cols:
                if key.endswith("win_rate"):
                    cells.append(_rate(row, key[:-len("_win_rate")]) if key in row else "(baseline)")
                elif key == "length_mean":
                    cells.append(f"{row[key]:.1f}")
                elif key in ("dominated_mean", "distinct_answers") and key in row:
                    cells.append(f"{row[key]:.2f}")
                elif key in row:
                    std = row.get(key.replace("_mean", "_std"))
                    cells.append(f"{row[key]:.3f}" + (f" ± {std:.3f}" if std is not None else ""))
                else:
                    cells.append("")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    if any("repeat_mean" in r for rows in m["results"].values() for r in rows.values()):
        lines += ["Degeneration, from each answer's tokens (rlhf/eval/degeneration.py): *repeat* is the share of "
                  "token transitions that repeat one seen before in the answer (or double the previous token), "
                  "*dominated* the share of answers one token makes more than half of, *distinct answers* the "
                  "share of answers no other answer equals. Compare with the baseline: a rise is the sign.", ""]
    return "\n".join(lines)


def ppo_section(rows: list[dict], done: dict | None, plot: Path | None, monitor: Path | None = None) -> str:
    if not rows:
        return ""
    rows = [r for r in rows if "ppo/kl" in r] or rows  # step 0: the monitor's SFT baseline only
    first, last = rows[: max(1, len(rows) // 10)], rows[-max(1, len(rows) // 10):]

    def mean(part, key):
        vals = [r[key] for r in part if key in r]
        return sum(vals) / len(vals) if vals else float("nan")

    lines = ["## PPO training", "",
             f"{rows[-1]['step']} steps. Mean over the first and last tenth of the steps:", "",
             "| | first | last |", "|---|---|---|"]
    for key, label in (("ppo/score", "RM score of rollouts"), ("ppo/kl", "KL to SFT (nats/answer)"),
                       ("ppo/reward", "total reward (normalised score − KL penalty)"),
                       ("ppo/response_length", "answer length"), ("ppo/entropy", "entropy"),
                       ("ppo/explained_variance", "value explained variance")):
        if key in rows[-1]:
            lines.append(f"| {label} | {mean(first, key):.3f} | {mean(last, key):.3f} |")
    if done and "perf/wall_s" in done:
        lines += ["", f"Wall time {done['perf/wall_s']:.0f} s, peak memory {done.get('perf/peak_rss_mb', 0):.0f} MB RSS"
                      + (f", {done['perf/peak_cuda_mb']:.0f} MB CUDA" if "perf/peak_cuda_mb" in done else "") + "."]
    if done and "kept_reason" in done:
        lines += ["", f"Policy kept: step {done['kept_step']} of {done.get('steps_run', '?')} run; "
                      f"{done['kept_reason']}."]
    lines.append("")
    if plot:
        lines += [f"![PPO training]({PLOTS}/{plot.name})", ""]
    if monitor:
        lines += ["Held-out monitor (the same prompts and seed at every point; step 0 is the SFT policy):", "",
                  f"![PPO held-out monitor]({PLOTS}/{monitor.name})", ""]
    return "\n".join(lines)


def rm_section(d: dict | None, plot: Path | None) -> str:
    if not d:
        return ""
    lines = ["## Reward model (held-out pairs)", "",
             f"Accuracy **{d['rm/accuracy']:.3f}** on {d['rm/n_pairs']} pairs, mean margin {d['rm/margin_mean']:.2f}, "
             f"expected calibration error {d['rm/ece']:.3f}, reward–length correlation {d['rm/length_corr']:.2f}."]
    if d.get("member_accuracy"):
        lines[-1] += (f" The reward is the mean of an ensemble of {len(d['member_accuracy'])} reward models, whose "
                      f"accuracies alone are {', '.join(f'{a:.3f}' for a in d['member_accuracy'])}.")
    tags = d.get("accuracy_by_tag")
    if tags:
        lines += ["", "| rejected answer's flaw | pairs | accuracy |", "|---|---|---|"]
        lines += [f"| {tag} | {v['n']} | {v['accuracy']:.3f} |" for tag, v in tags.items()]
    if d.get("selection"):
        lines += ["", f"Training {d['selection']}."]
    lines += probes_table(d)
    lines.append("")
    if plot:
        lines += [f"![Reward model calibration]({PLOTS}/{plot.name})", ""]
    return "\n".join(lines)


def probes_table(d: dict) -> list[str]:
    """The reward-hacking probes of the RM diagnostics and its warnings (lines of markdown)."""
    lines = []
    if d.get("probes"):
        lines += ["", "Reward-hacking probes: held-out chosen answers damaged in ways that make any answer worse; "
                  "a reward model that prefers the damaged answer teaches PPO to damage its answers.", "",
                  "| damage | answers | damaged preferred | mean margin (damaged − intact) |", "|---|---|---|---|"]
        lines += [f"| {name} | {v['n']} | {v['win_rate']:.3f} | {v['margin_mean']:+.2f} |" for name, v in d["probes"].items()]
    lines += [""] + [f"**Warning:** {w}." for w in d["warnings"]] if d.get("warnings") else []
    return lines


def samples_section(samples: list[dict], m: dict) -> str:
    decoding = next(iter(m["results"]))
    names = list(m["results"][decoding])
    by_prompt: dict[int, dict] = {}
    for s in samples:
        if s["decoding"] == decoding and s["prompt_index"] < m.get("examples", 8) and s.get("sample_index", 0) == 0:
            by_prompt.setdefault(s["prompt_index"], {"prompt": s["prompt"]})[s["checkpoint"]] = s
    if not by_prompt:
        return ""
    lines = [f"## Sample answers ({decoding})", "", "| prompt | " + " | ".join(names) + " |",
             "|---" * (len(names) + 1) + "|"]
    for i in sorted(by_prompt):
        row = by_prompt[i]
        cells = []
        for name in names:
            s = row.get(name)
            if s is None:
                cells.append("")
                continue
            scores = ", ".join(f"{label} {s[key]:.2f}" for key, label in (("gold", "gold"), ("reward", "RM"))
                               if key in s)
            cells.append(_cell(s["response"]) + (f" <sub>({scores})</sub>" if scores else ""))
        lines.append(f"| {_cell(row['prompt'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def method_section(m: dict) -> str:
    ckpts = ", ".join(f"`{c['name']}` ({c['kind']}{': ' + c['path'] if c.get('path') else ''})" for c in m["checkpoints"])
    judge = f"`{m['judge']}`" if m.get("judge") else "none"
    return "\n".join([
        "## How this was measured", "",
        f"- Checkpoints: {ckpts}.",
        f"- Reward model: {'the run' + chr(39) + 's RM stage' if m.get('reward_model') else 'not used'}; gold judge: {judge}.",
        f"- Seed {m.get('seed')} for every checkpoint. KL is log π(y|x) − log π_SFT(y|x) summed over the answer, "
        "on the checkpoint's own sampled answers at the sampling temperature (its mean estimates KL(π‖π_SFT)).",
        "- Win rate intervals: percentile bootstrap over prompts (2,000 resamples), pairs resampled together.",
        "- Machine-readable: `metrics.json` (this summary), `samples.jsonl` (every answer and score). "
        "`make report` redraws this page from them.", ""])


def _cell(text: str) -> str:
    return (text or "∅").replace("|", "\\|").replace("\n", " ")


def _figure(title: str, plot: Path | None, heading: str | None = None) -> str:
    if not plot:
        return ""
    return "\n".join(([heading, ""] if heading else []) + [f"![{title}]({PLOTS}/{plot.name})", ""])


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _jsonl(path: Path) -> list[dict]:
    return read_metrics(path) if path.is_file() else []


# ---------------------------------------------------------------- plots

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on clusters or CI
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Write the figure (atomically: a report never links a half-written image) and free it."""
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)  # laid out as it is drawn: the figures are made with layout="constrained"
    os.replace(tmp, path)
    _pyplot().close(fig)
    return path


def _tidy(ax) -> None:
    """The legend and grid every panel has."""
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_ppo(rows: list[dict], path: Path) -> Path:
    plt = _pyplot()
    panels = [(k, label) for k, label in (("ppo/score", "RM score of rollouts"), ("ppo/kl", "KL to SFT (nats)"),
                                          ("ppo/reward", "total reward"), ("ppo/response_length", "answer length"))
              if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False, layout="constrained")
    window = max(1, len(rows) // 20)
    for ax, (key, label) in zip(axes[0], panels):
        steps = [r["step"] for r in rows if key in r]
        values = [r[key] for r in rows if key in r]
        ax.plot(steps, values, color="tab:blue", alpha=0.3, linewidth=1)
        ax.plot(steps, _smooth(values, window), color="tab:blue", linewidth=2)
        ax.set_title(label)
        ax.set_xlabel("PPO step")
        ax.grid(alpha=0.3)
    return _save(fig, path)


MONITOR_PANELS = (("reward", "held-out RM score"), ("kl", "held-out KL to SFT (nats)"),
                  ("repeat", "repeat (degeneration)"), ("length", "answer length"))


def plot_monitor(rows: list[dict], path: Path) -> Path | None:
    """The `monitor/<decoding>/<name>` curves of PPO's metrics.jsonl, sampled and greedy answers together."""
    rows = [r for r in rows if any(k.startswith("monitor/") for k in r)]
    if not rows:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(MONITOR_PANELS), figsize=(4 * len(MONITOR_PANELS), 3.2), squeeze=False,
                             layout="constrained")
    for ax, (name, label) in zip(axes[0], MONITOR_PANELS):
        for decoding, color in (("sample", "tab:blue"), ("greedy", "tab:orange")):
            key = f"monitor/{decoding}/{name}"
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, color=color, label=decoding)
        ax.set_title(label)
        ax.set_xlabel("PPO step")
        _tidy(ax)
    return _save(fig, path)


def plot_distributions(samples: list[dict], m: dict, path: Path) -> Path | None:
    decoding = next(iter(m["results"]))
    names = list(m["results"][decoding])
    keys = [(k, label) for k, label in (("reward", "reward-model score"), ("gold", "gold-judge score"),
                                        ("kl", "KL to SFT (nats)")) if any(k in s for s in samples)]
    if not keys:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.4), squeeze=False, layout="constrained")
    for ax, (key, label) in zip(axes[0], keys):
        series = {name: [s[key] for s in samples if s["decoding"] == decoding and s["checkpoint"] == name and key in s]
                  for name in names}
        everything = [v for values in series.values() for v in values]
        low, high = min(everything), max(everything)
        edges = [low + (high - low) * i / 25 for i in range(26)] if high > low else 25  # the same bins for all
        for name, values in series.items():
            if values:
                ax.hist(values, bins=edges, histtype="step", linewidth=2, label=f"{name} (mean {sum(values) / len(values):.2f})")
        ax.set_title(f"{label}, {decoding} answers")
        ax.set_ylabel("answers")
        _tidy(ax)
    return _save(fig, path)


def plot_comparison(m: dict, path: Path) -> Path | None:
    """The gold win rate (the RM's without a judge) of each checkpoint, with its interval, against the wall
    time and the peak memory of the stage that produced it; None when no checkpoint has both."""
    decoding = next(iter(m["results"]))
    rows = m["results"][decoding]
    key = next((k for k in ("gold", "reward") if any(f"{k}_win_rate" in r for r in rows.values())), None)
    info = {c["name"]: c for c in m.get("checkpoints", [])}
    judged = [name for name, row in rows.items() if key and f"{key}_win_rate" in row]
    memory = "peak_cuda_mb" if judged and all("peak_cuda_mb" in info.get(n, {}) for n in judged) else "peak_rss_mb"
    panels = [(x, label, [n for n in judged if x in info.get(n, {})])
              for x, label in (("wall_s", "wall time of the stage (s)"),
                               (memory, f"peak {'GPU memory' if memory == 'peak_cuda_mb' else 'RSS'} of the stage (MB)"))]
    panels = [p for p in panels if p[2]]
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False, layout="constrained")
    color = {name: f"C{i}" for i, name in enumerate(judged)}  # a checkpoint's colour in every panel
    for ax, (x, label, names) in zip(axes[0], panels):
        for name in names:
            row, at = rows[name], info[name][x]
            rate = row[f"{key}_win_rate"]
            ax.errorbar([at], [rate], yerr=[[rate - row[f"{key}_win_rate_low"]], [row[f"{key}_win_rate_high"] - rate]],
                        fmt="o", capsize=4, color=color[name])
            ax.annotate(name, (at, rate), textcoords="offset points", xytext=(6, 4), fontsize=8)
        ax.axhline(0.5, color="gray", linestyle="--", linewidth=1, label=f"as good as {m['baseline']}")
        ax.set_xlim(0, 1.15 * max(info[n][x] for n in names))  # from 0: distances read as ratios
        ax.set_xlabel(label)
        ax.set_ylabel(f"{'gold-judge' if key == 'gold' else 'reward-model'} win rate")
        ax.set_ylim(0, 1)
        _tidy(ax)
    return _save(fig, path)


def plot_rm(d: dict, path: Path) -> Path | None:
    bins, tags = d.get("reliability") or [], d.get("accuracy_by_tag") or {}
    if not bins and not tags:
        return None
    plt = _pyplot()
    n = 1 + bool(tags)
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.6), squeeze=False, layout="constrained")
    ax = axes[0][0]
    ax.plot([0.5, 1], [0.5, 1], linestyle="--", color="gray", label="perfect calibration")
    if bins:
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", label="reward model")
    ax.set_xlabel("confidence σ(|r_a − r_b|)")
    ax.set_ylabel("observed accuracy")
    ax.set_title(f"calibration (ECE {d.get('rm/ece', float('nan')):.3f})")
    _tidy(ax)
    if tags:
        ax = axes[0][1]
        names = list(tags)
        ax.barh(names, [tags[t]["accuracy"] for t in names], color="tab:green")
        ax.set_xlim(0, 1)
        ax.axvline(0.5, color="gray", linestyle="--")
        ax.set_title("accuracy by flaw of the rejected answer")
    return _save(fig, path)


def plot_sft(rows: list[dict], path: Path) -> Path | None:
    series = {label: [(r["step"], r[key]) for r in rows if key in r]
              for key, label in (("train/loss", "train"), ("eval/loss", "held-out"))}
    if not any(series.values()):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2), layout="constrained")
    for label, points in series.items():
        if points:
            ax.plot(*zip(*points), marker="o" if len(points) < 20 else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)
