"""make eval's comparison of checkpoints from several algorithms: the stage behind each checkpoint (algorithm,
wall time, peak memory from its DONE), the report's table and plot, and `make compare`."""

import json
import os
import shutil
import subprocess

import pytest

from conftest import ROOT, run_make, small_demo_files, small_file_args
from rlhf.eval.checkpoints import Checkpoint, parse_checkpoints, provenance
from rlhf.eval.report import render

PNG = b"\x89PNG\r\n\x1a\n"
ENV = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}


def stage(d, summary, config=None, adapter=False):
    """A finished stage directory made by hand: DONE with `summary`, optionally config.yaml and an adapter."""
    d.mkdir(parents=True)
    (d / "DONE").write_text(json.dumps(summary) + "\n")
    if config is not None:
        (d / "config.yaml").write_text(config)
    if adapter:
        (d / "adapter_config.json").write_text("{}")
    return d


def perf(wall, rss, cuda=None):
    return {"finished": "2025-01-01T00:00:00", "perf/wall_s": wall, "perf/peak_rss_mb": rss,
            **({"perf/peak_cuda_mb": cuda} if cuda is not None else {})}


def test_each_checkpoint_is_traced_to_the_stage_that_produced_it(tmp_path):
    run, grpo = tmp_path / "demo", tmp_path / "demo-grpo"
    stage(run / "sft", perf(30.0, 700.0), adapter=True)
    (run / "sft" / "adapter_model.safetensors").write_bytes(b"sft A")
    stage(run / "ppo", perf(125.0, 1242.0), config="ppo:\n  estimator: gae\n")
    stage(run / "dpo", perf(60.0, 900.0, cuda=512.0), adapter=True)
    shutil.copytree(run / "sft", grpo / "sft")  # the same SFT weights: grpo's policy is judged over this run's
    stage(grpo / "ppo", perf(80.0, 1100.0), config="ppo:\n  estimator:\n    name: grpo\n    std_norm: true\n")
    (grpo / "ppo" / "policy").mkdir()
    (grpo / "ppo" / "policy" / "adapter_config.json").write_text("{}")
    stage(tmp_path / "export-ppo", {"stage": "ppo", **perf(9.0, 400.0)}, adapter=False)
    (tmp_path / "export-ppo" / "config.json").write_text("{}")
    (run / "ppo" / "policy").mkdir()
    (run / "ppo" / "policy" / "adapter_config.json").write_text("{}")

    ckpts = parse_checkpoints(["base", "sft", "ppo", "dpo", f"grpo={grpo / 'ppo' / 'policy'}",
                               f"exported={tmp_path / 'export-ppo'}"], run)
    got = {c.name: provenance(c, run) for c in ckpts}
    assert got["base"] == {"algorithm": "base"}
    assert got["sft"] == {"stage": str(run / "sft"), "algorithm": "SFT", "wall_s": 30.0, "peak_rss_mb": 700.0}
    assert got["ppo"] == {"stage": str(run / "ppo"), "algorithm": "PPO (GAE)", "wall_s": 125.0, "peak_rss_mb": 1242.0}
    assert got["dpo"] == {"stage": str(run / "dpo"), "algorithm": "DPO", "wall_s": 60.0, "peak_rss_mb": 900.0,
                          "peak_cuda_mb": 512.0}
    assert got["grpo"]["stage"] == str(grpo / "ppo") and got["grpo"]["algorithm"] == "GRPO"
    assert got["grpo"]["wall_s"] == 80.0
    assert got["exported"]["algorithm"] == "ppo export" and got["exported"]["wall_s"] == 9.0

    # Dr. GRPO, RLOO, and a PPO stage without a readable config
    (grpo / "ppo" / "config.yaml").write_text("ppo:\n  estimator: grpo\n  grpo_std_norm: false\n")
    assert provenance(ckpts[4], run)["algorithm"] == "Dr. GRPO"
    (grpo / "ppo" / "config.yaml").write_text("ppo:\n  estimator:\n    name: grpo\n    std_norm: false\n    grpo_kl: reward\n")
    assert provenance(ckpts[4], run)["algorithm"] == "Dr. GRPO, KL in reward"
    (grpo / "ppo" / "config.yaml").write_text("ppo:\n  estimator: rloo\n")
    assert provenance(ckpts[4], run)["algorithm"] == "RLOO"
    (grpo / "ppo" / "config.yaml").unlink()
    assert provenance(ckpts[4], run)["algorithm"] == "ppo"


def test_a_checkpoint_without_a_finished_stage_has_no_cost(tmp_path):
    """No DONE, a DONE that is not a summary, a summary without perf: blanks, never an error."""
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "adapter_config.json").write_text("{}")
    assert provenance(Checkpoint("loose", "adapter", str(loose)), tmp_path) == {}
    (loose / "DONE").write_text("ok\n")  # a data directory's marker
    assert provenance(Checkpoint("loose", "adapter", str(loose)), tmp_path) == {}
    (loose / "DONE").write_text(json.dumps({"finished": "x"}))  # a stage from before perf was recorded
    assert provenance(Checkpoint("loose", "adapter", str(loose)), tmp_path) == {"stage": str(loose),
                                                                              "algorithm": "loose"}
    assert provenance(Checkpoint("sft", "sft", str(tmp_path / "sft")), tmp_path) == {}


def saved_eval(run_dir, checkpoints, gold=True):
    """eval/metrics.json as `make eval` writes it, by hand: sft the baseline, ppo/grpo/dpo judged against it."""
    def judged(rate, low, high, kl, length):
        row = {"n": 8, "reward_mean": 0.5, "reward_std": 0.1, "kl_mean": kl, "kl_std": 0.1, "length_mean": length,
               "length_std": 1.0, "reward_win_rate": rate + 0.05, "reward_win_rate_low": low + 0.05,
               "reward_win_rate_high": high + 0.05}
        if gold:
            row |= {"gold_mean": 0.8, "gold_std": 0.1, "gold_win_rate": rate, "gold_win_rate_low": low,
                    "gold_win_rate_high": high}
        return row
    sft = {"n": 8, "reward_mean": -1.0, "reward_std": 0.1, "kl_mean": 0.0, "kl_std": 0.0, "length_mean": 8.0,
           "length_std": 1.0, **({"gold_mean": 0.5, "gold_std": 0.1} if gold else {})}
    results = {"sample": {"base": judged(0.2, 0.15, 0.25, 3.0, 11.0) | {"kl_mean": 3.0}, "sft": sft,
                          "ppo": judged(0.775, 0.74, 0.81, 1.26, 9.0), "grpo": judged(0.8, 0.76, 0.84, 0.9, 8.5),
                          "dpo": judged(0.6, 0.55, 0.65, 0.4, 8.1)}}
    metrics = {"run_dir": str(run_dir), "n_prompts": 8, "prompts_file": "p.jsonl", "baseline": "sft",
               "judge": "rlhf.demo.task:gold_score" if gold else None, "reward_model": True,
               "checkpoints": checkpoints,
               "decoding": {"sample": {"max_new_tokens": 12, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                                       "do_sample": True, "answers_per_prompt": 4}},
               "seed": 1, "examples": 2, "results": results}
    (run_dir / "eval").mkdir(parents=True)
    (run_dir / "eval" / "metrics.json").write_text(json.dumps(metrics))


COSTS = [{"name": "base", "kind": "base", "path": None, "algorithm": "base"},
         {"name": "sft", "kind": "sft", "path": "r/sft", "stage": "r/sft", "algorithm": "SFT", "wall_s": 30.4,
          "peak_rss_mb": 700.2},
         {"name": "ppo", "kind": "adapter", "path": "r/ppo/policy", "stage": "r/ppo", "algorithm": "PPO (GAE)",
          "wall_s": 125.0, "peak_rss_mb": 1242.0},
         {"name": "grpo", "kind": "adapter", "path": "r-grpo/ppo/policy", "stage": "r-grpo/ppo", "algorithm": "GRPO",
          "wall_s": 1500.0, "peak_rss_mb": 1100.0},
         {"name": "dpo", "kind": "adapter", "path": "r/dpo"}]  # no finished stage recorded its cost


def comparison_rows(text):
    section = text.split("## Comparison: quality and cost (sample decoding)")[1].split("\n## ")[0]
    return section, {line.split(" | ")[0].strip("| "): line for line in section.splitlines() if line.startswith("| ")}


def test_report_compares_quality_and_cost_in_one_table_and_plot(tmp_path):
    saved_eval(tmp_path, COSTS)
    text = render(tmp_path).read_text()
    section, rows = comparison_rows(text)
    assert rows["checkpoint"] == ("| checkpoint | algorithm | gold win rate | RM win rate | KL to SFT | length | "
                                  "stage wall time | peak RSS |")
    assert rows["ppo"] == ("| ppo | PPO (GAE) | 0.775 (0.740–0.810) | 0.825 (0.790–0.860) | 1.26 | 9.0 | 125 s | "
                           "1,242 MB |")
    assert rows["grpo"] == "| grpo | GRPO | 0.800 (0.760–0.840) | 0.850 (0.810–0.890) | 0.90 | 8.5 | 1,500 s | 1,100 MB |"
    assert rows["sft"] == "| sft | SFT | (baseline) | (baseline) | 0.00 | 8.0 | 30 s | 700 MB |"
    assert rows["base"].endswith("| 11.0 |  |  |") and "| base | base |" in rows["base"]
    assert rows["dpo"] == "| dpo |  | 0.600 (0.550–0.650) | 0.650 (0.600–0.700) | 0.40 | 8.1 |  |  |"  # blanks
    assert "(plots/comparison.png)" in section
    assert (tmp_path / "eval" / "plots" / "comparison.png").read_bytes()[:8] == PNG
    assert text.index("## Comparison") < text.index("## All results")


def test_comparison_shows_gpu_memory_and_rm_win_rates_without_a_judge(tmp_path):
    costs = [c | ({"peak_cuda_mb": 2048.0} if c["name"] == "ppo" else {}) for c in COSTS]
    saved_eval(tmp_path, costs, gold=False)
    section, rows = comparison_rows(render(tmp_path).read_text())
    assert "gold win rate" not in rows["checkpoint"] and rows["checkpoint"].endswith("| peak RSS | peak GPU memory |")
    assert rows["ppo"].endswith("| 125 s | 1,242 MB | 2,048 MB |") and rows["grpo"].endswith("| 1,100 MB |  |")
    assert (tmp_path / "eval" / "plots" / "comparison.png").is_file()


def test_metrics_without_costs_still_render_without_the_plot(tmp_path):
    """An evaluation from before costs were recorded (or of loose directories): the table, no plot."""
    saved_eval(tmp_path, [{"name": n, "kind": "adapter", "path": n} for n in ("base", "sft", "ppo", "grpo", "dpo")])
    text = render(tmp_path).read_text()
    section, rows = comparison_rows(text)
    assert rows["ppo"].endswith("| 9.0 |  |  |") and "comparison.png" not in text
    assert not (tmp_path / "eval" / "plots" / "comparison.png").exists()


def make_n(*args):
    out = subprocess.run(["make", "-n", "--no-print-directory", "-o", ".venv/.installed", "-o", "data/demo/DONE",
                          "PY=python", *args], cwd=ROOT, capture_output=True, text=True, check=True, env=ENV).stdout
    return out.splitlines()


def test_make_compare_dry_run_lists_the_demo_the_estimators_and_one_eval():
    lines = make_n("RUN=/nowhere/demo", "compare", "ARGS=ppo.steps=2 run_dir=/nowhere/demo")
    stages = [line for line in lines if "-m stages." in line]
    assert [line.split()[2] for line in stages] == ["stages.sft", "stages.rm", "stages.ppo", "stages.dpo",
                                                    "stages.ppo", "stages.ppo", "stages.eval"]
    assert stages[2].endswith("run_dir=/nowhere/demo ppo.eval_samples=0 ppo.steps=2 run_dir=/nowhere/demo")
    # the estimators' runs: their own config and run dir (run_dir= of ARGS left out), RUN's SFT and RM copied in
    assert stages[4] == ("python -m stages.ppo --config configs/demo-grpo.yaml run_dir=/nowhere/demo-grpo "
                         "ppo.eval_samples=0 ppo.steps=2")
    assert "--config configs/demo-rloo.yaml run_dir=/nowhere/demo-rloo" in stages[5]
    for e in ("grpo", "rloo"):
        for s in ("sft", "rm"):
            assert any(f"cp -Rp /nowhere/demo/{s} /nowhere/demo-{e}/{s}.copy" in line for line in lines), (e, s)
    assert ("'eval.checkpoints=[base,sft,ppo,dpo,\"grpo=/nowhere/demo-grpo/ppo/policy\","
            "\"rloo=/nowhere/demo-rloo/ppo/policy\"]'") in stages[6]
    assert "--config configs/demo.yaml run_dir=/nowhere/demo" in stages[6]
    # COMPARE picks the estimators
    stages = [line for line in make_n("RUN=/nowhere/demo", "compare", "COMPARE=grpo") if "-m stages." in line]
    assert [line.split()[2] for line in stages][-2:] == ["stages.ppo", "stages.eval"]
    assert "rloo" not in " ".join(stages)


def test_make_compare_copies_only_missing_stages(tmp_path):
    """RUN's finished SFT and RM go to <RUN>-grpo where it has none; a finished stage there stays as it is,
    and an unfinished one is an error (nothing is overwritten)."""
    run = tmp_path / "demo"
    stage(run / "sft", perf(30.0, 700.0), adapter=True)
    stage(run / "rm", perf(90.0, 800.0))
    stage(tmp_path / "demo-grpo" / "rm", {"mine": True})
    targets = [str(tmp_path / "demo-grpo" / s / "DONE") for s in ("sft", "rm")]
    cmd = run_make(targets[0], run) + [targets[1], "COMPARE=grpo"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "demo-grpo" / "sft" / "adapter_config.json").is_file()
    assert json.loads((tmp_path / "demo-grpo" / "sft" / "DONE").read_text())["perf/wall_s"] == 30.0
    assert json.loads((tmp_path / "demo-grpo" / "rm" / "DONE").read_text()) == {"mine": True}
    assert not list(tmp_path.glob("demo-grpo/*.copy"))

    shutil.rmtree(tmp_path / "demo-grpo" / "sft")
    (tmp_path / "demo-grpo" / "sft" / "checkpoints").mkdir(parents=True)  # a stage started there
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=ENV)
    assert proc.returncode != 0 and "demo-grpo/sft holds an unfinished stage" in proc.stderr
    assert list((tmp_path / "demo-grpo" / "sft").iterdir()) == [tmp_path / "demo-grpo" / "sft" / "checkpoints"]


def test_make_compare_judges_again_over_a_finished_eval_and_then_rests(tmp_path):
    """Every stage finished (DONE files by hand; PY=echo shows the command instead of running it): only eval runs,
    with --force over the finished `make demo` eval, and once COMPARED marks it, make compare has nothing to do."""
    run = tmp_path / "demo"
    for d in (run / "sft", run / "rm", run / "ppo", run / "dpo", tmp_path / "demo-grpo" / "sft",
              tmp_path / "demo-grpo" / "rm", tmp_path / "demo-grpo" / "ppo", run / "eval"):
        stage(d, perf(1.0, 1.0))  # created in this order: each newer than what it is built on
    cmd = run_make("compare", run) + ["COMPARE=grpo", "PY=echo"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=ENV, check=True).stdout
    ran = [line for line in out.splitlines() if line.startswith("-m stages.")]
    assert len(ran) == 1 and ran[0].startswith("-m stages.eval ") and ran[0].endswith(" --force"), out
    assert (run / "eval" / "COMPARED").read_text().startswith('[base,sft,ppo,dpo,"grpo=')
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=ENV, check=True).stdout
    assert "stages." not in out and "Nothing to be done for 'compare'" in out, out


@pytest.mark.slow
@pytest.mark.xdist_group("chain")  # long, and it waits for the chain: right after the test that builds it
@pytest.mark.early(1)
def test_make_compare_on_the_demo_with_a_few_steps(ppo_run, demo_dir, tmp_path):
    """The demo's finished SFT, RM and PPO (GAE) copied in, as after `make demo`; make compare trains DPO and an
    estimator's run (COMPARE=rloo: the default list's commands are checked above, dry) for a few steps and
    judges all of them in one report whose table names each algorithm and its stage's cost."""
    run = tmp_path / "demo"
    for s in ("sft", "rm", "ppo"):
        shutil.copytree(ppo_run / s, run / s)  # copy2: timestamps kept, make sees them finished in order
    f = small_demo_files(demo_dir, tmp_path / "data")  # DPO tokenizes its whole file (18000 pairs) before step 1
    args = ("ppo.steps=2 ppo.sampling.rollout_batch_size=16 ppo.reward.norm_samples=16 ppo.monitor.prompts=8 "
            + " ".join(small_file_args(f, "dpo")) + " dpo.train.max_steps=2 "
            "eval.samples=6 eval.samples_per_prompt=1 eval.decoding=[sample] eval.examples=0")
    proc = subprocess.run(run_make("compare", run, args=args) + ["COMPARE=rloo"], cwd=ROOT, capture_output=True,
                          text=True, env=ENV, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    # RUN's finished stages stay; the estimator's run starts from its SFT and RM
    assert "stages.sft" not in proc.stdout and "stages.rm " not in proc.stdout
    assert [line.split()[2] for line in proc.stdout.splitlines() if " -m stages." in line] == \
        ["stages.dpo", "stages.ppo", "stages.eval"], proc.stdout
    m = json.loads((run / "eval" / "metrics.json").read_text())
    algorithms = {c["name"]: c.get("algorithm") for c in m["checkpoints"]}
    assert algorithms == {"base": "base", "sft": "SFT", "ppo": "PPO (GAE)", "dpo": "DPO", "rloo": "RLOO"}
    for c in m["checkpoints"][1:]:
        assert c["wall_s"] > 0 and c["peak_rss_mb"] > 0, c
    _, rows = comparison_rows((run / "eval" / "report.md").read_text())
    assert rows["rloo"].startswith("| rloo | RLOO | ") and rows["rloo"].endswith(" MB |")
    assert (run / "eval" / "plots" / "comparison.png").is_file() and (run / "eval" / "COMPARED").is_file()
    # a second make compare has nothing to do
    again = subprocess.run(run_make("compare", run, args=args) + ["COMPARE=rloo"], cwd=ROOT, capture_output=True,
                           text=True, env=ENV)
    assert again.returncode == 0 and "stages." not in again.stdout, again.stdout
