"""One SiftTrainer run of a tiny model, optionally through HF's DeepSpeed integration, as its own process
(DeepSpeed needs a process group: start it with tests.distributed.common.run_ranks). Writes JSON: the
kept input_ids of every micro-step, the losses, and whether the scorer read a replica.

    python -m tests.hf_run --family gpt2 --zero 3 --out kept.json
"""

from __future__ import annotations

import argparse
import json

import torch

from sift_hf import SiftArguments, SiftTrainer
from tests.hf_helpers import hf_model, losses, quiet, rows, training_args


class Kept(SiftTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kept = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.kept.append(inputs["input_ids"].tolist())
        return super().training_step(model, inputs, num_items_in_batch)


def run(family: str, zero: int, steps: int, out_dir: str) -> dict:
    quiet()
    extra = {}
    if zero >= 0:
        extra["deepspeed"] = {"zero_optimization": {"stage": zero}, "train_micro_batch_size_per_gpu": "auto",
                              "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
                              "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
                              "bf16": {"enabled": False}, "fp16": {"enabled": False}}
    trainer = Kept(model=hf_model(family, dropout=0.0), train_dataset=rows(family),
                   args=training_args(out_dir, steps=steps, use_cpu=zero < 0, **extra),
                   sift=SiftArguments(keep=0.5))
    trainer.train()
    scorer = trainer._sift_loop.methods.selector.scorer
    fresh = None
    if zero == 3:  # the replica holds the weights of the last step (refreshed after every optimizer step)
        from engine import ds

        live = scorer._src
        with ds.gathered(live):
            fresh = all(torch.equal(s.data.view(d.shape), d) for s, d in zip(live, scorer.paths[0].parameters()))
    return {"kept": trainer.kept, "losses": losses(trainer), "replica": not scorer.reads_live_weights,
            "replica_fresh": fresh}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="gpt2")
    ap.add_argument("--zero", type=int, default=-1, help="-1: no DeepSpeed")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    with open(a.out, "w") as f:
        json.dump(run(a.family, a.zero, a.steps, f"{a.out}.dir"), f)


if __name__ == "__main__":
    main()
