"""CPU time and context switches per kind of thread in this process, between two
moments: where a benchmark's CPU goes when hundreds of threads (simulated agents) share
one GIL. Linux only (``/proc/self/task``); elsewhere the snapshots are empty. CPU time
is the scheduler's own count (``schedstat``, nanoseconds): the tick-based figures of
``stat`` missed 40% of a rollout's CPU."""

from __future__ import annotations

import re
import statistics
import threading
from pathlib import Path

__all__ = ["Switches", "new_threads_cpu", "snapshot", "switch_table"]

# native thread id -> (kind, voluntary switches, forced switches, CPU seconds)
Switches = dict[int, tuple[str, int, int, float]]


def _kind(name: str) -> str:
    """A thread's name up to its first part with a digit: ``delivery-sim-0007`` ->
    ``delivery-sim``."""
    kept = []
    for part in re.split(r"[-_ ]", name):
        if any(c.isdigit() for c in part):
            break
        kept.append(part)
    return "-".join(kept) or name


def _read(tid: int) -> tuple[int, int, float] | None:
    try:
        with open(f"/proc/self/task/{tid}/status") as status:
            fields = dict(line.split(":", 1) for line in status if "ctxt_switches" in line)
        with open(f"/proc/self/task/{tid}/schedstat") as schedstat:
            cpu = int(schedstat.read().split()[0]) / 1e9  # time on a CPU, nanoseconds
        voluntary = int(fields["voluntary_ctxt_switches"])
        return voluntary, int(fields["nonvoluntary_ctxt_switches"]), cpu
    except (OSError, KeyError, ValueError, IndexError):
        return None


def snapshot() -> Switches:
    """Every thread of this process: Python's by their names, the others (native
    threads of ONNX Runtime, for one) by the name the kernel knows (``comm``)."""
    names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
    try:
        tids = [int(entry.name) for entry in Path("/proc/self/task").iterdir()]
    except OSError:
        return {}
    taken: Switches = {}
    for tid in tids:
        counts = _read(tid)
        if counts is None:
            continue
        name = names.get(tid)
        if name is None:
            try:
                with open(f"/proc/self/task/{tid}/comm") as comm:
                    name = f"native:{comm.read().strip()}"
            except OSError:
                name = "native:?"
        taken[tid] = (_kind(name), *counts)
    return taken


def new_threads_cpu(before: Switches, after: Switches, process_cpu: float) -> float:
    """CPU seconds of the window not on any thread alive at both moments: threads that
    started (and perhaps ended) inside it."""
    kept = sum(after[t][3] - before[t][3] for t in after if t in before)
    return process_cpu - kept


def switch_table(before: Switches, after: Switches) -> list[str]:
    """One line per kind of thread alive at both moments, most CPU first."""
    kinds: dict[str, list[tuple[int, int, float]]] = {}
    for tid, (kind, voluntary, forced, cpu) in after.items():
        if tid in before:
            _, voluntary_0, forced_0, cpu_0 = before[tid]
            delta = (voluntary - voluntary_0, forced - forced_0, cpu - cpu_0)
            kinds.setdefault(kind, []).append(delta)
    rows = sorted(kinds.items(), key=lambda item: -sum(c for _, _, c in item[1]))
    return [
        f"  {kind:32s} threads {len(counts):4d}  CPU {sum(c for _, _, c in counts):6.2f} s  "
        f"voluntary switches {sum(v for v, _, _ in counts):7d} "
        f"(median {statistics.median(v for v, _, _ in counts):5.0f})  "
        f"forced {sum(f for _, f, _ in counts):6d}"
        for kind, counts in rows
    ]
