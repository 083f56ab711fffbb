"""engine/streams.py on CPU: no streams, so the training-stream context and the priorities are no-ops."""

from __future__ import annotations

import torch

from engine.streams import Streams, training_stream


def test_training_stream_is_a_no_op_on_cpu():
    dev = torch.device("cpu")
    with training_stream(dev) as stream:
        assert stream is None
        streams = Streams(dev)
        x = torch.ones(3) * 2  # ordinary work runs unchanged inside
    assert streams.main is streams.side is streams.copy is None
    assert streams.priorities() is None and streams.record(streams.side) is None
    assert x.sum().item() == 6.0
