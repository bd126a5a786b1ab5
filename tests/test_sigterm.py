"""A run stopped by SIGTERM (kill, a scheduler's preemption, a dying sweep) exits non-zero and says interrupted:
Lightning's ``SIGTERMException`` is a ``SystemExit`` without a code, which a shell reads as success."""

import json

import lightning as L
import pytest
from lightning.pytorch.utilities.exceptions import SIGTERMException

from conftest import PROJECT_ROOT, tiny_override
from rm_lightning import cli


class TerminateAt(L.Callback):
    """What Lightning raises in the training loop once its handler has seen SIGTERM."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise SIGTERMException()


def test_sigterm_exits_with_the_shells_status_and_results_say_interrupted(tmp_path):
    callback = tmp_path / "terminate.yaml"
    callback.write_text("trainer:\n  callbacks:\n    - class_path: test_sigterm.TerminateAt\n      init_args: {step: 1}\n")
    with pytest.raises(SystemExit) as exited:
        cli.main(["fit", "--config", str(PROJECT_ROOT / "configs/exrm_persona.yaml"),
                  "--config", str(tiny_override(tmp_path)), "--config", str(callback),
                  "--data.init_args.num_train", "8", "--data.init_args.num_test", "4"])
    (results,) = tmp_path.rglob("results.json")
    assert (exited.value.code, json.loads(results.read_text())["status"]) == (143, "interrupted")
