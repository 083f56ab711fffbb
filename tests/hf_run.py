"""One SiftTrainer run of a tiny model, optionally through HF's DeepSpeed integration, as its own process
(DeepSpeed needs a process group: start it with tests.distributed.common.run_ranks, 1 or 2 ranks). Writes
JSON: the kept input_ids of every micro-step, the losses, and whether the scorer read a replica; with
``--windows``, each rank also saves ``<out>.rank<r>.pt``: every accumulation window's weights at its
start (gathered under ZeRO-3) and its gross batches.

    python -m tests.hf_run --family gpt2 --zero 3 --out kept.json
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from sift_hf import SiftArguments, SiftTrainer
from tests.hf_helpers import hf_model, losses, quiet, rows, training_args


class Kept(SiftTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kept, self.windows = [], []

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        gross = []

        def tap():
            for b in epoch_iterator:
                gross.append(b)
                yield b

        self.windows.append((self._weights(), gross))
        return super().get_batch_samples(tap(), num_batches, device)

    def _weights(self) -> dict[str, torch.Tensor]:
        params = list(self.model.parameters())
        if self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
            from engine import ds

            with ds.gathered(params):
                return {k: p.data.view(p.ds_shape).clone() for k, p in self.model.named_parameters()}
        return {k: p.detach().clone() for k, p in self.model.named_parameters()}

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.kept.append(inputs["input_ids"].tolist())
        return super().training_step(model, inputs, num_items_in_batch)


def run(family: str, zero: int, steps: int, out_dir: str) -> tuple[dict, Kept]:
    quiet()
    extra = {}
    if zero >= 0:
        extra["deepspeed"] = {"zero_optimization": {"stage": zero}, "train_micro_batch_size_per_gpu": "auto",
                              "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
                              "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
                              "bf16": {"enabled": False}, "fp16": {"enabled": False}}
    # use_cpu even with DeepSpeed: without it accelerate finds no backend for a CPU device and counts
    # one process whatever the world size (HF then fills DeepSpeed's train_batch_size for one)
    trainer = Kept(model=hf_model(family, dropout=0.0), train_dataset=rows(family),
                   args=training_args(out_dir, steps=steps, use_cpu=True, **extra),
                   sift=SiftArguments(keep=0.5))
    trainer.train()
    scorer = trainer._sift_loop.methods.selector.scorer
    fresh = None
    if zero == 3:  # the replica holds the weights of the last step (refreshed after every optimizer step)
        from engine import ds

        live = scorer._src
        with ds.gathered(live):
            fresh = all(torch.equal(s.data.view(d.shape), d) for s, d in zip(live, scorer.paths[0].parameters()))
    engine = trainer.model_wrapped
    stage = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else None
    return {"kept": trainer.kept, "losses": losses(trainer), "replica": not scorer.reads_live_weights,
            "replica_fresh": fresh, "engine": type(engine).__name__, "zero": stage,
            "world": trainer.args.world_size}, trainer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="gpt2")
    ap.add_argument("--zero", type=int, default=-1, help="-1: no DeepSpeed")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--windows", action="store_true", help="also save each window's start weights and gross batches")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    out = a.out if rank == 0 else f"{a.out}.rank{rank}"
    result, trainer = run(a.family, a.zero, a.steps, f"{a.out}.dir")
    with open(out, "w") as f:
        json.dump(result, f)
    if a.windows:
        torch.save(trainer.windows, f"{a.out}.rank{rank}.pt")


if __name__ == "__main__":
    main()
