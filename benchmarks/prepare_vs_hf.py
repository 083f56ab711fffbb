"""`sift prepare` against the Hugging Face path users know, side by side on one held-out English corpus.

    python -m benchmarks.prepare_vs_hf                     # results in runs/prepare_vs_hf/
    python -m benchmarks.prepare_vs_hf --repeats 5 --out benchmarks/results   # on a quiet machine

The Hugging Face path is transformers' run_mlm.py recipe: ``datasets.load_dataset("parquet")``, one
batched ``map`` of the tokenizer (``return_special_tokens_mask=True``, the tokenizer's own threads) and
one batched ``map`` that concatenates every column and cuts it into rows of ``--seq-len`` tokens
(``group_texts``). ``sift prepare`` runs with ``--objective mlm_packed`` and the same seq_len and
tokenizer, at ``--num-proc 1`` (one process, one tokenizer thread), ``--num-proc 2`` (two worker processes)
and at its default (up to 4 cores: one process, the tokenizer's threads on every core). Each variant is one whole child process (start-up and
imports included), the variants alternating run by run; its CPU time is its user + system seconds with
every thread and reaped descendant (``os.wait4``), which other load on the machine barely moves; wall
time does move with load, so the result file records the load average.

Input: ``../shared/corpus/english-reference.parquet`` (relative to the repository; the benchmark says so
and stops where it is absent). Every third document is held out (the benchmark's input, ~4 M word
pieces); an uncased WordPiece of ``--vocab-size`` is trained on the first ``--tokenizer-docs`` of the
others. Throughput is word pieces of the input (``sift prepare``'s count, special tokens excluded) per
CPU-second and per wall-second, and each as a ratio to the HF path.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from sift_common.provenance import load_average, provenance

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "corpus" / "english-reference.parquet"


def hf_path(parquet: str, tokenizer: str, seq_len: int, cache: str) -> None:
    """The run_mlm.py recipe (child process): tokenize with ``datasets.map``, then group into rows."""
    from itertools import chain

    import datasets
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    raw = datasets.load_dataset("parquet", data_files=parquet, split="train", cache_dir=cache)

    def tokenize(batch):
        return tok(batch["text"], return_special_tokens_mask=True)

    tokenized = raw.map(tokenize, batched=True, remove_columns=raw.column_names)

    def group_texts(batch):
        joined = {k: list(chain.from_iterable(v)) for k, v in batch.items()}
        usable = len(joined["input_ids"]) // seq_len * seq_len
        return {k: [v[i : i + seq_len] for i in range(0, usable, seq_len)] for k, v in joined.items()}

    rows = tokenized.map(group_texts, batched=True)
    print(json.dumps({"rows": len(rows)}))


def measure(argv: list[str], env: dict[str, str]) -> dict[str, float]:
    """Wall and CPU seconds (user + system of the child, its threads and reaped descendants)."""
    t0 = time.perf_counter()
    child = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - t0
    out, err = child.stdout.read().decode(), child.stderr.read().decode()
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"benchmark child failed ({child.returncode}): {shlex.join(argv)}\n{err[-2000:]}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "stdout": out}


def setup(work: Path, vocab_size: int, tokenizer_docs: int) -> tuple[Path, Path]:
    """The held-out slice (every third document) and a tokenizer trained on the others."""
    import pyarrow.parquet as pq

    from data_pipeline.tokenization import train_wordpiece

    heldout, tokenizer = work / "heldout.parquet", work / "tokenizer"
    table = pq.read_table(CORPUS, columns=["id", "text"])
    if not heldout.exists():
        pq.write_table(table.take(list(range(0, len(table), 3))), heldout)
    if not tokenizer.exists():
        rest = [t for i, t in enumerate(table.column("text").to_pylist()) if i % 3][:tokenizer_docs]
        train_wordpiece(rest, vocab_size, tokenizer)
    return heldout, tokenizer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "runs" / "prepare_vs_hf", help="result directory")
    p.add_argument("--name", default="prepare_vs_hf-cpu", help="result file name (.json and .md)")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "prepare_vs_hf-work", help="inputs and outputs")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--vocab-size", type=int, default=16000)
    p.add_argument("--tokenizer-docs", type=int, default=3000)
    p.add_argument("--repeats", type=int, default=3, help="runs of each variant (alternating)")
    p.add_argument("--hf-child", nargs=4, metavar=("PARQUET", "TOKENIZER", "SEQ_LEN", "CACHE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.hf_child:
        hf_path(args.hf_child[0], args.hf_child[1], int(args.hf_child[2]), args.hf_child[3])
        return 0
    if not CORPUS.is_file():
        print(f"prepare_vs_hf: skipped: the shared corpus is not at {CORPUS} (../shared/corpus/ next to the repository)")
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    heldout, tokenizer = setup(args.work, args.vocab_size, args.tokenizer_docs)
    load_before = load_average()
    env = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}  # each path's own default
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    sift = [sys.executable, "-m", "data_pipeline.prepare", str(heldout), "--tokenizer", str(tokenizer),
            "--objective", "mlm_packed", "--seq-len", str(args.seq_len), "--overwrite", "--log-level", "WARNING"]
    variants = {
        "hf": lambda i: [sys.executable, "-m", "benchmarks.prepare_vs_hf", "--hf-child", str(heldout), str(tokenizer),
                         str(args.seq_len), str(args.work / f"hf-cache-{i}")],
        "sift_num_proc_1": lambda i: [*sift, "--out", str(args.work / "sift-1"), "--num-proc", "1"],
        "sift_num_proc_2": lambda i: [*sift, "--out", str(args.work / "sift-2"), "--num-proc", "2"],
        "sift_default": lambda i: [*sift, "--out", str(args.work / "sift-default")],
    }
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
    for i in range(args.repeats):
        for name, command in variants.items():
            runs[name].append(measure(command(i), env))
            shutil.rmtree(args.work / f"hf-cache-{i}", ignore_errors=True)
            print(f"prepare_vs_hf: run {i + 1}/{args.repeats} {name}: {runs[name][-1]['wall_s']:.2f} s wall, "
                  f"{runs[name][-1]['cpu_s']:.2f} s CPU", file=sys.stderr)
    index = json.loads((args.work / "sift-1" / "index.json").read_text())
    tokens = index["prepare"]["stats"]["tokens"]
    result = provenance("python -m benchmarks.prepare_vs_hf " + shlex.join(sys.argv[1:] if argv is None else argv),
                        where=REPO)
    result.update(load_average_before=load_before, input={"documents": index["prepare"]["stats"]["documents"], "word_pieces": tokens,
                         "seq_len": args.seq_len, "vocab_size": index["vocab_size"]}, variants={})
    hf_cpu = statistics.median(r["cpu_s"] for r in runs["hf"])
    hf_wall = statistics.median(r["wall_s"] for r in runs["hf"])
    for name, rs in runs.items():
        cpu, wall = statistics.median(r["cpu_s"] for r in rs), statistics.median(r["wall_s"] for r in rs)
        result["variants"][name] = {
            "cpu_s": [round(r["cpu_s"], 3) for r in rs], "wall_s": [round(r["wall_s"], 3) for r in rs],
            "tokens_per_cpu_s": round(tokens / cpu), "tokens_per_wall_s": round(tokens / wall),
            "per_cpu_s_x_hf": round(hf_cpu / cpu, 3), "per_wall_s_x_hf": round(hf_wall / wall, 3)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    m, inp = result["machine"], result["input"]
    lines = [f"# `sift prepare` vs datasets.map + group_texts ({inp['word_pieces']:,} word pieces, "
             f"{inp['documents']:,} documents, T = {inp['seq_len']}, vocab {inp['vocab_size']:,})", "",
             f"`{result['command']}` at {result['git_commit']}, {result['date']}; {m['cpu']}, {m['cores']} cores; "
             f"load average before: {result['load_average_before']}, after: {result['load_average']}; versions: "
             + ", ".join(f"{k} {v}" for k, v in result["versions"].items() if v), "",
             "Medians of each variant's runs (whole child processes, imports included). CPU: user + system "
             "seconds of every thread and child; wall moves with the machine's load.", ""]
    # The 1-minute load before the first run: the 5- and 15-minute figures still carry earlier jobs.
    if (result["load_average_before"] or [0])[0] > m["cores"]:
        lines += ["**Measured on a busy machine (1-minute load average above its core count): wall times are slower and "
                  "noisier than on a quiet one, and CPU times somewhat inflated; rerun quiet before quoting a "
                  "figure.**", ""]
    lines += ["| | tokens per CPU-second | x HF | wall (s) | x HF (speed) | CPU s (runs) |", "|---|---|---|---|---|---|"]
    for name, v in result["variants"].items():
        wall = statistics.median(v["wall_s"])
        lines.append(f"| {name} | {v['tokens_per_cpu_s']:,} | {v['per_cpu_s_x_hf']:.2f} | {wall:.2f} | "
                     f"{v['per_wall_s_x_hf']:.2f} | {', '.join(f'{c:.2f}' for c in v['cpu_s'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
