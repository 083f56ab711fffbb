"""CUDA streams, events and phase timers that degrade to plain sequential code on CPU.

On CPU there are no streams: every `on(...)` is a no-op, events are None and waits do nothing, so the
pipelined schedule runs the same Python in the same order, sequentially, with identical semantics.

Priorities. CUDA's priority range is (least, greatest) = (0, -N) and the default stream has priority 0,
the least: a side stream cannot be ranked below a training loop that runs on the default stream. So the
training work itself runs on a stream of the greatest priority (`training_stream`, entered before the
engine is built so that DeepSpeed's own kernels and buffers follow it) and the scoring and copy streams
keep the least, 0. Priority only orders which ready thread blocks the GPU schedules first; it never
preempts a running kernel.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress

import torch

from data_pipeline.batch import Batch, to_device


@contextmanager
def training_stream(device: torch.device) -> Iterator[torch.cuda.Stream | None]:
    """Make a stream of the device's greatest priority current for the duration (CPU: no-op, yields None).

    Enter it before the DeepSpeed engine is built and keep it for the whole run (build, steps,
    evaluation, checkpoints): every kernel the loop, autograd and DeepSpeed launch on the current stream
    then outranks the scoring and copy streams, and tensors allocated during the build belong to it in
    the caching allocator. Build ``Streams`` inside it.
    """
    if device.type != "cuda":
        yield None
        return
    _least, greatest = torch.cuda.Stream.priority_range()
    outer = torch.cuda.current_stream(device)
    stream = torch.cuda.Stream(device, priority=greatest)
    stream.wait_stream(outer)  # after whatever was queued before (the weights' initialization)
    try:
        with torch.cuda.stream(stream):
            yield stream
    finally:
        outer.wait_stream(stream)  # and the caller's stream after everything queued inside


class Streams:
    """The training stream (the stream current at construction), a scoring and a copy stream of the least
    priority.

    Constructed inside ``training_stream(device)`` the training stream has the greatest priority and the
    side streams rank below it; constructed outside it, training runs on the default stream, whose
    priority equals theirs, and nothing is prioritized. Either way ``main`` is the stream the schedule's
    training work must run on, so the loop must keep that stream current.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.main = torch.cuda.current_stream(device)
            least, _greatest = torch.cuda.Stream.priority_range()
            self.side = torch.cuda.Stream(device, priority=least)
            self.copy = torch.cuda.Stream(device, priority=least)
        else:
            self.main = self.side = self.copy = None

    def priorities(self) -> dict[str, int] | None:
        """Priority of each stream (lower is more urgent); None on CPU."""
        if not self.cuda:
            return None
        return {"main": self.main.priority, "side": self.side.priority, "copy": self.copy.priority}

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
