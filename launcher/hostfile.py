"""DeepSpeed hostfiles (`host slots=N`) and the `--include/--exclude` filters, checked up front.

The deepspeed launcher reports a bad hostfile as one line of text without a line number, and accepts
some files that then fail later (a host with `slots=0`, a host with no `slots=` that Open MPI would
take but DeepSpeed rejects). Here every problem is listed at once as `file:line: what, how to fix`.
Filters follow DeepSpeed's syntax, `NAME[:SLOT[,SLOT...]][@NAME...]`, and semantics (include keeps
only what is named; exclude removes it; hosts left without slots drop out; hostfile order is kept).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from launcher.errors import LaunchError

# Open MPI hostfiles may also carry max_slots; accept it so one file serves both launchers.
_EXTRA_KEYS = ("max_slots", "max-slots")
_HOST = re.compile(r"^[A-Za-z0-9_.\-]+$")


def parse_hostfile(text: str, source: str = "<hostfile>") -> dict[str, int]:
    """Parse hostfile text into {host: slots} in file order; raise LaunchError listing every bad line."""
    pool: dict[str, int] = {}
    first_line: dict[str, int] = {}
    problems: list[str] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source}:{lineno}"
        host, *fields = line.split()
        if "=" in host:
            problems.append(f"{where}: line starts with {host!r}; expected a host name first, e.g. 'node1 slots=8'")
            continue
        if not _HOST.match(host):
            problems.append(f"{where}: {host!r} is not a host name (letters, digits, '.', '-', '_')")
            continue
        if not fields or not fields[0].startswith("slots="):
            problems.append(
                f"{where}: host {host!r} has no slots; the deepspeed launcher needs "
                f"'{host} slots=N' with N the number of GPUs to use on it"
            )
            continue
        value = fields[0].removeprefix("slots=")
        if not value.isdigit():
            problems.append(f"{where}: host {host!r} has malformed slots {value!r}; expected a whole number like slots=8")
            continue
        if int(value) == 0:
            problems.append(f"{where}: host {host!r} has slots=0; give it at least one slot or remove the line")
            continue
        bad_extra = [f for f in fields[1:] if f.split("=", 1)[0] not in _EXTRA_KEYS or not f.split("=", 1)[-1].isdigit()]
        if bad_extra:
            problems.append(f"{where}: unexpected {' '.join(bad_extra)!r} after slots (only max_slots=N may follow)")
            continue
        if host in pool:
            problems.append(f"{where}: host {host!r} is listed again (first on line {first_line[host]}); keep one line per host")
            continue
        pool[host] = int(value)
        first_line[host] = lineno
    if not problems and not pool:
        problems.append(f"{source}: no hosts found; write one 'host slots=N' line per machine")
    if problems:
        raise LaunchError("invalid hostfile:\n  " + "\n  ".join(problems))
    return pool


def read_hostfile(path: str | Path) -> dict[str, int]:
    """Read and parse a hostfile; a missing or unreadable file is a LaunchError naming it."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise LaunchError(f"cannot read hostfile {str(path)!r}: {exc.strerror or exc}") from exc
    return parse_hostfile(text, str(path))


def parse_filter(spec: str, option: str = "--include") -> dict[str, list[int] | None]:
    """Parse `host1:0,1@host2` into {host: sorted slots, or None for the whole host}.

    As in DeepSpeed, slots named for one host in several places are merged, and a bare host name
    means "all its slots" only when no slots are named for it anywhere in the spec.
    """
    slots_of: dict[str, set[int]] = {}
    for node in spec.split("@"):
        name, colon, slots = node.strip().partition(":")
        if not name or not _HOST.match(name):
            raise LaunchError(
                f"{option} {spec!r}: {node!r} does not start with a host name (syntax: host[:slot,slot][@host...])"
            )
        slots_of.setdefault(name, set())
        if colon:
            items = slots.split(",")
            if not all(s.strip().isdigit() for s in items):
                raise LaunchError(
                    f"{option} {spec!r}: slots of {name!r} must be whole numbers separated by commas, got {slots!r}"
                )
            slots_of[name] |= {int(s) for s in items}
    return {name: sorted(slots) if slots else None for name, slots in slots_of.items()}


def apply_filters(pool: Mapping[str, int], include: str = "", exclude: str = "") -> dict[str, list[int]]:
    """Resolve include/exclude against {host: slots}; return {host: slot ids} in hostfile order."""
    if include and exclude:
        raise LaunchError("--include and --exclude are mutually exclusive (as in the deepspeed launcher); use one")
    active = {host: list(range(n)) for host, n in pool.items()}
    if not include and not exclude:
        return active
    option, spec = ("--include", include) if include else ("--exclude", exclude)
    wanted = parse_filter(spec, option)
    for host, slots in wanted.items():
        if host not in active:
            raise LaunchError(f"{option} names host {host!r}, which is not in the host list {list(active)}")
        missing = [s for s in slots or [] if s not in active[host]]
        if missing:
            raise LaunchError(f"{option}: host {host!r} has slots 0..{pool[host] - 1}; there is no slot {missing[0]}")
    if include:
        chosen = {h: (active[h] if s is None else s) for h, s in wanted.items()}
    else:
        chosen = {}
        for h, slots in active.items():
            if h in wanted and wanted[h] is None:
                continue  # the whole host is excluded
            drop = set(wanted.get(h) or ())
            chosen[h] = [s for s in slots if s not in drop]
    result = {h: chosen[h] for h in active if chosen.get(h)}
    if not result:
        raise LaunchError(f"{option} {spec!r} leaves no GPU slots to run on")
    return result


def render_hostfile(resources: Mapping[str, Sequence[int]]) -> str:
    """Write {host: slot ids} back as hostfile text (`host slots=N`, one line per host)."""
    return "".join(f"{host} slots={len(slots)}\n" for host, slots in resources.items())
