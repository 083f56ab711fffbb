"""End-to-end `sift reference` on tiny causal-LM data: two references on the halves of the training split
(RHO-LOSS's double irreducible loss) and their sidecar; a run that reads the sidecar zeroed trains exactly
like ``criterion: loss`` and logs fidelity; a reference the sidecar was not computed by is refused."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from data_pipeline.reader import ShardDataset
from data_pipeline.sampler import split_half
from engine.reference import ReferenceModelError, open_reference, read_sidecar, write_sidecar
from tests.distributed.common import REPO, single_env
from tests.runs import TINY_RUN, concurrently, losses, train

TINY = ("model.family=gpt2", "deepspeed.config=ds_configs/zero0.json", "model.num_layers=1", "train.steps=2",
        "train.save_every=2", "train.eval_every=2")


@pytest.mark.slow
def test_reference_halves_sidecar_and_runs_that_read_it(tiny_clm_data, tmp_path):
    out, sidecar = tmp_path / "ref", tmp_path / "ref" / "losses.sidecar"
    cmd = [sys.executable, "-m", "launcher.cli", "reference", "--config", str(TINY_RUN), "--out", str(out),
           "--half", "both", "--sidecar", str(sidecar), f"data.path={tiny_clm_data}", *TINY]
    done = subprocess.run(cmd, cwd=REPO, env=single_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    cost = json.loads((out / "reference.json").read_text())
    assert [r["half"] for r in cost["references"]] == [0, 1]
    for r in cost["references"]:
        assert r["steps"] == 2 and r["seconds"] > 0 and r["flops"] > 0 and r["backprop_samples"] == 8
        assert f"reference {r['path']}: 2 steps" in done.stdout

    # the sidecar: every row of the split, each scored by the reference that did not train on its half
    train_rows = len(ShardDataset.open(tiny_clm_data, "train"))
    side = read_sidecar(sidecar)
    assert side.losses.shape == (train_rows, 64) and [m["half"] for m in side.header["models"]] == [0, 1]
    assert np.all(side.losses[:, -1] == 0) and np.all(side.losses[:, :-1] > 0)
    assert len(split_half(train_rows, 0)) + len(split_half(train_rows, 1)) == train_rows
    zeroed = tmp_path / "zero.sidecar"
    write_sidecar(zeroed, side.header, [np.zeros(side.losses.shape, np.float32)])

    run = ("model.family=gpt2", "deepspeed.config=ds_configs/zero0.json", "train.steps=6", "train.save_every=6",
           "train.eval_every=6", "sift.fidelity_every=1")
    a, b = tmp_path / "loss", tmp_path / "zero"
    concurrently(lambda: train(a, tiny_clm_data, *run),
                 lambda: train(b, tiny_clm_data, *run, "sift.criterion=reducible", f"sift.reference={out / 'half1'}",
                               f"sift.reference_losses={zeroed}"))
    assert losses(a) == losses(b)  # loading the reference draws nothing from the run's RNG streams
    records = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert any("spearman" in r and r.get("reference_flops") == 0 for r in records)

    # a reference whose weights are not the sidecar's is refused, naming both
    only_half0 = tmp_path / "half0.sidecar"
    write_sidecar(only_half0, side.header | {"models": side.header["models"][:1]}, [np.asarray(side.losses)])
    with pytest.raises(ReferenceModelError) as e:
        open_reference(str(out / "half1"), str(only_half0), data_path=str(tiny_clm_data), split="train",
                       device=torch.device("cpu"))
    for s in (str(out / "half0"), str(out / "half1"), side.header["models"][0]["sha256"]):
        assert s in str(e.value)


@pytest.mark.slow
def test_bert_reference_on_a_held_out_split_runs_online(tiny_data, tmp_path):
    """BERT: `sift reference --split validation`, then a run whose reference forwards each gross batch."""
    out = tmp_path / "ref"
    cmd = [sys.executable, "-m", "launcher.cli", "reference", "--config", str(TINY_RUN), "--out", str(out),
           "--split", "validation", f"data.path={tiny_data}", "model.num_layers=1", "train.steps=2",
           "train.save_every=2", "train.eval_every=2"]
    done = subprocess.run(cmd, cwd=REPO, env=single_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    (r,) = json.loads((out / "reference.json").read_text())["references"]
    assert r["split"] == "validation" and r["steps"] == 2 and r["flops"] > 0
    run = tmp_path / "run"
    train(run, tiny_data, "train.steps=4", "train.save_every=4", "train.eval_every=4", "sift.fidelity_every=1",
          "sift.criterion=reducible", f"sift.reference={out}")
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in records if "reference_flops" in r]
    assert scored and all(r["reference_flops"] > 0 and r["reference_s"] > 0 for r in scored)
    assert any("spearman" in r for r in scored)
