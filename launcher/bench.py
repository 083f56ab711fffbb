"""`sift bench`: find this process's rank as `sift train` does, then hand over to benchmarks/throughput.py.

The benchmark measures one device in one process; a launcher that started more is refused here, before
anything is built.
"""

from __future__ import annotations

import os

from launcher.dist_env import prepare_process
from launcher.errors import LaunchError


def main(argv: list[str] | None = None) -> int:
    dist = prepare_process(os.environ)
    if dist.world_size != 1:
        raise LaunchError(f"it measures one device in one process, but the launcher started {dist.world_size}")
    from benchmarks.throughput import main as bench_main

    return bench_main(argv)
