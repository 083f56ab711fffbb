"""One rank of a 2-process Trainer run on CPU (gloo; start with tests.distributed.common.run_ranks):

    python -m tests.hf_ranks sift --out DIR            # SiftTrainer, random policy: the rows each rank kept
    python -m tests.hf_ranks plain --out DIR2 --kept DIR   # a plain Trainer fed exactly those rows

Each writes its losses and (rank 0) the final weights; ``sift`` also each rank's kept micro-batches.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from transformers import Trainer

from sift_hf import SiftArguments, SiftTrainer
from tests.hf_helpers import InOrder, Rows, hf_model, losses, quiet, rows, training_args, weights


class Kept(SiftTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kept = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.kept.append({k: v.clone() for k, v in inputs.items()})
        return super().training_step(model, inputs, num_items_in_batch)


def interleaved(kept_dir: Path, world: int) -> Rows:
    """The ranks' kept batches in the order a sequential sampler hands batch i * world + r to rank r."""
    per_rank = [torch.load(kept_dir / f"kept{r}.pt") for r in range(world)]
    batches = [per_rank[r][i] for i in range(len(per_rank[0])) for r in range(world)]
    return Rows({k: torch.cat([b[k] for b in batches]) for k in batches[0]})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("sift", "plain"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--kept", type=Path)
    a = ap.parse_args()
    quiet()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    args = training_args(a.out / "trainer", steps=2)
    trainer: Trainer
    if a.mode == "sift":
        trainer = Kept(model=hf_model("gpt2"), args=args, train_dataset=rows("gpt2"),
                       sift=SiftArguments(keep=0.5, policy="random"))
    else:
        trainer = InOrder(model=hf_model("gpt2"), args=args, train_dataset=interleaved(a.kept, world))
    trainer.train()
    if a.mode == "sift":
        torch.save(trainer.kept, a.out / f"kept{rank}.pt")
    if rank == 0:
        torch.save(weights(trainer.model), a.out / "weights.pt")
        (a.out / "losses.json").write_text(json.dumps(losses(trainer)))


if __name__ == "__main__":
    main()
