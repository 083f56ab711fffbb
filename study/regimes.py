"""Data regimes for the study: one input corpus -> clean, redundant and noisy variants plus a held-out set.

    python -m study.regimes --input ../shared/corpus/english-reference.parquet \\
        --out runs/study-data/regimes --heldout-group python-docs      # what `sift study` runs

* **held-out**: the documents of one group (``--group-field``, e.g. the corpus's ``source`` column) are
  left out of training entirely and prepared as a dataset of their own, with the clean data's tokenizer:
  text of a different distribution, evaluated next to the validation split.
* **clean**: the remaining documents as they are (kind ``original``).
* **redundant**: clean plus near-duplicate copies (kind ``duplicate``) of a few training documents
  (kind ``duplicated``), ``copies`` each, until the copies make ``duplicate_share`` of the training text.
* **noisy**: clean plus unlearnable documents until they make ``noise_share`` of the training text: half
  ``noise-shuffled`` (a training document's words in random order: the unigram statistics without any
  context) and half ``noise-random`` (words drawn uniformly from the corpus's distinct words).

Every variant is prepared with ``--split-by id`` and the clean data's tokenizer. Generated documents carry
the id of a document on the training side of the split (a copy, its original's), so the split rule that
`sift prepare` documents (a hash of the id) puts them all in training and every regime is validated on
exactly the same documents; ``build`` checks that the validation shards are byte-identical across
regimes and refuses the data otherwise. Shares are of characters on the training side, which is close
to the share of rows (rows of different kinds are filled alike); the study's kept-row diagnostic draws
gross batches from a sample of each kind (prepared alone, the same way) in those shares.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sift_common.logs import setup_logging
from study.spec import StudyError

log = logging.getLogger("sift.study.regimes")

REGIMES = ("clean", "redundant", "noisy")
HELDOUT = "heldout"
KINDS = {"clean": ("original",), "redundant": ("original", "duplicated", "duplicate"),
         "noisy": ("original", "noise-shuffled", "noise-random")}
_WORD = re.compile(r"\S+")
KIND_SAMPLE_DOCS = 300  # training documents per kind prepared on their own, for the kept-row diagnostic


@dataclass(kw_only=True, slots=True)
class RegimeConfig:
    """How the variants are made (the `study.regimes` section of a study file)."""

    input: str
    """A .parquet or .jsonl(.gz) corpus, one document per row."""
    names: list[str] = field(default_factory=lambda: list(REGIMES))
    text_field: str = "text"
    id_field: str = "id"
    group_field: str | None = "source"
    heldout_group: str | None = None
    """Documents of this group are left out of training and prepared as the held-out set."""
    duplicate_share: float = 0.4
    copies: int = 16
    """Near-duplicate copies per duplicated document (more copies: more redundant, fewer distinct)."""
    noise_share: float = 0.25
    seed: int = 0
    val_fraction: float = 0.02
    heldout_val_fraction: float = 0.5
    """The held-out set's evaluation split (`sift prepare` needs a fraction < 1; the rest is unused)."""
    prepare_args: list[str] = field(default_factory=lambda: ["--seq-len", "128", "--vocab-size", "8192", "--seed", "0"])
    """Options for `sift prepare` (besides --out, --tokenizer, --val-fraction and --split-by)."""

    @classmethod
    def from_dict(cls, tree: dict[str, Any], where: str = "study.regimes") -> RegimeConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(tree) - known)
        if unknown:
            raise StudyError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        if not tree.get("input"):
            raise StudyError(f"{where}: `input` (the corpus to build the regimes from) is required")
        cfg = cls(**{k: ([str(a) for a in v] if k == "prepare_args" else v) for k, v in tree.items()})
        problems = cfg.problems()
        if problems:
            raise StudyError(f"{where}: " + "; ".join(problems))
        return cfg

    def problems(self) -> list[str]:
        p = [f"unknown regime {n!r} (known: {', '.join(REGIMES)})" for n in self.names if n not in REGIMES]
        if not 0 < self.duplicate_share < 1:
            p.append(f"duplicate_share must be in (0, 1), got {self.duplicate_share}")
        if not 0 < self.noise_share < 1:
            p.append(f"noise_share must be in (0, 1), got {self.noise_share}")
        if self.copies < 1:
            p.append(f"copies must be >= 1, got {self.copies}")
        if not 0 < self.val_fraction < 1 or not 0 < self.heldout_val_fraction < 1:
            p.append("val_fraction and heldout_val_fraction must be in (0, 1)")
        if self.heldout_group is not None and not self.group_field:
            p.append("heldout_group needs group_field")
        reserved = {"--out", "--tokenizer", "--train-tokenizer", "--val-fraction", "--split-by", "--text-field",
                    "--id-field"}
        p += [f"prepare_args: {a} is set by the regime builder" for a in self.prepare_args if a in reserved]
        return p


@dataclass(slots=True)
class Doc:
    id: str
    text: str
    kind: str = "original"
    group: str = ""


# ----------------------------------------------------------------------------- pure pieces


def validation_side(doc_id: str, val_fraction: float) -> bool:
    """`sift prepare --split-by id`'s documented rule: validation when the little-endian 64-bit BLAKE2b
    hash of the UTF-8 id is below val_fraction x 2^64 (data_pipeline/README.md, "Split")."""
    h = int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return h < val_fraction * 2.0**64


def near_duplicate(text: str, rng: np.random.Generator, *, drop_line: float = 0.1, swap_word: float = 0.03) -> str:
    """A lightly edited copy: each line dropped with probability ``drop_line`` (at least one kept), each
    word replaced by another word of the same document with probability ``swap_word``."""
    lines = text.split("\n")
    keep = rng.random(len(lines)) >= drop_line
    if not keep.any():
        keep[rng.integers(len(lines))] = True
    words = _WORD.findall(text) or [""]
    out = []
    for line, k in zip(lines, keep):
        if not k:
            continue
        out.append(_WORD.sub(lambda m: words[rng.integers(len(words))] if rng.random() < swap_word else m.group(0),
                             line))
    return "\n".join(out)


def shuffled_words(text: str, rng: np.random.Generator) -> str:
    """The document's words in a random order, on lines of the original lengths (in words)."""
    lines = [_WORD.findall(line) for line in text.split("\n")]
    words = [w for line in lines for w in line]
    order = rng.permutation(len(words))
    out, i = [], 0
    for line in lines:
        out.append(" ".join(words[j] for j in order[i:i + len(line)]))
        i += len(line)
    return "\n".join(out)


def random_words(n_words: int, vocabulary: list[str], rng: np.random.Generator, per_line: int = 12) -> str:
    """``n_words`` words drawn uniformly (with replacement) from ``vocabulary``, ``per_line`` to a line."""
    picks = rng.integers(len(vocabulary), size=max(1, n_words))
    words = [vocabulary[i] for i in picks]
    return "\n".join(" ".join(words[i:i + per_line]) for i in range(0, len(words), per_line))


def _insert(docs: list[Doc], extra: list[Doc], rng: np.random.Generator) -> list[Doc]:
    """``extra`` spread over random positions of ``docs``, whose own order is kept (so the validation
    documents, and the chunks `sift prepare` groups them in, stay the same)."""
    slots = np.sort(rng.integers(0, len(docs) + 1, size=len(extra)))
    out, j = [], 0
    for i, doc in enumerate(docs):
        while j < len(extra) and slots[j] == i:
            out.append(extra[j])
            j += 1
        out.append(doc)
    return out + extra[j:]


def redundant(docs: list[Doc], cfg: RegimeConfig, rng: np.random.Generator) -> list[Doc]:
    """Clean plus near-duplicate copies making ``cfg.duplicate_share`` of the training characters."""
    train = [i for i, d in enumerate(docs) if not validation_side(d.id, cfg.val_fraction)]
    train_chars = sum(len(docs[i].text) for i in train)
    goal = cfg.duplicate_share / (1 - cfg.duplicate_share) * train_chars  # copies' characters
    out = [Doc(d.id, d.text, d.kind, d.group) for d in docs]
    copies, chars = [], 0
    for i in rng.permutation(train):
        if chars >= goal:
            break
        out[i].kind = "duplicated"
        for _ in range(cfg.copies):
            text = near_duplicate(docs[i].text, rng)
            copies.append(Doc(docs[i].id, text, "duplicate", docs[i].group))  # the original's id: same split
            chars += len(text)
    rng.shuffle(copies)
    return _insert(out, copies, rng)


def noisy(docs: list[Doc], cfg: RegimeConfig, rng: np.random.Generator) -> list[Doc]:
    """Clean plus unlearnable documents making ``cfg.noise_share`` of the training characters."""
    train = [i for i, d in enumerate(docs) if not validation_side(d.id, cfg.val_fraction)]
    goal = cfg.noise_share / (1 - cfg.noise_share) * sum(len(docs[i].text) for i in train)
    vocabulary = sorted({w for i in train for w in _WORD.findall(docs[i].text)})
    noise, chars = [], 0
    while chars < goal:
        src = docs[train[rng.integers(len(train))]]
        if len(noise) % 2 == 0:
            text, kind = shuffled_words(src.text, rng), "noise-shuffled"
        else:
            text, kind = random_words(len(_WORD.findall(src.text)), vocabulary, rng), "noise-random"
        noise.append(Doc(src.id, text, kind, src.group))  # a training document's id: the training side
        chars += len(text)
    return _insert([Doc(d.id, d.text, d.kind, d.group) for d in docs], noise, rng)


def make_regime(name: str, docs: list[Doc], cfg: RegimeConfig) -> list[Doc]:
    rng = np.random.default_rng([cfg.seed, REGIMES.index(name), 0x8E61E])
    if name == "clean":
        return [Doc(d.id, d.text, d.kind, d.group) for d in docs]
    return redundant(docs, cfg, rng) if name == "redundant" else noisy(docs, cfg, rng)


def char_shares(docs: list[Doc], val_fraction: float) -> dict[str, float]:
    """Share of the training-side characters per kind."""
    chars: dict[str, int] = {}
    for d in docs:
        if not validation_side(d.id, val_fraction):
            chars[d.kind] = chars.get(d.kind, 0) + len(d.text)
    total = sum(chars.values()) or 1
    return {k: v / total for k, v in sorted(chars.items())}


# ----------------------------------------------------------------------------- files


def read_corpus(cfg: RegimeConfig) -> list[Doc]:
    """The input's documents (id, text, group) in file order."""
    path = Path(cfg.input)
    if not path.is_file():
        raise StudyError(f"regime input {path} is not a file")
    name = path.name.lower()
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    if name.endswith(".parquet"):
        table = pq.read_table(path)
    elif name.endswith((".jsonl", ".jsonl.gz")):
        table = pj.read_json(path)
    else:
        raise StudyError(f"regime input {path}: expected .parquet, .jsonl or .jsonl.gz")
    cols = table.column_names
    missing = [c for c in (cfg.text_field, cfg.id_field, cfg.group_field) if c and c not in cols]
    if missing:
        raise StudyError(f"{path}: no column(s) {', '.join(missing)} (columns: {', '.join(cols)})")
    texts = table.column(cfg.text_field).to_pylist()
    ids = table.column(cfg.id_field).to_pylist()
    groups = table.column(cfg.group_field).to_pylist() if cfg.group_field else [""] * len(texts)
    docs = [Doc(str(i), t, "original", str(g)) for i, t, g in zip(ids, texts, groups) if isinstance(t, str) and t]
    if cfg.heldout_group is not None and not any(d.group == cfg.heldout_group for d in docs):
        raise StudyError(f"{path}: no document has {cfg.group_field} = {cfg.heldout_group!r} "
                         f"(groups: {', '.join(sorted({d.group for d in docs}))})")
    return docs


def write_parquet(docs: list[Doc], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"id": [d.id for d in docs], "text": [d.text for d in docs], "kind": [d.kind for d in docs],
                      "group": [d.group for d in docs]})
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def prepare(inputs: Path, out: Path, args: list[str]) -> None:
    """`sift prepare` through its command line (its internals are not ours to call)."""
    if (out / "index.json").is_file():
        return
    cmd = [sys.executable, "-m", "data_pipeline.prepare", str(inputs), "--out", str(out), "--text-field", "text",
           "--id-field", "id", "--split-by", "id", "--overwrite", "--log-level", "WARNING", *args]
    log.info("sift prepare -> %s", out)
    if subprocess.run(cmd).returncode != 0:
        raise StudyError(f"`sift prepare` failed for {inputs} -> {out}")


def _validation_shards(data: Path) -> list[str]:
    index = json.loads((data / "index.json").read_text())
    return [s["sha256"] for s in index["splits"].get("validation", {}).get("shards", [])]


def build(cfg: RegimeConfig, out: Path) -> dict[str, Any]:
    """Every regime's corpus and dataset under ``out`` (skipping what exists); returns the manifest.

    Layout: corpus/<regime>.parquet, <regime>/ (a dataset), heldout/, kinds/<regime>-<kind>/ (a sample
    of each kind's training documents alone, for the kept-row diagnostic), regimes.json.
    """
    if not Path(cfg.input).is_file():
        raise StudyError(f"regime input {cfg.input} is not a file")
    recipe = {k: v for k, v in _as_dict(cfg).items() if k not in ("names", "input")}
    recipe["input_sha256"] = hashlib.sha256(Path(cfg.input).read_bytes()).hexdigest()  # not its location
    recipe_path = out / "regimes-recipe.json"  # written first: what every file here was made with
    if recipe_path.is_file() and json.loads(recipe_path.read_text()) != recipe:
        raise StudyError(f"{out} holds regimes built with another recipe ({recipe_path}); remove the directory "
                         "or build into another one (--data)")
    out.mkdir(parents=True, exist_ok=True)
    recipe_path.write_text(json.dumps(recipe, indent=1) + "\n")
    manifest_path = out / "regimes.json"
    earlier = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if all(n in earlier.get("regimes", {}) and (out / n / "index.json").is_file() for n in cfg.names):
        return earlier
    docs = read_corpus(cfg)
    held = [d for d in docs if cfg.heldout_group is not None and d.group == cfg.heldout_group]
    docs = [d for d in docs if cfg.heldout_group is None or d.group != cfg.heldout_group]
    names = ["clean", *[n for n in cfg.names if n != "clean"]]  # clean first: it makes the tokenizer
    vf = ["--val-fraction", str(cfg.val_fraction)]
    manifest: dict[str, Any] = {"recipe": recipe, "regimes": earlier.get("regimes", {})}
    for name in names:
        variant = make_regime(name, docs, cfg)
        corpus = out / "corpus" / f"{name}.parquet"
        if not corpus.is_file():
            write_parquet(variant, corpus)
        tokenizer = [] if name == "clean" else ["--tokenizer", str(out / "clean" / "tokenizer")]
        prepare(corpus, out / name, [*cfg.prepare_args, *vf, *tokenizer])
        kinds = {}
        for kind in KINDS[name] if name != "clean" else ():
            part = [d for d in variant if d.kind == kind and not validation_side(d.id, cfg.val_fraction)]
            pick = np.random.default_rng([cfg.seed, len(kinds), 0x5A3]).permutation(len(part))[:KIND_SAMPLE_DOCS]
            sample = out / "corpus" / f"{name}-{kind}.parquet"
            if not sample.is_file():
                write_parquet([part[i] for i in sorted(pick)], sample)
            prepare(sample, out / "kinds" / f"{name}-{kind}",
                    [*cfg.prepare_args, "--val-fraction", "0", "--tokenizer", str(out / "clean" / "tokenizer")])
            kinds[kind] = str(Path("kinds") / f"{name}-{kind}")
        index = json.loads((out / name / "index.json").read_text())
        manifest["regimes"][name] = {
            "documents": len(variant), "char_share": char_shares(variant, cfg.val_fraction),
            "rows": {k: v["rows"] for k, v in index["splits"].items()}, "kind_data": kinds,
        }
    reference = _validation_shards(out / "clean")
    for name in names[1:]:
        if _validation_shards(out / name) != reference:
            raise StudyError(f"the validation split of {out / name} differs from {out / 'clean'}'s: `sift prepare` "
                             "no longer splits by the documented id hash; the regimes would not share a validation "
                             "set. Update validation_side() in study/regimes.py")
    if held:
        corpus = out / "corpus" / f"{HELDOUT}.parquet"
        if not corpus.is_file():
            write_parquet(held, corpus)
        prepare(corpus, out / HELDOUT, [*cfg.prepare_args, "--val-fraction", str(cfg.heldout_val_fraction),
                                         "--tokenizer", str(out / "clean" / "tokenizer")])
        index = json.loads((out / HELDOUT / "index.json").read_text())
        manifest["heldout"] = {"group": cfg.heldout_group, "documents": len(held),
                               "rows": {k: v["rows"] for k, v in index["splits"].items()}}
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _as_dict(cfg: RegimeConfig) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--regimes", default=",".join(REGIMES))
    p.add_argument("--text-field", default="text")
    p.add_argument("--id-field", default="id")
    p.add_argument("--group-field", default="source")
    p.add_argument("--heldout-group", default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging()
    cfg = RegimeConfig.from_dict({"input": str(Path(args.input).resolve()), "names": args.regimes.split(","),
                                  "text_field": args.text_field, "id_field": args.id_field,
                                  "group_field": args.group_field or None, "heldout_group": args.heldout_group,
                                  "seed": args.seed}, "command line")
    manifest = build(cfg, args.out)
    print(json.dumps(manifest["regimes"], indent=1))
    return 0


if __name__ == "__main__":
    from sift_common.errors import run_command

    sys.exit(run_command("study.regimes", main, sys.argv[1:]))
