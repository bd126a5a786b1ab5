"""What the fit benchmarks read back from a ``cli.py fit`` run under ``/usr/bin/time -v``."""

from __future__ import annotations

import re
from pathlib import Path


def max_rss_kib(time_log: str) -> int:
    """``/usr/bin/time -v``'s maximum resident set size, in KiB."""
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", time_log).group(1))


def step_times_and_losses(run_root: Path) -> tuple[list[float], list[float]]:
    """Seconds between consecutive training steps and every step's loss, from the run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(Path(run_root).rglob("events.out.tfevents.*")).parent))
    events.Reload()
    scalars = events.Scalars("train/loss")
    times = [later.wall_time - earlier.wall_time for earlier, later in zip(scalars, scalars[1:])]
    return times, [s.value for s in scalars]
