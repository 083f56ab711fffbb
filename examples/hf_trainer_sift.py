"""SIFT inside a stock ``transformers.Trainer``: a tiny GPT-2 and a tiny BERT trained from scratch on
the repository's generated demo corpus, with the committed test tokenizers (nothing is downloaded).
About a minute of CPU time (61 CPU-seconds measured for both models with the defaults; 4 min of wall time
on a shared 2-core machine at a load average of 15)::

    pip install -e ".[hf]"
    python examples/hf_trainer_sift.py --out runs/hf-example

The one change from a plain Trainer script: ``SiftTrainer(..., sift=SiftArguments(keep=0.5))`` instead
of ``Trainer(...)``. ``per_device_train_batch_size`` stays the back-propagated batch B; the loader draws
G = B / keep rows per micro-step, and the Trainer's logs gain the selection's statistics.

BERT's logged loss is about twice GPT-2's here: transformers 5's ``BertForMaskedLM`` accepts the
Trainer's ``num_items_in_batch`` but takes a plain mean anyway, so with 2 accumulation steps the
Trainer sums two means (the plain Trainer does the same).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from datasets import Dataset
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    DataCollatorForLanguageModeling,
    GPT2Config,
    GPT2LMHeadModel,
    TrainingArguments,
    set_seed,
)

from data_pipeline.demo_corpus import write_demo_corpus
from sift_hf import SiftArguments, SiftTrainer

ASSETS = Path(__file__).resolve().parent.parent / "tests" / "assets"
SEQ = 64


def texts(out: Path, docs: int) -> list[str]:
    path = write_demo_corpus(out / "corpus", seed=0, target_docs=docs, stdlib=False)
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def dataset(tokenizer, docs: list[str]) -> Dataset:
    tokenized = Dataset.from_dict({"text": docs}).map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=SEQ), batched=True, remove_columns=["text"])
    return tokenized.filter(lambda row: len(row["input_ids"]) >= 8)


def train(name: str, model, tokenizer, data: Dataset, collator, out: Path, steps: int) -> None:
    args = TrainingArguments(output_dir=str(out / name), per_device_train_batch_size=8, gradient_accumulation_steps=2,
                             max_steps=steps, learning_rate=1e-3, warmup_steps=5, logging_steps=max(1, steps // 3),
                             save_strategy="no",
                             report_to=[], use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0)
    sift = SiftArguments(keep=0.5, criterion="loss", exit_layer=1, warmup_steps=5)
    trainer = SiftTrainer(model=model, args=args, train_dataset=data, data_collator=collator, sift=sift)
    print(f"--- {name}: B = 8 back-propagated of G = {trainer.gross_batch_size} drawn per micro-step")
    trainer.train()
    last = [h for h in trainer.state.log_history if "loss" in h][-1]
    print(f"{name}: step {last['step']} loss {last['loss']:.3f}, kept score {last['kept_score']:.3f} vs dropped "
          f"{last['dropped_score']:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/hf-example"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--docs", type=int, default=200)
    a = ap.parse_args()
    set_seed(0)
    docs = texts(a.out, a.docs)

    gpt2_tok = AutoTokenizer.from_pretrained(ASSETS / "bpe-512")
    gpt2_tok.pad_token = gpt2_tok.eos_token  # right padding; the collator sets the pads' labels to -100
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(gpt2_tok), n_positions=SEQ, n_embd=64, n_layer=2, n_head=4,
                                      bos_token_id=gpt2_tok.eos_token_id, eos_token_id=gpt2_tok.eos_token_id))
    train("gpt2", gpt2, gpt2_tok, dataset(gpt2_tok, docs), DataCollatorForLanguageModeling(gpt2_tok, mlm=False),
          a.out, a.steps)

    bert_tok = AutoTokenizer.from_pretrained(ASSETS / "tokenizer-512")
    bert = BertForMaskedLM(BertConfig(vocab_size=len(bert_tok), hidden_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=128, max_position_embeddings=SEQ,
                                      pad_token_id=bert_tok.pad_token_id))
    train("bert", bert, bert_tok, dataset(bert_tok, docs), DataCollatorForLanguageModeling(bert_tok, mlm=True),
          a.out, a.steps)


if __name__ == "__main__":
    main()
