"""Training started through the deepspeed launcher and through mpirun (2 ranks x B) reaches the same
losses as one process with 2B rows on the same global batch (selection off, dropout off)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from launcher.cli import main as sift
from tests.distributed.common import REPO, free_port
from tests.runs import TINY_RUN, losses, train

pytestmark = pytest.mark.dist

COMMON = ["sift.policy=none", "model.dropout=0.0", "train.steps=8", "train.eval_every=8", "train.save_every=0",
          "sift.fidelity_every=0"]


@pytest.fixture(scope="module")
def one_rank_2b(tiny_data, tmp_path_factory) -> list[float]:
    out = tmp_path_factory.mktemp("one-rank")
    train(out, tiny_data, "train.micro_batch_size=8", *COMMON)
    return losses(out)


@pytest.fixture
def launch_env(monkeypatch, tmp_path):
    for key in list(os.environ):
        if key.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "OMPI_", "SLURM_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(REPO)  # the launch commands name launcher/train.py relative to the repo


def training_args(tiny_data: Path, out: Path) -> list[str]:
    return ["--config", str(TINY_RUN), f"data.path={tiny_data}", f"train.out_dir={out}",
            "train.micro_batch_size=4", *COMMON]


def test_deepspeed_launcher(one_rank_2b, tiny_data, tmp_path, launch_env, capfd):
    code = sift(["launch", "--hosts", "localhost", "--gpus-per-node", "2", "--master-port", str(free_port()),
                 "--", *training_args(tiny_data, tmp_path)])
    assert code == 0, capfd.readouterr().err[-3000:]
    assert losses(tmp_path) == pytest.approx(one_rank_2b, rel=1e-4)


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="Open MPI (mpirun) not installed")
def test_mpirun(one_rank_2b, tiny_data, tmp_path, launch_env, capfd):
    code = sift(["launch", "--backend", "mpirun", "--gpus-per-node", "2", "--oversubscribe", "--allow-run-as-root",
                 "--master-port", str(free_port()), "--python", sys.executable,
                 "--", *training_args(tiny_data, tmp_path)])
    assert code == 0, capfd.readouterr().err[-3000:]
    assert losses(tmp_path) == pytest.approx(one_rank_2b, rel=1e-4)


LLAMA = ["model.family=llama", "deepspeed.config=ds_configs/zero2.json"]


def test_deepspeed_launcher_trains_a_decoder(tiny_clm_data, tmp_path, launch_env, capfd):
    """A tiny Llama on causal-LM data under ZeRO-2: 2 ranks x B through the deepspeed launcher train like
    one process with 2B (the global token-mean objective)."""
    train(tmp_path / "one", tiny_clm_data, "train.micro_batch_size=8", *COMMON, *LLAMA)
    code = sift(["launch", "--hosts", "localhost", "--gpus-per-node", "2", "--master-port", str(free_port()),
                 "--", *training_args(tiny_clm_data, tmp_path / "two"), *LLAMA])
    assert code == 0, capfd.readouterr().err[-3000:]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)
