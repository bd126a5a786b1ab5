"""Checkpoints written straight to disk: ``torch.save`` into a file beside the target, then a rename.

Lightning's ``TorchCheckpointIO`` serializes the whole checkpoint into an ``io.BytesIO`` first and
writes ``getvalue()`` (a second copy) through fsspec, so that remote stores get one upload. For a
local file that costs two to three in-memory copies of the checkpoint (1.6 GB for the bundled model
with its Adam state) and their time. ``LocalCheckpointIO`` streams ``torch.save`` into the staged
file of ``rm_lightning.files`` instead: no copy in memory, and still atomic (a failed or interrupted
save leaves the previous checkpoint as it was). Remote paths (``s3://`` ...) keep Lightning's way.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from fsspec.utils import get_protocol
from lightning.fabric.plugins import TorchCheckpointIO

from rm_lightning.errors import CheckpointWriteError
from rm_lightning.files import write_atomically, write_refused

LOCAL_PROTOCOLS = ("file", "local")


def is_local_path(path: str | os.PathLike) -> bool:
    """A path on this machine's file system (no ``protocol://`` other than ``file://``)."""
    return get_protocol(str(path)) in LOCAL_PROTOCOLS


class LocalCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that saves local checkpoints without an in-memory copy (module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or not is_local_path(path):
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        local = str(path).removeprefix("file://")
        try:
            write_atomically(local, lambda staging: torch.save(checkpoint, staging))
        except (OSError, RuntimeError) as err:  # torch's writer reports a full disk as "basic_ios::clear" or so
            raise write_refused(local, err, CheckpointWriteError, what="the checkpoint ") from err


def use_local_checkpoint_io(trainer) -> None:
    """Give ``trainer`` a ``LocalCheckpointIO`` where it would use Lightning's plain ``TorchCheckpointIO``.

    Any other checkpoint IO (a plugin of another class given to the Trainer, an XLA or asynchronous
    one) is left as it is; strategies that write sharded checkpoints do not go through it at all.
    """
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = LocalCheckpointIO()
