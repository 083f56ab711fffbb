"""The reducible-loss criterion and its reference: the criterion on a hand-computed example, RHO-LOSS's
exact criterion at j = L, the loss sidecar's round trip and refusals, the tokenizer check, and that a
zero reference trains exactly like ``criterion: loss`` (BERT online, a decoder from a sidecar)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.sampler import DrawSampler, split_half
from engine import reference as ref
from engine.schedule import PipelinedSchedule, SerialSchedule
from engine.scoring import exit_scores, exit_token_values, per_sequence_mean, scores_from_logits
from tests.helpers import (
    PlainEngine,
    clm_batch,
    methods_for,
    model_and_batches,
    random_batch,
    schedule_for,
    tiny_decoder,
    tiny_model,
)

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def test_reducible_on_a_hand_computed_example():
    # uniform logits over V = 3: every token's loss is log 3; the second row's last slot is unused
    logits = torch.zeros(2, 2, 3)
    labels = torch.tensor([[0, 2], [1, -100]])
    reference = torch.tensor([[0.5, 1.0], [0.25, 7.0]])
    scores = scores_from_logits(logits, labels, "reducible", reference)
    expected = torch.tensor([math.log(3) - 0.75, math.log(3) - 0.25])
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="needs the reference"):
        scores_from_logits(logits, labels, "reducible")
    with pytest.raises(ValueError, match="takes no reference"):
        scores_from_logits(logits, labels, "loss", reference)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_reducible_at_the_last_block_is_rho_loss(family):
    """j = L: the full model's per-row loss minus the reference's mean loss over the same targets."""
    model = tiny_model() if family == "bert" else tiny_decoder("gpt2")
    small = tiny_model(seed=5, layers=1) if family == "bert" else tiny_decoder("gpt2", seed=5, layers=1)
    batch = random_batch(G=6) if family == "bert" else clm_batch(G=6)
    path = model.exit_path(model.num_layers)
    token_ref = exit_token_values(small.exit_path(1), batch)
    labels = path.targets(batch)
    assert token_ref.shape == labels.shape and bool((token_ref[labels < 0] == 0).all())
    with torch.no_grad():
        exact = model.eval()(**batch)["per_seq_loss"]
    rho = exit_scores(path, batch, "reducible", reference=token_ref)
    torch.testing.assert_close(rho, exact - per_sequence_mean(token_ref, labels >= 0), rtol=0, atol=1e-5)
    assert not torch.allclose(rho, exact, atol=1e-3)


@pytest.mark.parametrize("positions", [0, 7])
def test_a_zero_reference_scores_exactly_like_the_loss(positions):
    model = tiny_decoder("gpt2")
    batch = clm_batch(G=6)
    path = model.exit_path(1)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    loss = exit_scores(path, batch, "loss", positions=positions, generator=gen())
    zero = exit_scores(path, batch, "reducible", positions=positions, generator=gen(),
                       reference=torch.zeros(batch["labels"].shape))
    assert torch.equal(loss, zero)


# ----------------------------------------------------------------------------- the sidecar


def _header(tmp_path: Path, rows: int = 5, seq_len: int = 4) -> dict:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "index.json").write_text('{"format": "sift-shards"}\n')
    return {"index_sha256": ref.index_hash(data), "index_path": str(data), "split": "train", "rows": rows,
            "seq_len": seq_len, "models": [{"path": "refs/a", "sha256": "a" * 64, "half": None}]}


def test_sidecar_round_trip_and_check(tmp_path):
    header = _header(tmp_path)
    table = np.arange(20, dtype=np.float32).reshape(5, 4)
    path = ref.write_sidecar(tmp_path / "losses.sidecar", header, [table[:2], table[2:]])
    side = ref.read_sidecar(path)
    assert side.header == header and np.array_equal(side.losses, table)
    ref.check_sidecar(side, path, data_path=tmp_path / "data", split="train", rows=5, seq_len=4,
                      reference=Path("refs/a"), reference_sha="a" * 64)
    looked_up = ref.SidecarReference(torch.from_numpy(np.array(side.losses))).token_losses(
        {"sample_ids": torch.tensor([4, 0])})
    assert torch.equal(looked_up, torch.from_numpy(table[[4, 0]]))
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file is gone


def test_sidecar_refuses_other_data_or_another_reference_naming_both(tmp_path):
    header = _header(tmp_path)
    path = ref.write_sidecar(tmp_path / "losses.sidecar", header, [np.zeros((5, 4), np.float32)])
    side = ref.read_sidecar(path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "index.json").write_text('{"format": "sift-shards", "seq_len": 8}\n')
    with pytest.raises(ref.ReferenceModelError) as e:
        ref.check_sidecar(side, path, data_path=other, split="train", rows=5, seq_len=4,
                          reference=Path("refs/a"), reference_sha="a" * 64)
    for s in (header["index_sha256"], ref.index_hash(other), str(other), str(tmp_path / "data"), str(path)):
        assert s in str(e.value)
    with pytest.raises(ref.ReferenceModelError) as e:
        ref.check_sidecar(side, path, data_path=tmp_path / "data", split="train", rows=5, seq_len=4,
                          reference=Path("refs/b"), reference_sha="b" * 64)
    for s in ("a" * 64, "b" * 64, "refs/a", "refs/b"):
        assert s in str(e.value)
    with pytest.raises(ref.ReferenceModelError, match="covers split 'train' .5 rows"):
        ref.check_sidecar(side, path, data_path=tmp_path / "data", split="train", rows=6, seq_len=4,
                          reference=Path("refs/a"), reference_sha="a" * 64)


def test_sidecar_refuses_a_truncated_or_foreign_file(tmp_path):
    path = ref.write_sidecar(tmp_path / "losses.sidecar", _header(tmp_path), [np.zeros((5, 4), np.float32)])
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(ref.ReferenceModelError, match="truncated"):
        ref.read_sidecar(path)
    path.write_bytes(b"not a sidecar at all")
    with pytest.raises(ref.ReferenceModelError, match="not a reference-loss sidecar"):
        ref.read_sidecar(path)


def test_an_interrupted_sidecar_write_leaves_nothing(tmp_path):
    def blocks():
        yield np.zeros((2, 4), np.float32)
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        ref.write_sidecar(tmp_path / "losses.sidecar", _header(tmp_path), blocks())
    assert not (tmp_path / "losses.sidecar").exists() and not list(tmp_path.glob(".*tmp*"))


def test_a_reference_with_another_tokenizer_is_refused_naming_both():
    bpe, wordpiece = ASSETS / "bpe-512", ASSETS / "tokenizer-512"
    ref.check_tokenizer(Path("refs/a"), str(bpe), Path("data"), str(bpe))
    with pytest.raises(ref.ReferenceModelError) as e:
        ref.check_tokenizer(Path("refs/a"), str(wordpiece), Path("data"), str(bpe))
    assert all(s in str(e.value) for s in (str(bpe), str(wordpiece), "refs/a"))


def test_model_hash_sees_every_weight():
    a, b = tiny_decoder("gpt2"), tiny_decoder("gpt2")
    assert ref.model_hash(a) == ref.model_hash(b)
    with torch.no_grad():
        b.hf.transformer.h[-1].mlp.c_proj.bias[0] += 1e-6
    assert ref.model_hash(a) != ref.model_hash(b)


# ----------------------------------------------------------------------------- halves


def test_halves_partition_the_split_and_the_sampler_keeps_to_one():
    h0, h1 = split_half(101, 0), split_half(101, 1)
    assert len(h0) == 50 and sorted([*h0, *h1]) == list(range(101))
    sampler = iter(DrawSampler(101, seed=0, rank=0, world_size=1, size_fn=lambda d: 7, rows=h1))
    seen = np.concatenate([next(sampler).sample_ids for _ in range(30)])
    assert set(seen.tolist()) == set(h1.tolist())  # every row of the half, nothing else (3+ epochs of it)


# ----------------------------------------------------------------------------- zero reference = loss


class ZeroOnline(ref.OnlineReference):
    """The online reference, its forward run for real (so any side effect would show), times 0."""

    def token_losses(self, batch):
        return super().token_losses(batch) * 0.0


def _train(family, cls, criterion, monkeypatch, make_reference=None, steps=6, exit_layer=1, **sift):
    B, G = 4, 8
    model, stream = model_and_batches(family, seed=3)
    engine = PlainEngine(model)
    if make_reference is not None:
        monkeypatch.setattr(ref, "open_reference", lambda *a, **k: make_reference())
        sift |= {"reference": "zero"}
    methods = methods_for(model, engine, B=B, criterion=criterion, exit_layer=exit_layer, fidelity_every=1, **sift)
    sched = schedule_for(cls, engine, methods, stream(lambda d: G))
    torch.manual_seed(11)  # the dropout stream: a reference forward that drew from it would change the run
    outs = [sched.micro_step(d, d) for d in range(steps)]
    return [o.out["loss"].item() for o in outs], outs, model


def test_a_zero_reference_trains_bert_exactly_like_the_loss_online(monkeypatch):
    small = tiny_model(seed=9, layers=1).train()  # dropout on: the reference must run it in eval mode
    loss, _, m1 = _train("bert", SerialSchedule, "loss", monkeypatch)
    zero, outs, m2 = _train("bert", SerialSchedule, "reducible", monkeypatch, lambda: ZeroOnline(small, 32))
    assert zero == loss
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters(), strict=True))
    assert outs[0].stats["reference_flops"] == 8 * small.flops(32).scoring(1) > 0
    assert outs[0].stats["reference_s"] > 0 and "spearman" in outs[0].stats


def test_a_zero_sidecar_trains_a_decoder_exactly_like_the_loss(monkeypatch):
    # helpers.clm_batch numbers the rows of draw d from 100 * (1000 + d)
    zeros = lambda: ref.SidecarReference(torch.zeros(100 * 1010, 32))  # noqa: E731
    loss, _, m1 = _train("gpt2", PipelinedSchedule, "loss", monkeypatch, score_positions=8)
    zero, outs, m2 = _train("gpt2", PipelinedSchedule, "reducible", monkeypatch, zeros, score_positions=8)
    assert zero == loss
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters(), strict=True))
    assert outs[0].stats["reference_flops"] == 0


def test_fidelity_compares_with_the_exact_reducible_loss(monkeypatch):
    """At j = L the exit's reducible loss is the exact one: rank correlation 1 and the same top B (the
    dropout-free exact forward of the same weights, minus the same reference)."""
    small = tiny_model(seed=9, layers=1)
    _, outs, _ = _train("bert", SerialSchedule, "reducible", monkeypatch, lambda: ref.OnlineReference(small, 32),
                        steps=3, exit_layer=3)
    for o in outs:
        assert o.stats["spearman"].item() == pytest.approx(1.0) and o.stats["topk_overlap"].item() == 1.0


def test_a_hugging_face_checkpoint_is_a_reference_with_its_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from engine.config import ModelConfig
    from engine.models import build_model
    from engine.models.base import DataFacts

    bpe = str(ASSETS / "bpe-512")
    facts = DataFacts(vocab_size=len(AutoTokenizer.from_pretrained(bpe)), seq_len=32, objective="clm", pad_id=0,
                      eos_id=0)
    torch.manual_seed(0)
    model = build_model(ModelConfig(family="gpt2", hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
                        facts)
    model.hf.save_pretrained(tmp_path / "hf")
    with pytest.raises(ref.ReferenceModelError, match="(cannot load the tokenizer|uses the tokenizer .* but the data)"):
        ref.load_reference(tmp_path / "hf", facts, "data", bpe)  # no tokenizer files: nothing to compare
    AutoTokenizer.from_pretrained(bpe).save_pretrained(tmp_path / "hf")
    loaded = ref.load_reference(tmp_path / "hf", facts, "data", bpe)
    assert type(loaded) is type(model) and not loaded.training
    assert ref.model_hash(loaded) == ref.model_hash(model)
    with pytest.raises(ref.ReferenceModelError, match="neither a SIFT-Train run directory"):
        ref.load_reference(tmp_path, facts, "data", bpe)
