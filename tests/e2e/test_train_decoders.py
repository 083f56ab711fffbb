"""End-to-end `sift train` of a tiny GPT-2 (ZeRO-0) and a tiny Llama (ZeRO-3, scoring a subset of positions)
on causal-LM data: learning and metrics, bitwise resume after a kill, `sift export` into a
`pipeline("text-generation")`; GPT-2 with SIFT + VCAS under ZeRO-3."""

from __future__ import annotations

import json
import math

import pytest

from engine import checkpoint as ckpt
from tests.runs import evals, losses, train

GPT2 = ("model.family=gpt2", "deepspeed.config=ds_configs/zero0.json")
LLAMA = ("model.family=llama", "deepspeed.config=ds_configs/zero3.json", "sift.score_positions=16",
         "sift.criterion=entropy", "train.steps=12", "train.save_every=6", "train.eval_every=6")


@pytest.fixture(scope="module")
def gpt2_run(tiny_clm_data, tmp_path_factory):
    """20 uninterrupted steps of the tiny run (pipelined, loss exit at block 1), checkpoints at 10 and 20."""
    out = tmp_path_factory.mktemp("gpt2")
    train(out, tiny_clm_data, *GPT2)
    return out


@pytest.fixture(scope="module")
def llama_run(tiny_clm_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("llama")
    train(out, tiny_clm_data, *LLAMA)
    return out


def test_gpt2_learns_and_reports_loss_perplexity_and_selection(gpt2_run):
    ev = evals(gpt2_run)
    assert [e["step"] for e in ev] == [10, 20] and ev[1]["val_lm_loss"] < ev[0]["val_lm_loss"]
    for e in ev:
        assert e["val_lm_ppl"] == pytest.approx(math.exp(e["val_lm_loss"])) and 0 <= e["val_lm_acc"] <= 1
        assert e["val_tokens"] == 32 * 63  # eval_samples rows x (T - 1) targets
    records = [json.loads(x) for x in (gpt2_run / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in records if r.get("step") == 10 and "loss" in r)
    for key in ("lm_loss", "lm_acc", "lm_ppl", "kept_score", "dropped_score", "time_scoring", "tokens_per_s"):
        assert key in step, key
    assert step["lm_loss"] == pytest.approx(step["loss"], rel=1e-5)  # one rank: the objective is the token mean
    assert step["kept_score"] > step["dropped_score"]
    assert any("spearman" in r for r in records)
    summary = json.loads((gpt2_run / "summary.json").read_text())
    assert summary["token_loss"] == "lm" and summary["final_eval"]["val_lm_loss"] == ev[1]["val_lm_loss"]


def test_gpt2_resume_after_kill_is_bitwise_identical(gpt2_run, tiny_clm_data, tmp_path):
    killed = train(tmp_path, tiny_clm_data, *GPT2, env={"SIFT_FAULT": "after_save:10"}, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert ckpt.find_latest(tmp_path / "checkpoints") == "step00000010"
    resumed = train(tmp_path, tiny_clm_data, *GPT2)
    assert "resumed from" in resumed.stderr
    assert losses(tmp_path) == losses(gpt2_run)
    assert evals(tmp_path)[-1]["val_lm_loss"] == evals(gpt2_run)[-1]["val_lm_loss"]


def test_llama_zero3_resume_is_bitwise_identical(llama_run, tiny_clm_data, tmp_path):
    """ZeRO-3: the scorer reads a gathered replica of the exit (untied LM head); the scored positions are
    drawn from (seed, draw, rank), so the replayed steps draw them again."""
    killed = train(tmp_path, tiny_clm_data, *LLAMA, env={"SIFT_FAULT": "after_save:6"}, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    train(tmp_path, tiny_clm_data, *LLAMA)
    assert losses(tmp_path) == losses(llama_run) and len(losses(llama_run)) == 12


def test_llama_zero3_scorer_replica_selects_like_zero1(llama_run, tiny_clm_data, tmp_path):
    """Under ZeRO-3 the scorer reads a gathered replica (embeddings, blocks, norm, untied head); ZeRO-1
    reads the live modules. The same rows must be kept, so the losses agree to rounding."""
    train(tmp_path, tiny_clm_data, *LLAMA, "deepspeed.config=ds_configs/zero1.json")
    assert losses(tmp_path) == pytest.approx(losses(llama_run), rel=1e-3)


def test_llama_zero3_chunked_loss_trains_like_the_whole_batch(llama_run, tiny_clm_data, tmp_path):
    """model.loss_chunk under ZeRO-3: the LM head runs again in the backward (activation checkpointing)
    while DeepSpeed gathers its partitioned weight; the run follows the unchunked one to rounding."""
    train(tmp_path, tiny_clm_data, *LLAMA, "model.loss_chunk=100")
    assert losses(tmp_path) == pytest.approx(losses(llama_run), rel=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decoder_sift_vcas_under_zero3(family, tiny_clm_data, tmp_path):
    """SIFT + adaptive VCAS on GPT-2 (sampled Conv1Ds) and Llama (sampled Linears, grouped-query K/V)
    under ZeRO-3: the sampled backward gathers each partitioned weight, the scorer reads its replica; a
    huge tau lets the controller lower the ratios."""
    train(tmp_path, tiny_clm_data, f"model.family={family}", "deepspeed.config=ds_configs/zero3.json",
          "method=sift+vcas", "vcas.calib_every=2", "vcas.tau_act=1e9", "vcas.tau_w=1e9", "vcas.alpha=0.3",
          "train.steps=8", "train.eval_every=8", "train.save_every=8")
    steps = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(steps) == 8 and all(math.isfinite(r["loss"]) for r in steps)
    assert [r["step"] for r in steps if "vcas_var_sgd" in r] == [2, 4, 6, 8]
    assert steps[-1]["vcas_rho"] < 1 and steps[-1]["vcas_nu"] < 1 and steps[-1]["vcas_flops"] < 1
    assert "kept_score" in steps[-1] and math.isfinite(evals(tmp_path)[-1]["val_lm_loss"])


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_export_generates_text_in_transformers(which, gpt2_run, llama_run, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, pipeline

    from engine import ds
    from engine.export import main as export_main

    run = gpt2_run if which == "gpt2" else llama_run
    assert export_main([str(run), "--out", str(tmp_path / "hf")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.config.model_type == which
    tag = ckpt.find_latest(run / "checkpoints")
    state = ds.consolidated_state_dict(run / "checkpoints", tag)
    for name, tensor in model.state_dict().items():
        if "hf." + name in state:
            assert torch.equal(tensor, state["hf." + name]), name
    generate = pipeline("text-generation", model=str(tmp_path / "hf"))
    text = generate("The weather in", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith("The weather in") and len(text) > len("The weather in")


def test_score_positions_benchmark_reads_a_trained_run(gpt2_run, tmp_path):
    """benchmarks/probes/score_positions.py on the tiny run: every position equals the full exit exactly; a subset
    is a different, still positively related ranking; the report names its run and step."""
    import torch

    from benchmarks.probes import score_positions

    threads = torch.get_num_threads()  # the benchmark pins its own; later tests keep theirs
    try:
        code = score_positions.main(["--run", str(gpt2_run), "--exits", "1", "--positions", "8,0", "--criteria",
                                     "loss", "--gross", "8", "--batches", "3", "--out", str(tmp_path), "--name", "sp"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    result = json.loads((tmp_path / "sp.json").read_text())
    sub, full = result["rows"]
    assert full["positions"] == 63 and full["spearman_vs_all_positions"] == pytest.approx(1.0)
    assert sub["positions"] == 8 and sub["head_fraction"] == pytest.approx(8 / 63)
    assert -1 <= sub["spearman"] <= 1 and sub["spearman_vs_all_positions"] < 1
    assert result["meta"]["step"] == 20 and "step 20" in (tmp_path / "sp.md").read_text()


def test_load_run_model_rebuilds_the_trained_decoder(gpt2_run, tiny_clm_data):
    """engine/run_model.py on a GPT-2 run: every weight of the checkpoint (the tied head included), and the
    study's held-out evaluation in the model's own metric names."""
    import torch

    from engine.export import model_spec
    from engine.models import family
    from engine.run_model import consolidated_state, latest_checkpoint, load_run_model
    from study.sources import batches, source_accuracy

    cfg, model = load_run_model(gpt2_run)
    root, tag, record = latest_checkpoint(gpt2_run)
    stock = family("gpt2").from_state(consolidated_state(root, tag), model_spec(record))
    ours = model.hf.state_dict()
    assert cfg.model.family == "gpt2" and not model.training and set(stock.state_dict()) == set(ours)
    assert all(torch.equal(v, ours[k]) for k, v in stock.state_dict().items())
    acc = source_accuracy(model, {"val": batches(tiny_clm_data, "validation", 16, batch_size=8)})["val"]
    assert set(acc) == {"val_lm_acc", "val_lm_loss", "tokens"} and 0 <= acc["val_lm_acc"] <= 1 and acc["tokens"] > 0
