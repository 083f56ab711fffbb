"""End-to-end `sift train` on CPU: golden curve, exact resume, crash-safe checkpoints, export, errors."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest

from engine import checkpoint as ckpt
from tests.distributed.common import REPO
from tests.runs import concurrently, evals, losses, train

GOLDEN = REPO / "tests" / "assets" / "golden" / "tiny-run-losses.json"


def test_golden_loss_curve(run_a):
    """The tiny run's 20-step loss curve; regenerate only on purpose with SIFT_UPDATE_GOLDEN=1."""
    got = losses(run_a)
    assert len(got) == 20 and all(math.isfinite(x) for x in got)
    if os.environ.get("SIFT_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps({"config": "tests/assets/tiny-run.yaml", "losses": got}, indent=1) + "\n")
    want = json.loads(GOLDEN.read_text())["losses"]
    # Bitwise on one machine; other CPUs' kernels may differ in the last bits, which 20 steps amplify a little.
    assert got == pytest.approx(want, rel=2e-3)


def test_training_learns_and_reports(run_a):
    ev = evals(run_a)
    assert [e["step"] for e in ev] == [10, 20]
    assert ev[1]["val_mlm_loss"] < ev[0]["val_mlm_loss"]
    records = [json.loads(x) for x in (run_a / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in records if r.get("step") == 10 and "loss" in r)
    for key in ("lr", "mlm_loss", "nsp_loss", "mlm_acc", "kept_score", "dropped_score", "backprop_seq_per_s",
                "gross_seq_per_s", "tokens_per_s", "backprop_samples", "hours", "time_forward", "time_scoring"):
        assert key in step, key
    assert step["kept_score"] > step["dropped_score"]  # top-k keeps the highest early-exit losses
    assert step["backprop_samples"] == 10 * 4
    fidelity = [r for r in records if "spearman" in r]
    assert fidelity and all(-1 <= r["spearman"] <= 1 and 0 <= r["topk_overlap"] <= 1 for r in fidelity)
    summary = json.loads((run_a / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["final_eval"]["val_mlm_acc"] == ev[1]["val_mlm_acc"]


@pytest.mark.parametrize("policy", ["topk", "importance"])
def test_resume_after_kill_is_bitwise_identical(run_a, tiny_data, tmp_path, policy):
    """Also for a weighted policy, whose draws are keyed on (seed, draw, rank) (pipelined: the resumed run
    selects with the scores the killed one had computed)."""
    extra = () if policy == "topk" else (f"sift.policy={policy}",)
    run = tmp_path / "run"
    kill = lambda: train(run, tiny_data, *extra, env={"SIFT_FAULT": "after_save:10"}, check=False)  # noqa: E731
    if extra:
        ref = tmp_path / "ref"
        _, killed = concurrently(lambda: train(ref, tiny_data, *extra), kill)
    else:
        ref, killed = run_a, kill()
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert ckpt.find_latest(run / "checkpoints") == "step00000010"
    resumed = train(run, tiny_data, *extra)
    assert "resumed from" in resumed.stderr
    assert losses(run) == losses(ref)  # every step, bitwise
    assert evals(run)[-1]["val_mlm_loss"] == evals(ref)[-1]["val_mlm_loss"]


def test_checkpoint_killed_mid_write_is_never_latest(run_a, tiny_data, tmp_path):
    killed = train(tmp_path, tiny_data, env={"SIFT_FAULT": "during_save:20"}, check=False)
    assert killed.returncode == -9
    assert (tmp_path / "checkpoints" / "step00000020").is_dir()  # DeepSpeed's files are there ...
    assert ckpt.find_latest(tmp_path / "checkpoints") == "step00000010"  # ... but it is not complete
    train(tmp_path, tiny_data)
    assert losses(tmp_path) == losses(run_a)


def test_export_loads_in_transformers(run_a, tmp_path, capsys):
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

    from engine import ds
    from engine.export import main as export_main

    assert export_main([str(run_a), "--out", str(tmp_path / "hf")]) == 0
    said = capsys.readouterr().out  # which checkpoint (a run stopped early exports where it stopped) and as what
    assert f"exported {run_a / 'checkpoints' / 'step00000020'} (the latest) to {tmp_path / 'hf'}: a BertForMaskedLM" in said
    model = AutoModelForMaskedLM.from_pretrained(tmp_path / "hf")
    state = ds.consolidated_state_dict(run_a / "checkpoints", "step00000020")
    for name, tensor in model.state_dict().items():
        key = "hf." + name
        if key in state:
            assert torch.equal(tensor, state[key]), name
    assert torch.equal(model.cls.predictions.decoder.weight, model.bert.embeddings.word_embeddings.weight)
    fill = pipeline("fill-mask", model=str(tmp_path / "hf"), tokenizer=AutoTokenizer.from_pretrained(tmp_path / "hf"))
    preds = fill("the cat sat on the [MASK] .")
    assert len(preds) == 5 and all("token_str" in p for p in preds)


def test_bad_config_lists_every_problem(tiny_data, tmp_path):
    result, second = concurrently(
        lambda: train(tmp_path / "a", tiny_data, "sift.exit_layer=9", "sift.policy=greedy", "train.stpes=3", check=False),
        lambda: train(tmp_path / "b", tiny_data, "sift.exit_layer=9", check=False))
    assert result.returncode == 2
    assert "train.stpes: unknown key (did you mean 'steps'?)" in result.stderr
    assert "Traceback" not in result.stderr
    assert second.returncode == 2 and "sift.exit_layer=9 but the model has 2 layers" in second.stderr


@pytest.mark.slow
def test_time_budget_stops_early_and_the_same_command_continues_exactly(run_a, tiny_data, tmp_path):
    """train.time_budget_s stops at the next log step with an evaluation, a checkpoint and an honest
    summary; running again resumes, and the run ends as an uninterrupted one did."""
    first = train(tmp_path, tiny_data, "train.time_budget_s=1e-9")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stopped_early"] and summary["steps"] == 1 and summary["planned_steps"] == 20
    assert "train.time_budget_s ran out before step 20; the same command continues" in first.stdout
    assert "step 1/20, 0:" in first.stderr and ckpt.find_latest(tmp_path / "checkpoints") == "step00000001"
    again = train(tmp_path, tiny_data)
    assert "resumed from" in again.stderr and not json.loads((tmp_path / "summary.json").read_text())["stopped_early"]
    assert losses(tmp_path) == losses(run_a)
    assert "about 0:" in again.stderr  # evaluation lines carry the time left


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(run_a, tiny_data, tmp_path):
    shutil.copytree(run_a, tmp_path / "run", dirs_exist_ok=True)
    states = next((tmp_path / "run" / "checkpoints" / "step00000020").glob("*model_states.pt"))
    states.write_bytes(b"\0" * states.stat().st_size)  # same size, garbage content
    result = train(tmp_path / "run", tiny_data)
    assert "step00000020 is corrupt: mp_rank_00_model_states.pt does not match its SHA-256" in result.stderr
    assert "resumed from" in result.stderr and "step00000010" in result.stderr
    assert losses(tmp_path / "run") == losses(run_a)  # steps 11-20 trained again, bitwise as before
    assert "Traceback" not in result.stderr


def test_nonfinite_abort_keeps_the_good_checkpoints(tiny_data, tmp_path):
    """Diverged at step 12 with keep_last=1: the state goes to diverged-step00000012, step 10 stays latest."""
    result = train(tmp_path, tiny_data, "train.max_nonfinite=3", "train.keep_last=1",
                   env={"SIFT_FAULT": "poison_weights:12"}, check=False)
    assert result.returncode == 2
    root = tmp_path / "checkpoints"
    assert "3 non-finite losses in a row at step 12" in result.stderr
    assert f"the last good checkpoint is {root / 'step00000010'}" in result.stderr
    assert f"diverged state is saved in {root / 'diverged-step00000012'}" in result.stderr
    assert "The steps before were finite: possible causes" in result.stderr
    assert ckpt.find_latest(root) == "step00000010" and ckpt.complete_tags(root) == ["step00000010"]
    record = ckpt.verify(root, "diverged-step00000012")
    assert record["nonfinite_total"] == 3 and record["step"] == 12


def test_stop_mode_matches_skip_mode_when_finite(run_a, tiny_data, tmp_path):
    """train.nonfinite=stop changes when the flag is read, nothing else: every step's loss is bitwise run A's."""
    train(tmp_path, tiny_data, "train.nonfinite=stop")
    assert losses(tmp_path) == losses(run_a)


def test_stop_mode_stops_at_the_next_check_and_keeps_the_good_checkpoints(tiny_data, tmp_path):
    """Poisoned before step 13, checked every 5 steps: the check of step 15 finds 3 and stops; no checkpoint
    is written after the poison except the diverged state; step 10 stays the last good one."""
    result = train(tmp_path, tiny_data, "train.nonfinite=stop", "train.log_every=5", "train.keep_last=1",
                   env={"SIFT_FAULT": "poison_weights:12"}, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    root = tmp_path / "checkpoints"
    assert "3 non-finite loss(es) in steps 11-15 (train.nonfinite=stop" in result.stderr
    assert f"the last good checkpoint is {root / 'step00000010'}" in result.stderr
    assert f"diverged state is saved in {root / 'diverged-step00000015'}" in result.stderr
    assert "Traceback" not in result.stderr
    assert ckpt.complete_tags(root) == ["step00000010"]
    assert ckpt.verify(root, "diverged-step00000015")["step"] == 15
    assert max(r["step"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())) == 10


def test_compiled_blocks_train_like_eager(tiny_data, tmp_path):
    """train.compile=true (torch.compile of each block; inductor on CPU) with the pipelined scorer: without
    dropout (compiled dropout draws from inductor's RNG) the losses and evaluations are eager's."""
    short = ("model.dropout=0", "train.steps=6", "train.eval_every=3", "train.save_every=0")
    concurrently(lambda: train(tmp_path / "eager", tiny_data, *short),
                 lambda: train(tmp_path / "compiled", tiny_data, *short, "train.compile=true"))
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-5)
    got, want = evals(tmp_path / "compiled"), evals(tmp_path / "eager")
    assert [e["val_mlm_loss"] for e in got] == pytest.approx([e["val_mlm_loss"] for e in want], rel=1e-5)


def test_init_from_an_exported_checkpoint(run_a, tmp_path):
    """model.init_from loads a local Hugging Face directory (here: our own export, with the NSP head that
    sentence-pair training needs) instead of random init."""
    import torch

    from engine.config import ModelConfig
    from engine.export import main as export_main
    from engine.models.bert import ModelError, build_model

    assert export_main([str(run_a), "--out", str(tmp_path / "hf"), "--nsp-head"]) == 0
    cfg = ModelConfig(init_from=str(tmp_path / "hf"))
    model = build_model(cfg, vocab_size=512, seq_len=64, pad_id=0, use_nsp=True)
    again = build_model(cfg, vocab_size=512, seq_len=64, pad_id=0, use_nsp=True)
    for p, q in zip(model.parameters(), again.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ModelError, match="vocabulary of 512 tokens but the data's tokenizer has 30522"):
        build_model(cfg, vocab_size=30522, seq_len=64, pad_id=0, use_nsp=True)
    with pytest.raises(ModelError, match="not a Hugging Face checkpoint directory"):
        build_model(ModelConfig(init_from=str(tmp_path)), vocab_size=512, seq_len=64, pad_id=0, use_nsp=True)


def test_a_plugin_method_runs_through_the_unchanged_loop(tiny_data, tmp_path):
    """tests/plugin_lowest.py registers a method; `sift train` runs it by name, checkpoints included."""
    train(tmp_path, tiny_data, "train.plugins=[tests.plugin_lowest]", "method=lowest", "train.steps=6",
          "train.eval_every=6", "train.save_every=3")
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    selecting = [r for r in records if "kept_score" in r]
    assert len(selecting) == 4  # steps 3-6: the first 2 are the tiny run's warm-up
    assert all(r["kept_score"] < r["dropped_score"] for r in selecting)
    assert ckpt.find_latest(tmp_path / "checkpoints") == "step00000006"


def test_zero3_resume_scores_with_the_restored_weights(tiny_data, tmp_path):
    """Under ZeRO-3 the scorer reads a replica of the exit's modules: after a resume it must hold the
    checkpoint's weights (not the initial ones), or the first selections after the resume differ."""
    common = ("deepspeed.zero_stage=3", "train.steps=12", "train.save_every=6", "train.eval_every=12")
    _, killed = concurrently(lambda: train(tmp_path / "ref", tiny_data, *common),
                             lambda: train(tmp_path / "run", tiny_data, *common, env={"SIFT_FAULT": "after_save:6"},
                                           check=False))
    assert killed.returncode == -9, killed.stderr[-2000:]
    train(tmp_path / "run", tiny_data, *common)
    assert losses(tmp_path / "run") == losses(tmp_path / "ref")


def test_corrupt_shard_stops_training_with_the_default_config(tiny_data, tmp_path):
    """Flipped bytes in a shard of the right size: the default config stops before training on it."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    shard = data / "train-00000.arrow"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 64] = bytes(64)
    shard.write_bytes(bytes(raw))
    result = train(tmp_path / "run", data, "train.steps=2", "data.num_workers=1", check=False)
    assert result.returncode == 2
    assert f"shard {shard} fails its SHA-256 check against index.json" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run" / "checkpoints").exists()
