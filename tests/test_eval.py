"""make eval and make report: win rates on hand-made scores, the report from saved files, input errors, and
an end-to-end evaluation of base, SFT, PPO and an exported directory on the demo."""

import json
import shutil
import subprocess

import pytest

from conftest import ROOT, run_make, run_stage
from rlhf.config import ConfigError, EvalConfig
from rlhf.eval.checkpoints import parse_checkpoints
from rlhf.eval.report import render, verdict
from rlhf.eval.judging import summarize
from rlhf.checks import check_eval
from rlhf.config import PipelineConfig
from rlhf.eval.run import check_baseline, merge_in_order

PNG = b"\x89PNG\r\n\x1a\n"


def test_summarize_win_rates_and_intervals_on_hand_made_scores():
    scores = {
        "sft": {"reward": [0.0, 0.0, 0.0, 0.0], "gold": [0.5, 0.5, 0.5, 0.5], "kl": [0.0] * 4, "length": [4, 4, 4, 4]},
        "ppo": {"reward": [1.0, 1.0, 1.0, -1.0], "gold": [0.5, 0.9, 0.9, 0.9], "kl": [1.0, 2.0, 3.0, 2.0],
                "length": [6, 6, 6, 6]},
        "twin": {"reward": [0.0] * 4, "gold": [0.5] * 4, "kl": None, "length": [4, 4, 4, 4]},
    }
    out = summarize(scores, "sft")
    assert "reward_win_rate" not in out["sft"]                      # no win rate against itself
    assert out["ppo"]["reward_win_rate"] == 0.75                    # 3 wins, 1 loss
    assert out["ppo"]["gold_win_rate"] == pytest.approx(3.5 / 4)    # 3 wins, 1 tie
    assert out["twin"]["reward_win_rate"] == 0.5 and out["twin"]["gold_win_rate"] == 0.5
    assert out["twin"]["reward_win_rate_low"] == out["twin"]["reward_win_rate_high"] == 0.5  # all ties: no spread
    low, high = out["ppo"]["reward_win_rate_low"], out["ppo"]["reward_win_rate_high"]
    assert 0.0 <= low < 0.75 < high <= 1.0
    assert out["ppo"]["kl_mean"] == 2.0 and out["ppo"]["length_mean"] == 6.0
    assert "kl_mean" not in out["twin"]
    assert (verdict(0.6, 0.9), verdict(0.1, 0.4), verdict(0.4, 0.6)) == ("better", "worse", "no clear difference")


def test_answers_of_several_processes_merge_back_in_prompt_order():
    """Under accelerate launch, process r answers prompts r, r + W, ...; the merged lists follow the prompts."""
    def part(indices):
        return indices, {"sft": {"response": [f"a{i}" for i in indices], "reward": [float(i) for i in indices],
                                 "kl": None}}
    merged = merge_in_order([part([0, 2, 4]), part([1, 3])], 5)
    assert merged["sft"]["response"] == ["a0", "a1", "a2", "a3", "a4"]
    assert merged["sft"]["reward"] == [0.0, 1.0, 2.0, 3.0, 4.0] and merged["sft"]["kl"] is None


def test_several_answers_per_prompt_are_compared_pairwise_and_averaged_per_prompt():
    # 2 prompts x 3 answers: prompt 0 wins 2 of 3, prompt 1 ties 1 and loses 2 -> (2/3 + 1/6) / 2
    scores = {"sft": {"gold": [0.5, 0.5, 0.5, 0.5, 0.5, 0.5], "reward": None, "kl": None, "length": [1] * 6},
              "ppo": {"gold": [1.0, 1.0, 0.0, 0.5, 0.0, 0.0], "reward": None, "kl": None, "length": [1] * 6}}
    row = summarize(scores, "sft", group=3)["ppo"]
    assert row["gold_win_rate"] == pytest.approx((2 / 3 + 1 / 6) / 2)
    assert row["gold_mean"] == pytest.approx(2.5 / 6) and row["n"] == 6
    with pytest.raises(ValueError, match="groups of 4"):
        summarize(scores, "sft", group=4)


def write_saved_run(run_dir, with_optional=True):
    """The files the stages save, made by hand: what `make report` renders from."""
    (run_dir / "eval").mkdir(parents=True)
    results = {"sample": {
        "sft": {"n": 3, "reward_mean": -1.0, "reward_std": 0.5, "gold_mean": 0.5, "gold_std": 0.1, "kl_mean": 0.0,
                "kl_std": 0.0, "length_mean": 8.0, "length_std": 1.0},
        "ppo": {"n": 3, "reward_mean": 0.7, "reward_std": 0.4, "gold_mean": 0.8, "gold_std": 0.1, "kl_mean": 1.234,
                "kl_std": 0.3, "length_mean": 9.0, "length_std": 1.0,
                "reward_win_rate": 0.861, "reward_win_rate_low": 0.812, "reward_win_rate_high": 0.905,
                "gold_win_rate": 0.777, "gold_win_rate_low": 0.731, "gold_win_rate_high": 0.819}}}
    metrics = {"run_dir": str(run_dir), "n_prompts": 3, "prompts_file": "p.jsonl", "baseline": "sft",
               "judge": "rlhf.demo.task:gold_score", "reward_model": True,
               "checkpoints": [{"name": "sft", "kind": "sft", "path": "x"}, {"name": "ppo", "kind": "adapter", "path": "y"}],
               "decoding": {"sample": {"max_new_tokens": 12, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "do_sample": True}},
               "seed": 1, "examples": 2, "results": results}
    (run_dir / "eval" / "metrics.json").write_text(json.dumps(metrics))
    if not with_optional:
        return
    samples = [{"decoding": "sample", "checkpoint": c, "prompt_index": i, "prompt": f"list {i} | things",
                "response": f"answer {c} {i}", "reward": r, "gold": g, "kl": 0.1 * i, "length": 8}
               for c, r, g in (("sft", -1.0, 0.5), ("ppo", 0.7, 0.8)) for i in range(3)]
    (run_dir / "eval" / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    (run_dir / "ppo").mkdir()
    (run_dir / "ppo" / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "ppo/score": -1 + s / 10, "ppo/kl": s / 20, "ppo/reward": s / 30,
                    "ppo/response_length": 8.0}) + "\n" for s in range(1, 21)))
    (run_dir / "ppo" / "DONE").write_text(json.dumps({"perf/wall_s": 125.0, "perf/peak_rss_mb": 900.0}))
    (run_dir / "rm").mkdir()
    (run_dir / "rm" / "diagnostics.json").write_text(json.dumps({
        "rm/accuracy": 0.957, "rm/n_pairs": 400, "rm/margin_mean": 3.1, "rm/ece": 0.06, "rm/length_corr": 0.1,
        "reliability": [{"low": 0.5, "high": 0.75, "n": 100, "confidence": 0.62, "accuracy": 0.66},
                        {"low": 0.75, "high": 1.0, "n": 300, "confidence": 0.93, "accuracy": 0.95}],
        "accuracy_by_tag": {"repeat": {"n": 50, "accuracy": 0.91}, "too_few": {"n": 60, "accuracy": 0.99}}}))
    (run_dir / "sft").mkdir()
    (run_dir / "sft" / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "train/loss": 3 - s / 10}) + "\n" for s in range(1, 6))
        + json.dumps({"step": 5, "eval/loss": 2.6}) + "\n")


def test_report_renders_from_saved_metrics_with_plots(tmp_path):
    write_saved_run(tmp_path)
    path = render(tmp_path)
    text = path.read_text()
    assert path == tmp_path / "eval" / "report.md"
    # the headline: gold win rate with its interval, the RM's estimate next to it, the KL
    assert "gold-judge win rate **0.777 (0.731–0.819)**, better" in text
    assert "reward-model win rate 0.861 (0.812–0.905)" in text and "KL to SFT 1.23 nats" in text
    assert "Accuracy **0.957** on 400 pairs" in text and "| repeat | 50 | 0.910 |" in text
    assert "answer ppo 1" in text and "list 1 \\| things" in text  # sample table, pipes escaped
    assert "Wall time 125 s" in text
    for name in ("ppo_training", "score_distributions", "rm_calibration", "sft_loss"):
        png = tmp_path / "eval" / "plots" / f"{name}.png"
        assert f"(plots/{name}.png)" in text and png.read_bytes()[:8] == PNG, name
    assert "answer sft 2" not in text  # only `examples` prompts in the table


def test_report_without_plots_has_the_same_text_and_no_figures(tmp_path):
    """eval.plots=false: the report's text, with no figure linked and no plots/ directory."""
    write_saved_run(tmp_path)
    with_plots = render(tmp_path).read_text()
    shutil.rmtree(tmp_path / "eval" / "plots")
    text = render(tmp_path, plots=False).read_text()
    assert "![" not in text and not (tmp_path / "eval" / "plots").exists()
    assert "gold-judge win rate **0.777 (0.731–0.819)**, better" in text and "Wall time 125 s" in text
    figures = [line for line in with_plots.splitlines() if line.startswith("![")]
    assert len(figures) >= 4
    # the same text but for the figures (and the SFT section, which is its loss figure alone)
    kept = [line for line in with_plots.splitlines() if line and line not in figures and line != "## SFT"]
    assert [line for line in text.splitlines() if line] == kept


def test_report_renders_without_the_optional_files(tmp_path):
    write_saved_run(tmp_path, with_optional=False)
    text = render(tmp_path).read_text()
    assert "gold-judge win rate **0.777" in text
    assert "## PPO training" not in text and "## Reward model" not in text and "![" not in text


def test_report_without_metrics_says_to_run_eval(tmp_path):
    with pytest.raises(FileNotFoundError, match="make eval"):
        render(tmp_path)
    proc = run_stage("report", f"run_dir={tmp_path}", check=False)
    assert proc.returncode == 2 and "make eval" in proc.stderr


def test_adapter_checkpoints_from_other_sft_weights_are_refused(tmp_path):
    """Adapters go over this run's SFT model: an SFT adapter (over the base) or another run's PPO policy
    (over that run's SFT model) would be judged on weights it was not trained over."""
    def run(name, sft_weights):
        d = tmp_path / name
        (d / "sft").mkdir(parents=True)
        (d / "sft" / "DONE").write_text("ok\n")
        (d / "sft" / "adapter_model.safetensors").write_bytes(sft_weights)
        (d / "sft" / "adapter_config.json").write_text("{}")
        (d / "ppo" / "checkpoints" / "step-10" / "policy").mkdir(parents=True)
        (d / "ppo" / "checkpoints" / "step-10" / "policy" / "adapter_config.json").write_text("{}")
        return d

    here, other, twin = run("here", b"sft A"), run("other", b"sft B"), run("twin", b"sft A")
    ckpt = "ppo/checkpoints/step-10/policy"
    with pytest.raises(ConfigError, match="trained over the SFT model of .*other"):
        parse_checkpoints([f"p={other / ckpt}"], here)
    with pytest.raises(ConfigError, match="is an SFT adapter"):
        parse_checkpoints([f"s={here / 'sft'}"], here)
    with pytest.raises(ConfigError, match="is an SFT adapter"):
        parse_checkpoints([f"s={other / 'sft'}"], here)
    # the same SFT weights (a copied run), this run's own checkpoints, and adapters outside any run load
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "adapter_config.json").write_text("{}")
    kinds = parse_checkpoints([f"t={twin / ckpt}", f"h={here / ckpt}", str(tmp_path / "loose")], here)
    assert [c.kind for c in kinds] == ["adapter"] * 3


def test_checkpoint_and_eval_config_errors_name_the_key(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"neither base, sft, ppo, dpo \(or one with `\?`\) nor a directory"):
        parse_checkpoints(["nowhere/at/all"], tmp_path)
    with pytest.raises(ConfigError, match="neither a model"):
        parse_checkpoints([str(tmp_path / "empty")], tmp_path)
    with pytest.raises(FileNotFoundError, match="make ppo"):
        parse_checkpoints(["ppo"], tmp_path)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert parse_checkpoints([f"mine={tmp_path / 'm'}", "base"], tmp_path)[0].kind == "model"
    with pytest.raises(ConfigError, match="names must differ"):  # a directory's name is its last part
        check_eval(PipelineConfig(eval=EvalConfig(checkpoints=["sft", str(tmp_path / "m"), f"m={tmp_path}"])))
    ckpts = parse_checkpoints(["base"], tmp_path)
    with pytest.raises(ConfigError, match="eval.baseline 'sft'"):
        check_baseline(EvalConfig(), ckpts)
    for settings, message in (({"checkpoints": ["base"]}, "eval.baseline 'sft'"),
                              ({"baseline": "base", "decoding": ["beam"]}, "eval.decoding"),
                              ({"baseline": "base", "samples_per_prompt": 0}, "samples_per_prompt"),
                              ({"checkpoints": ["base", "x=base", "x=sft"]}, "names must differ"),
                              ({"engine": "tgi"}, "eval.engine must be one of hf, vllm")):
        with pytest.raises(ConfigError, match=message):
            check_eval(PipelineConfig(eval=EvalConfig(**settings)))
    check_eval(PipelineConfig(eval=EvalConfig(checkpoints=["base", "sft", "dpo?", f"mine={tmp_path}"])))


def test_eval_stage_rejects_bad_input_before_loading_a_model(demo_dir, tmp_path):
    proc = run_stage("eval", f"run_dir={tmp_path}", "checkpoints=[base]", "baseline=base", "reward_model=false",
                     "prompts_file=tests/data_bad/wrong_type_messages.jsonl", check=False)
    assert proc.returncode == 2, proc.stderr
    assert "wrong_type_messages.jsonl: row 3: field 'messages'" in proc.stderr
    proc = run_stage("eval", f"run_dir={tmp_path}", check=False)  # sft and ppo checkpoints need their stages
    assert proc.returncode == 2 and "run `make sft` first" in proc.stderr
    assert not (tmp_path / "eval").exists()


@pytest.mark.slow
def test_eval_judges_base_sft_ppo_and_an_exported_directory(ppo_run, tmp_path):
    """`make eval` on the demo run, with the PPO policy also given as a merged export: the export answers
    exactly as the adapter does, SFT has KL 0 to itself, PPO beats SFT, and the report is drawn."""
    export = tmp_path / "export-ppo"
    run_stage("export", f"run_dir={ppo_run}", "stage=ppo", f"out_dir={export}")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for stage in ("sft", "rm", "ppo"):
        (run_dir / stage).symlink_to(ppo_run / stage)
    proc = run_stage("eval", f"run_dir={run_dir}", f"checkpoints=[base,sft,ppo,exported={export}]", "samples=64",
                     "samples_per_prompt=2")
    out = run_dir / "eval"
    m = json.loads((out / "metrics.json").read_text())
    sample, greedy = m["results"]["sample"], m["results"]["greedy"]
    assert list(sample) == ["base", "sft", "ppo", "exported"]
    assert sample["sft"]["kl_mean"] == 0.0                      # the reference is the SFT model itself
    assert sample["ppo"]["kl_mean"] > 0
    assert sample["ppo"]["gold_win_rate"] > 0.6 and sample["ppo"]["reward_win_rate"] > 0.6
    assert sample["base"]["gold_mean"] < sample["sft"]["gold_mean"]
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == (2 + 1) * 4 * 64  # 2 sampled answers and 1 greedy per prompt and checkpoint
    for decoding in ("sample", "greedy"):
        answers = {c: [r for r in rows if r["decoding"] == decoding and r["checkpoint"] == c] for c in ("ppo", "exported")}
        assert [r["response"] for r in answers["ppo"]] == [r["response"] for r in answers["exported"]]
        for a, b in zip(answers["ppo"], answers["exported"]):
            assert a["reward"] == pytest.approx(b["reward"], abs=1e-4) and a["gold"] == b["gold"]
            assert decoding == "greedy" or a["kl"] == pytest.approx(b["kl"], abs=1e-3)
    assert greedy["exported"]["gold_win_rate"] == greedy["ppo"]["gold_win_rate"]
    text = (out / "report.md").read_text()
    assert "**ppo** vs sft" in text and "**exported** vs sft" in text and "## PPO training" in text
    assert all((out / "plots" / f"{p}.png").is_file() for p in ("ppo_training", "score_distributions", "rm_calibration"))
    assert (out / "DONE").is_file() and "ppo" in proc.stdout

    # make report redraws the page from the saved files alone
    (out / "report.md").unlink()
    shutil.rmtree(out / "plots")
    subprocess.run(run_make("report", run_dir), cwd=ROOT, check=True, capture_output=True)
    assert (out / "report.md").read_text() == text and (out / "plots" / "ppo_training.png").is_file()


def test_report_names_a_reward_ensemble_and_its_members(tmp_path):
    write_saved_run(tmp_path)
    diag_path = tmp_path / "rm" / "diagnostics.json"
    diag_path.write_text(json.dumps(json.loads(diag_path.read_text()) | {"member_accuracy": [0.95, 0.94, 0.96]}))
    text = render(tmp_path).read_text()
    assert "mean of an ensemble of 3 reward models, whose accuracies alone are 0.950, 0.940, 0.960" in text


def test_report_shows_the_rm_probes_selection_and_warnings(tmp_path):
    write_saved_run(tmp_path)
    diag_path = tmp_path / "rm" / "diagnostics.json"
    extra = {"probes": {"repeat": {"n": 50, "win_rate": 0.4, "margin_mean": 0.12}},
             "warnings": ["the RM prefers a 'repeat' damaged answer"],
             "selection": "kept the best checkpoint (held-out accuracy 0.830, loss 0.400) at epoch 3 (step 30) of at most 8 epochs"}
    diag_path.write_text(json.dumps(json.loads(diag_path.read_text()) | extra))
    text = render(tmp_path).read_text()
    assert "| repeat | 50 | 0.400 | +0.12 |" in text
    assert "**Warning:** the RM prefers a 'repeat' damaged answer." in text
    assert "Training kept the best checkpoint (held-out accuracy 0.830" in text


def test_report_warns_at_the_top_shows_degeneration_and_the_ppo_monitor(tmp_path):
    """A PPO checkpoint worse than SFT by the gold judge, whose greedy answers degenerate: both said in the
    first lines; degeneration columns per checkpoint and decoding; the monitor curves and the kept step."""
    write_saved_run(tmp_path)
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    ppo = m["results"]["sample"]["ppo"]
    ppo |= {"gold_win_rate": 0.39, "gold_win_rate_low": 0.35, "gold_win_rate_high": 0.43}
    degen = {"repeat_mean": 0.05, "repeat_std": 0.1, "dominated_mean": 0.0, "distinct_answers": 1.0}
    m["results"]["greedy"] = {"sft": {**m["results"]["sample"]["sft"], **degen},
                              "ppo": {**ppo, **degen, "repeat_mean": 0.4, "distinct_answers": 0.2,
                                      "gold_win_rate_high": 0.6}}
    for name in ("sft", "ppo"):
        m["results"]["sample"][name] |= degen
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps(m))
    rows = [{"step": s, "monitor/sample/reward": s / 10, "monitor/greedy/reward": s / 9, "monitor/sample/kl": s / 20,
             "monitor/sample/repeat": 0.05, "monitor/greedy/repeat": 0.05 + s / 100, "monitor/sample/length": 8,
             "monitor/greedy/length": 8} for s in (0, 10, 20)]
    with open(tmp_path / "ppo" / "metrics.jsonl", "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "ppo" / "DONE").write_text(json.dumps({"steps_run": 20, "kept_step": 10,
                                                        "kept_reason": "kept the policy of step 10: why"}))
    text = render(tmp_path).read_text()
    head = text.splitlines()[:6]
    assert any("**Warning:** **ppo** is worse than **sft** by the gold judge (sample answers" in h for h in head)
    assert any("**ppo**: greedy answers degenerate: repeat 0.400 vs 0.050" in h for h in head)
    assert "| repeat | dominated | distinct answers |" in text and "| 0.400 ± 0.100 | 0.00 | 0.20 |" in text
    assert "Policy kept: step 10 of 20 run; kept the policy of step 10: why." in text
    assert (tmp_path / "eval" / "plots" / "ppo_monitor.png").read_bytes()[:8] == PNG
    assert "(plots/ppo_monitor.png)" in text


def test_the_verdict_line_leads_with_sampled_and_greedy_against_sft():
    """The report's first line after its title: whether the kept PPO policy beats SFT on sampled and on greedy
    answers, which step was kept and why; SFT's own weights kept read as no improvement."""
    from rlhf.eval.report import summary_section, verdict_line

    def rate(w, lo, hi):
        return {"gold_win_rate": w, "gold_win_rate_low": lo, "gold_win_rate_high": hi, "length_mean": 8.0}

    m = {"baseline": "sft", "run_dir": "r", "n_prompts": 200, "prompts_file": "p", "judge": "j",
         "results": {"sample": {"sft": {"length_mean": 8.0}, "ppo": rate(0.78, 0.74, 0.82)},
                     "greedy": {"sft": {"length_mean": 8.0}, "ppo": rate(0.47, 0.40, 0.54)}}}
    done = {"kept_step": 20, "steps_run": 30, "kept_reason": "kept the policy of step 20: why"}
    line = verdict_line(m, done)
    assert line.startswith("**Verdict: the kept ppo policy (step 20 of 30 kept) beats sft on sample answers, not "
                           "on greedy answers.** sample: gold-judge win rate 0.780 (0.740–0.820), better; greedy: "
                           "gold-judge win rate 0.470 (0.400–0.540), no clear difference.")
    assert line.endswith("Kept: kept the policy of step 20: why.")
    assert summary_section(m, done).splitlines()[2] == line
    m["results"]["greedy"]["ppo"] = rate(0.6, 0.55, 0.65)
    assert "policy (step 20 of 30 kept) beats sft on sample and greedy answers.**" in verdict_line(m, done)
    m["results"]["sample"]["ppo"] = m["results"]["greedy"]["ppo"] = rate(0.45, 0.40, 0.50)
    assert "policy (step 20 of 30 kept) does not beat sft on sample or greedy answers.**" in verdict_line(m, done)
    sft_kept = verdict_line(m, {"kept_step": 0, "steps_run": 30, "kept_reason": "kept SFT (step 0), no improvement"})
    assert sft_kept.startswith("**Verdict: no improvement: the PPO stage kept sft's weights (step 0).**")
    assert verdict_line({"baseline": "sft", "results": {"sample": {"sft": {}}}}, done) is None
