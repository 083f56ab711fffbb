"""Per-sequence scores from an early exit: pure tensor code, no DeepSpeed, no ranks.

The scorer runs the exit path with dropout off (eval mode, restored afterwards) and without autograd,
so a score is a deterministic function of (weights, batch): it draws nothing from any RNG, records no
graph and leaves parameters and gradients untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from engine.models.base import ExitPath

# The fp32 criterion over (rows, P, V) logits is the scorer's largest temporary (G = 64 rows of BERT-base
# at seq 512: 600 MB per copy); scoring in row chunks of at most this many logits bounds it.
CHUNK_ELEMENTS = 1 << 25


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(G, P, V) logits, (G, P) labels (-100 = unused slot) -> (G, P) fp32 CE, 0 at unused slots."""
    G, P, V = logits.shape
    ce = F.cross_entropy(logits.reshape(G * P, V).float(), labels.reshape(G * P), ignore_index=-100, reduction="none")
    return ce.view(G, P)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """(G, P, V) logits -> (G, P) fp32 entropy of the predictive distribution (nats)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def per_sequence_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(G, P) values, (G, P) bool -> (G,) mean over the valid slots.

    A row with no target token scores 0: the minimum of both criteria, so such a row is kept only when
    fewer than B rows have any target token (it has nothing to teach the token-level objective).
    """
    total = torch.where(valid, values, torch.zeros_like(values)).sum(dim=1)
    return total / valid.sum(dim=1).clamp(min=1)


def _entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return token_entropy(logits)


Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
CRITERIA: dict[str, Criterion] = {"loss": token_cross_entropy, "entropy": _entropy}
"""Scoring criteria: (G, P, V) logits, (G, P) labels -> (G, P) per-token values. ``sift.criterion``
accepts exactly these names; a plugin may register more."""


def scores_from_logits(logits: torch.Tensor, labels: torch.Tensor, criterion: str) -> torch.Tensor:
    """(G, P, V) exit logits at the scored positions -> (G,) fp32 per-sequence scores."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; expected one of {', '.join(CRITERIA)}")
    return per_sequence_mean(CRITERIA[criterion](logits, labels), labels >= 0)


@contextmanager
def eval_mode(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Dropout off for the duration, then every submodule's own training flag restored."""
    flags = [(m, m.training) for top in modules for m in top.modules()]
    for top in modules:
        top.train(False)
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def exit_scores(path: ExitPath, batch: dict[str, torch.Tensor], criterion: str,
                chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """(G,) fp32 early-exit scores of a gross batch; see the module docstring for what is untouched.

    The output head and the criterion run on row chunks of at most ``chunk_elements`` logits (one chunk
    for small models), so the scorer's peak memory does not grow with G x P x V.
    """
    with torch.no_grad(), eval_mode(path.modules()):
        hidden = path.hidden(batch)  # (G, P, H)
        labels = path.targets(batch)
        G, P = labels.shape
        rows = max(1, chunk_elements // max(1, P * path.vocab_size))
        return torch.cat([
            scores_from_logits(path.logits(hidden[i : i + rows]), labels[i : i + rows], criterion)
            for i in range(0, G, rows)
        ])
