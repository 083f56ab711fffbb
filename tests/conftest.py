"""Shared test setup: CPU DeepSpeed, the GPU marker, and the optional shared corpus."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest


def pytest_configure(config):
    # A bare `pytest` from an interpreter without the project installed would fail to import every test
    # module; say so once, naming the interpreter, before collection starts.
    missing = [m for m in ("torch", "deepspeed", "transformers", "pyarrow", "engine")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise pytest.UsageError(
            f"{', '.join(missing)} not importable from {sys.executable}: run the tests in the environment the "
            'README sets up (`pip install torch==2.13.0 && pip install -e ".[dev]"`, then `python -m pytest -q`)'
        )
    import torch

    # DeepSpeed picks its accelerator at import time: the CPU one (gloo) where there is no CUDA.
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The tests' models are tiny: a second intra-op thread only adds OpenMP hand-offs, which on a busy
    # 2-core machine cost more than the work (20 VCAS draws: 1.5 s on one thread, 23 s on two at load 12).
    # Runs the tests start (subprocesses) get one thread each too, as two of them often run at once.
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_CORPUS = REPO_ROOT.parent / "shared" / "corpus" / "english-reference.parquet"


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_corpus() -> Path:
    """The shared English corpus; tests that use it skip cleanly where it is absent (a user's clone)."""
    if not SHARED_CORPUS.is_file():
        pytest.skip(f"shared corpus not present at ../shared/corpus/ (looked for {SHARED_CORPUS.name})")
    return SHARED_CORPUS


def _prepare(tmp_path_factory, name: str, tokenizer: str, *options: str) -> Path:
    """The generated corpus (no stdlib text, so it is identical on every Python) prepared at seq 64 with a
    committed tokenizer (the same token ids in every session)."""
    from data_pipeline import prepare
    from data_pipeline.demo_corpus import write_demo_corpus

    root = tmp_path_factory.mktemp(name)
    corpus = write_demo_corpus(root / "corpus", seed=0, target_docs=300, stdlib=False)
    out = root / "data"
    code = prepare.main([str(corpus), "--out", str(out), *options, "--seq-len", "64", "--tokenizer",
                         str(REPO_ROOT / "tests" / "assets" / tokenizer), "--val-fraction", "0.1", "--seed", "0",
                         "--num-proc", "1", "--log-level", "WARNING"])
    assert code == 0
    return out


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """BERT sentence pairs (NSP) from the generated corpus, with the committed WordPiece tokenizer
    (WordPiece training is not deterministic, and the golden loss curve needs identical token ids)."""
    return _prepare(tmp_path_factory, "tiny-data", "tokenizer-512")


@pytest.fixture(scope="session")
def tiny_mlm_data(tmp_path_factory) -> Path:
    """The generated corpus of ``tiny_data`` packed for masked LM only (``--objective mlm_packed``)."""
    return _prepare(tmp_path_factory, "tiny-mlm-data", "tokenizer-512", "--objective", "mlm_packed")


@pytest.fixture(scope="session")
def tiny_clm_data(tmp_path_factory) -> Path:
    """The generated corpus of ``tiny_data`` prepared for causal LMs (``--objective clm``) with a committed
    byte-level BPE."""
    return _prepare(tmp_path_factory, "tiny-clm-data", "bpe-512", "--objective", "clm")


def pytest_sessionfinish(session, exitstatus):
    # A child process left running (a DataLoader worker whose iterator a test still held, say) can make the
    # interpreter wait for it at exit, after the summary, forever: name it, end it, and fail the run.
    import multiprocessing

    left = multiprocessing.active_children()
    if not left:
        return
    for child in left:
        child.kill()
        child.join(timeout=5)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.ensure_newline()
        reporter.write_line(f"child processes still running at the end of the session (killed): "
                            f"{', '.join(f'{c.name} pid {c.pid}' for c in left)}", red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
