"""Cache files that check themselves: what the IM-RM reference cache and the tokenized-pairs cache share.

An entry holds tensors and the ``identity`` they were computed from (a dict of strings naming every
input), with a SHA-256 of the tensors. Its file name is a hash of the identity, so each distinct
computation has one file. A file whose identity or checksum does not match, or that cannot be read
(truncated, empty, not an entry), raises ``UnusableEntry`` with the reason in a few words: the
caller says so in one line and recomputes, never uses it. Files are read with ``weights_only=True``
(tensors and plain containers only, whatever ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says: it cannot
override an explicit argument) and written atomically. A folder that cannot be written means
computing in memory, with one warning per folder.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_warn

from rm_lightning.files import write_atomically, write_failure

CACHE_ENV = "RM_LIGHTNING_CACHE"


def cache_dir() -> Path:
    """Root of everything rm-lightning caches (converted models, reference log-probs, tokenized sets)."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "rm_lightning")).expanduser()


class UnusableEntry(Exception):
    """A cache file that must not be used; the message says why, in a few words."""


def entry_path(directory: str | Path, identity: dict[str, str]) -> Path:
    """Where the entry of ``identity`` is kept (a hash of it: one file per distinct computation)."""
    key = "|".join(f"{name}={identity[name]}" for name in sorted(identity))
    return Path(directory) / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.pt"


def checksum(*tensors: torch.Tensor) -> str:
    """SHA-256 over each tensor's shape, dtype and bytes, in order."""
    digest = hashlib.sha256()
    for index, values in enumerate(tensors):
        digest.update(f"{'|' if index else ''}{tuple(values.shape)}|{values.dtype}".encode())
        digest.update(values.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def entry(identity: dict[str, str], **tensors: torch.Tensor) -> dict:
    """The stored form: the identity, the tensors by name and their checksum (in name order)."""
    return {"identity": dict(identity), "checksum": checksum(*(tensors[name] for name in sorted(tensors))), **tensors}


def read_entry(path: Path, identity: dict[str, str], names: tuple[str, ...], kind: str) -> dict[str, torch.Tensor]:
    """The tensors ``names`` of the entry at ``path`` computed from ``identity``; ``UnusableEntry`` otherwise.
    ``kind`` names the cache in the reason (``not a reference cache entry of this format``)."""
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated, empty, not a torch file, unsafe content: all unusable
        raise UnusableEntry(f"unreadable ({type(err).__name__})") from None
    if not isinstance(stored, dict) or not {"identity", "checksum", *names} <= set(stored):
        raise UnusableEntry(f"not a {kind} entry of this format")
    if stored["identity"] != identity:
        differing = sorted(name for name in identity if stored["identity"].get(name) != identity[name])
        raise UnusableEntry(f"computed from other {', '.join(differing) or 'inputs'}")
    tensors = {name: stored[name] for name in names}
    if not all(isinstance(values, torch.Tensor) for values in tensors.values()):
        raise UnusableEntry(f"not a {kind} entry of this format")
    if checksum(*(tensors[name] for name in sorted(names))) != stored["checksum"]:
        raise UnusableEntry("contents do not match their checksum (corrupted)")
    return tensors


def write_entry(directory: str | Path, identity: dict[str, str], tensors: dict[str, torch.Tensor],
                unwritable_message: str) -> None:
    """Store ``tensors`` for ``identity`` in ``directory``; a folder that cannot be written is warned about
    once with ``unwritable_message`` (``warn_unwritable_once``)."""
    try:
        write_atomically(entry_path(directory, identity),
                         lambda staging: torch.save(entry(identity, **tensors), staging))
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError ("file write failed")
        warn_unwritable_once(Path(directory), err, unwritable_message)


_WARNED_DIRECTORIES: set[str] = set()


def warn_unwritable_once(directory: Path, err: Exception, message: str) -> None:
    """Warn ``message`` (with ``{directory}`` and ``{why}`` filled in) the first time ``directory`` fails."""
    if str(directory) not in _WARNED_DIRECTORIES:
        _WARNED_DIRECTORIES.add(str(directory))
        why = "it is a file" if directory.is_file() else write_failure(err)
        rank_zero_warn(message.format(directory=directory, why=why))
