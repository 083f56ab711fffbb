"""Hugging Face models and batches as the project's model adapters see them.

The Trainer trains the stock model with its own forward and loss; the adapter (engine/models) wraps the
same modules so that the methods find the early exit (``exit_path``), the blocks (VCAS) and a forward
that follows the project's loss contract (VCAS's calibration, fidelity). A batch from a Hugging Face
collator becomes an adapter batch:

- BERT (``BertForMaskedLM``): ``labels`` (G, T) with -100 at unmasked positions -> ``mlm_positions``
  and ``mlm_labels`` (G, P), P the most masked tokens of any row (unused slots point at position 0
  with label -100, as the project's own loader pads them);
- GPT-2, Llama (``*ForCausalLM``): the unshifted ``labels`` (the model shifts them) -> the next token
  at each position, -100 at the last. The exit runs causal attention with no mask, so padding must be
  on the right (a real token never attends to a later pad); left padding is refused.

Padding-free / flattened collators (``DataCollatorWithFlattening``: one row of concatenated sequences
with ``position_ids``) are refused: the exit would attend across sequence boundaries and a row's score
would mix sequences.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.models.base import Batch, SiftModel
from sift_common.errors import SiftError

SUPPORTED = {"bert": "BertForMaskedLM", "gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}
"""model.config.model_type -> the class the Trainer's model must be."""

FLATTENED_KEYS = ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "seq_idx")


class UnsupportedError(SiftError, ValueError):
    """A model or batch that SIFT inside a Hugging Face loop cannot score (the message says why)."""


SUPPORTED_VERSIONS = {"transformers": ">=5.0,<6", "accelerate": ">=1.1"}
"""The libraries whose hooks and behaviour sift_hf relies on (pyproject.toml states the same range;
tests/unit/test_hf_trainer.py checks both agree and holds a canary on the Trainer's hooks)."""


def version_problems() -> list[str]:
    """One line per installed library outside ``SUPPORTED_VERSIONS`` (or missing)."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.specifiers import SpecifierSet

    problems = []
    for name, spec in SUPPORTED_VERSIONS.items():
        try:
            got = version(name)
        except PackageNotFoundError:
            problems.append(f"{name} is not installed (need {spec}: pip install 'sift-train[hf]')")
            continue
        if got not in SpecifierSet(spec):
            problems.append(f"{name} {got} (need {spec})")
    return problems


def adapter_for(model: nn.Module) -> SiftModel:
    """The project's adapter around the modules of a stock BERT masked LM, GPT-2 or Llama causal LM."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    expected = SUPPORTED.get(model_type)
    if expected is None:
        raise UnsupportedError(
            f"model.config.model_type {model_type!r} ({type(model).__name__}) is not supported: SIFT in a "
            f"Hugging Face loop knows {', '.join(f'{t} ({c})' for t, c in SUPPORTED.items())}")
    if type(model).__name__ != expected:
        raise UnsupportedError(f"{type(model).__name__}: a {model_type} model must be a {expected} (the early exit "
                               "reuses its output head and the loss follows its labels)")
    if model_type == "bert":
        from engine.models.bert import SiftBert

        return SiftBert(model)
    if model_type == "gpt2":
        from engine.models.gpt2 import SiftGPT2

        return SiftGPT2(model)
    from engine.models.llama import SiftLlama

    return SiftLlama(model)


def rows(batch: dict[str, Any]) -> int:
    return int(batch["input_ids"].shape[0])


def check_batch(batch: dict[str, Any], family: str) -> None:
    """UnsupportedError for a batch the exit cannot score as the model trains on it."""
    flat = [k for k in FLATTENED_KEYS if k in batch]
    if flat:
        raise UnsupportedError(
            f"the batch has {', '.join(flat)}: a padding-free / flattened collator packs several sequences into "
            "one row, and the early exit would score across their boundaries; use a padding collator")
    if "input_ids" not in batch or "labels" not in batch:
        raise UnsupportedError(f"the batch has keys {sorted(batch)}; scoring needs input_ids and labels")
    if family != "bert":
        mask = batch.get("attention_mask")
        if mask is not None and bool((mask[:, 1:] > mask[:, :-1]).any()):
            raise UnsupportedError(
                "the batch is left-padded (an attention_mask 0 before a 1): the early exit of a causal LM runs "
                "without a mask, so padding must be on the right (tokenizer.padding_side = 'right')")


def adapter_batch(batch: dict[str, Any], family: str) -> Batch:
    """The adapter's view of a Hugging Face batch (see the module docstring); on the batch's device."""
    check_batch(batch, family)
    ids, labels = batch["input_ids"], batch["labels"]
    if family == "bert":
        valid = labels != -100
        P = max(int(valid.sum(dim=1).max()), 1)  # one host read per gross batch
        order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices[:, :P]  # masked first
        used = valid.gather(1, order)
        positions = torch.where(used, order, torch.zeros_like(order))
        mask = batch.get("attention_mask")
        return {
            "input_ids": ids,
            "token_type_ids": batch.get("token_type_ids", torch.zeros_like(ids)),
            "attention_mask": torch.ones_like(ids) if mask is None else mask,
            "mlm_positions": positions,
            "mlm_labels": torch.where(used, labels.gather(1, order), torch.full_like(order, -100)),
            "nsp_labels": torch.full_like(ids[:, 0], -100),
        }
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    return {"input_ids": ids, "labels": shifted}


def take_rows(batch: dict[str, Any], kept: torch.Tensor, n: int) -> dict[str, Any]:
    """The kept rows of every per-row entry of a Hugging Face batch (tensors and lists of length n)."""
    out: dict[str, Any] = {}
    host = None
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n:
            out[k] = v.index_select(0, kept.to(v.device))
        elif isinstance(v, (list, tuple)) and len(v) == n:
            host = kept.tolist() if host is None else host
            out[k] = type(v)(v[i] for i in host)
        else:
            out[k] = v
    return out
