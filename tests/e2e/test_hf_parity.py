"""`sift train` (one process, serial schedule, ZeRO-0) against SiftTrainer fed the same packed rows in the
same order, with the same model, optimizer, schedule, clipping and seed: the same kept sample ids at
every draw and weights within 1e-6 after every step, for a tiny BERT (masked LM, no accumulation) and a
tiny GPT-2 (2 accumulation steps). Both start with a warm-up step (`sift train` draws B rows there, the
Trainer G and trains the first B: its draws are padded to G here).

The two loops compute the same sums in other orders (the adapter's loss and attention path against the
stock model's), so a few gradient entries near 0 differ by ~1e-9; AdamW's first steps divide by
sqrt(v) + eps and turn that into weight differences up to about lr x 1e-3. At the project's default lr
of 1e-4 they stay near 1e-7, while a single differently kept row moves many weights by about lr.

Dropout is 0 on both sides: `sift train` seeds its dropout stream per rank after DeepSpeed's build, the
Trainer from its own seed, and the two loops run other operations on the global RNG between them.
BERT runs without accumulation: with it `sift train` averages the micro-batches' token means, while the
Trainer adds up the means transformers 5's BertForMaskedLM returns (a mean even when the Trainer passes
the window's token count).
"""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

from data_pipeline.loader import build_loader
from data_pipeline.reader import ShardDataset
from engine.config import load_config, to_dict
from engine.methods import build_methods
from engine.models import build_model
from engine.optim import build_optimizer
from engine.run_model import data_facts
from sift_hf import SiftArguments, with_sift
from tests.hf_helpers import InOrder, Rows, quiet, training_args
from tests.runs import TINY_RUN, concurrently, train

STEPS = 3
SAME = ("sift.schedule=serial", "sift.warmup_steps=1", "sift.fidelity_every=0", "model.dropout=0.0", "optim.lr=1.0e-4",
        "deepspeed.config=ds_configs/zero0.json", f"train.steps={STEPS}", "train.eval_every=100", "train.eval_samples=8")
RUNS = {"bert": SAME, "gpt2": (*SAME, "model.family=gpt2", "train.grad_accum=2")}


@pytest.fixture(scope="module")
def recorded(tiny_mlm_data, tiny_clm_data, tmp_path_factory):
    """Each family's `sift train` run with tests.plugin_record: (its config, its record)."""
    def run(family: str):
        out = tmp_path_factory.mktemp(f"parity-{family}")
        data = tiny_mlm_data if family == "bert" else tiny_clm_data
        train(out, data, *RUNS[family], "train.plugins=[tests.plugin_record]",
              env={"SIFT_RECORD": str(out / "record.pt")}, timeout=240)
        cfg = load_config(TINY_RUN, [f"data.path={data}", f"train.out_dir={out}", *RUNS[family]])
        return cfg, torch.load(out / "record.pt", weights_only=False)

    return dict(zip(RUNS, concurrently(*(lambda f=f: run(f) for f in RUNS))))


def hf_rows(batch: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """A `sift train` batch as a Hugging Face collator gives it: BERT's (G, P) masked positions as (G, T)
    labels with -100 elsewhere; a decoder's next-token labels unshifted (the model shifts them)."""
    ids = batch["input_ids"]
    if family == "bert":
        labels = torch.full_like(ids, -100)
        row, slot = torch.nonzero(batch["mlm_labels"] != -100, as_tuple=True)
        labels[row, batch["mlm_positions"][row, slot]] = batch["mlm_labels"][row, slot]
        return {"input_ids": ids, "attention_mask": batch["attention_mask"],
                "token_type_ids": batch["token_type_ids"], "labels": labels}
    return {"input_ids": ids, "attention_mask": batch["attention_mask"], "labels": ids.clone()}


class Replay(with_sift(InOrder)):
    """SiftTrainer reading its dataset in order; records the rows each training step trains on and the
    weights after every optimizer step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trained, self.weights = [], {}
        trainer = self

        class AfterStep(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                trainer.weights[state.global_step] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}

        self.add_callback(AfterStep())

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.trained.append(inputs["input_ids"].clone())
        return super().training_step(model, inputs, num_items_in_batch)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(RUNS))
def test_sift_trainer_keeps_and_trains_like_sift_train(recorded, family, tmp_path):
    quiet()
    cfg, record = recorded[family]
    t, B, G, ga = cfg.train, cfg.train.micro_batch_size, cfg.gross_batch_size, cfg.train.grad_accum
    train_set = ShardDataset.open(cfg.data.path, cfg.data.train_split)
    # sift train's draws, rebuilt from its seed and its methods' draw sizes (B in the warm-up, G after)
    loader = iter(build_loader(train_set, seed=t.seed, rank=0, world_size=1, mask_prob=cfg.data.mask_prob,
                               batch_size_for_draw=build_methods(cfg).rows_for_draw))
    draws = [next(loader) for _ in range(STEPS * ga)]
    assert [len(d["sample_ids"]) for d in draws] == [B] * ga + [G] * (STEPS - 1) * ga
    padded = []  # every draw G rows for the Trainer's loader; it trains the first B in the warm-up
    for d in draws:
        rows = hf_rows(d, family)
        padded.append({k: torch.cat([v, v[:G - len(v)]]) for k, v in rows.items()})

    model = build_model(cfg.model, data_facts(train_set.meta)).hf  # the stock model sift train wraps
    model.load_state_dict({k.removeprefix("hf."): v for k, v in record["weights"][0].items()})
    optimizer, scheduler = build_optimizer(model, cfg.optim, t.steps, cuda=False)
    trainer = Replay(model=model, train_dataset=Rows({k: torch.cat([p[k] for p in padded]) for k in padded[0]}),
                     args=training_args(tmp_path, B=B, ga=ga, steps=STEPS, seed=t.seed, max_grad_norm=cfg.optim.grad_clip),
                     optimizers=(optimizer, scheduler),
                     sift=SiftArguments(cfg.method, **to_dict(cfg.sift)))
    trainer.train()

    # the kept sample ids at every draw: the Trainer's kept rows found in the draw they came from
    assert [draw for draw, _ in record["kept"]] == list(range(STEPS * ga))
    assert len(trainer.trained) == STEPS * ga
    chose = []
    for (draw, sift_ids), d, kept in zip(record["kept"], draws, trainer.trained, strict=True):
        ids = d["input_ids"]
        where = [torch.nonzero((ids == row).all(1)).flatten().tolist() for row in kept]
        assert all(len(w) == 1 for w in where), f"draw {draw}: a kept row is not exactly one row of the draw"
        assert [d["sample_ids"][w[0]].item() for w in where] == sift_ids, f"draw {draw}"
        chose.append([w[0] for w in where] != list(range(B)))
    assert not any(chose[:ga]) and any(chose[ga:])  # the warm-up trains the first B; later draws select
    # the weights after every optimizer step
    for step in range(1, STEPS + 1):
        theirs = record["weights"][step]
        for name, value in trainer.weights[step].items():
            torch.testing.assert_close(value, theirs["hf." + name], rtol=0, atol=1e-6,
                                       msg=lambda m, name=name, step=step: f"step {step}, {name}: {m}")
