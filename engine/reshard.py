"""Resume at another data-parallel world size: ZeRO-1/2/3 checkpoints through DeepSpeed's universal checkpoint.

ZeRO-1/2/3 save each rank's shard of the fp32 weights and Adam moments (ZeRO-3 also of the weights
themselves), and DeepSpeed loads those shards only at the world size that wrote them. Its universal
checkpoint holds every parameter's state whole, and each ZeRO stage slices it for any world size. A
checkpoint is converted once, into ``<checkpoint>/universal/``, by ``sift convert-checkpoint`` or by the
first resume at another world size (rank 0, while the other ranks wait at a collective, whose timeout,
``train.collective_timeout_s`` under gloo, a long conversion would exceed). The conversion follows the checkpoints' own protocol: its files, then its
``sift_state.json`` manifest last; a conversion cut short has none, is never loaded, and is redone. It
is verified (sizes, SHA-256) before DeepSpeed unpickles it.

With DeepSpeed 0.19.8 on CPU (gloo, fp32), resuming 2 -> 1 and 1 -> 2 ranks works at ZeRO-1, 2 and 3
and continues the run as a run at the new size would from the same state (tests/distributed/test_reshard.py;
ZeRO-3 needs ``ds._repair_zero3_universal``). Not tested: bf16/fp16, GPUs, more than 2 ranks.
ZeRO-0 checkpoints need no conversion: they hold the whole optimizer and resume at any world size.
The data order needs nothing either: the sampler resumes from the global count of samples consumed.
What a change of world size does change: the global batch (``train.micro_batch_size`` is per rank:
keep W x micro_batch_size x grad_accum with ``--allow-change train.grad_accum`` to train on as before),
and the per-rank parts of a checkpoint start afresh: dropout RNG streams, the pipelined schedule's
scores of the next batch (recomputed) and the methods' per-rank state (VCAS's calibrated ratios).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from engine import checkpoint as ckpt
from engine import ds

log = logging.getLogger(__name__)

UNIVERSAL = ds.UNIVERSAL_TAG


class ReshardError(ckpt.CheckpointError):
    pass


def zero_sharded(record: dict[str, Any]) -> bool:
    """The checkpoint holds ZeRO-1/2/3 optimizer shards (ZeRO-0 keeps the optimizer in its model states)."""
    return any(name.endswith("optim_states.pt") for name in record.get("files", {}))


def needs_universal(root: Path, tag: str, world_size: int) -> bool:
    """Whether resuming ``tag`` at ``world_size`` ranks goes through its universal form; a ReshardError
    when it would but this DeepSpeed cannot."""
    record = ckpt.verify(root, tag)
    saved = record.get("world_size")
    if saved == world_size or not zero_sharded(record):
        return False
    reason = ds.universal_unsupported()
    if reason is not None:
        raise ReshardError(f"checkpoint {root / tag} was saved by {saved} ranks and cannot be resharded to "
                           f"{world_size}: {reason}; resume on {saved} ranks, or upgrade DeepSpeed")
    return True


def universal(root: Path, tag: str, workers: int = 1) -> Path:
    """``root/tag/universal``: the universal form of ZeRO checkpoint ``root/tag``, converted now unless a
    complete, intact one exists. ``workers``: processes DeepSpeed's converter may use."""
    tag_dir = root / tag
    record = ckpt.verify(root, tag)
    if not zero_sharded(record):
        raise ReshardError(f"checkpoint {tag_dir} holds no ZeRO-1/2/3 optimizer shards (a ZeRO-0 checkpoint): "
                           "it resumes at any world size as it is, there is nothing to convert")
    reason = ds.universal_unsupported()
    if reason is not None:
        raise ReshardError(f"cannot convert checkpoint {tag_dir}: {reason}")
    out = tag_dir / UNIVERSAL
    if out.exists():
        try:
            ckpt.verify(tag_dir, UNIVERSAL)
            return out
        except ckpt.CheckpointError as e:
            log.warning("%s; converting again", e)
            shutil.rmtree(out)
    log.info("converting checkpoint %s (saved by %s ranks) to DeepSpeed's universal checkpoint in %s", tag_dir,
             record.get("world_size"), out)
    try:
        ds.to_universal(tag_dir, out, workers)
        ckpt.mark_complete(tag_dir, UNIVERSAL, {"source": tag, "world_size": record.get("world_size")}, keep_last=1)
    except Exception as e:  # DeepSpeed's converter raises anything (asserts, OSError, KeyError)
        shutil.rmtree(out, ignore_errors=True)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ReshardError(f"converting checkpoint {tag_dir} to a universal checkpoint failed: "
                           f"{e.__class__.__name__}: {first}; the checkpoint itself is unchanged") from e
    return out
