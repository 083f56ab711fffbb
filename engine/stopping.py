"""Stop on request: a signal (SIGTERM, SIGINT, SLURM's early warning SIGUSR1) sets a flag; the loop asks
at each optimizer-step boundary whether any rank has one, saves and exits with ``PREEMPTED_EXIT``.

The handler only sets a flag, so a signal arriving mid-step, mid-save or twice changes nothing but the
decision at the next boundary; the decision is collective (one all-reduce of the flag over a host
group), so every rank stops after the same step and the checkpoint is complete.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

log = logging.getLogger(__name__)

PREEMPTED_EXIT = 75
"""Exit status of a run stopped by a signal after saving its checkpoint (EX_TEMPFAIL: "try again").
A requeue script resubmits the same command on it; 0 is a finished run, 2 an error to fix."""


def signal_number(name: str) -> int | None:
    """``SIGTERM`` / ``TERM`` / ``15`` -> its number, None when this platform has no such signal."""
    if name.isdigit():
        return int(name)
    sig = getattr(signal, name if name.startswith("SIG") else f"SIG{name}", None)
    return int(sig) if isinstance(sig, signal.Signals) else None


class StopRequests:
    """Signal handlers for the life of a run (``close`` puts the previous ones back) and the collective
    stop decision."""

    def __init__(self, names: list[str]):
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}
        for name in names:
            num = signal_number(name)
            if num is not None:
                self._previous[num] = signal.signal(num, self._handle)

    def _handle(self, num: int, _frame: Any) -> None:
        name = signal.Signals(num).name
        if self.requested is None:
            self.requested = name
            log.warning("%s received: stopping after the current optimizer step, with a checkpoint", name)
        else:  # the save in progress goes on; SIGKILL still ends the process (complete-or-invisible)
            log.warning("%s received: already stopping (%s), the checkpoint is being written", name, self.requested)

    def agreed(self) -> bool:
        """Did any rank get a stop signal? Every rank must call it at the same step."""
        from engine import ds  # not at import: the config's checks use signal_number without deepspeed

        num = ds.max_over_ranks(int(signal.Signals[self.requested]) if self.requested else 0)
        if num and self.requested is None:
            self.requested = signal.Signals(num).name  # another rank's: named alike in every rank's record
        return num > 0

    def close(self) -> None:
        for num, previous in self._previous.items():
            signal.signal(num, previous)
        self._previous = {}
