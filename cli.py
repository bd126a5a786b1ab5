"""rm-lightning command line: ``python cli.py fit --config configs/imrm_persona.yaml``.

LightningCLI with the reward module and the data module given by class path in YAML.
Bad input (a missing file, a malformed record, an unknown backbone) ends in one line.
On the CPU, freed host memory is kept for reuse between steps (``rm_lightning.host_memory``).
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI

from data_modules.base import PreferenceDataModule
from rm_lightning.callbacks import MarginHistory
from rm_lightning.errors import RMLightningError
from rm_lightning.host_memory import keep_freed_memory
from rm_lightning.module import RewardModule
from rm_lightning.results import ResultsWriter


class RewardCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(MarginHistory, "margin_history")
        parser.add_lightning_class_args(ResultsWriter, "results")


def main(args: list[str] | None = None) -> RewardCLI | None:
    keep_freed_memory()  # before any model is loaded: blocks mapped earlier are unmapped when freed
    try:
        return RewardCLI(RewardModule, PreferenceDataModule, subclass_mode_model=True, subclass_mode_data=True,
                         save_config_kwargs={"overwrite": True}, args=args)
    except Exception as err:
        cause = _user_error(err)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None


def _user_error(err: BaseException) -> RMLightningError | None:
    """The bad-input error behind ``err``, if any (jsonargparse wraps errors raised in __init__)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, RMLightningError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


if __name__ == "__main__":
    main()
