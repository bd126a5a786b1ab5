"""What a run prints: the libraries' tips and deprecation notices about their own internals are left out.

Each is silenced by its message (and warning category), in this one place, so that every other warning
still shows: Lightning's advertisement for its cloud logger, its "GPU/TPU available" lines, its advice
on DataLoader workers (the data modules here tokenize up front; workers would only copy tensors), its
notice when LightningCLI gets both ``args`` and a command line (``cli.main`` passes ``args`` on purpose),
its model summary's note that it counts bf16 weights as 32-bit, and torch's deprecation of a pytree
class that Lightning itself still uses. None of them is about the user's run or anything they can change.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

# (regular expression matched at the start of the message, warning category)
QUIET_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    (r"The '\w+' does not have many workers", UserWarning),
    (r"LightningCLI's args parameter is intended to run from within Python", UserWarning),
    (r"Precision bf16-mixed is not supported by the model summary", UserWarning),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
)
# Lightning's info lines (logged through its rank-zero loggers), by how they start
QUIET_LOG_LINES: tuple[str, ...] = ("💡 Tip:", "GPU available: ", "TPU available: ")
RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class QuietLines(logging.Filter):
    """Drops log records whose message starts with one of ``QUIET_LOG_LINES``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(QUIET_LOG_LINES)


def quiet_console() -> None:
    """Install the filters (idempotent); the CLI calls it before parsing."""
    for message, category in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, QuietLines) for f in logger.filters):
            logger.addFilter(QuietLines())


def say_once(line: str) -> None:
    """Print ``line`` to stderr, on the first process only (every rank parses the same command line)."""
    if os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0":
        print(line, file=sys.stderr, flush=True)
