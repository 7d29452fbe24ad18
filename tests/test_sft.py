"""Stage 1 end to end on the demo: it learns, its output reloads, bad input stops it early, a kill resumes."""

import json
import statistics
import subprocess

import pytest
from peft import PeftModel

from conftest import DEMO_CONFIG, ROOT, kill_once_written, run_make, run_stage, small_demo_files, small_file_args
from rlhf import sft
from rlhf.cli import stage_main
from rlhf.config import ModelConfig, load_config
from rlhf.data import load_prompts
from rlhf.demo.task import gold_score
from rlhf.generation import SamplingSpec, generate_texts
from rlhf.models import load_causal_lm, load_tokenizer
from rlhf.runs import MetricsFile, last_complete_checkpoint, read_metrics

pytestmark = pytest.mark.slow


def mean_gold(model, tokenizer, prompts):
    texts = generate_texts(model, tokenizer, prompts, SamplingSpec(max_new_tokens=12), seed=0)
    return statistics.mean(gold_score(p, t) for p, t in zip(prompts, texts))


def test_sft_learns_held_out_loss_falls_and_gold_score_rises(sft_run, demo_dir):
    out = sft_run / "sft"
    losses = [r["eval/loss"] for r in read_metrics(out / "metrics.jsonl") if "eval/loss" in r]
    assert len(losses) >= 3 and losses[-1] < losses[0] - 0.01, losses
    assert json.loads((out / "DONE").read_text())["eval_loss_end"] == pytest.approx(losses[-1])

    # Gold judge on held-out requests (never seen in training), same sampling seed for both models.
    tokenizer = load_tokenizer(str(out))
    prompts = [p.prompt for p in load_prompts(str(demo_dir / "prompts_eval.jsonl"))]
    base = load_causal_lm(ModelConfig(name_or_path=str(demo_dir / "base")), tokenizer)
    before = mean_gold(base, tokenizer, prompts)
    after = mean_gold(PeftModel.from_pretrained(base, str(out)), tokenizer, prompts)
    print(f"gold score on held-out prompts: base {before:.3f} -> SFT {after:.3f}")
    assert after > before + 0.05


def test_sft_output_is_complete_and_reloads_with_peft(sft_run, demo_dir):
    out = sft_run / "sft"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "config.yaml",
                 "metrics.jsonl", "DONE"):
        assert (out / name).is_file(), name
    assert any((out / "tb").glob("events.out.tfevents.*"))
    assert load_config(out / "config.yaml").run_dir == str(sft_run)  # the resolved config, reloadable

    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo_dir / "base"), str(out))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "name 2 colors"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    new = model.generate(**ids, max_new_tokens=8, do_sample=False)[0, ids["input_ids"].shape[1]:]
    assert len(new) > 0 and tokenizer.decode(new, skip_special_tokens=True).strip()


def bad_sft_files(tmp_path):
    """One file per kind of SFT input error: two good rows, then the bad row (row 3)."""
    prompt_rows = [{"prompt": [{"role": "user", "content": "list 2 fruits"}], "completion": "apple pear"}] * 2
    chat_rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}] * 2
    cases = [  # name, good rows, bad row, field
        ("missing_field", prompt_rows, {"prompt": "list 2 fruits"}, "completion"),
        ("empty_text", prompt_rows, {"prompt": "list 2 fruits", "completion": "  "}, "completion"),
        ("wrong_type", prompt_rows, {"prompt": "list 2 fruits", "completion": 7}, "completion"),
        ("unknown_role", chat_rows,
         {"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "messages"),
        ("prompt_too_long", prompt_rows,
         {"prompt": [{"role": "user", "content": "apple " * 40}], "completion": "pear"}, "prompt"),
    ]
    for name, good, bad, field in cases:
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in good + [bad]))
        yield name, path, f"row 3: field '{field}'"
    path = tmp_path / "malformed_json.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in prompt_rows) + '{"prompt": "x", "completion": \n')
    yield "malformed_json", path, "row 3: malformed JSON"


def test_bad_input_fails_before_training_naming_file_row_field(tmp_path, monkeypatch, capsys, demo_dir):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded although the data is invalid")
    monkeypatch.setattr(sft, "load_causal_lm", no_model)
    for name, path, where in bad_sft_files(tmp_path):
        code = stage_main("sft", sft.run, ["--config", str(DEMO_CONFIG), f"run_dir={tmp_path / name}",
                                            f"train_file={path}"])
        err = capsys.readouterr().err
        assert code == 2, name
        assert f"{path.name}: {where}" in err, (name, err)
        assert not (tmp_path / name / "sft" / "checkpoints").exists()


def test_last_complete_checkpoint_skips_and_removes_half_written(tmp_path):
    for step, complete in ((10, True), (20, True), (30, False)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if complete:
            (d / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-20" / "trainer_state.json").write_text('{"global_')  # killed while writing
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert not (tmp_path / "checkpoint-30").exists() and not (tmp_path / "checkpoint-20").exists()
    assert last_complete_checkpoint(tmp_path / "missing") is None


def test_metrics_file_drops_rows_after_the_resume_point(tmp_path):
    path = tmp_path / "metrics.jsonl"
    m = MetricsFile(path)
    for step in (0, 10, 20, 30):
        m.write(step, {"train/loss": 1.0 / (step + 1), "note": "text is left out"})
    MetricsFile(path, resume_step=20).write(30, {"train/loss": 0.5})
    rows = read_metrics(path)
    assert [r["step"] for r in rows] == [0, 10, 20, 30] and rows[-1]["train/loss"] == 0.5
    assert "note" not in rows[0]


@pytest.mark.early(4)  # one of the longest single tests: not last
def test_killed_make_sft_resumes_from_last_checkpoint(demo_dir, tmp_path):
    """Kill `make sft` (the whole process group, as Ctrl-C or a scheduler would) once a checkpoint exists,
    then run it again: it resumes from that checkpoint and finishes; DONE appears only at the end."""
    run, f = tmp_path / "run", small_demo_files(demo_dir, tmp_path / "data")
    args = (" ".join(small_file_args(f, "sft", prefixed=False))  # small: a stage tokenizes all of them
            + " train.max_steps=30 train.save_steps=10 train.logging_steps=10 train.eval_steps=100")
    cmd = run_make("sft", run, args=args)
    kill_once_written(cmd, run / "sft" / "checkpoints" / "checkpoint-10" / "trainer_state.json")
    assert not (run / "sft" / "DONE").exists()
    killed_at = last_complete_checkpoint(run / "sft" / "checkpoints")
    assert killed_at is not None and int(killed_at.name.split("-")[1]) < 30

    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {killed_at}" in again.stdout
    assert (run / "sft" / "DONE").exists()
    state = json.loads((run / "sft" / "checkpoints" / "checkpoint-30" / "trainer_state.json").read_text())
    assert state["global_step"] == 30
    steps = [r["step"] for r in read_metrics(run / "sft" / "metrics.jsonl") if "train/loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 30  # no step logged twice after the resume

    # Up to date now: make does nothing.
    done_mtime = (run / "sft" / "DONE").stat().st_mtime
    noop = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert noop.returncode == 0 and "Nothing to be done" in noop.stdout, noop.stdout
    assert (run / "sft" / "DONE").stat().st_mtime == done_mtime


def text_rows(src, dst, n: int) -> str:
    """The first `n` demo rows with their chat prompt written as plain text ({"prompt": "...", ...})."""
    rows = [json.loads(line) for line in src.read_text().splitlines()[:n]]
    dst.write_text("".join(json.dumps({**r, "prompt": r["prompt"][-1]["content"]}) + "\n" for r in rows))
    return str(dst)


def test_plain_text_prompts_go_through_the_chat_template_when_asked_and_each_stage_says_which(demo_dir, tmp_path):
    """model.text_prompts: raw keeps a text prompt as the model's input (trl's convention), chat makes it a user
    turn of the model's chat template, as the chat rows of the same task are; the stage says which in one line."""
    from rlhf import data as rdata
    from rlhf.chat import encode_prompt
    from rlhf.ppo.train import load_prompt_ids

    tok = load_tokenizer(str(demo_dir / "base"))
    chat = rdata.load_sft(str(demo_dir / "sft_train.jsonl"))[:4]
    text = rdata.load_sft(text_rows(demo_dir / "sft_train.jsonl", tmp_path / "text.jsonl", 4))
    assert [e.prompt for e in rdata.as_chat(text, "chat")] == [e.prompt for e in chat]
    assert rdata.as_chat(text, "raw") == text and rdata.as_chat(chat, "chat") == chat
    assert rdata.text_prompts_line(chat, tok, "raw") is None
    assert "4 of 4 prompts are plain text: as they are" in rdata.text_prompts_line(text, tok, "raw")
    cfg = load_config(DEMO_CONFIG, ["model.text_prompts=chat"])
    _, ids = load_prompt_ids(str(tmp_path / "text.jsonl"), "train", cfg.ppo, tok, "chat")
    assert ids == [encode_prompt(tok, e.prompt) for e in chat]  # PPO sees what SFT trained on

    files = {"train_file": text_rows(demo_dir / "sft_train.jsonl", tmp_path / "train.jsonl", 32),
             "eval_file": text_rows(demo_dir / "sft_eval.jsonl", tmp_path / "eval.jsonl", 8)}
    for mode, said in (("chat", "as a user turn through the model's chat template"), ("raw", "as they are")):
        proc = run_stage("sft", f"run_dir={tmp_path / mode}", f"model.text_prompts={mode}", "sft.train.max_steps=1",
                         "sft.train.progress_bar=false", *(f"sft.{k}={v}" for k, v in files.items()))
        assert f"[sft] 40 of 40 prompts are plain text: {said}" in proc.stdout
    bad = run_stage("sft", f"run_dir={tmp_path / 'bad'}", "model.text_prompts=template", check=False)
    assert bad.returncode == 2 and "model.text_prompts must be one of raw, chat" in bad.stderr
