"""A rollout on the terminal: a progress bar while it runs, a table of the devices
that did not update when it ends."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .._progress import make_progress
from .._rollout import RolloutStatus, RolloutWatch

__all__ = ["follow_rollout", "rollout_line", "rollout_table"]

_SHOWN_ROWS = 50


def _info(status: RolloutStatus) -> str:
    c = status.counts
    parts = [f"{c['failed']} failed", f"{c['pending']} pending"]
    parts += [f"{c[k]} {k.replace('_', ' ')}" for k in ("offline", "held", "no_variant") if c[k]]
    return ", ".join(parts)


def follow_rollout(
    watch: RolloutWatch,
    *,
    timeout_s: float,
    max_failures: int | None,
    progress: bool,
    console: Console,
) -> RolloutStatus:
    """Wait for the rollout with a progress bar: devices updated of those it waits for."""
    tracker = watch.tracker
    with make_progress(progress, console) as bar:
        task = bar.add_task(f"{tracker.model}:{tracker.version}", total=None, info="")

        def show(status: RolloutStatus) -> None:
            bar.update(
                task,
                total=max(status.target, 1),
                completed=status.counts["updated"],
                info=_info(status),
            )

        status = watch.wait(timeout_s, max_failures=max_failures, on_change=show)
        show(status)
    return status


def rollout_line(status: RolloutStatus) -> str:
    c = status.counts
    head = {
        "complete": "[green]rollout complete[/green]",
        "failed": "[red]rollout failed[/red]",
        "aborted": "[red]rollout aborted[/red]",
        "timed_out": "[yellow]rollout timed out[/yellow]",
        "in_progress": "rollout in progress",
    }[status.result]
    return (
        f"{head}: {c['updated']}/{status.target} devices in {status.scope} run "
        f"{status.model}:{status.version} after {status.elapsed_s:.2f} s ({_info(status)})"
    )


def rollout_table(status: RolloutStatus) -> Table | None:
    """The devices that do not run the version, with why; None if there are none."""
    rows = [d for d in status.devices if d.outcome != "updated"]
    if not rows:
        return None
    table = Table(title=f"Devices not on {status.model}:{status.version}")
    for col in ("device", "class", "outcome", "running", "reason"):
        table.add_column(col)
    for d in rows[:_SHOWN_ROWS]:
        table.add_row(
            d.device_id,
            d.device_class or "?",
            d.outcome.replace("_", " "),
            "-" if d.running is None else f"v{d.running}",
            Text(d.reason),  # device-reported text: no markup
        )
    if len(rows) > _SHOWN_ROWS:
        table.caption = f"... and {len(rows) - _SHOWN_ROWS} more (--json lists them all)"
    return table
