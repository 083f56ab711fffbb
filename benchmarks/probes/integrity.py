"""What integrity checks cost: hash throughput, checkpoint verification, shard verification before training.

    python benchmarks/probes/integrity.py --out benchmarks/results/integrity-cpu.json

Measures, on this machine (each timing with the load average and the process CPU time next to it):

* hash throughput in memory: SHA-256 (OpenSSL, with and without the CPU's SHA instructions: p4d's
  Cascade Lake Xeons have none) and BLAKE2b, MB/s on one core;
* a checkpoint laid out like BERT-base (110M parameters) under ZeRO-2 on 8 ranks: the bf16 model states
  once plus 8 optimizer shards holding fp32 master weights and Adam's two moments (110M x (2 + 12)
  bytes = 1.54 GB), random content: ``mark_complete`` (hashing at save), ``verify`` with a warm and a
  cold page cache, 1 and 2 threads;
* shards: the delay before the first batch (each shard's SHA-256 is verified on first touch) for the
  demo dataset (`sift demo`'s prepare) and a 12M-token dataset (synthetic token ids, seq 128).

Timings on a shared machine vary with its load: the JSON records the load average around each part.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sift_common.provenance import cpu_seconds, load_average, provenance

MB = 1e6
BERT_BASE_PARAMS = 110_000_000
RANKS = 8
# OpenSSL's capability mask: bit 29 of CPUID(7).EBX is the SHA extension; "~" clears it.
NO_SHA_NI = ":~0x20000000"


def timed(fn, *args, **kwargs) -> dict:
    load, t, cpu = load_average(), time.perf_counter(), cpu_seconds(children=False)
    fn(*args, **kwargs)
    return {"wall_s": round(time.perf_counter() - t, 3), "cpu_s": round(cpu_seconds(children=False) - cpu, 3), "load": load}


def hash_rate(name: str, mib: int = 256) -> dict:
    """MB/s of one hashlib object over ``mib`` MiB already in memory (one core)."""
    buf = np.random.default_rng(0).bytes(64 << 20)
    h = hashlib.new(name)
    r = timed(lambda: [h.update(buf) for _ in range(mib // 64)])
    return {**r, "MB_per_s": round(mib * (1 << 20) / MB / r["wall_s"]), "MB_per_cpu_s": round(mib * (1 << 20) / MB / r["cpu_s"])}


def hash_rates() -> dict:
    out = {name: hash_rate(name) for name in ("sha256", "blake2b")}
    # SHA-256 as on a CPU without SHA instructions: a fresh interpreter with OpenSSL told to ignore them.
    code = "import json; from benchmarks.probes.integrity import hash_rate; print(json.dumps(hash_rate('sha256')))"
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "OPENSSL_ia32cap": NO_SHA_NI},
                          capture_output=True, text=True, check=True)
    out["sha256_without_sha_ni"] = json.loads(proc.stdout)
    return out


def write_checkpoint(root: Path, scale: float) -> dict[str, int]:
    """BERT-base ZeRO-2 x 8 ranks, file for file as DeepSpeed names them (content random)."""
    from engine import checkpoint as ckpt

    tag = root / "step00000100"
    tag.mkdir(parents=True)
    n = int(BERT_BASE_PARAMS * scale)
    sizes = {"mp_rank_00_model_states.pt": 2 * n}  # bf16 weights
    sizes |= {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt": 12 * n // RANKS for r in range(RANKS)}
    rng = np.random.default_rng(1)
    for name, size in sizes.items():
        with open(tag / name, "wb") as f:
            for start in range(0, size, 64 << 20):
                f.write(rng.bytes(min(64 << 20, size - start)))
    for r in range(RANKS):
        (tag / ckpt.rank_file(r)).write_bytes(rng.bytes(10_000))
    return sizes


def drop_cache(paths) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def bench_checkpoint(work: Path, scale: float) -> dict:
    from engine import checkpoint as ckpt

    root = work / "checkpoints"
    sizes = write_checkpoint(root, scale)
    tag, tag_dir = "step00000100", root / "step00000100"
    total = sum(p.stat().st_size for p in tag_dir.iterdir())
    files = sorted(tag_dir.iterdir())
    out: dict = {"files": len(files), "bytes": total, "layout": {k: v for k, v in list(sizes.items())[:2]}}
    out["mark_complete_warm"] = timed(ckpt.mark_complete, root, tag, {"step": 100}, 2)
    for threads in (1, 2):
        out[f"digests_warm_{threads}_threads"] = timed(ckpt._digests, files, threads)
    drop_cache(files)
    out["verify_cold_default_threads"] = timed(ckpt.verify, root, tag)
    ckpt._VERIFIED.clear()
    out["verify_warm_default_threads"] = timed(ckpt.verify, root, tag)
    for r in out.values():
        if isinstance(r, dict) and "wall_s" in r:
            r["MB_per_s"] = round(total / MB / r["wall_s"])
    return out


def synthetic_dataset(out: Path, tokens: int, seq_len: int = 128, vocab: int = 30522) -> Path:
    """A dataset of random token ids (full rows), written by the project's own ShardWriter."""
    from data_pipeline.index import FORMAT_NAME, FORMAT_VERSION, write_index
    from data_pipeline.shards import ShardWriter, token_dtype_for

    out.mkdir(parents=True)
    dtype = token_dtype_for(vocab)
    rows = tokens // seq_len
    per_shard = (32 << 20) // (seq_len * dtype.itemsize)
    writer = ShardWriter(out, "train", seq_len, dtype, per_shard)
    rng = np.random.default_rng(0)
    for start in range(0, rows, 8192):
        n = min(8192, rows - start)
        toks = rng.integers(5, vocab, (n, seq_len), dtype=dtype)
        full = np.full(n, seq_len)
        writer.add(toks, full, full // 2, np.zeros(n, dtype=np.int8))
    shards = writer.close()
    write_index(out, {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "seq_len": seq_len, "objective": "nsp_pairs",
        "token_dtype": dtype.name, "rows_per_shard": per_shard, "vocab_size": vocab,
        "special_ids": {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}, "tokenizer": "tokenizer",
        "splits": {"train": {"rows": rows, "shards": [vars(s) for s in shards]}},
    })
    return out


def demo_dataset(work: Path) -> Path:
    from data_pipeline import prepare
    from data_pipeline.demo_corpus import write_demo_corpus

    corpus = write_demo_corpus(work / "corpus", seed=0)
    data = work / "demo-data"
    code = prepare.main([str(corpus), "--out", str(data), "--seq-len", "128", "--vocab-size", "4096",
                         "--val-fraction", "0.05", "--seed", "0", "--log-level", "WARNING"])
    if code:
        raise SystemExit(f"prepare failed: {code}")
    return data


def bench_shards(data: Path, batch: int = 64) -> dict:
    """Delay before the first batch: open, then one random batch of rows (whose shards get hashed)."""
    from data_pipeline.reader import ShardDataset

    shards = sorted(data.glob("train-*.arrow"))
    total = sum(p.stat().st_size for p in shards)
    idx = np.random.default_rng(0).choice(ShardDataset.open(data).meta.splits["train"], batch, replace=False)
    out: dict = {"train_shards": len(shards), "train_bytes": total}
    drop_cache(shards)
    ds = ShardDataset.open(data)
    out["first_batch_cold"] = timed(ds.rows, idx)  # hashes every shard the batch touches
    out["second_batch"] = timed(ds.rows, idx)
    ds = ShardDataset.open(data)
    out["first_batch_warm"] = timed(ds.rows, idx)
    out["open_with_verify_checksums_warm"] = timed(ShardDataset.open, data, "train", True)
    out["touched_shards"] = len(ds._verified)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/bench/integrity-cpu.json"))
    p.add_argument("--scale", type=float, default=1.0, help="checkpoint size relative to BERT-base")
    p.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    args = p.parse_args()
    import ssl

    result = provenance("python -m benchmarks.probes.integrity " + shlex.join(sys.argv[1:]))
    result["machine"]["openssl"] = ssl.OPENSSL_VERSION
    result["hash_in_memory_one_core"] = hash_rates()
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        result["checkpoint_bert_base_zero2_8_ranks"] = bench_checkpoint(work, args.scale)
        result["shards_demo"] = bench_shards(demo_dataset(work))
        result["shards_12M_tokens"] = bench_shards(synthetic_dataset(work / "12M", 12_000_000))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    from sift_common.errors import run_command

    sys.exit(run_command("benchmarks.probes.integrity", lambda _: main(), []))
