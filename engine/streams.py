"""CUDA streams, events and phase timers that degrade to plain sequential code on CPU.

On CPU there are no streams: every `on(...)` is a no-op, events are None and waits do nothing, so the
pipelined schedule runs the same Python in the same order, sequentially, with identical semantics.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress

import torch

from data_pipeline.batch import Batch, to_device


class Streams:
    """The training (current) stream, a low-priority scoring stream and a copy stream."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.main = torch.cuda.current_stream(device)
            low, _high = torch.cuda.Stream.priority_range()  # (lowest, greatest) priority values
            self.side = torch.cuda.Stream(device, priority=low)  # the training stream keeps precedence
            self.copy = torch.cuda.Stream(device, priority=low)
        else:
            self.main = self.side = self.copy = None

    def on(self, stream: torch.cuda.Stream | None):
        return torch.cuda.stream(stream) if stream is not None else nullcontext()

    def record(self, stream: torch.cuda.Stream | None) -> torch.cuda.Event | None:
        return stream.record_event() if stream is not None else None

    @staticmethod
    def wait(stream: torch.cuda.Stream | None, event: torch.cuda.Event | None) -> None:
        if stream is not None and event is not None:
            stream.wait_event(event)

    @staticmethod
    def keep_alive(tensors: Batch | list[torch.Tensor], stream: torch.cuda.Stream | None) -> None:
        """Tell the caching allocator that ``stream`` uses these tensors too (allocated elsewhere)."""
        if stream is None:
            return
        for t in tensors.values() if isinstance(tensors, dict) else tensors:
            t.record_stream(stream)


class DevicePrefetcher:
    """Moves the next batch to the device on the copy stream while the current one computes."""

    def __init__(self, loader_iter: Iterator[Batch], device: torch.device, streams: Streams):
        self.it, self.device, self.streams = loader_iter, device, streams
        self._next: tuple[Batch, torch.cuda.Event | None] | None = None

    def _fetch(self) -> tuple[Batch, torch.cuda.Event | None]:
        host = next(self.it)
        if not self.streams.cuda:
            return to_device(host, self.device), None
        with self.streams.on(self.streams.copy):
            dev = to_device(host, self.device, non_blocking=True)
        return dev, self.streams.record(self.streams.copy)

    def next(self) -> tuple[Batch, torch.cuda.Event | None]:
        """A device batch and the event its copy completes on (None on CPU). Consumers must wait on the
        event and ``keep_alive`` the tensors on their stream."""
        current = self._next if self._next is not None else self._fetch()
        self._next = None
        with suppress(StopIteration):  # a finite loader simply ends
            self._next = self._fetch()
        return current


class PhaseTimer:
    """Seconds per phase (data, scoring, forward, backward, optimizer), summed between flushes.

    CUDA phases are timed with events on the stream they run on and read only at ``flush`` (the one
    host sync), so timing adds no synchronisation to the steady state.
    """

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self._host: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str, stream: torch.cuda.Stream | None = None, host: bool = False) -> Iterator[None]:
        if self.cuda and not host:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record(stream)
            yield
            end.record(stream)
            self._events.append((name, start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._host[name] += time.perf_counter() - t0

    def flush(self) -> dict[str, float]:
        out = dict(self._host)
        if self._events:
            self._events[-1][2].synchronize()
            for name, start, end in self._events:
                end.synchronize()
                out[name] = out.get(name, 0.0) + start.elapsed_time(end) / 1000.0
        self._events.clear()
        self._host.clear()
        return out
