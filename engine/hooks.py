"""Loop hooks: named events the training loop fires, for plugins (``train.plugins``).

The test suite injects its faults this way (tests/faults.py): killing the process mid-save, poisoning
the weights; benchmarks/step_clock.py times the steps. The loop knows nothing about them; it only fires:

==========================  ================================  ==========================================
event                       keyword arguments                 when
==========================  ================================  ==========================================
``micro_step_start``        step, draw, model, engine         before every micro-step
``step_end``                step                              after each optimizer step, before the loop
                                                              logs, evaluates or saves
``checkpoint_files_written`` step, tag, rank                  DeepSpeed's files written, ours not yet
``checkpoint_complete``     step, tag, rank                   the checkpoint is complete on every rank
==========================  ================================  ==========================================
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

EVENTS = ("micro_step_start", "step_end", "checkpoint_files_written", "checkpoint_complete")
_HOOKS: dict[str, list[Callable[..., None]]] = defaultdict(list)


def on(event: str, fn: Callable[..., None]) -> None:
    """Call ``fn(**kwargs)`` whenever the loop fires ``event``."""
    if event not in EVENTS:
        raise ValueError(f"unknown loop event {event!r}; events: {', '.join(EVENTS)}")
    _HOOKS[event].append(fn)


def fire(event: str, **kwargs: Any) -> None:
    for fn in _HOOKS.get(event, ()):
        fn(**kwargs)
