"""One exception family, so the CLI can turn any bad input into a single readable line."""


class RMLightningError(Exception):
    """Bad user input: a missing file, a malformed record, an unknown name. Shown as one line."""


class DataError(RMLightningError):
    """A data file or record that cannot be used."""


class BackboneError(RMLightningError):
    """A backbone name or path that cannot be loaded."""
