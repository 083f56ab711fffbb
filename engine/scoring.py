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
# at seq 512: 600 MB per copy; one row of a 128K-vocabulary decoder at T = 2048: 1 GB); scoring in chunks
# of at most this many logits, over rows and, when one row is larger, over positions, bounds it.
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


def logit_chunks(rows: int, positions: int, vocab: int, chunk_elements: int) -> Iterator[tuple[slice, slice]]:
    """(row slice, position slice) blocks covering a (rows, positions) grid with at most ``chunk_elements``
    logits each (never less than one position): whole rows while a row fits, else position runs of one row."""
    per_row = max(1, positions * vocab)
    if per_row <= chunk_elements:
        step = chunk_elements // per_row
        for i in range(0, rows, step):
            yield slice(i, i + step), slice(0, positions)
        return
    width = max(1, chunk_elements // max(1, vocab))
    for i in range(rows):
        for p in range(0, positions, width):
            yield slice(i, i + 1), slice(p, p + width)


def sample_slots(valid: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """(G, P) bool valid slots -> (G, k) ascending slot indices, k of each row's valid slots uniformly at
    random (all of them, then invalid ones, in a row with fewer than k). Draws only from ``generator``,
    which must live on ``valid``'s device (no host sync)."""
    keys = torch.rand(valid.shape, generator=generator, device=valid.device)
    keys = keys.masked_fill(~valid, 2.0)  # invalid slots sort last
    return torch.sort(torch.topk(keys, k, dim=1, largest=False, sorted=False).indices, dim=1).values


def exit_scores(path: ExitPath, batch: dict[str, torch.Tensor], criterion: str,
                chunk_elements: int = CHUNK_ELEMENTS, *, positions: int = 0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """(G,) fp32 early-exit scores of a gross batch; see the module docstring for what is untouched.

    ``positions`` > 0 scores each row on that many of its target positions, drawn by ``sample_slots``
    from ``generator`` (fewer logits: the head runs on G x ``positions`` instead of G x P). The output head
    and the criterion run on chunks of at most ``chunk_elements`` logits (``logit_chunks``: one chunk for
    small models), so the scorer's peak memory does not grow with G x P x V; per-token values do not
    depend on the chunking, and each row's mean is taken once at the end.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; expected one of {', '.join(CRITERIA)}")
    with torch.no_grad(), eval_mode(path.modules()):
        hidden = path.hidden(batch)  # (G, P, H)
        labels = path.targets(batch)  # (G, P)
        if 0 < positions < labels.shape[1]:
            if generator is None:
                raise ValueError("scoring a subset of positions needs an explicit generator")
            slots = sample_slots(labels >= 0, positions, generator)
            hidden = hidden.gather(1, slots.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
            labels = labels.gather(1, slots)
        G, P = labels.shape
        values = torch.empty(G, P, dtype=torch.float32, device=labels.device)
        for r, c in logit_chunks(G, P, path.vocab_size, chunk_elements):
            values[r, c] = CRITERIA[criterion](path.logits(hidden[r, c]), labels[r, c])
        return per_sequence_mean(values, labels >= 0)
