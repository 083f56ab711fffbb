"""The model adapter: what the engine asks of a model family.

The loop, the scorer, compile, export and the FLOP model talk to a model only through this protocol, so
a new family (a decoder LM, say) is a new module in engine/models/, not a change to the engine.

The forward's loss contract (every family):

=================  =======  ==========================================================================
key                shape    meaning
=================  =======  ==========================================================================
``loss``           ()       this rank's training objective (token mean + the family's extra terms)
``loss_sum``       ()       sum of the token-level loss over this rank's target tokens
``loss_tokens``    ()       number of those tokens (int)
``extra_loss``     ()       the extra terms of ``loss`` (e.g. BERT's NSP), absent when there are none
``per_seq_loss``   (G,)     detached mean token loss of each row (exact losses, for fidelity)
``extra_weight``   ()       the weight behind ``extra_loss``'s mean (weighted batches with extra terms)
=================  =======  ==========================================================================

plus any detached statistics the family names in ``metrics()``. `engine/schedule.py:global_objective`
builds the cross-rank objective from ``loss_sum``, ``loss_tokens``, ``extra_loss`` and ``extra_weight``
alone.

Weighted rows: a batch may carry ``row_weights`` (G,) (data_pipeline/batch.py; a weighted selection
adds it). Then every summed term counts row i w_i times: ``loss_sum`` = sum_i w_i loss_sum_i,
``loss_tokens`` = sum_i w_i tokens_i (a float), the counts of the metrics likewise, and the extra terms
become weighted means (BERT's NSP: sum_i w_i nsp_i / sum_i w_i, that sum being ``extra_weight``).
``per_seq_loss`` stays unweighted. Without ``row_weights`` nothing of this runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

Batch = dict[str, torch.Tensor]


def token_sums(ce: torch.Tensor, valid: torch.Tensor, hits: torch.Tensor,
               row_weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``loss_sum``, ``loss_tokens`` and ``correct`` of (G, P) token losses (0 where not ``valid``) and
    hits: plain sums, or each row's terms times its weight (weights all 1 give the same values bitwise,
    with ``loss_tokens`` a float)."""
    if row_weights is None:
        return ce.sum(), valid.sum(), (hits & valid).sum()
    w = row_weights.to(ce.dtype)[:, None]
    return (ce * w).sum(), (valid * w).sum(), ((hits & valid) * w).sum()


@dataclass(frozen=True, slots=True)
class DataFacts:
    """What a model needs to know about the data it trains on (from the dataset's index.json)."""

    vocab_size: int
    seq_len: int
    objective: str
    pad_id: int
    eos_id: int | None = None
    """The end-of-text token (``clm`` data), which a causal LM's config records for generation."""
    bos_id: int | None = None


class ExitPath(Protocol):
    """What an early exit at block j runs: views of the live modules, or an unshared replica."""

    vocab_size: int

    def modules(self) -> list[nn.Module]:
        """The modules the exit runs (for eval mode)."""
        ...

    def parameters(self) -> list[nn.Parameter]:
        """Their parameters, each once (tied weights appear once), in a fixed order."""
        ...

    def hidden(self, batch: Batch) -> torch.Tensor:
        """(G, P, H) block j's hidden states at the P scored positions of each row."""
        ...

    def targets(self, batch: Batch) -> torch.Tensor:
        """(G, P) the token to predict at each of those positions; -100 in unused slots."""
        ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(rows, P, H) -> (rows, P, V) through the model's own output head."""
        ...

    def replicate(self, device: torch.device | str, dtype: torch.dtype) -> ExitPath:
        """A fresh copy of the same structure with its own (unfilled) parameters, in the order of
        ``parameters()``, so ``for s, d in zip(live.parameters(), copy.parameters())`` refreshes it."""
        ...


@dataclass(frozen=True, slots=True)
class Ratio:
    """A metric reported as sum(num) / sum(den) over micro-steps and ranks (e.g. a token mean)."""

    num: str
    den: str


@dataclass(frozen=True, slots=True)
class Mean:
    """A metric reported as the mean of a per-micro-step value over micro-steps and ranks."""

    key: str


@dataclass(frozen=True, slots=True)
class Exp:
    """exp of another metric of the same model, e.g. perplexity = ``Exp("lm_loss")``; reported wherever
    that metric is (training records, ``val_<name>``)."""

    of: str


Metric = Ratio | Mean | Exp


def exp_metric(value: float) -> float:
    """exp(value), inf where it overflows (a diverged loss), for ``Exp`` metrics."""
    try:
        return math.exp(value)
    except OverflowError:
        return math.inf


@dataclass(frozen=True, slots=True)
class FlopCounts:
    """Model FLOPs per sequence (a multiply-add counts 2; backward = 2 x forward).

    ``block``: one block over the sequence's positions; ``head``: the output head at the positions it
    runs on; ``extra``: per-sequence heads that only training runs (BERT's NSP).
    """

    layers: int
    block: float
    head: float
    extra: float = 0.0

    def forward(self) -> float:
        return self.layers * self.block + self.head + self.extra

    def train(self) -> float:
        return 3.0 * self.forward()

    def scoring(self, exit_layer: int, head_fraction: float = 1.0) -> float:
        """The early exit at block j: j blocks and the head, no extra heads, no backward; the head on
        ``head_fraction`` of its positions (``sift.score_positions``)."""
        return exit_layer * self.block + head_fraction * self.head


@dataclass(frozen=True, slots=True)
class BlockLinear:
    """A Linear inside every block, for methods that change Linears (VCAS)."""

    path: str
    """Its dotted path inside the block, e.g. ``attention.self.query``."""
    token_local: bool
    """Its output gradient at a position comes only from the block's output gradient at that position
    (true for attention's query and output projections and the feed-forward Linears; false for keys and
    values, which attention mixes across positions)."""


class SiftModel(nn.Module):
    """Base class of the per-family adapters (an nn.Module, so DeepSpeed wraps it as is).

    ``forward(**batch)`` follows the loss contract in the module docstring.
    """

    family: ClassVar[str]
    token_loss_name: ClassVar[str]
    """How metrics name the token-level objective: ``<name>_loss``, ``<name>_acc``, ``val_<name>_acc``."""
    block_linears: ClassVar[tuple[BlockLinear, ...]] = ()
    """The Linears of each block that VCAS samples; empty: the family does not support VCAS."""

    @property
    def num_layers(self) -> int:
        return len(self.blocks())

    def blocks(self) -> list[nn.Module]:
        """The repeated blocks, in order (for compile and per-block hooks)."""
        raise NotImplementedError

    def exit_path(self, exit_layer: int) -> ExitPath:
        """The early exit after block ``exit_layer`` (1..num_layers)."""
        raise NotImplementedError

    def live_positions(self, batch: Batch) -> torch.Tensor | None:
        """(G, P') positions of each row whose last-block output the loss reads (repeats allowed), or
        None when it reads every position (a causal LM). VCAS back-propagates the last block's
        ``token_local`` Linears only there."""
        return None

    def metrics(self) -> dict[str, Metric]:
        """Metric name -> how to reduce the forward's outputs; the loop and the evaluator report these."""
        raise NotImplementedError

    def flops(self, seq_len: int) -> FlopCounts:
        raise NotImplementedError

    def export_config(self) -> dict[str, Any]:
        """What `sift export` needs to rebuild the stock Hugging Face model (stored in checkpoints)."""
        raise NotImplementedError
