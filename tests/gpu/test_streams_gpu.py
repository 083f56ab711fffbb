"""Stream priorities on a GPU: inside ``training_stream`` the training work outranks the scoring and copy
streams, and the pipelined schedule still keeps exactly the one-step-stale scores there. Skipped without
CUDA (tests/conftest.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from benchmarks.synthetic import batch_pool, cycle
from engine.scoring import exit_scores
from engine.streams import Streams, training_stream
from tests.gpu.test_pipelined_gpu import ATOL, G, T, V, base_ish, pipelined
from tests.helpers import PlainEngine

pytestmark = pytest.mark.gpu


def test_training_stream_outranks_the_side_streams():
    dev = torch.device("cuda")
    least, greatest = torch.cuda.Stream.priority_range()
    assert greatest < least == 0 == torch.cuda.default_stream(dev).priority
    outside = Streams(dev).priorities()
    assert outside["main"] == outside["side"] == outside["copy"] == 0  # the default stream: no precedence
    with training_stream(dev) as stream:
        assert torch.cuda.current_stream(dev) == stream
        inside = Streams(dev).priorities()
    assert inside == {"main": greatest, "side": least, "copy": least}
    assert torch.cuda.current_stream(dev) == torch.cuda.default_stream(dev)


def test_pipelined_keeps_the_one_step_stale_scores_on_the_training_stream():
    dev = torch.device("cuda")
    with training_stream(dev):
        model = base_ish()
        engine = PlainEngine(model, lr=3e-3)
        sched = pipelined(model, engine, "loss", cycle(batch_pool(G, T, V, size=4, pin=True)))
        assert sched.streams.main == torch.cuda.current_stream(dev)
        for d in range(3):
            before = copy.deepcopy(model)
            assert sched.micro_step(d, d).stepped
            batch, scores, done = sched._pending
            torch.cuda.current_stream().wait_event(done)
            stale = exit_scores(before.exit_path(1), batch, "loss")
            fresh = exit_scores(model.exit_path(1), batch, "loss")
            torch.testing.assert_close(scores, stale, rtol=0, atol=ATOL)
            assert (scores - fresh).abs().max() > 10 * ATOL
            del before
