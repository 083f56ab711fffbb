"""SLURM's compressed host and task-count lists, expanded without calling `scontrol`.

Ranks started by srun must agree on a master address without talking to each other, so each one
expands `SLURM_STEP_NODELIST` (e.g. `p4d-st1-[01-03,07],gpu9`) itself and takes the first host.
"""

from __future__ import annotations

import re

from launcher.errors import LaunchError

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")
_TASKS = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


def _split_top_level(text: str, what: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise LaunchError(f"{what} {text!r}: nested '[' at position {i}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise LaunchError(f"{what} {text!r}: ']' without '[' at position {i}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise LaunchError(f"{what} {text!r}: '[' is never closed")
    parts.append(text[start:])
    return parts


def _expand_ranges(body: str, source: str) -> list[str]:
    """`01-03,07` -> ['01', '02', '03', '07']; the zero padding of each range start is kept."""
    out: list[str] = []
    for item in body.split(","):
        m = _RANGE.match(item.strip())
        if not m:
            raise LaunchError(f"host list {source!r}: bad range {item!r} (expected N or N-M)")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise LaunchError(f"host list {source!r}: range {item!r} runs backwards")
        width = len(lo) if lo.startswith("0") else 1
        out += [str(n).zfill(width) for n in range(int(lo), int(hi) + 1)]
    return out


def _expand_name(name: str, source: str) -> list[str]:
    """Expand every bracket group of one host pattern (`rack[1-2]-n[01-02]` -> 4 names)."""
    m = re.search(r"\[([^\]]*)\]", name)
    if not m:
        if "]" in name:
            raise LaunchError(f"host list {source!r}: stray ']' in {name!r}")
        return [name]
    head, tail = name[: m.start()], name[m.end() :]
    return [head + mid + rest for mid in _expand_ranges(m.group(1), source) for rest in _expand_name(tail, source)]


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a SLURM host list (`p4d-st1-[01-03,07],gpu9`) into host names, in order."""
    text = hostlist.strip()
    if not text:
        raise LaunchError("host list is empty")
    hosts: list[str] = []
    for part in _split_top_level(text, "host list"):
        part = part.strip()
        if not part:
            raise LaunchError(f"host list {hostlist!r}: empty entry (two commas in a row?)")
        hosts += _expand_name(part, hostlist)
    return hosts


def expand_tasks_per_node(spec: str) -> list[int]:
    """Expand SLURM's tasks-per-node format (`8(x2),4` -> [8, 8, 4])."""
    counts: list[int] = []
    for part in spec.strip().split(","):
        m = _TASKS.match(part.strip())
        if not m:
            raise LaunchError(f"tasks per node {spec!r}: bad entry {part!r} (expected N or N(xK))")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts
