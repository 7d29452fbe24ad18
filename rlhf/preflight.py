"""What each stage checks before it touches its directory or loads a model: the model path, every data file
(through the loaders the stage itself uses), the stages it needs, plug-ins, and that the chat template renders.

Every failure is one ConfigError or DataError line, which `python -m stages.<x>` prints without a traceback
(rlhf/cli.py). The stage reads its data again afterwards: a few seconds on large files, for a run that cannot
fail hours later on an input it could have rejected at once. Prompt lengths are still checked by the stage
itself (that needs every prompt tokenized), after begin_stage, which no longer changes a finished stage.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from rlhf import checks
from rlhf import data as rdata
from rlhf.config import ConfigError, PipelineConfig
from rlhf.data.io import looks_like_path
from rlhf.plugins import import_callable, reward_function
from rlhf.runs import require_done, rm_warnings


def check_model_path(name: str, revision: str | None = None, key: str = "model.name_or_path") -> None:
    """A local model directory, or a valid hub id that is cached (or, online, exists on the hub)."""
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
            raise ConfigError(f"{key}={name!r} is a LoRA adapter directory, not a model: give the base model "
                              f"it was trained on (every stage loads the base, then this run's adapters)")
        if not (path / "config.json").is_file():
            raise ConfigError(f"{key}={name!r} is a directory without a model in it (no config.json)")
        return
    if path.exists():
        raise ConfigError(f"{key}={name!r} is a file, not a model directory or a hub id")
    if looks_like_path(name):
        raise ConfigError(f"{key}={name!r}: no such directory (a hub id looks like 'org/name')")
    from huggingface_hub import repo_exists, try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as e:
        raise ConfigError(f"{key}={name!r} is neither a local directory nor a valid hub id: {e}") from None
    if isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
        return
    if offline():
        raise ConfigError(f"{key}={name!r}: no local directory of that name, and the hub model is not in the "
                          f"local cache (HF_HUB_OFFLINE is set: download it first, or give a local directory)")
    try:
        exists = repo_exists(name)
    except Exception:  # no network, a proxy, ...: the model load itself will say
        return
    if not exists:
        raise ConfigError(f"{key}={name!r}: no local directory of that name, and no such model on the hub "
                          f"(a private or gated one needs `hf auth login`)")


def offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def bitsandbytes_unused(cfg: PipelineConfig) -> bool:
    """Whether nothing a stage of `cfg` loads can need bitsandbytes: no model.quantization, a base model whose
    config.json (a local directory, or the hub cache) holds no quantization_config, no model directory among
    eval.checkpoints that does, and no plugin outside rlhf (a user's judge or reward may load a quantized model of
    its own). When unsure (a hub model not in the cache), False."""
    if cfg.model.quantization != "none":
        return False
    plugins = [cfg.rm.pair_tags, cfg.ppo.judge, cfg.eval.judge, *(t.source for t in cfg.ppo.reward.terms)]
    if any(spec and spec != "rm" and not spec.startswith("rlhf.") for spec in plugins):
        return False
    models = [cfg.model.name_or_path] + [entry.partition("=")[2] or entry for entry in cfg.eval.checkpoints]
    for name in models:
        path = Path(name).expanduser()
        if path.is_dir():
            config = path / "config.json"
        elif name == cfg.model.name_or_path:
            from huggingface_hub import try_to_load_from_cache

            try:
                cached = try_to_load_from_cache(name, "config.json", revision=cfg.model.revision)
            except Exception:  # not a valid hub id: the stage's check says so
                return False
            if not isinstance(cached, str):
                return False
            config = Path(cached)
        else:  # base, sft, ppo, ...: this run's adapters on the base
            continue
        try:
            if config.is_file() and "quantization_config" in json.loads(config.read_text()):
                return False
        except (OSError, ValueError):
            return False
    return True


def check_chat_template(cfg: PipelineConfig, tokenizer_dir: str, examples: list) -> None:
    """Render the first chat-format prompt of `examples` (with its completion, if it has one) through the chat
    template of the tokenizer in `tokenizer_dir` (a hub id or directory): a broken template fails here, in one
    line, instead of inside a trainer. Plain-text prompts count as chat with model.text_prompts=chat."""
    chat = cfg.model.text_prompts == "chat"
    example = next((e for e in examples if chat or isinstance(e.prompt, list)), None)
    if example is None:  # raw-text prompts never go through the template
        return
    example = rdata.as_chat([example], cfg.model.text_prompts)[0]
    tokenizer = tokenizer_of(tokenizer_dir, cfg)
    answer = getattr(example, "completion", None) or getattr(example, "chosen", None) or "ok"
    try:
        rdata.render_prompt(tokenizer, example.prompt)
        tokenizer.apply_chat_template(example.prompt + [{"role": "assistant", "content": answer}], tokenize=False)
    except Exception as e:  # jinja2's TemplateError, or whatever the template raises (raise_exception)
        raise ConfigError(f"the chat template of {tokenizer_dir} fails to render {example.source}: "
                          f"{type(e).__name__}: {e}") from None


def tokenizer_of(name: str, cfg: PipelineConfig):
    from rlhf.models import load_tokenizer

    try:
        return load_tokenizer(name, cfg.model.revision if name == cfg.model.name_or_path else None,
                              cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load the tokenizer of {name}: {str(e).splitlines()[0]}") from None


def load_quietly(load, source: str | None, split: str, skip_invalid: bool) -> list:
    """The stage loads the file again and warns about skipped rows then: no warnings twice."""
    if not source:
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load(source, split=split, skip_invalid=skip_invalid)


def check_plugin(spec: str | None, key: str) -> None:
    if spec:
        try:
            import_callable(spec)
        except ValueError as e:
            raise ConfigError(f"{key}: {e}") from None


# --- one function per stage, called by stages/<stage>.py before the stage runs ---

def check_sft(cfg: PipelineConfig) -> None:
    s = cfg.sft
    checks.check_sft(cfg)  # the settings first: they need no file
    check_model_path(cfg.model.name_or_path, cfg.model.revision)
    examples = (load_quietly(rdata.load_sft, s.train_file, s.train_split, s.skip_invalid)
                + load_quietly(rdata.load_sft, s.eval_file, s.eval_split, s.skip_invalid))
    check_chat_template(cfg, cfg.model.name_or_path, examples)


def check_rm(cfg: PipelineConfig) -> None:
    r = cfg.rm
    checks.check_rm(cfg)
    sft_dir = require_done(Path(cfg.run_dir) / "sft", "sft")
    check_model_path(cfg.model.name_or_path, cfg.model.revision)
    check_plugin(r.pair_tags, "rm.pair_tags")
    pairs = (load_quietly(rdata.load_preferences, r.train_file, r.train_split, r.skip_invalid)
             + load_quietly(rdata.load_preferences, r.eval_file, r.eval_split, r.skip_invalid))
    check_chat_template(cfg, str(sft_dir), pairs)


def check_ppo(cfg: PipelineConfig) -> None:
    p, run_dir = cfg.ppo, Path(cfg.run_dir)
    checks.check_ppo(cfg)
    for i, term in enumerate(p.reward.terms):  # each reward function imports and takes (prompt, response)
        if term.source != "rm":
            reward_function(term.source, f"ppo.reward.terms[{i}].source")
    sft_dir = require_done(run_dir / "sft", "sft")
    require_done(run_dir / "rm", "rm")
    checks.rm_warnings_gate(rm_warnings(run_dir / "rm"), p.guards.keep_best, checks.monitor_on(p),
                            p.guards.accept_rm_warnings)
    check_model_path(cfg.model.name_or_path, cfg.model.revision)
    check_plugin(p.judge, "ppo.judge")
    prompts = (load_quietly(rdata.load_prompts, p.prompts_file, p.prompts_split, p.skip_invalid)
               + load_quietly(rdata.load_prompts, p.eval_prompts_file, p.eval_prompts_split, p.skip_invalid))
    demos = load_quietly(rdata.load_sft, p.ptx.file if p.ptx.coef > 0 else None, "train", p.skip_invalid)
    check_chat_template(cfg, str(sft_dir), prompts + demos)


def check_dpo(cfg: PipelineConfig) -> None:
    d = cfg.dpo
    checks.check_dpo(cfg)
    sft_dir = require_done(Path(cfg.run_dir) / "sft", "sft")
    check_model_path(cfg.model.name_or_path, cfg.model.revision)
    pairs = (load_quietly(rdata.load_preferences, d.train_file, d.train_split, d.skip_invalid)
             + load_quietly(rdata.load_preferences, d.eval_file, d.eval_split, d.skip_invalid))
    check_chat_template(cfg, str(sft_dir), pairs)


def check_eval(cfg: PipelineConfig) -> None:
    e, sft_dir = cfg.eval, Path(cfg.run_dir) / "sft"
    checks.check_eval(cfg)
    check_model_path(cfg.model.name_or_path, cfg.model.revision)
    check_plugin(e.judge, "eval.judge")
    prompts = load_quietly(rdata.load_prompts, e.prompts_file, e.prompts_split, e.skip_invalid)
    tokenizer = str(sft_dir) if (sft_dir / "DONE").is_file() else cfg.model.name_or_path
    check_chat_template(cfg, tokenizer, prompts)


def check_export(cfg: PipelineConfig) -> None:
    checks.check_export(cfg)
    require_done(Path(cfg.run_dir) / "sft", "sft")
    if cfg.export.stage == "ppo":
        require_done(Path(cfg.run_dir) / "ppo", "ppo")
    check_model_path(cfg.model.name_or_path, cfg.model.revision)
