"""Where a fit's wall time went: start-up, the reward module's setup (the IM-RM reference pass),
training, evaluation and checkpoint saving, for ``results.json`` (``timings``) and the final table.

Every second from the process's start to the end of training is charged to exactly one phase
(the one innermost at that moment), so the parts add up to the total:

* ``start_up_s``: the process's start (``process_start_seconds_ago``) to the start of the training
  loop: imports, parsing, model and data loading, tokenization, optimizer set-up, less the parts
  below that happen before it;
* ``reference_s``: the reward module's ``setup`` hook, which for an IM-RM is its reference pass
  (read from the cache or computed); for the other RM types only bookkeeping;
* ``training_s``: the training loop (steps, data loading, logging, and what callbacks do at a step,
  e.g. ``DynamicsMonitor``'s analysis), less evaluation and checkpoints;
* ``evaluation_s``: every validation loop, the step-0 one of ``MarginHistory(validate_at_start)``
  and a sanity check included (``evaluations`` counts them);
* ``checkpoints_s``: every ``trainer.save_checkpoint`` call (what every checkpoint callback calls);
* ``other_s``: the rest, i.e. from the end of the training loop to when the timings were read;
* ``total_s``: the process's start to when the timings were first read (``results.json`` is
  written then); they are read once, so the file and the printed line agree.

Timed from outside: the callback wraps, for the length of one fit, the module's ``setup`` and the
trainer's ``save_checkpoint`` (instance attributes, removed again), so no module changes for it.
Start-up counts from the process's start: a fit run inside a longer-lived process (a notebook, a
test) counts that process's earlier life as start-up.
"""

from __future__ import annotations

import functools
import os
import time
from collections import defaultdict
from typing import Any, Callable, Optional

import lightning as L

START_UP, REFERENCE, TRAINING, EVALUATION, CHECKPOINTS, OTHER = (
    "start_up", "reference", "training", "evaluation", "checkpoints", "other")
PHASES = (START_UP, REFERENCE, TRAINING, EVALUATION, CHECKPOINTS, OTHER)
LABELS = {START_UP: "start-up", REFERENCE: "reference", TRAINING: "training", EVALUATION: "evaluation",
          CHECKPOINTS: "checkpoints", OTHER: "other"}


def process_start_seconds_ago() -> float:
    """Seconds since this process started (the OS's record of it).

    On Linux from ``/proc/self/stat`` against the boot-time clock, both counted from boot: exact to a
    clock tick. psutil's ``create_time()`` adds the process's age to the boot time, which Linux gives
    in whole seconds, so it can put the start up to a second too early (0.9 s on one test machine),
    all of it charged to start-up.
    """
    try:
        with open("/proc/self/stat") as stat:
            ticks = start_ticks(stat.read())
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, AttributeError, ValueError, IndexError):  # not Linux
        import psutil

        return max(0.0, time.time() - psutil.Process().create_time())


def start_ticks(proc_stat: str) -> int:
    """Field 22 of a ``/proc/<pid>/stat`` line: clock ticks from boot to the process's start. Fields are
    counted after the command name, which is in parentheses and may itself hold spaces or parentheses."""
    return int(proc_stat.rsplit(")", 1)[1].split()[19])


class PhaseClock:
    """Exclusive wall time per phase: time is charged to the phase on top of a stack.

    The bottom of the stack is the run's current stage (start-up, training, other); phases that
    interrupt it (evaluation, a checkpoint, the reference pass) are entered and left around it.
    """

    def __init__(self, phase: str, started: float, clock: Callable[[], float] = time.perf_counter):
        self.clock, self.started, self.last = clock, started, started
        self.stack = [phase]
        self.seconds: dict[str, float] = defaultdict(float)

    def _charge(self) -> None:
        now = self.clock()
        self.seconds[self.stack[-1]] += now - self.last
        self.last = now

    def enter(self, phase: str) -> None:
        self._charge()
        self.stack.append(phase)

    def leave(self, phase: str) -> None:
        """Leave the innermost ``phase`` (an exception may have skipped leaving one inside it)."""
        self._charge()
        if phase in self.stack[1:]:
            del self.stack[len(self.stack) - 1 - self.stack[::-1].index(phase):]

    def switch(self, stage: str) -> None:
        """Move the bottom of the stack to ``stage``."""
        self._charge()
        self.stack[0] = stage

    def snapshot(self) -> dict[str, float]:
        """Seconds per phase so far, ``other`` as the rest of the total, and ``total``."""
        self._charge()
        total = self.last - self.started
        parts = {phase: self.seconds.get(phase, 0.0) for phase in PHASES if phase != OTHER}
        parts[OTHER] = max(0.0, total - sum(parts.values()))
        return {**parts, "total": total}


class PhaseTimes(L.Callback):
    """Time the phases of a fit (module docstring); ``timings()`` is what ``results.json`` records."""

    def __init__(self):
        self.clock = PhaseClock(START_UP, time.perf_counter() - process_start_seconds_ago())
        self.steps = self.evaluations = 0
        self._timings: Optional[dict[str, Any]] = None
        self._unwrap: list[Callable[[], None]] = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        # called just before the module's own setup hook, which Lightning looks up on the instance
        self._wrap(pl_module, "setup", REFERENCE, once=True)
        self._wrap(trainer, "save_checkpoint", CHECKPOINTS)

    def _wrap(self, owner, name: str, phase: str, once: bool = False) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            self.clock.enter(phase)
            try:
                return original(*args, **kwargs)
            finally:
                self.clock.leave(phase)
                if once:
                    restore()

        def restore():
            if owner.__dict__.get(name) is timed:
                delattr(owner, name)

        setattr(owner, name, timed)
        self._unwrap.append(restore)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for restore in self._unwrap:
            restore()
        self._unwrap.clear()

    def on_train_start(self, trainer, pl_module) -> None:
        """Training from here on: what other callbacks do before the first step (the dynamics monitor's
        step-0 analysis: 20 s on the Persona IM-RM) is not start-up."""
        if self.clock.stack[0] == START_UP:
            self.clock.switch(TRAINING)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps += 1

    def on_train_end(self, trainer, pl_module) -> None:
        self.clock.switch(OTHER)

    def on_validation_start(self, trainer, pl_module) -> None:
        self.clock.enter(EVALUATION)

    def on_validation_end(self, trainer, pl_module) -> None:
        self.clock.leave(EVALUATION)
        self.evaluations += 1

    def timings(self) -> dict[str, Any]:
        """``{"start_up_s": ..., ..., "total_s": ..., "training_batches": n, "evaluations": n}``, read once."""
        if self._timings is None:
            seconds = {phase: round(value, 3) for phase, value in self.clock.snapshot().items()}
            # the rest after rounding, so that the recorded parts add up to the recorded total
            seconds[OTHER] = round(max(0.0, seconds["total"] - sum(seconds[p] for p in PHASES if p != OTHER)), 3)
            self._timings = {f"{phase}_s": value for phase, value in seconds.items()}
            self._timings.update(training_batches=self.steps, evaluations=self.evaluations)
        return self._timings


def phase_timings(trainer) -> Optional[dict[str, Any]]:
    """The timings of the trainer's ``PhaseTimes`` callback, or None without one."""
    for callback in getattr(trainer, "callbacks", None) or []:
        if isinstance(callback, PhaseTimes):
            return callback.timings()
    return None


def describe_timings(timings: dict[str, Any]) -> str:
    """One line for the final table: ``time: 142.0 s = start-up 6.0 + reference 0.0 + ...``."""
    parts = " + ".join(f"{LABELS[phase]} {timings[f'{phase}_s']:.1f}" for phase in PHASES)
    return f"time: {timings['total_s']:.1f} s = {parts}"
