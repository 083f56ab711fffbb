"""Reference models for the reducible-loss criterion (``sift.criterion: reducible``, RHO-LOSS).

A row's reducible loss is the exit's per-token loss minus a reference model's per-token loss on the same
targets, averaged over the row. The reference (``sift.reference``) is a small model of a family that fits
the data's objective, trained on data the run does not train on (`sift reference`), with the data's
tokenizer: a SIFT-Train run directory or a local Hugging Face checkpoint.

Two ways to get its per-token losses during a run:

- a sidecar (``sift.reference_losses``, decoders): computed once for every row of the training split and
  looked up by row id. A decoder row's targets are fixed (the next tokens), so this costs nothing per
  step. The file records the SHA-256 of the dataset's ``index.json`` and of the reference's weights; a run
  whose data or reference differs is refused.
- online (BERT, or a decoder without a sidecar): a frozen forward of the reference on each gross batch
  (eval mode, no autograd). BERT must do this: its masks are drawn anew each epoch, so the targets of a row
  are not fixed. The cost lands in the method's statistics (``reference_flops``, ``reference_s``).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.models import FAMILIES, family
from engine.models.base import Batch, DataFacts, SiftModel
from engine.scoring import exit_token_values
from sift_common.atomic import atomic_open
from sift_common.errors import SiftError


class ReferenceModelError(SiftError, ValueError):
    """A reference model or sidecar that cannot be used with this run."""


# ----------------------------------------------------------------------------- loading


def _vocab(tokenizer: str, what: str) -> dict[str, int]:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(tokenizer, local_files_only=True).get_vocab()
    except (OSError, ValueError) as e:
        raise ReferenceModelError(f"{what}: cannot load the tokenizer at {tokenizer}: {e}") from None


def check_tokenizer(reference: Path, ref_tokenizer: str, data: Path, data_tokenizer: str) -> None:
    """ReferenceModelError naming both unless the two tokenizers have the same vocabulary (token -> id)."""
    theirs = _vocab(ref_tokenizer, f"sift.reference {reference}")
    ours = _vocab(data_tokenizer, f"data {data}")
    if theirs != ours:
        raise ReferenceModelError(
            f"sift.reference {reference} uses the tokenizer {ref_tokenizer} ({len(theirs)} tokens) but the data "
            f"{data} uses {data_tokenizer} ({len(ours)} tokens): a reference's per-token losses are only "
            "comparable on the same token ids; train the reference on data prepared with the same tokenizer")


def load_reference(path: str | Path, data: DataFacts, data_path: str | Path, data_tokenizer: str) -> SiftModel:
    """The reference model at ``path`` (a run directory or a Hugging Face checkpoint), checked against the
    data (tokenizer, objective), in eval mode with autograd off, on CPU in fp32."""
    from engine.config import ModelConfig

    path = Path(path)
    if (path / "config.json").is_file():
        try:
            model_type = json.loads((path / "config.json").read_text()).get("model_type")
        except (OSError, ValueError) as e:
            raise ReferenceModelError(f"sift.reference {path}: cannot read config.json: {e}") from None
        if model_type not in FAMILIES:
            raise ReferenceModelError(
                f"sift.reference {path}: model_type {model_type!r} is not one of the families "
                f"{', '.join(FAMILIES)}")
        check_tokenizer(path, str(path), Path(data_path), data_tokenizer)
        model = family(model_type).build(ModelConfig(family=model_type, init_from=str(path), dropout=0.0), data)
    elif (path / "checkpoints").is_dir():
        from engine.run_model import latest_checkpoint, load_run_model

        record = latest_checkpoint(path)[2]
        if record.get("objective") != data.objective:
            raise ReferenceModelError(
                f"sift.reference {path} was trained on {record.get('objective')!r} data, the run's "
                f"data {data_path} is {data.objective!r}")
        check_tokenizer(path, record["tokenizer"], Path(data_path), data_tokenizer)
        model = load_run_model(path, data=Path(data_path))[1]
    else:
        raise ReferenceModelError(
            f"sift.reference {path} is neither a SIFT-Train run directory (no checkpoints/) nor "
            "a Hugging Face checkpoint (no config.json)")
    return model.float().eval().requires_grad_(False)


def model_hash(model: SiftModel) -> str:
    """SHA-256 of a model's weights (fp32, names in sorted order): the same for a run and its export."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().float().contiguous().cpu()
        h.update(f"{name}:{tuple(t.shape)}\0".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- the sidecar

MAGIC = b"SIFTREF1"
ALIGN = 64


@dataclass(frozen=True, slots=True)
class Sidecar:
    header: dict[str, Any]
    """index_sha256, index_path, split, rows, seq_len, models: [{path, sha256, half}]."""
    losses: np.ndarray
    """(rows, seq_len) fp32, row i = the split's row id i; a memory map."""


def write_sidecar(path: str | Path, header: dict[str, Any], blocks: Iterable[np.ndarray]) -> Path:
    """Write ``header`` and the (rows, seq_len) fp32 losses given as consecutive row blocks, atomically:
    MAGIC, the header's length (8 bytes), the JSON header padded to 64 bytes, then the array (C order)."""
    path = Path(path)
    rows, seq_len = header["rows"], header["seq_len"]
    text = json.dumps(header, sort_keys=True).encode()
    text += b" " * (-(len(MAGIC) + 8 + len(text)) % ALIGN)
    written = 0
    with atomic_open(path) as f:
        f.write(MAGIC + struct.pack("<Q", len(text)) + text)
        for block in blocks:
            block = np.ascontiguousarray(block, dtype=np.float32)
            if block.ndim != 2 or block.shape[1] != seq_len:
                raise ValueError(f"sidecar block of shape {block.shape}, expected (n, {seq_len})")
            f.write(block.tobytes())
            written += block.shape[0]
        if written != rows:
            raise ValueError(f"sidecar got {written} rows, its header says {rows}")
    return path


def read_sidecar(path: str | Path) -> Sidecar:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic, size = f.read(len(MAGIC)), f.read(8)
            text = f.read(struct.unpack("<Q", size)[0]) if magic == MAGIC and len(size) == 8 else None
    except OSError as e:
        raise ReferenceModelError(f"sift.reference_losses {path}: cannot read it: {e.strerror}") from None
    if text is None:
        raise ReferenceModelError(
            f"sift.reference_losses {path} is not a reference-loss sidecar (written by "
            "`sift reference --sidecar`)")
    try:
        header = json.loads(text)
        shape = (int(header["rows"]), int(header["seq_len"]))
        if not {"index_sha256", "index_path", "split", "models"} <= header.keys():
            raise KeyError("header fields")
    except (ValueError, KeyError, TypeError):  # JSON, text or field errors
        raise ReferenceModelError(f"sift.reference_losses {path}: its header is corrupt") from None
    offset = len(MAGIC) + 8 + len(text)
    expected = offset + 4 * shape[0] * shape[1]
    if path.stat().st_size != expected:
        raise ReferenceModelError(
            f"sift.reference_losses {path} has {path.stat().st_size} bytes, its header "
            f"promises {expected}: truncated or altered")
    return Sidecar(header, np.memmap(path, dtype=np.float32, mode="r", offset=offset, shape=shape))


def index_hash(data_path: str | Path) -> str:
    from data_pipeline.index import INDEX_NAME, sha256_file

    return sha256_file(Path(data_path) / INDEX_NAME)


def check_sidecar(sidecar: Sidecar, where: Path, *, data_path: Path, split: str, rows: int, seq_len: int,
                  reference: Path, reference_sha: str) -> None:
    """ReferenceModelError naming both hashes and paths unless the sidecar was computed on this data (index.json
    hash, split, shape) by this reference (its weights' hash is one of the sidecar's models)."""
    h = sidecar.header
    ours = index_hash(data_path)
    if h["index_sha256"] != ours:
        raise ReferenceModelError(
            f"sift.reference_losses {where} was computed on the dataset {h['index_path']} (index.json "
            f"sha256 {h['index_sha256']}) but the run's data {data_path} has index.json sha256 "
            f"{ours}; compute the sidecar for this data (`sift reference --from ... --sidecar`)")
    if (h["split"], h["rows"], h["seq_len"]) != (split, rows, seq_len):
        raise ReferenceModelError(
            f"sift.reference_losses {where} covers split {h['split']!r} ({h['rows']} rows of "
            f"{h['seq_len']} tokens), the run trains on {split!r} ({rows} rows of {seq_len})")
    known = {m["sha256"]: m["path"] for m in h["models"]}
    if reference_sha not in known:
        theirs = ", ".join(f"{p} (sha256 {s})" for s, p in known.items())
        raise ReferenceModelError(
            f"sift.reference_losses {where} was computed by {theirs}, but sift.reference {reference} "
            f"has weights sha256 {reference_sha}")


# ----------------------------------------------------------------------------- during a run


def data_facts(meta: Any) -> DataFacts:
    """What a model needs to know about a dataset, from its ``DatasetMeta``."""
    return DataFacts(meta.vocab_size, meta.seq_len, meta.objective, meta.special_ids["pad"],
                     eos_id=meta.special_ids.get("eos"), bos_id=meta.special_ids.get("bos"))


class OnlineReference:
    """Per-token losses from a frozen forward of the reference on each gross batch."""

    def __init__(self, model: SiftModel, seq_len: int):
        self.model = model
        self.path = model.exit_path(model.num_layers)
        self.flops_per_row = model.flops(seq_len).scoring(model.num_layers)
        """The reference forward: every block and the head, no extra heads (BERT's NSP is not read)."""

    def token_losses(self, batch: Batch) -> torch.Tensor:
        """(G, P) fp32, aligned with the run's ``targets(batch)`` (same data, same target slots)."""
        return exit_token_values(self.path, batch)


class SidecarReference:
    """Per-token losses looked up by row id in a table computed once (``sift.reference_losses``)."""

    flops_per_row = 0.0

    def __init__(self, table: torch.Tensor):
        self.table = table

    def token_losses(self, batch: Batch) -> torch.Tensor:
        return self.table.index_select(0, batch["sample_ids"])


Reference = OnlineReference | SidecarReference


def open_reference(reference: str, losses: str | None, *, data_path: str, split: str,
                   device: torch.device) -> Reference:
    """The run's reference: a sidecar checked against the data and the model, or the model itself."""
    from data_pipeline.reader import ShardDataset

    train_set = ShardDataset.open(data_path, split)
    meta, facts = train_set.meta, data_facts(train_set.meta)
    with torch.random.fork_rng(devices=[]):  # building a model draws its init: not from the run's dropout stream
        model = load_reference(reference, facts, data_path, train_set.tokenizer_path())
    if losses is None:
        return OnlineReference(model.to(device), meta.seq_len)
    sidecar = read_sidecar(losses)
    check_sidecar(sidecar, Path(losses), data_path=Path(data_path), split=split, rows=len(train_set),
                  seq_len=meta.seq_len, reference=Path(reference), reference_sha=model_hash(model))
    return SidecarReference(torch.from_numpy(np.array(sidecar.losses)).to(device))


# ----------------------------------------------------------------------------- computing a sidecar


def sidecar_blocks(references: list[tuple[SiftModel, int | None]], train_set: Any, batch_size: int = 32,
                   device: torch.device | str = "cpu") -> Iterable[np.ndarray]:
    """(rows, T) fp32 per-token losses of every row of a ``clm`` split, in row order and blocks of
    ``batch_size`` rows. One reference scores every row; two, trained on halves 0 and 1 (``data.train_half``),
    score each row with the one that did not train on it (RHO-LOSS's "double irreducible" loss)."""
    from data_pipeline.batch import select_rows, to_device
    from data_pipeline.loader import collate_clm
    from data_pipeline.sampler import split_half

    n = len(train_set)
    in_half1 = np.zeros(n, dtype=bool)
    if len(references) == 2:
        in_half1[split_half(n, 1)] = True
    paths = [(m.to(device).exit_path(m.num_layers), half) for m, half in references]
    for start in range(0, n, batch_size):
        ids = np.arange(start, min(n, start + batch_size))
        batch = to_device(collate_clm(train_set.rows(ids), ids), device)
        if len(paths) == 1:
            yield exit_token_values(paths[0][0], batch).cpu().numpy()
            continue
        out = torch.empty(batch["labels"].shape, dtype=torch.float32, device=device)
        for path, half in paths:  # the model trained on half h scores the rows of the other half
            rows = torch.from_numpy(np.flatnonzero(in_half1[ids] != bool(half))).to(device)
            if len(rows):
                out[rows] = exit_token_values(path, select_rows(batch, rows))
        yield out.cpu().numpy()
