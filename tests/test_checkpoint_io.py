"""last.ckpt: written straight to disk and atomically (``perf/checkpoint_io.py``), at the end of fit and at
an epoch's end once ``every_minutes`` passed (``callbacks/last_checkpoint.py``). The clock is a fake one:
no test depends on how fast the machine is."""

import signal
from pathlib import Path

import fsspec
import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from conftest import tiny_override
from test_faults import EXRM, SMALL, logged_train_steps, results, versions
from rm_lightning import cli
from rm_lightning.callbacks import last_checkpoint
from rm_lightning.callbacks.last_checkpoint import LastCheckpoint
from rm_lightning.errors import CheckpointWriteError, SettingError
from rm_lightning.models import explicit
from rm_lightning.perf.checkpoint_io import LocalCheckpointIO, use_local_checkpoint_io

STEPS_PER_EPOCH = 2


# --- the file ------------------------------------------------------------------------------------


def a_checkpoint() -> dict:
    return {"state_dict": {"w": torch.arange(1000.0).reshape(10, 100)}, "optimizer_states": [{"step": 3}],
            "global_step": 3}


def test_a_saved_checkpoint_is_complete_and_loads(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    LocalCheckpointIO().save_checkpoint(a_checkpoint(), path)
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["state_dict"]["w"], a_checkpoint()["state_dict"]["w"])
    assert loaded["optimizer_states"] == [{"step": 3}] and loaded["global_step"] == 3
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # nothing staged is left beside it


def test_an_existing_checkpoint_survives_a_failing_save(tmp_path):
    path = tmp_path / "last.ckpt"
    LocalCheckpointIO().save_checkpoint(a_checkpoint(), path)
    before = path.read_bytes()
    unpicklable = {**a_checkpoint(), "callbacks": {"broken": lambda: None}}  # fails once the file is open
    with pytest.raises(Exception):
        LocalCheckpointIO().save_checkpoint(unpicklable, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_write_that_fails_on_disk_is_one_line_naming_the_file_and_the_free_space(tmp_path, monkeypatch):
    """A full disk reaches ``torch.save`` as a RuntimeError ("basic_ios::clear: iostream error")."""
    def disk_full(obj, file):
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(torch, "save", disk_full)
    path = tmp_path / "last.ckpt"
    with pytest.raises(CheckpointWriteError, match=rf"{path}: the checkpoint could not be written \(basic_ios.*GiB free"):
        LocalCheckpointIO().save_checkpoint(a_checkpoint(), path)
    assert list(tmp_path.iterdir()) == []


def test_a_fit_whose_last_checkpoint_the_disk_refuses_still_records_its_results(tmp_path, monkeypatch):
    """The run trained and evaluated: results.json says failed, with the reason, and keeps its metrics."""
    save = torch.save

    def full_for_checkpoints(obj, file, *args, **kwargs):
        if str(file).endswith(".ckpt") or ".ckpt." in str(file):
            raise RuntimeError("basic_ios::clear: iostream error")
        return save(obj, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_for_checkpoints)
    with pytest.raises(SystemExit) as exited:
        cli.main(["fit", "--config", EXRM, "--config", str(tiny_override(tmp_path)), *SMALL])
    record = results(versions(tmp_path)[0])
    assert (exited.value.code, record["status"], "original_test_prompts" in record["eval_sets"]) == (2, "failed", True)


def test_a_remote_path_is_saved_the_lightning_way():
    url = "memory://rm-lightning-test/checkpoints/last.ckpt"
    LocalCheckpointIO().save_checkpoint(a_checkpoint(), url)
    with fsspec.open(url, "rb") as file:
        assert torch.load(file, weights_only=True)["global_step"] == 3


def test_only_lightnings_plain_checkpoint_io_is_replaced():
    class OwnIO(LocalCheckpointIO):
        pass

    plain = L.Trainer(logger=False, enable_progress_bar=False)
    own = L.Trainer(logger=False, enable_progress_bar=False, plugins=[OwnIO()])
    use_local_checkpoint_io(plain), use_local_checkpoint_io(own)
    assert type(plain.strategy.checkpoint_io) is LocalCheckpointIO and type(own.strategy.checkpoint_io) is OwnIO


# --- when it is written --------------------------------------------------------------------------


class Clock:
    """``monotonic`` for the callback: moves only when a training step ends, by ``minutes_per_step``."""

    def __init__(self, minutes_per_step: float):
        self.now, self.minutes_per_step = 1000.0, minutes_per_step

    def __call__(self) -> float:
        return self.now


class Tick(L.Callback):
    def __init__(self, clock: Clock):
        self.clock = clock

    def on_train_batch_end(self, *args) -> None:
        self.clock.now += 60.0 * self.clock.minutes_per_step


class Interrupt(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


@pytest.fixture(autouse=True)
def sigint_restored():
    """Lightning ignores SIGINT after a KeyboardInterrupt (for its shutdown); give pytest its Ctrl-C back."""
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


def saves_of(tmp_path: Path, monkeypatch, every_minutes: float, minutes_per_step: float = 0.0, *,
             interrupt_at: int | None = None, **trainer_options) -> list[int]:
    """The global steps at which a BoringModel fit (2 steps an epoch) writes last.ckpt."""
    clock, saved = Clock(minutes_per_step), []
    monkeypatch.setattr(last_checkpoint, "monotonic", clock)
    save = LocalCheckpointIO.save_checkpoint
    monkeypatch.setattr(LocalCheckpointIO, "save_checkpoint",
                        lambda self, checkpoint, path, **kw: (saved.append(checkpoint["global_step"]),
                                                              save(self, checkpoint, path, **kw)))
    callbacks = [Tick(clock), LastCheckpoint(every_minutes)] + ([Interrupt(interrupt_at)] if interrupt_at else [])
    options = dict(max_epochs=3, limit_train_batches=STEPS_PER_EPOCH, limit_val_batches=1, num_sanity_val_steps=0,
                   logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                   callbacks=callbacks)
    trainer = L.Trainer(**{**options, **trainer_options})
    use_local_checkpoint_io(trainer)
    try:
        trainer.fit(BoringModel())
    except SystemExit:  # Lightning's answer to Ctrl-C
        pass
    return saved


def test_epoch_ends_within_the_interval_are_skipped_and_the_end_of_fit_saves(tmp_path, monkeypatch):
    # 3 minutes a step, 6 an epoch: 6 < 10 at the first end, 12 >= 10 at the second, 6 again at the third
    assert saves_of(tmp_path, monkeypatch, every_minutes=10, minutes_per_step=3) == [4, 6]
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6


def test_a_run_shorter_than_the_interval_saves_once(tmp_path, monkeypatch):
    assert saves_of(tmp_path, monkeypatch, every_minutes=10, minutes_per_step=1) == [6]


def test_zero_minutes_saves_at_every_epoch_end_and_not_twice_at_the_last(tmp_path, monkeypatch):
    assert saves_of(tmp_path, monkeypatch, every_minutes=0) == [2, 4, 6]


def test_a_max_steps_stop_inside_an_epoch_saves_at_the_end_of_fit(tmp_path, monkeypatch):
    assert saves_of(tmp_path, monkeypatch, every_minutes=10, max_steps=3) == [3]


def test_a_max_steps_stop_before_the_first_validation_of_every_second_epoch_saves(tmp_path, monkeypatch):
    assert saves_of(tmp_path, monkeypatch, every_minutes=10, max_steps=1, check_val_every_n_epoch=2) == [1]


def test_ctrl_c_writes_nothing_and_keeps_the_epoch_end_checkpoint(tmp_path, monkeypatch):
    assert saves_of(tmp_path, monkeypatch, every_minutes=0, interrupt_at=3) == [2]
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["last.ckpt"]


def test_a_negative_interval_is_refused_in_one_line():
    with pytest.raises(SettingError, match=r"last_checkpoint.every_minutes: expected a finite number >= 0, got -1"):
        LastCheckpoint(every_minutes=-1)


# --- through the CLI ------------------------------------------------------------------------------


def fit(root: Path, *args: str, max_epochs: int, max_steps: int = -1):
    root.mkdir(parents=True, exist_ok=True)
    override = tiny_override(root, max_epochs=max_epochs, max_steps=max_steps)
    return cli.main(["fit", "--config", EXRM, "--config", str(override), *SMALL, *args])


def test_the_cli_saves_locally_without_a_copy_and_before_a_first_validation_it_never_reached(tmp_path):
    """A check_val_every_n_epoch: 2 config stopped by max_steps in its first epoch keeps a last.ckpt."""
    run_cli = fit(tmp_path, "--trainer.check_val_every_n_epoch", "2", max_epochs=2, max_steps=1)
    assert type(run_cli.trainer.strategy.checkpoint_io) is LocalCheckpointIO
    checkpoint = torch.load(versions(tmp_path)[0] / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 1 and checkpoint["optimizer_states"]


def test_a_run_resumed_from_its_end_of_fit_checkpoint_ends_as_an_uninterrupted_one(tmp_path):
    fit(tmp_path / "whole", max_epochs=2)
    fit(tmp_path / "cut", max_epochs=1)  # 10 minutes not reached: last.ckpt only at the end of fit
    fit(tmp_path / "cut", "--ckpt_path", "last", max_epochs=2)
    (whole,), (cut, resumed) = versions(tmp_path / "whole"), versions(tmp_path / "cut")
    assert torch.load(cut / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    assert results(resumed)["status"] == "finished" and results(resumed)["global_step"] == 4
    assert len(logged_train_steps(resumed)) == 2  # only the second epoch: it went on from the checkpoint
    assert results(resumed)["eval_sets"] == results(whole)["eval_sets"]


def test_a_run_without_a_logger_resumes_from_ckpt_path_last(tmp_path):
    """``--trainer.logger false`` keeps the same ``lightning_logs/version_N`` folders: ``last`` finds its checkpoint
    there, rather than Lightning looking in the new run's empty folder and training from scratch."""
    fit(tmp_path, "--trainer.logger", "false", max_epochs=1)
    fit(tmp_path, "--trainer.logger", "false", "--ckpt_path", "last", max_epochs=2)
    assert results(versions(tmp_path)[1])["checkpoint"] == str(versions(tmp_path)[0] / "checkpoints" / "last.ckpt")


def test_a_run_saved_while_the_exrm_still_trained_its_untied_lm_head_resumes(tmp_path, monkeypatch):
    """Checkpoints of versions before the EX-RM froze the LM head it never reads list it among Adam's parameters."""
    with monkeypatch.context() as as_before:
        as_before.setattr(explicit, "freeze_unused_output_embeddings", lambda model: None)
        fit(tmp_path, max_epochs=1)
    fit(tmp_path, "--ckpt_path", "last", max_epochs=2)
    assert results(versions(tmp_path)[1])["global_step"] == 4


def test_the_cli_refuses_a_negative_interval_before_any_model_loads(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        fit(tmp_path, "--last_checkpoint.every_minutes", "-1", max_epochs=1)
    assert exited.value.code == 2
    assert "error: last_checkpoint.every_minutes: expected a finite number >= 0, got -1" in capsys.readouterr().err
    assert not (tmp_path / "lightning_logs").exists()


def test_resuming_into_a_new_run_directory_restores_nothing_of_the_old_one_and_says_nothing(tmp_path, recwarn):
    old = LastCheckpoint(dirpath=str(tmp_path / "version_0" / "checkpoints"))
    old.best_model_path = str(tmp_path / "version_0" / "checkpoints" / "last.ckpt")
    new = LastCheckpoint(dirpath=str(tmp_path / "version_1" / "checkpoints"))
    new.load_state_dict(old.state_dict())
    assert new.best_model_path == "" and not [w for w in recwarn if "dirpath has changed" in str(w.message)]


def test_resuming_in_the_same_directory_restores_its_paths(tmp_path):
    saved = LastCheckpoint(dirpath=str(tmp_path / "checkpoints"))
    saved.best_model_path = saved.last_model_path = str(tmp_path / "checkpoints" / "last.ckpt")
    resumed = LastCheckpoint(dirpath=str(tmp_path / "checkpoints"))
    resumed.load_state_dict(saved.state_dict())
    assert resumed.best_model_path == resumed.last_model_path == saved.best_model_path


def test_the_newest_run_is_the_highest_version_number_not_the_last_in_name_order(tmp_path):
    from rm_lightning.callbacks.run_directory import newest_run_checkpoint

    for version in (2, 10, 9):
        (tmp_path / "lightning_logs" / f"version_{version}" / "checkpoints").mkdir(parents=True)
        (tmp_path / "lightning_logs" / f"version_{version}" / "checkpoints" / "last.ckpt").touch()
    (tmp_path / "lightning_logs" / "version_x" / "checkpoints").mkdir(parents=True)
    (tmp_path / "lightning_logs" / "version_x" / "checkpoints" / "last.ckpt").touch()
    assert newest_run_checkpoint(tmp_path).parent.parent.name == "version_10"
