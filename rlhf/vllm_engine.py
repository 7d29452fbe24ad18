"""vLLM as a sampling engine: a `vllm serve` process with the frozen base and LoRA on, fed adapters by name.

vLLM pins its own transformers, so it lives in its own environment (`make setup-vllm`: .venv-vllm) and runs as a
server, here or elsewhere (`vllm.url`). Only adapters travel, never merged weights: the trainer writes an adapter
directory, the engine loads it under a new name (`/v1/load_lora_adapter`), and samples with it.

The SFT model is the base with the SFT adapter merged (rlhf.models.load_sft_model); a role adapter (the PPO policy,
the DPO policy) goes over it. LoRA sums its adapters' outputs, so SFT + role is one LoRA of rank r_sft + r_role:
A = [A_sft; A_role], B = [s_sft B_sft, s_role B_role] (each s = alpha / r folded into B, the combined scaling 1).
`combined_adapter` writes that, and the engine's base stays the pristine base the pipeline started from.

Everything here is the standard library, safetensors and torch: nothing imports vLLM in the trainer's process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rlhf import distributed
from rlhf.errors import EngineError
from rlhf.sequences import left_pad

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM's --max-lora-rank accepts


# --- adapters ------------------------------------------------------------------------------------------------

def read_adapter(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, weights) of a PEFT LoRA adapter directory."""
    path = Path(path)
    return json.loads((path / ADAPTER_CONFIG).read_text()), load_file(str(path / ADAPTER_WEIGHTS))


def lora_scaling(config: dict) -> float:
    r, alpha = config["r"], config.get("lora_alpha", config["r"])
    return alpha / (r ** 0.5) if config.get("use_rslora") else alpha / r


def _lora_pairs(config: dict, weights: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module prefix -> (A (r, in), B (out, r) x scaling): the adapter's update is B @ A."""
    unsupported = [k for k in ("use_dora", "modules_to_save") if config.get(k)]
    if unsupported or any(".lora_" not in k for k in weights):
        raise EngineError(f"the vLLM engine takes plain LoRA adapters (lora_A/lora_B weights only); this one has "
                          f"{', '.join(unsupported) or 'other weights'}: set ppo.sampling.engine=hf")
    s = lora_scaling(config)
    pairs = {}
    for key, a in weights.items():
        if key.endswith(".lora_A.weight"):
            prefix = key[:-len(".lora_A.weight")]
            pairs[prefix] = (a.float(), weights[prefix + ".lora_B.weight"].float() * s)
    return pairs


def combined_adapter(parts: Sequence[tuple[dict, dict[str, torch.Tensor]]], out: str | Path) -> Path:
    """Write one LoRA adapter whose update is the sum of the parts' updates (each (config, weights), as
    `read_adapter` returns): ranks concatenated, scalings folded into B, lora_alpha = r (scaling 1). A module that
    a part does not adapt gets zero rows there. Written to a temporary directory, then renamed: a reader never
    sees half an adapter. Returns `out`."""
    out = Path(out)
    pairs = [_lora_pairs(c, w) for c, w in parts]
    ranks = [next(iter(p.values()))[0].shape[0] if p else 0 for p in pairs]
    modules = sorted(set().union(*pairs))
    weights = {}
    for prefix in modules:
        shapes = next(p[prefix] for p in pairs if prefix in p)
        d_in, d_out = shapes[0].shape[1], shapes[1].shape[0]
        a = [p[prefix][0] if prefix in p else torch.zeros(r, d_in) for p, r in zip(pairs, ranks)]
        b = [p[prefix][1] if prefix in p else torch.zeros(d_out, r) for p, r in zip(pairs, ranks)]
        weights[prefix + ".lora_A.weight"] = torch.cat(a, 0).contiguous()
        weights[prefix + ".lora_B.weight"] = torch.cat(b, 1).contiguous()
    rank = sum(ranks)
    targets = sorted({m.rsplit(".", 1)[-1] for m in modules})
    config = {**parts[0][0], "r": rank, "lora_alpha": rank, "target_modules": targets, "use_rslora": False,
              "lora_dropout": 0.0, "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(weights, str(tmp / ADAPTER_WEIGHTS))
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def engine_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts as --max-lora-rank that holds `rank`."""
    for r in LORA_RANKS:
        if r >= rank:
            return r
    raise EngineError(f"a combined adapter of rank {rank} is more than vLLM serves ({LORA_RANKS[-1]}): "
                      f"lower the adapters' lora.r")


# --- rollouts in the trainer's layout ---

def pack(prompts: list[list[int]], answers: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Prompts and answers (token ids, each answer ending at its stop token or cut by the budget) -> generate_ids'
    layout: (B, P + R) ids and bool mask, prompts left-padded to P, answers right-padded, and P."""
    width = max(len(p) for p in prompts)
    ids, mask = left_pad(prompts, pad_id, width)
    resp_width = max(1, max(len(a) for a in answers))
    resp = torch.full((len(answers), resp_width), pad_id, dtype=torch.long)
    resp_mask = torch.zeros((len(answers), resp_width), dtype=torch.bool)
    for i, a in enumerate(answers):  # the engine stops at the first stop token (kept) or at max_new_tokens
        resp[i, :len(a)] = torch.tensor(a, dtype=torch.long)
        resp_mask[i, :len(a)] = True
    return torch.cat([ids, resp], 1), torch.cat([mask, resp_mask], 1), width


def row_seeds(seed: int, step: int, rank: int, n: int) -> list[int]:
    """A seed per rollout row: the engine's sampling is reproducible and resumes as an uninterrupted run would."""
    return [(seed * 1_000_003 + step * 65_537 + rank * 4_099 + i) % 2**31 for i in range(n)]


# --- the server process --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ServerSpec:
    """How to start `vllm serve` (rlhf.config.VLLMConfig holds the user's values)."""

    model: str                  # the base: a hub id or a directory (model.name_or_path)
    python: str                 # the vLLM environment's interpreter
    dtype: str = "auto"
    max_lora_rank: int = 32
    max_model_len: int | None = None  # None: the model's own
    port: int = 0               # 0: a free port
    kv_cache_gb: int = 1        # VLLM_CPU_KVCACHE_SPACE (GiB) on CPU
    gpu_memory_utilization: float = 0.3
    start_timeout: float = 600.0
    extra_args: tuple[str, ...] = ()


def server_spec(cfg, rank: int) -> ServerSpec:
    """The server for a pipeline config (rlhf.config.PipelineConfig: model and vllm sections), LoRA up to `rank`."""
    v = cfg.vllm
    dtype = cfg.model.dtype if v.dtype == "auto" else v.dtype
    return ServerSpec(model=cfg.model.name_or_path, python=v.python,
                      dtype=dtype if dtype in ("float32", "bfloat16", "float16") else "auto",
                      max_lora_rank=engine_lora_rank(rank), max_model_len=v.max_model_len, port=v.port,
                      kv_cache_gb=v.kv_cache_gb, gpu_memory_utilization=v.gpu_memory_utilization,
                      start_timeout=v.start_timeout, extra_args=tuple(v.extra_args))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVED_NAME = "base"  # the name the server gives the base model (requests without an adapter)


def serve_command(spec: ServerSpec, port: int) -> list[str]:
    """`vllm serve` with LoRA on, runtime adapter loading, and sampling that is ours alone: the checkpoint's
    generation_config.json is ignored (--generation-config vllm), log-probs are those of the distribution sampled
    from (processed: after the temperature)."""
    return [spec.python, "-m", "vllm.entrypoints.openai.api_server", "--model", spec.model,
            "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
            "--dtype", spec.dtype, "--enable-lora", "--max-lora-rank", str(spec.max_lora_rank),
            "--max-loras", "2", *(["--max-model-len", str(spec.max_model_len)] if spec.max_model_len else []),
            "--generation-config", "vllm", "--gpu-memory-utilization", str(spec.gpu_memory_utilization),
            "--logprobs-mode", "processed_logprobs", "--max-logprobs", "1", "--disable-log-stats",
            "--enforce-eager", *spec.extra_args]


def server_env(spec: ServerSpec) -> dict[str, str]:
    env = dict(os.environ)
    env.update(VLLM_ALLOW_RUNTIME_LORA_UPDATING="True", VLLM_CPU_KVCACHE_SPACE=str(int(spec.kv_cache_gb)),
               VLLM_WORKER_MULTIPROC_METHOD="spawn", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    for var in ("PYTHONPATH", "VIRTUAL_ENV"):  # the trainer's packages must not shadow the engine's
        env.pop(var, None)
    return env


def _die_with_parent() -> None:
    """In the server's process, before it starts: SIGTERM when the trainer dies, even by SIGKILL (Linux), so no
    server outlives a killed job (vLLM's server stops its engine processes on SIGTERM)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class VLLMServer:
    """A `vllm serve` child process: started, waited for (/health), stopped with its process group. A server that
    dies is an EngineError naming its log; none outlives the trainer (closed on exit and on SIGTERM's unwinding)."""

    def __init__(self, spec: ServerSpec, log_path: str | Path):
        if not Path(spec.python).is_file():
            raise EngineError(f"vllm.python={spec.python}: no such interpreter; build the vLLM environment with "
                              f"`make setup-vllm`, or point vllm.url at a running server")
        self.spec, self.log_path = spec, Path(log_path)
        self.port = spec.port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(serve_command(spec, self.port), stdout=self._log, stderr=subprocess.STDOUT,
                                     env=server_env(spec), start_new_session=True, preexec_fn=_die_with_parent)

    def check_alive(self) -> None:
        code = self.proc.poll()
        if code is not None:
            raise EngineError(f"the vLLM server exited with code {code}: {self.log_tail()} (log: {self.log_path})")

    def log_tail(self, lines: int = 1) -> str:
        try:
            text = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        return " | ".join(text[-lines:])[-300:]

    def wait_ready(self, client: "VLLMClient") -> None:
        deadline = time.monotonic() + self.spec.start_timeout
        while time.monotonic() < deadline:
            self.check_alive()
            if client.healthy():
                return
            time.sleep(1.0)
        self.close()
        raise EngineError(f"the vLLM server did not answer {self.url}/health within {self.spec.start_timeout:.0f} s "
                          f"(vllm.start_timeout; log: {self.log_path})")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=30)
        self._log.close()


# --- the client ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sampled:
    """One answer from the engine: its token ids (a stop token included) and their log-probs at the temperature."""

    tokens: list[int]
    logprobs: list[float]


class VLLMClient:
    """The OpenAI-compatible API of a vLLM server (vLLM's extensions: token-id prompts and answers, prompt
    log-probs, runtime LoRA loading), over plain HTTP. `server`: the process behind it, checked when a request
    fails, so a dead server is named as such instead of as a refused connection."""

    def __init__(self, url: str, timeout: float = 600.0, server: VLLMServer | None = None, workers: int = 16):
        self.url, self.timeout, self.server, self.workers = url.rstrip("/"), timeout, server, workers

    def _request(self, path: str, body: dict | None = None, timeout: float | None = None) -> dict | str:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                text = resp.read().decode()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:300]
            raise EngineError(f"the vLLM server at {self.url} refused {path}: HTTP {e.code} {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            if self.server is not None:
                self.server.check_alive()
            raise EngineError(f"the vLLM server at {self.url} did not answer {path}: {e}") from None
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text

    def healthy(self) -> bool:
        try:
            urllib.request.urlopen(self.url + "/health", timeout=5).read()
            return True
        except (urllib.error.URLError, OSError):
            return False

    def load_adapter(self, name: str, path: str | Path) -> None:
        self._request("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(Path(path).resolve())})

    def unload_adapter(self, name: str) -> None:
        try:
            self._request("/v1/unload_lora_adapter", {"lora_name": name})
        except EngineError:
            pass  # not loaded (a fresh server, or a name another run used): nothing to unload

    def _map(self, fn, items: list, workers: int | None = None) -> list:
        with ThreadPoolExecutor(max_workers=max(1, min(workers or self.workers, len(items)))) as pool:
            return list(pool.map(fn, items))

    def sample(self, prompts: list[list[int]], adapter: str | None, max_tokens: int, temperature: float,
               seeds: list[int], stop_ids: Sequence[int], greedy: bool = False, top_k: int = 0,
               top_p: float = 1.0) -> list[Sampled]:
        """One answer per prompt (token ids in, token ids out), each request with its own seed: reproducible, and
        a prompt repeated in a group gets different answers. The distribution at `temperature` (top_k 0 and top_p 1:
        untruncated; never penalties or a minimum length), stopping at `stop_ids` (the stop token kept)."""
        def one(job):
            prompt, seed = job
            body = {"model": adapter or SERVED_NAME, "prompt": prompt, "max_tokens": max_tokens,
                    "temperature": 0.0 if greedy else temperature, "top_p": top_p, "top_k": top_k or -1, "min_p": 0.0,
                    "seed": seed, "n": 1, "logprobs": 0, "stop_token_ids": list(stop_ids), "ignore_eos": False,
                    "skip_special_tokens": False, "return_token_ids": True, "repetition_penalty": 1.0,
                    "frequency_penalty": 0.0, "presence_penalty": 0.0, "min_tokens": 0}
            choice = self._request("/v1/completions", body)["choices"][0]
            tokens = choice.get("token_ids")
            logprobs = (choice.get("logprobs") or {}).get("token_logprobs")
            if tokens is None or logprobs is None or len(tokens) != len(logprobs):
                raise EngineError(f"the vLLM server at {self.url} answered without token ids and log-probs "
                                  f"(return_token_ids, logprobs): a vLLM too old for the engine")
            return Sampled(list(tokens), [float(x) for x in logprobs])
        return self._map(one, list(zip(prompts, seeds)))

    def answer_logprobs(self, rows: list[tuple[list[int], list[int]]], adapter: str | None) -> list[list[float]]:
        """log p(answer token | prompt, earlier answer tokens) under `adapter` at temperature 1, for each
        (prompt ids, answer ids): the prompt log-probs of prompt + answer, read at the answer's positions."""
        def one(row):
            prompt, answer = row
            body = {"model": adapter or SERVED_NAME, "prompt": list(prompt) + list(answer), "max_tokens": 1,
                    "temperature": 0.0, "prompt_logprobs": 0, "return_token_ids": True}
            choice = self._request("/v1/completions", body)["choices"][0]
            found = choice.get("prompt_logprobs")
            if found is None:
                raise EngineError(f"the vLLM server at {self.url} answered without prompt log-probs")
            ids = list(prompt) + list(answer)
            out = []
            for pos in range(len(prompt), len(ids)):
                entry = found[pos] or {}
                hit = entry.get(str(ids[pos]))
                if hit is None:
                    raise EngineError(f"the vLLM server's prompt log-probs miss token {ids[pos]} at position {pos}")
                out.append(float(hit["logprob"] if isinstance(hit, dict) else hit))
            return out
        # one request at a time: vLLM 0.32's CPU LoRA kernels fail on prompt log-probs of several requests at once
        return self._map(one, rows, workers=1)

    def publish(self, name: str, parts: Sequence[tuple[dict, dict[str, torch.Tensor]]], directory: str | Path) -> None:
        """`combined_adapter(parts)` written to directory/name and loaded under `name` (replacing one of that name)."""
        path = combined_adapter(parts, Path(directory) / name)
        self.unload_adapter(name)
        self.load_adapter(name, path)

    def retire(self, name: str, directory: str | Path) -> None:
        """Unload `name` from the engine and remove its directory (what `publish` wrote)."""
        self.unload_adapter(name)
        shutil.rmtree(Path(directory) / name, ignore_errors=True)


def connect_or_start(url: str | None, spec: ServerSpec, log_path: str | Path,
                     timeout: float = 600.0) -> tuple[VLLMClient, VLLMServer | None]:
    """A client of the server at `url` (started elsewhere: checked with /health), or of a new server started here
    (returned too: the caller closes it)."""
    if url:
        client = VLLMClient(url, timeout)
        if not client.healthy():
            raise EngineError(f"vllm.url={url}: no vLLM server answers {url}/health")
        return client, None
    server = VLLMServer(spec, log_path)
    client = VLLMClient(server.url, timeout, server)
    try:
        server.wait_ready(client)
    except BaseException:
        server.close()
        raise
    print(f"[vllm] server ready at {server.url} ({spec.model}, log {log_path})", file=sys.stderr)
    return client, server


def shared_engine(cfg, rank: int, log_path: str | Path) -> tuple[VLLMClient, VLLMServer | None, str]:
    """The engine every process of a stage uses: the main process connects to vllm.url or starts a server (LoRA up
    to `rank`; returned there, for the caller to close), the others connect to it. Also the token of the main
    process (its pid) that the stage's adapter names carry, the same on every process: they never collide with an
    earlier run's names on a shared server."""
    client = server = None
    url = cfg.vllm.url
    if distributed.state().is_main_process:
        client, server = connect_or_start(url, server_spec(cfg, rank), log_path)
        url = client.url
    url, token = distributed.gather_objects((url, str(os.getpid())))[0]
    return client or VLLMClient(url), server, token
