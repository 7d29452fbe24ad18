"""PPO pieces on tiny models built in the test (fast): PPO-ptx batches, trainable parameters, logits of
the response positions only, gradient checkpointing, bf16 heads, non-finite checks."""

import json
from types import SimpleNamespace

import pytest
import torch

from rlhf.config import ConfigError
from rlhf.models import load_tokenizer
from rlhf.ppo.ptx import ptx_batches


@pytest.fixture(scope="module")
def tok(demo_dir):
    return load_tokenizer(str(demo_dir / "base"))


def demonstrations(path, n):
    path.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": "list 2 fruits"}],
                                        "completion": "apple pear"}) + "\n" for _ in range(n)))
    return str(path)


def test_ptx_share_smaller_than_a_batch_is_a_clear_error_not_an_endless_loop(tmp_path, tok):
    p = SimpleNamespace(ptx_file=demonstrations(tmp_path / "demo.jsonl", 5), ptx_batch_size=3, seed=0,
                        skip_invalid=False)
    batches = ptx_batches(p, tok, "cpu", rank=0, world=2)  # 3 of 5 demonstrations: one batch per pass
    assert all(next(batches)[0].shape[0] == 3 for _ in range(3))
    with pytest.raises(ConfigError, match=r"demo\.jsonl: 2 demonstrations .*ppo\.ptx_batch_size=3"):
        ptx_batches(p, tok, "cpu", rank=1, world=2)  # raised at the call, before any batch is asked for
