"""`sift reference`: train a reference model for ``sift.criterion: reducible`` and report its cost; with
``--sidecar``, precompute its per-token losses on the training split (decoders).

    # on a held-out split of prepared data (any split the run does not train on)
    sift reference --config RUN.yaml --out runs/ref --split heldout model.preset=tiny train.steps=500
    # on each half of the training split (RHO-LOSS's "double irreducible" loss): runs/ref/half0, half1;
    # the sidecar scores every row with the reference that did not train on it
    sift reference --config RUN.yaml --out runs/ref --half both --sidecar runs/ref/losses.sidecar
    # a sidecar from an existing reference (a run directory or a Hugging Face checkpoint)
    sift reference --from runs/ref --data runs/data --sidecar runs/ref/losses.sidecar

Training is `sift train` on that data (``method=none``, ``data.train_split`` or ``data.train_half``, the
given overrides), one process per reference. The cost (steps, seconds, FLOPs by the model's FLOP count)
is printed and written to ``OUT/reference.json``. Then set ``sift.reference`` (and ``sift.reference_losses``)
in the run config.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sift_common.errors import SiftError


class ReferenceCommandError(SiftError, RuntimeError):
    pass


def train_reference(config: str, out: Path, overrides: list[str], *, split: str | None, half: int | None) -> dict:
    """One `sift train` run of the reference; its cost record."""
    rows = [f"data.train_split={split}"] if split is not None else [f"data.train_half={half}"]
    argv = [sys.executable, "-m", "launcher.train", "--config", config, *overrides, "method=none",
            f"train.out_dir={out}", *rows]
    if subprocess.run(argv).returncode != 0:
        raise ReferenceCommandError(f"training the reference in {out} failed (its log is above)")
    summary = json.loads((out / "summary.json").read_text())
    return {"path": str(out), "split": split, "half": half, "steps": summary["steps"],
            "seconds": summary["hours"] * 3600.0, "backprop_samples": summary["backprop_samples"]}


def write_sidecar_for(references: list[Path], data: Path, split: str, out: Path) -> dict[str, Any]:
    """The sidecar of ``references`` (one, or two trained on halves 0 and 1) on ``split`` of ``data``."""
    from data_pipeline.reader import ShardDataset
    from engine import reference as ref

    train_set = ShardDataset.open(data, split)
    meta = train_set.meta
    if meta.objective != "clm":
        raise ReferenceCommandError(f"--sidecar: {data} holds {meta.objective!r} data; a sidecar is for decoders "
                                    "(BERT's reference runs online: its masks change every epoch)")
    if len(references) > 2:
        raise ReferenceCommandError(f"--from: one reference, or two trained on halves 0 and 1; got {len(references)}")
    facts = ref.data_facts(meta)
    models, entries = [], []
    for path in references:
        model = ref.load_reference(path, facts, data, train_set.tokenizer_path())
        half = _trained_half(path)
        models.append((model, half))
        entries.append({"path": str(path), "sha256": ref.model_hash(model), "half": half})
    if len(models) == 2 and sorted(h for _, h in models) != [0, 1]:
        raise ReferenceCommandError(f"--from twice: the references must be trained on halves 0 and 1 "
                                    f"(data.train_half), got {[h for _, h in models]}")
    if len(models) == 1 and models[0][1] is not None:
        print(f"note: {references[0]} trained on half {models[0][1]} of {data}; its losses on those rows are "
              "in-sample (--half both gives every row a reference that did not see it)", file=sys.stderr)
    header = {"index_sha256": ref.index_hash(data), "index_path": str(data), "split": split, "rows": len(train_set),
              "seq_len": meta.seq_len, "models": entries}
    t0 = time.perf_counter()
    ref.write_sidecar(out, header, ref.sidecar_blocks(models, train_set))
    # forwards of every row (two references: each on about half of them)
    flops = len(train_set) / len(models) * sum(m.flops(meta.seq_len).scoring(m.num_layers) for m, _ in models)
    return {"path": str(out), "rows": len(train_set), "seconds": time.perf_counter() - t0, "flops": flops}


def _trained_half(path: Path) -> int | None:
    """``data.train_half`` of a reference run (None for a Hugging Face checkpoint or a whole split)."""
    from engine import checkpoint as ckpt

    root = path / "checkpoints"
    tag = ckpt.find_latest(root) if root.is_dir() else None
    return None if tag is None else ckpt.verify(root, tag)["config"]["data"].get("train_half")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sift reference", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="run config of the reference (data, model size, steps), as for `sift train`")
    p.add_argument("--out", type=Path, help="where the reference run(s) go")
    rows = p.add_mutually_exclusive_group()
    rows.add_argument("--split", help="train on this split of the prepared data (held out from the run)")
    rows.add_argument("--half", choices=("0", "1", "both"), help="train on this half of the training split")
    p.add_argument("--from", dest="sources", type=Path, action="append", default=[],
                   help="an existing reference (run directory or Hugging Face checkpoint); twice for halves 0 and 1")
    p.add_argument("--sidecar", type=Path, help="also write the reference's per-token losses on the training split")
    p.add_argument("--data", type=Path, help="with --from: the prepared data (default: the config's data.path)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the reference's config")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    from engine.config import load_config

    cfg = load_config(args.config, args.overrides) if args.config else None
    references: list[dict[str, Any]] = []
    if args.sources:
        if args.split or args.half or args.sidecar is None:
            p.error("--from computes a sidecar from existing references: give --sidecar, not --split or --half")
    else:
        if cfg is None or args.out is None or not (args.split or args.half):
            p.error("training a reference needs --config, --out and --split or --half")
        halves = [0, 1] if args.half == "both" else [None] if args.half is None else [int(args.half)]
        for h in halves:
            out = args.out / f"half{h}" if args.half == "both" else args.out
            references.append(train_reference(args.config, out, args.overrides, split=args.split, half=h))
        _add_flops(references, cfg.data.path)
        args.sources = [Path(r["path"]) for r in references]
    cost: dict[str, Any] = {"references": references}
    if args.sidecar is not None:
        data = args.data or (Path(cfg.data.path) if cfg else None)
        if data is None:
            p.error("--sidecar needs the data: --data DIR or --config")
        split = cfg.data.train_split if cfg else "train"
        cost["sidecar"] = write_sidecar_for(args.sources, data, split, args.sidecar)
    if args.out is not None:
        from sift_common.atomic import atomic_write_text

        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out / "reference.json", json.dumps(cost, indent=1))
    for r in cost["references"]:
        print(f"reference {r['path']}: {r['steps']} steps, {r['seconds']:.1f} s, {r['flops']:.3g} FLOPs "
              f"({r['backprop_samples']} rows trained)")
    if "sidecar" in cost:
        s = cost["sidecar"]
        print(f"sidecar {s['path']}: {s['rows']} rows, {s['seconds']:.1f} s, {s['flops']:.3g} FLOPs")
    return 0


def _add_flops(records: list[dict[str, Any]], data_path: str) -> None:
    """Training FLOPs of each reference: back-propagated rows x the model's training FLOPs per row."""
    from data_pipeline.index import read_index
    from engine.run_model import load_run_model

    seq_len = read_index(data_path)[0].seq_len
    for r in records:
        model = load_run_model(Path(r["path"]), data=Path(data_path))[1]
        r["flops"] = r["backprop_samples"] * model.flops(seq_len).train()


if __name__ == "__main__":
    from launcher.cli import main as sift

    sys.exit(sift(["reference", *sys.argv[1:]]))
