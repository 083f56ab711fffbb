"""A test-only method, installed as a plugin (``train.plugins=[tests.plugin_lowest] method=lowest``):
SIFT's early exit and draws, but it keeps the B *lowest*-scoring rows. It exists to show that a method
plugs in through the registry alone, without any change to the loop."""

from __future__ import annotations

import torch

from engine.methods import METHODS, MicroContext
from engine.methods.sift import Sift
from engine.models.base import Batch
from engine.selection import kept_dropped_means, topk_indices


class KeepLowest(Sift):
    name = "lowest"

    def select(self, batch: Batch, scores: torch.Tensor, ctx: MicroContext) -> torch.Tensor:
        kept = topk_indices(-scores, self.B)
        kept_mean, dropped_mean = kept_dropped_means(scores, kept)
        self._stats = {"kept_score": kept_mean, "dropped_score": dropped_mean}
        return kept


METHODS["lowest"] = KeepLowest
