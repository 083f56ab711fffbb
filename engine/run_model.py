"""A trained run's model, loaded one way for every reader: `sift export`, the study's held-out evaluation
and probe, and the benchmarks' probes.

``load_run_model(run_dir)`` rebuilds the SIFT model of the config its checkpoint records (any family)
on its data's facts and loads the weights of that checkpoint (the latest complete one, verified first,
any ZeRO stage), on the CPU, in eval mode. Its metrics carry the model's own names (``model.metrics()``: ``mlm_acc`` for BERT,
``lm_acc`` for decoders).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine import checkpoint as ckpt
from sift_common.errors import SiftError

if TYPE_CHECKING:
    from engine.config import RunConfig
    from engine.models.base import DataFacts, SiftModel


class RunModelError(SiftError, RuntimeError):
    pass


def latest_checkpoint(run_dir: Path, tag: str | None = None) -> tuple[Path, str, dict[str, Any]]:
    """(checkpoints directory, tag, verified state record) of the run's checkpoint ``tag`` (default: the
    latest complete one)."""
    root = Path(run_dir) / "checkpoints"
    tag = tag or (ckpt.find_latest(root) if root.is_dir() else None)
    if tag is None:
        raise RunModelError(f"no complete checkpoint under {root}: a run directory is a training run's "
                            "train.out_dir (a study keeps its runs' checkpoints with --keep-checkpoints)")
    return root, tag, ckpt.verify(root, tag)


def consolidated_state(root: Path, tag: str) -> dict[str, Any]:
    from engine import ds

    try:
        return ds.consolidated_state_dict(root, tag)
    except Exception as e:  # DeepSpeed's own errors are many and deep
        raise RunModelError(f"cannot consolidate checkpoint {root / tag}: {e.__class__.__name__}: {e}") from e


def data_facts(meta: Any) -> DataFacts:
    """What a model needs to know of its data, from a dataset's index (``ShardDataset.meta``)."""
    from engine.models.base import DataFacts

    specials = meta.special_ids
    return DataFacts(meta.vocab_size, meta.seq_len, meta.objective, specials["pad"], eos_id=specials.get("eos"),
                     bos_id=specials.get("bos"))


def load_run_model(run_dir: Path, tag: str | None = None, data: Path | None = None) -> tuple[RunConfig, SiftModel]:
    """(the run's config, its model with the checkpoint's weights, eval mode, CPU). ``data``: where the
    run's prepared data is now, when it moved since (default: the config's ``data.path``)."""
    import torch

    from data_pipeline.reader import ShardDataset
    from engine.config import from_tree
    from engine.models import build_model

    run_dir = Path(run_dir)
    root, tag, record = latest_checkpoint(run_dir, tag)
    cfg = from_tree(record["config"], f"the config recorded in {root / tag}")
    meta = ShardDataset.open(data or cfg.data.path, cfg.data.eval_split).meta
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten; leave the caller's RNG alone
        torch.manual_seed(0)
        model = build_model(dataclasses.replace(cfg.model, dropout=0.0), data_facts(meta))
    missing, unexpected = model.load_state_dict(consolidated_state(root, tag), strict=False)
    # A tied parameter (an output head sharing the embedding) is saved once, under one of its names.
    params = list(model.named_parameters(remove_duplicate=False))
    tied = {name for name, p in params if name in missing and any(q is p for n, q in params if n not in missing)}
    if unexpected or set(missing) - tied:
        raise RunModelError(f"checkpoint {root / tag} does not fit the run's {cfg.model.family} model: missing "
                            f"{sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
    return cfg, model.eval()
