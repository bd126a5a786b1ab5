"""One exception family, so the CLI can turn any bad input into a single readable line."""

from __future__ import annotations

import sys
from typing import Callable


class RMLightningError(Exception):
    """Bad user input: a missing file, a malformed record, an unknown name. Shown as one line."""


class DataError(RMLightningError):
    """A data file or record that cannot be used."""


class BackboneError(RMLightningError):
    """A backbone name or path that cannot be loaded."""


def exit_status(main: Callable[..., int | None], *args) -> int:
    """A script's exit status from ``main(*args)``: bad input shown as one ``error:`` line and status 2."""
    try:
        return main(*args) or 0
    except RMLightningError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
