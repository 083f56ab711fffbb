"""`sift export`: a checkpoint (any ZeRO stage) -> a Hugging Face `save_pretrained` directory.

    sift export runs/demo/train --out runs/demo/hf
    python -c "from transformers import pipeline; print(pipeline('fill-mask', model='runs/demo/hf')('the [MASK] of python'))"
    sift export runs/demo-gpt2/train --out runs/demo-gpt2/hf     # a decoder: pipeline('text-generation')

The model family recorded in the checkpoint (engine/models/) rebuilds its stock Hugging Face model; a BERT
becomes a ``BertForMaskedLM`` (``--nsp-head``: the ``BertForPreTraining`` it trained as, NSP head kept).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from engine.run_model import RunModelError, consolidated_state, latest_checkpoint


def model_spec(record: dict[str, Any]) -> dict[str, Any]:
    """The model description of a checkpoint record (records written before model families existed
    describe a BERT by its objective and config)."""
    if "model" in record:
        return record["model"]
    cls = "BertForPreTraining" if record["objective"] == "nsp_pairs" else "BertForMaskedLM"
    return {"family": "bert", "class": cls, "config": record["model_config"]}


def export(run_dir: Path, out: Path, tag: str | None = None, *, nsp_head: bool = False) -> tuple[Path, str]:
    """Write checkpoint ``tag`` (default: the latest complete one) to ``out``; returns (the checkpoint's
    directory, the Hugging Face class written)."""
    from transformers import AutoTokenizer

    from engine.models import family

    root, tag, record = latest_checkpoint(run_dir, tag)
    spec = model_spec(record)
    if nsp_head and spec["family"] != "bert":
        raise RunModelError(f"--nsp-head: a {spec['family']} model has no NSP head (BERT only)")
    model = family(spec["family"]).from_state(consolidated_state(root, tag), spec,
                                              **({"nsp_head": True} if nsp_head else {}))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(record["tokenizer"]).save_pretrained(out)
    return root / tag, type(model).__name__


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sift export", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, help="train.out_dir of the run")
    p.add_argument("--out", type=Path, required=True, help="directory to write (save_pretrained format)")
    p.add_argument("--tag", help="checkpoint tag (default: the latest complete one)")
    p.add_argument("--nsp-head", action="store_true",
                   help="BERT trained on sentence pairs: keep the pooler and NSP head (BertForPreTraining, to continue "
                        "pre-training with model.init_from); by default a BertForMaskedLM, what fill-mask loads")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    checkpoint, cls = export(args.run_dir, args.out, args.tag, nsp_head=args.nsp_head)
    which = "" if args.tag else " (the latest)"  # a run stopped early exports where it stopped: say which
    print(f"exported {checkpoint}{which} to {args.out}: a {cls} and its tokenizer")
    return 0


if __name__ == "__main__":
    from sift_common.errors import run_command

    sys.exit(run_command("sift export", main, sys.argv[1:]))
