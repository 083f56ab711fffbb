"""`sift export`: a checkpoint (any ZeRO stage) -> a Hugging Face `save_pretrained` directory.

    sift export runs/demo/train --out runs/demo/hf
    python -c "from transformers import pipeline; print(pipeline('fill-mask', model='runs/demo/hf')('the [MASK] of python'))"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine import checkpoint as ckpt

# The MLM decoder shares the word-embedding matrix and its bias parameter; ZeRO checkpoints store
# each shared tensor once, under the first name.
TIED = {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}


class ExportError(RuntimeError):
    pass


def export(run_dir: Path, out: Path, tag: str | None = None) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertForPreTraining

    from engine import ds

    root = run_dir / "checkpoints"
    tag = tag or ckpt.find_latest(root)
    if tag is None:
        raise ExportError(f"no complete checkpoint under {root}")
    record = ckpt.verify(root, tag)
    try:
        state = ds.consolidated_state_dict(root, tag)
    except Exception as e:
        raise ExportError(f"cannot consolidate checkpoint {root / tag}: {e.__class__.__name__}: {e}") from e
    state = {k.removeprefix("hf."): v for k, v in state.items()}
    cls = BertForPreTraining if record["objective"] == "nsp_pairs" else BertForMaskedLM
    model = cls(BertConfig.from_dict(record["model_config"]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - TIED:
        raise ExportError(
            f"checkpoint {root / tag} does not match the model: missing {sorted(set(missing) - TIED)}, "
            f"unexpected {sorted(unexpected)}"
        )
    model.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(record["tokenizer"]).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sift export", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, help="train.out_dir of the run")
    p.add_argument("--out", type=Path, required=True, help="directory to write (save_pretrained format)")
    p.add_argument("--tag", help="checkpoint tag (default: the latest complete one)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        path = export(args.run_dir, args.out, args.tag)
    except (ExportError, ckpt.CheckpointError) as e:
        print(f"sift export: error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.run_dir} to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
