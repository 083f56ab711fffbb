"""An interrupted or failed prepare never leaves a directory that the reader accepts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from data_pipeline import build
from data_pipeline.demo_corpus import write_demo_corpus
from data_pipeline.errors import DataError
from data_pipeline.reader import ShardDataset
from launcher.cli import main as sift

REPO_ROOT = Path(__file__).resolve().parents[2]

# Kill the process (SIGKILL: no cleanup code runs) right after the first shard is complete.
KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from data_pipeline import prepare, shards
    original = shards.ShardWriter._flush
    def flush_then_die(self):
        original(self)
        os.kill(os.getpid(), signal.SIGKILL)
    shards.ShardWriter._flush = flush_then_die
    sys.exit(prepare.main(sys.argv[1:]))
    """
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_demo_corpus(tmp_path_factory.mktemp("corpus"), seed=3, target_docs=60, stdlib=False)


def argv(src, out, *extra):
    return [str(src), "--out", str(out), "--train-tokenizer", "--vocab-size", "200", "--seq-len", "32",
            "--shard-rows", "16", "--num-proc", "1", "--log-level", "WARNING", *extra]  # fmt: skip


def test_killed_prepare_is_not_a_dataset(corpus, tmp_path):
    out = tmp_path / "ds"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, *argv(corpus, out)], env=env, capture_output=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL
    assert list(out.glob(".tmp-prepare-*/*.arrow")) and not list(out.rglob("index.json"))
    with pytest.raises(DataError, match=r"index\.json is missing.*interrupted"):
        ShardDataset.open(out)
    # A second run refuses to mix with the leftovers, and --overwrite recovers.
    assert sift(["prepare", *argv(corpus, out)]) == 2
    assert sift(["prepare", *argv(corpus, out, "--overwrite")]) == 0
    assert len(ShardDataset.open(out)) > 0


def test_failure_midway_cleans_up(corpus, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(corpus.read_text() + "{broken\n")
    out = tmp_path / "ds"
    assert sift(["prepare", *argv(bad, out)]) == 2
    assert "bad.jsonl:61" in capsys.readouterr().err
    assert not list(out.glob("*.arrow")) and not (out / "index.json").exists()


def test_interrupt_before_the_index_is_written(corpus, tmp_path, monkeypatch, capsys):
    def interrupted(root, index):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "write_index", interrupted)
    out = tmp_path / "ds"
    assert sift(["prepare", *argv(corpus, out)]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not (out / "index.json").exists() and not list(out.glob("*.arrow"))


def test_swap_removes_the_old_index_first(corpus, tmp_path, monkeypatch):
    """Killed while swapping the new dataset in: what is left must not pass for the old dataset."""
    out = tmp_path / "ds"
    assert sift(["prepare", *argv(corpus, out)]) == 0
    real_replace = os.replace

    def crash_after_first_move_into_out(src, dst):
        real_replace(src, dst)
        if Path(dst).parent == out:
            raise RuntimeError("crash")

    monkeypatch.setattr(os, "replace", crash_after_first_move_into_out)
    with pytest.raises(RuntimeError):
        sift(["prepare", *argv(corpus, out, "--overwrite", "--seq-len", "64")])
    assert not (out / "index.json").exists()
    with pytest.raises(DataError):
        ShardDataset.open(out)
