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
from torch import nn

if TYPE_CHECKING:
    from engine.models.base import ExitPath

# The scorer's largest temporaries are per chunk of exit logits: the bf16 logits (2 bytes each) and one
# fp32 buffer (4 bytes each, see `_exp_shifted`). 2^23 logits bound that to 48 MiB whatever G x P x V
# (`logit_chunks`: whole rows while one fits, else runs of positions of one row): BERT-base at seq 512
# (P = 77, V = 30,522) scores 3 rows per chunk; a 128K-vocabulary decoder 65 positions per chunk.
CHUNK_ELEMENTS = 1 << 23


def _exp_shifted(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., V) logits of any float dtype -> (exp(z - m) in fp32 (..., V), m in fp32 (...)), m the row max.

    The one full-size temporary: the max is exact in the logits' dtype, ``logits - m`` with an fp32 (..., 1)
    m promotes elementwise to fp32 (CUDA casts while reading the bf16 logits; on CPU TensorIterator first
    copies them to fp32), and exp runs in place on that result.
    """
    m = logits.detach().amax(dim=-1, keepdim=True).float()
    return (logits - m).exp_(), m.squeeze(-1)


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(G, P, V) logits, (G, P) labels (-100 = unused slot) -> (G, P) fp32 CE, 0 at unused slots.

    CE = logsumexp(z) - z[label], with logsumexp = m + log(sum(exp(z - m))) accumulated in fp32 from
    logits of any dtype. Differentiable (the training loss uses it).
    """
    e, m = _exp_shifted(logits)
    lse = e.sum(dim=-1).log() + m
    picked = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1).float()
    return torch.where(labels >= 0, lse - picked, 0.0)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """(G, P, V) logits -> (G, P) fp32 entropy of the predictive distribution (nats). No autograd.

    H = logsumexp(z) - sum(softmax(z) * z), written shift-invariantly: with e = exp(z - m) and s = sum(e),
    H = log s - sum(e * log e) / s. Every term e * log e is <= 0, so the sum cannot cancel (lse and the
    expected logit are both about the max logit and their fp32 difference would lose digits), and
    log e is computed in place in the same fp32 buffer.
    """
    e, _ = _exp_shifted(logits)
    s = e.sum(dim=-1)
    return s.log() - e.xlogy_(e).sum(dim=-1) / s


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
CRITERIA: dict[str, Criterion] = {"loss": token_cross_entropy, "entropy": _entropy, "reducible": token_cross_entropy}
"""Scoring criteria: (G, P, V) logits, (G, P) labels -> (G, P) per-token values. ``sift.criterion``
accepts exactly these names; a plugin may register more. A criterion in ``REFERENCED`` is the
per-token value minus a reference model's per-token loss on the same targets, which the caller passes
(``exit_scores(reference=...)``)."""

REFERENCED = frozenset({"reducible"})
"""Criteria that subtract a reference model's per-token loss (RHO-LOSS's reducible loss: training loss
minus irreducible loss)."""


def _check_criterion(criterion: str, reference: torch.Tensor | None) -> None:
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; expected one of {', '.join(CRITERIA)}")
    if (criterion in REFERENCED) != (reference is not None):
        raise ValueError(f"criterion {criterion!r} " + ("needs the reference's per-token losses"
                                                         if reference is None else "takes no reference losses"))


def scores_from_logits(logits: torch.Tensor, labels: torch.Tensor, criterion: str,
                       reference: torch.Tensor | None = None) -> torch.Tensor:
    """(G, P, V) exit logits at the scored positions -> (G,) fp32 per-sequence scores; ``reference``:
    (G, P) the reference's per-token losses at the same positions (criteria in ``REFERENCED``)."""
    _check_criterion(criterion, reference)
    values = CRITERIA[criterion](logits, labels)
    return per_sequence_mean(values if reference is None else values - reference, labels >= 0)


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


def exit_token_values(path: ExitPath, batch: dict[str, torch.Tensor], criterion: str = "loss",
                      chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """(G, P) fp32 per-token values of ``criterion`` at every target slot of ``path.targets(batch)`` (0 at
    unused slots), in eval mode and without autograd; the head runs on chunks as in ``exit_scores``. A
    reference model's per-token losses are this at its last block."""
    with torch.no_grad(), eval_mode(path.modules()):
        hidden = path.hidden(batch)
        labels = path.targets(batch)
        return _chunked_values(path, hidden, labels, criterion, chunk_elements)


def _chunked_values(path: ExitPath, hidden: torch.Tensor, labels: torch.Tensor, criterion: str,
                    chunk_elements: int) -> torch.Tensor:
    G, P = labels.shape
    values = torch.empty(G, P, dtype=torch.float32, device=labels.device)
    for r, c in logit_chunks(G, P, path.vocab_size, chunk_elements):
        values[r, c] = CRITERIA[criterion](path.logits(hidden[r, c]), labels[r, c])
    return values


def exit_scores(path: ExitPath, batch: dict[str, torch.Tensor], criterion: str,
                chunk_elements: int = CHUNK_ELEMENTS, *, positions: int = 0,
                generator: torch.Generator | None = None, reference: torch.Tensor | None = None) -> torch.Tensor:
    """(G,) fp32 early-exit scores of a gross batch; see the module docstring for what is untouched.

    ``positions`` > 0 scores each row on that many of its target positions, drawn by ``sample_slots``
    from ``generator`` (fewer logits: the head runs on G x ``positions`` instead of G x P). The output head
    and the criterion run on chunks of at most ``chunk_elements`` logits (``logit_chunks``: one chunk for
    small models), so the scorer's peak memory does not grow with G x P x V; per-token values do not
    depend on the chunking, and each row's mean is taken once at the end. ``reference`` (criteria in
    ``REFERENCED``): (G, P) a reference model's per-token losses, aligned with ``path.targets(batch)``;
    they are subtracted at the same (sampled) positions before the mean.
    """
    _check_criterion(criterion, reference)
    with torch.no_grad(), eval_mode(path.modules()):
        hidden = path.hidden(batch)  # (G, P, H)
        labels = path.targets(batch)  # (G, P)
        if 0 < positions < labels.shape[1]:
            if generator is None:
                raise ValueError("scoring a subset of positions needs an explicit generator")
            slots = sample_slots(labels >= 0, positions, generator)
            hidden = hidden.gather(1, slots.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
            labels = labels.gather(1, slots)
            if reference is not None:
                reference = reference.gather(1, slots)
        values = _chunked_values(path, hidden, labels, criterion, chunk_elements)
        return per_sequence_mean(values if reference is None else values - reference, labels >= 0)
