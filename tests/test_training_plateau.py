"""Training until training accuracy plateaus: the stop rule, and a run that stops early or evaluates
only at its end still ends with an evaluation of its final weights."""

import json
from pathlib import Path

import pytest
import yaml

from conftest import PROJECT_ROOT, tiny_override
from rm_lightning import cli
from rm_lightning.callbacks import TrainingPlateau

TINY_DATA = ["--data.init_args.num_train", "8", "--data.init_args.num_test", "4"]


def decision(history, **options):
    plateau = TrainingPlateau(**options)
    plateau.history = list(history)
    return plateau.reason_to_stop()


def test_rising_accuracy_goes_on():
    assert decision([0.55, 0.70, 0.85]) is None


def test_an_epoch_without_a_gain_of_min_delta_stops():
    assert "beat 0.700" in decision([0.55, 0.70, 0.705], min_delta=0.01)


def test_reaching_the_threshold_stops_at_once():
    assert "threshold" in decision([0.99], threshold=0.98)


def test_no_stop_before_min_epochs():
    assert decision([0.99, 0.99], min_epochs=3) is None


def test_patience_counts_epochs_in_a_row():
    assert decision([0.6, 0.7, 0.69], patience=2) is None
    assert decision([0.6, 0.7, 0.69, 0.70], patience=2) is not None


@pytest.mark.parametrize("options", [{"min_delta": -0.1}, {"patience": 0}, {"threshold": 1.5}])
def test_bad_options_fail_in_one_line(options):
    with pytest.raises(ValueError, match="TrainingPlateau"):
        TrainingPlateau(**options)


def run_persona(tmp_path: Path, trainer: dict, callbacks: list) -> dict:
    override = tmp_path / "schedule.yaml"
    override.write_text(yaml.safe_dump({"trainer": {**trainer, "callbacks": callbacks},
                                        "margin_history": {"validate_at_start": False}}))
    cli.main(["fit", "--config", str(PROJECT_ROOT / "configs/exrm_persona.yaml"),
              "--config", str(tiny_override(tmp_path, max_steps=-1)), "--config", str(override), *TINY_DATA,
              "--trainer.enable_progress_bar", "false", "--results.dirpath", str(tmp_path)])
    return json.loads((tmp_path / "results.json").read_text())


def test_a_plateau_stops_fit_and_evaluates_the_final_weights_in_a_skipped_epoch(tmp_path):
    # min_delta 1.0 cannot be met: the rule stops after the second epoch, which validation would skip
    never_rising = {"class_path": "rm_lightning.callbacks.TrainingPlateau",
                    "init_args": {"min_delta": 1.0, "patience": 1, "threshold": None}}
    results = run_persona(tmp_path, {"max_epochs": 5, "check_val_every_n_epoch": 6}, [never_rising])
    steps_per_epoch = 2  # 8 training pairs, 4 a batch
    assert (results["status"], results["global_step"], results["eval_step"]) == ("finished", 2 * steps_per_epoch,
                                                                                 2 * steps_per_epoch)


def test_validation_scheduled_after_max_epochs_still_evaluates_at_the_end(tmp_path):
    results = run_persona(tmp_path, {"max_epochs": 2, "check_val_every_n_epoch": 3}, [])
    assert (results["status"], results["eval_step"]) == ("finished", results["global_step"])
