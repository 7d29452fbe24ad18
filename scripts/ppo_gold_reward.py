"""Diagnostic: `make ppo` on the demo with the gold judge as the reward, in place of the reward model.

    python scripts/ppo_gold_reward.py --config configs/demo.yaml run_dir=runs/oracle [key=value ...]

It measures the ceiling that a perfect reward model would give the demo's PPO: what is left between it
and the goal is the policy's (optimisation, KL, LoRA capacity), not the reward model's. The run needs a
finished SFT and RM stage in run_dir (the value model still starts from the RM); every RM score in it,
the logged `ppo/score` and the end-of-run comparison included, is 10 x the gold score. Never part of the
pipeline: the judge stands for the humans, and no training stage may see it. Its figures are in NOTES.md.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rlhf.rm import scoring as reward  # noqa: E402
from rlhf.cli import stage_main  # noqa: E402
from rlhf.demo import task  # noqa: E402
from rlhf.ppo import train  # noqa: E402

SCALE = 10.0


@torch.no_grad()
def gold_score_ids(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The RewardScorer interface, scored by the gold judge: the prompt is what precedes the first
    assistant marker of the chat template, the answer what follows it (as `make eval` decodes it)."""
    marker = self.tokenizer.convert_tokens_to_ids("<|assistant|>")
    out = []
    for row, m in zip(input_ids.cpu(), mask.cpu()):
        ids = row[m].tolist()
        start = ids.index(marker)
        prompt = self.tokenizer.decode(ids[:start], skip_special_tokens=True).strip()
        answer = self.tokenizer.decode(ids[start + 1:], skip_special_tokens=True).strip()
        out.append(SCALE * task.gold_score(prompt, answer))
    return torch.tensor(out, device=input_ids.device)


if __name__ == "__main__":
    reward.RewardScorer.score_ids = gold_score_ids
    sys.exit(stage_main("ppo", train.run))
