"""This machine's processes, read from /proc (Linux): for the tests that kill a Spark process on purpose."""

from __future__ import annotations

import os
from pathlib import Path


def _stat(pid: int) -> list[str]:
    """The fields of ``/proc/PID/stat`` after the command name (so field 1 is the parent); [] once it has ended."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def children(pid: int) -> list[int]:
    """Every process below ``pid``."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))):
            parents[int(entry.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        kids = [p for p, parent in parents.items() if parent == current]
        found += kids
        frontier += kids
    return found


def cmdline(pid: int) -> str:
    """The command line of ``pid``; "" once it has ended."""
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def cpu_seconds(pid: int) -> float:
    """User and system CPU time ``pid`` has used; 0 once it has ended."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") if fields else 0.0


def python_workers(pid: int) -> list[int]:
    """The Spark Python workers below ``pid``: the processes a pyspark daemon forked (same command line).

    Only below ``pid``: under pytest-xdist, other sessions' workers come and go beside ours.
    """
    daemons = {p for p in children(pid) if "pyspark.daemon" in cmdline(p)}
    return sorted(p for p in daemons if (fields := _stat(p)) and int(fields[1]) in daemons)
