"""Context switches per kind of thread in this process, between two moments: where a
benchmark's CPU goes when hundreds of threads (simulated agents) share one GIL. Linux
only (``/proc/self/task``); elsewhere the snapshots are empty."""

from __future__ import annotations

import re
import statistics
import threading

__all__ = ["Switches", "snapshot", "switch_table"]

Switches = dict[int, tuple[str, int, int]]  # native thread id -> (kind, voluntary, forced)


def _kind(name: str) -> str:
    """A thread's name up to its first part with a digit: ``delivery-sim-0007`` ->
    ``delivery-sim``."""
    kept = []
    for part in re.split(r"[-_ ]", name):
        if any(c.isdigit() for c in part):
            break
        kept.append(part)
    return "-".join(kept) or name


def _read(tid: int) -> tuple[int, int] | None:
    try:
        with open(f"/proc/self/task/{tid}/status") as status:
            fields = dict(line.split(":", 1) for line in status if "ctxt_switches" in line)
        return int(fields["voluntary_ctxt_switches"]), int(fields["nonvoluntary_ctxt_switches"])
    except (OSError, KeyError, ValueError):
        return None


def snapshot() -> Switches:
    taken: Switches = {}
    for thread in threading.enumerate():
        tid = thread.native_id
        counts = None if tid is None else _read(tid)
        if tid is not None and counts is not None:
            taken[tid] = (_kind(thread.name), *counts)
    return taken


def switch_table(before: Switches, after: Switches) -> list[str]:
    """One line per kind of thread alive at both moments, most voluntary switches first."""
    kinds: dict[str, list[tuple[int, int]]] = {}
    for tid, (kind, voluntary, forced) in after.items():
        if tid in before:
            _, voluntary_0, forced_0 = before[tid]
            kinds.setdefault(kind, []).append((voluntary - voluntary_0, forced - forced_0))
    rows = sorted(kinds.items(), key=lambda item: -sum(v for v, _ in item[1]))
    return [
        f"  {kind:32s} threads {len(counts):4d}  voluntary {sum(v for v, _ in counts):7d} "
        f"(median {statistics.median(v for v, _ in counts):5.0f})  "
        f"forced {sum(f for _, f in counts):6d}"
        for kind, counts in rows
    ]
