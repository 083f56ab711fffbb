"""Data pipeline benchmark: loader, prepare, reader memory and sampler start-up, on CPU.

    python -m benchmarks.probes.data_loader --out benchmarks/results/data_loader-cpu.json     # from the repository root

Measures (targets from the data-pipeline issue, for a 2-core machine):

* loader: sequences/s and tokens/s for read + mask + collate at seq_len 512, G = 64 rows per draw, with
  0 and 2 DataLoader workers (target >= 20,000 sequences/s per process);
* prepare: tokens/s of ``sift prepare`` per process on ``../shared/corpus/english-reference.parquet``
  (target >= 300,000), skipped with a message where the corpus is absent;
* reader memory: resident set (anonymous and file-backed) of a fresh process that opens datasets of
  1x, 4x and 16x the size and reads the same number of rows (target: independent of corpus size);
* sampler start-up: time to the first draw for 10 M samples (target < 1 s).

Timings on a shared machine vary with its load: the JSON records the load average around each part.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import numpy as np

from sift_common.errors import SiftError
from sift_common.logs import setup_logging
from sift_common.provenance import cpu_seconds, load_average, proc_field, provenance

SHARED_CORPUS = Path("..") / "shared" / "corpus" / "english-reference.parquet"
"""The workplace's reference corpus, looked for next to the directory the benchmark runs from."""
SEQ_LEN, G = 512, 64
log = logging.getLogger("bench.data_loader")


def process_cpu(pids: list[int]) -> float:
    """CPU seconds of this process plus the live processes ``pids`` (from /proc/<pid>/stat)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    total = me.ru_utime + me.ru_stime
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return total


def run_prepare(argv: list[str]) -> dict:
    from data_pipeline import prepare

    code = prepare.main([*argv, "--log-level", "WARNING"])
    if code != 0:
        raise SiftError(f"prepare failed with status {code}: {argv}")
    return json.loads((Path(argv[argv.index("--out") + 1]) / "index.json").read_text())


def bench_prepare(work: Path) -> tuple[dict, Path]:
    """Tokenizer training, then prepare with 1 and 2 processes; returns results and a seq-512 dataset."""
    if not SHARED_CORPUS.is_file():
        log.warning(
            "shared corpus absent (%s): prepare throughput skipped; using the demo corpus", SHARED_CORPUS
        )
        from data_pipeline.demo_corpus import write_demo_corpus

        src = write_demo_corpus(work, seed=0, target_docs=6000)
        index = run_prepare(
            [str(src), "--out", str(work / "ds512"), "--seq-len", str(SEQ_LEN), "--vocab-size", "8000"]
        )
        return {"skipped": f"{SHARED_CORPUS.name} not found next to the repository"}, work / "ds512"
    results: dict = {"corpus": "../shared/corpus/english-reference.parquet"}
    t = time.perf_counter()
    load = load_average()
    index = run_prepare([str(SHARED_CORPUS), "--out", str(work / "tok"), "--seq-len", "128", "--max-docs", "2000",
                         "--train-tokenizer", "--vocab-size", "30522", "--num-proc", "1"])  # fmt: skip
    results["tokenizer_training"] = {"documents": 2000, "vocab_size": index["vocab_size"],
                                     "seconds_incl_small_prepare": round(time.perf_counter() - t, 2), "load": load}  # fmt: skip
    tokenizer = str(work / "tok" / "tokenizer")
    runs = []
    for num_proc, seq_len, objective in [(1, 512, "nsp_pairs"), (1, 128, "nsp_pairs"), (1, 128, "mlm_packed"),
                                         (2, 512, "nsp_pairs")]:  # fmt: skip
        out = work / f"ds{seq_len}-{objective}-{num_proc}"
        load = load_average()
        t, cpu = time.perf_counter(), cpu_seconds()
        index = run_prepare([str(SHARED_CORPUS), "--out", str(out), "--tokenizer", tokenizer, "--seq-len",
                             str(seq_len), "--objective", objective, "--num-proc", str(num_proc)])  # fmt: skip
        wall, cpu = time.perf_counter() - t, cpu_seconds() - cpu
        st = index["prepare"]["stats"]
        runs.append({
            "num_proc": num_proc, "seq_len": seq_len, "objective": objective, "documents": st["documents"],
            "tokens": st["tokens"], "wall_seconds": round(wall, 2), "tokenize_seconds": st["tokenize_seconds"],
            "tokens_per_second": st["tokens_per_second"],
            "tokens_per_second_per_process": round(st["tokens_per_second"] / num_proc),
            "cpu_seconds_whole_command": round(cpu, 2), "tokens_per_cpu_second": round(st["tokens"] / cpu),
            "rows": {s: v["rows"] for s, v in index["splits"].items()}, "fill": st["fill"],
            "load_before": load, "load_after": load_average(),
        })  # fmt: skip
        log.info("prepare %s", runs[-1])
    results["runs"] = runs
    results["target_tokens_per_second_per_process"] = 300_000
    return results, work / "ds512-nsp_pairs-1"


def bench_loader(dataset: Path, draws: int = 300, repeats: int = 3) -> list[dict]:
    """Each configuration ``repeats`` times (fresh loader each time); the median is the headline."""
    import torch

    from data_pipeline.loader import build_loader
    from data_pipeline.reader import ShardDataset

    torch.set_num_threads(1)  # one process = one core: what "per process" means here
    ds = ShardDataset.open(dataset)
    out = []
    for workers in (0, 2):
        runs = []
        for r in range(repeats):
            loader = build_loader(ds, seed=r, rank=0, world_size=1, batch_size_for_draw=lambda d: G,
                                  num_workers=workers)  # fmt: skip
            it = iter(loader)
            for _ in range(10 if workers == 0 else 20):  # warm-up (worker start, page cache)
                next(it)
            pids = [w.pid for w in getattr(it.inner, "_workers", [])]  # DataLoader internals: benchmark only
            load = load_average()
            t, cpu = time.perf_counter(), process_cpu(pids)
            real = 0
            for batch in islice(it, draws):
                real += int(batch["attention_mask"].sum())
            dt, cpu = time.perf_counter() - t, process_cpu(pids) - cpu
            del it
            runs.append({
                "sequences_per_second": round(draws * G / dt), "real_tokens_per_second": round(real / dt),
                # CPU of the main process plus its workers during the timed draws: the cost per sequence,
                # whatever else the machine is running.
                "sequences_per_cpu_second": round(draws * G / cpu),
                "load_before": load,
            })  # fmt: skip
        median = sorted(runs, key=lambda x: x["sequences_per_second"])[len(runs) // 2]
        seqs = median["sequences_per_second"]
        out.append({
            "num_workers": workers, "seq_len": SEQ_LEN, "rows_per_draw": G, "draws_per_run": draws,
            "sequences_per_second": seqs, "padded_tokens_per_second": seqs * SEQ_LEN,
            "real_tokens_per_second": median["real_tokens_per_second"],
            "sequences_per_second_per_process": round(seqs / max(1, workers)),
            "sequences_per_cpu_second": median["sequences_per_cpu_second"],
            "runs": runs,
        })  # fmt: skip
        log.info("loader %s", out[-1])
    return out


def bench_sampler(n: int = 10_000_000) -> dict:
    from data_pipeline.sampler import DrawSampler, epoch_permutation

    t, cpu = time.perf_counter(), cpu_seconds()
    first = next(iter(DrawSampler(n, seed=0, rank=3, world_size=8, size_fn=lambda d: 64)))
    startup, startup_cpu = time.perf_counter() - t, cpu_seconds() - cpu
    t = time.perf_counter()
    epoch_permutation(0, 1, n)
    perm = time.perf_counter() - t
    assert len(first.sample_ids) == 64
    return {"samples": n, "first_draw_seconds": round(startup, 3), "first_draw_cpu_seconds": round(startup_cpu, 3),
            "permutation_seconds": round(perm, 3),
            "target_seconds": 1.0}  # fmt: skip


def write_synthetic(root: Path, shards: int, rows_per_shard: int) -> None:
    """A dataset of random tokens (format-identical to a prepared one), ``shards`` full shards."""
    from data_pipeline.index import FORMAT_NAME, FORMAT_VERSION, write_index
    from data_pipeline.shards import ShardWriter

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    w = ShardWriter(root, "train", SEQ_LEN, np.dtype(np.uint16), rows_per_shard)
    block = rng.integers(5, 30522, (rows_per_shard, SEQ_LEN), dtype=np.uint16)
    lengths = np.full(rows_per_shard, SEQ_LEN)
    for _ in range(shards):
        w.add(block, lengths, lengths // 2, np.zeros(rows_per_shard, np.int8))
    infos = w.close()
    write_index(root, {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "seq_len": SEQ_LEN, "objective": "nsp_pairs",
        "token_dtype": "uint16", "rows_per_shard": rows_per_shard, "vocab_size": 30522,
        "special_ids": {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}, "tokenizer": "bert-base-uncased",
        "splits": {"train": {"rows": w.rows, "shards": [vars(i) for i in infos]}},
    })  # fmt: skip


def rss_probe(dataset: str) -> dict:
    """Run in a fresh process, shards evicted from the page cache first: memory after import, after
    open, after reading 100 draws of 64 random rows. RssAnon is the reader's own memory; RssFile counts
    mapped page-cache pages of the shards (read-ahead included; shared between processes, reclaimable)."""
    from data_pipeline.loader import build_loader
    from data_pipeline.reader import ShardDataset

    def status() -> dict:
        return {
            k: round(int(proc_field("/proc/self/status", k).split()[0]) / 1024, 1)
            for k in ("VmRSS", "RssAnon", "RssFile")
        }

    for shard in Path(dataset).glob("*.arrow"):  # cold page cache: as for a corpus larger than memory
        fd = os.open(shard, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    base = status()
    ds = ShardDataset.open(dataset)
    opened = status()
    for _ in islice(build_loader(ds, seed=0, rank=0, world_size=1, batch_size_for_draw=lambda d: G), 100):
        pass
    return {
        "rows": len(ds),
        "MiB_after_imports": base,
        "MiB_after_open": opened,
        "MiB_after_6400_rows": status(),
    }


def bench_rss(work: Path, rows_per_shard: int = 16384) -> list[dict]:
    out = []
    for shards in (1, 4, 16):
        root = work / f"synthetic-{shards}"
        write_synthetic(root, shards, rows_per_shard)
        proc = subprocess.run([sys.executable, "-m", "benchmarks.probes.data_loader", "--rss-probe", str(root)], capture_output=True, text=True,
                              check=True)  # fmt: skip
        probe = json.loads(proc.stdout.strip().splitlines()[-1])
        probe["dataset_MiB"] = round(sum(p.stat().st_size for p in root.glob("*.arrow")) / 2**20, 1)
        out.append(probe)
        log.info("rss %s", probe)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="write the JSON results here (default: print only)")
    p.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--rss-probe", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rss_probe:
        print(json.dumps(rss_probe(args.rss_probe)))
        return 0
    setup_logging()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    command = "python -m benchmarks.probes.data_loader" + (f" --out {shlex.quote(args.out)}" if args.out else "")
    results: dict = {"benchmark": "data_loader", **provenance(command), "load_at_start": load_average()}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        results["sampler_startup"] = bench_sampler()
        results["prepare"], ds512 = bench_prepare(work)
        results["loader"] = bench_loader(ds512)
        results["loader_target_sequences_per_second_per_process"] = 20_000
        results["reader_rss"] = bench_rss(work)
    results["load_at_end"] = load_average()
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    from sift_common.errors import run_command

    sys.exit(run_command("benchmarks.probes.data_loader", lambda _: main(), []))
