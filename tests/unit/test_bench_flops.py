"""The benchmark's FLOP model, MFU peaks, grid and ratios, and its synthetic batches (pure, fast)."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig

from benchmarks import flops as F
from benchmarks.synthetic import CLS, FIRST_WORD, PAD, SEP, make_batch
from benchmarks.throughput import PRESETS, Variant, add_ratios, grid
from data_pipeline.batch import max_predictions
from engine.models.bert import flop_counts

BASE = BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, intermediate_size=3072)
BASE512 = flop_counts(BASE, 512, max_predictions(512, 0.15), nsp=True)


def test_bert_base_figures_of_the_issue():
    assert BASE512.train() / 1e9 == pytest.approx(301, abs=0.5)
    # Exit-1 scoring of G = 64 adds 7.8% to the training FLOPs of B = 32 ...
    share = 64 * BASE512.scoring(1) / (32 * BASE512.train())
    assert share == pytest.approx(0.078, abs=5e-4)
    # ... and 1,300 back-propagated sequences/s on an H100 is about 40% MFU.
    mfu = 1300 * BASE512.train() / F.peak_flops("NVIDIA H100 80GB HBM3", "bf16")
    assert mfu == pytest.approx(0.40, abs=0.01)


def test_exit_at_the_last_layer_is_the_forward_without_nsp():
    no_nsp = flop_counts(BASE, 512, max_predictions(512, 0.15), nsp=False)
    assert BASE512.scoring(12) == no_nsp.forward()
    assert BASE512.forward() - no_nsp.forward() == 2 * 768 * 768 + 4 * 768


def test_the_adapter_counts_what_the_formula_says():
    from tests.helpers import tiny_model

    model = tiny_model(layers=3)
    assert model.flops(32) == flop_counts(model.config, 32, max_predictions(32, 0.15), nsp=True)


def test_peaks():
    assert F.peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert F.peak_flops("NVIDIA H100 NVL", "bf16") == 835e12
    assert F.peak_flops("NVIDIA H200", "bf16") == 989e12
    assert F.peak_flops("NVIDIA L40S", "bf16") == 362e12
    assert F.peak_flops("NVIDIA L40", "bf16") is None and F.peak_flops("NVIDIA A10G", "bf16") is None
    assert F.peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert F.peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert F.peak_flops("NVIDIA H100 80GB HBM3", "fp32") is None
    assert F.peak_flops("CPU", "fp32", override_tflops=2.0) == 2e12


def test_grid_clips_exits_and_pairs_serial_with_pipelined():
    p = PRESETS["cpu-tiny"]
    g = grid(p, ("vanilla", "serial", "pipelined"), (False,), num_layers=2)
    assert g[0] == Variant("vanilla", 64)
    assert {v.exit_layer for v in g[1:]} == {1, 2}
    assert [v.kind for v in g[1:3]] == ["serial", "pipelined"] and len(g) == 1 + 2 * 2 * 2


def test_ratios():
    def row(kind, step, scoring=0.0, j=None):
        return {"variant": kind, "seq_len": 64, "compile": False, "exit_layer": j, "criterion": j and "loss",
                "backprop_seq_per_s": 8 / step, "step_time_s": {"median": step}, "phases_s": {"scoring": scoring}}

    rows = [row("vanilla", 1.0), row("serial", 1.2, scoring=0.3, j=1), row("pipelined", 1.1, scoring=0.3, j=1)]
    add_ratios(rows)
    assert [r["overhead_ratio"] for r in rows] == pytest.approx([1.0, 1 / 1.2, 1 / 1.1])
    assert rows[2]["overlap_efficiency"] == pytest.approx(0.1 / 0.3)
    assert rows[0]["overlap_efficiency"] is None and rows[1]["overlap_efficiency"] is None


def test_synthetic_batch_follows_the_contract():
    b = make_batch(64, 128, 30522, seed=3)
    assert b["input_ids"].shape == (64, 128) and b["mlm_positions"].shape == (64, 20)
    real = b["attention_mask"].bool()
    assert (b["input_ids"][:, 0] == CLS).all() and (b["input_ids"][~real] == PAD).all()
    assert (b["input_ids"][real] != PAD).all() and real.float().mean() > 0.8
    assert ((b["input_ids"] == SEP).sum(1) == 2).all()
    valid = b["mlm_labels"] >= 0
    assert valid.any(1).all() and (b["mlm_labels"][valid] >= FIRST_WORD).all()
    assert torch.equal(make_batch(64, 128, 30522, seed=3)["input_ids"], b["input_ids"])


def test_decoder_exits_and_presets():
    from benchmarks.throughput import exit_layers, parse_args, resolve_preset

    assert exit_layers(("1", "2", "L/4", "L/2"), 12) == [1, 2, 3, 6]
    assert exit_layers(("1", "2", "L/4", "L/2"), 16) == [1, 2, 4, 8] and exit_layers(("L/4", "12"), 4) == [1, 4]
    with pytest.raises(ValueError, match="layer number, L, or L/k"):
        exit_layers(("L/x",), 4)
    name, p = resolve_preset(parse_args(["--model", "llama-1b"]), cuda=True)
    assert (name, p.family, p.model, p.vocab, p.seq_lens) == ("gpu-decoder", "llama", "1b", 128256, (1024, 2048))
    name, p = resolve_preset(parse_args(["--model", "gpt2-125m", "--vocab", "1000"]), cuda=False)
    assert (name, p.family, p.model, p.vocab, p.objective) == ("cpu-decoder", "gpt2", "125m", 1000, "clm")
    assert resolve_preset(parse_args([]), cuda=False)[1].objective == "nsp_pairs"
    for bad in (["--model", "gpt2-base"], ["--model", "t5-small"], ["--exits", "1,L/0"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_scoring_flops_with_a_subset_of_positions():
    from engine.models.base import FlopCounts

    f = FlopCounts(layers=4, block=10.0, head=100.0)
    assert f.scoring(2) == 120.0 and f.scoring(2, head_fraction=0.25) == 45.0 and f.train() == 3 * 140.0
