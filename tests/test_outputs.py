"""What a researcher reads after a run: the margin plot, the CSV and TensorBoard on one step axis, a point at
step 0, and a console without library tips."""

import csv
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from conftest import PROJECT_ROOT, tiny_override
from rm_lightning import cli
from rm_lightning.callbacks import margin_history, results
from rm_lightning.console import quiet_console

TINY_DATA = ["--data.init_args.num_train", "8", "--data.init_args.num_test", "4"]


def fit(config: str, tmp_path: Path, *args: str) -> Path:
    override = tiny_override(tmp_path, max_steps=4, reference_cache_dir=tmp_path / "ref" if "imrm" in config else None)
    cli.main(["fit", "--config", str(PROJECT_ROOT / config), "--config", str(override), *TINY_DATA, *args])
    (run,) = (tmp_path / "lightning_logs").glob("version_*")
    return run


def history(run: Path) -> list[dict]:
    return list(csv.DictReader(open(run / "margin_history.csv")))


def test_validation_scalars_histograms_and_csv_share_the_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = fit("configs/exrm_persona.yaml", tmp_path, "--trainer.val_check_interval", "1",
              "--trainer.check_val_every_n_epoch", "null")
    events = EventAccumulator(str(run), size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    name = "original_test_prompts"
    csv_steps = [int(row["step"]) for row in history(run) if row["set"] == name]
    assert csv_steps == [0, 1, 2]  # 8 pairs, 4 a batch; step 0: the evaluation before training
    for tag in (f"val/{name}/accuracy", f"val/{name}/normalized_margin", f"val/{name}/signed_normalized_margin"):
        assert [event.step for event in events.Scalars(tag)] == csv_steps, tag
    assert [event.step for event in events.Histograms(f"val/{name}/margins")] == csv_steps


def test_training_scalars_and_csv_rows_share_the_step(tmp_path):
    """A training batch's loss is at the same step in TensorBoard as in margin_history.csv (Lightning's own axis
    put it one step earlier)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = fit("configs/exrm_persona.yaml", tmp_path, "--trainer.max_steps", "2")
    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "histograms": 1})
    events.Reload()
    logged = {event.step: round(event.value, 4) for event in events.Scalars("train/loss")}
    rows = {int(row["step"]): round(float(row["loss"]), 4) for row in history(run) if row["set"] == "train"}
    assert logged == rows
    assert [event.step for event in events.Scalars("train/epoch_accuracy")] == [max(rows)]  # at the epoch's last


def test_validating_a_checkpoint_logs_at_the_step_its_weights_were_trained_to(tmp_path):
    """``validate --ckpt_path``: TensorBoard's point at the checkpoint's step, the one results.json records (not 0)."""
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (tmp_path / "fit").mkdir(), (tmp_path / "validate").mkdir()
    trained = fit("configs/exrm_persona.yaml", tmp_path / "fit", "--trainer.max_steps", "2")
    override = tiny_override(tmp_path / "validate")
    cli.main(["validate", "--config", str(PROJECT_ROOT / "configs/exrm_persona.yaml"), "--config", str(override),
              *TINY_DATA, "--ckpt_path", str(trained / "checkpoints" / "last.ckpt")])
    (run,) = (tmp_path / "validate" / "lightning_logs").glob("version_*")
    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "histograms": 1})
    events.Reload()
    recorded = json.loads((run / "results.json").read_text())["global_step"]
    assert [event.step for event in events.Scalars("val/original_test_prompts/accuracy")] == [recorded]


def test_an_im_rm_starts_from_rewards_of_exactly_zero_and_its_reference_pass_shows_no_bar(tmp_path, capfd):
    run = fit("configs/imrm_persona.yaml", tmp_path, "--trainer.enable_progress_bar", "false")
    start = [row for row in history(run) if row["step"] == "0"]
    assert {row["set"] for row in start} >= {"original_test_prompts", "paraphrased_test_prompts"}
    assert all(float(row["chosen_reward"]) == float(row["rejected_reward"]) == 0.0 for row in start)
    assert all(float(row["accuracy"]) == 0.5 for row in start)  # every pair a tie
    assert "reference log-probs [" not in capfd.readouterr().err


def test_no_evaluation_at_step_0_when_turned_off(tmp_path):
    run = fit("configs/exrm_persona.yaml", tmp_path, "--margin_history.validate_at_start", "false")
    assert not [row for row in history(run) if row["step"] == "0"]


def test_the_plot_has_a_title_one_legend_and_separate_margin_axes(monkeypatch, tmp_path):
    drawn = []
    monkeypatch.setattr(margin_history, "save_figure_atomically", lambda fig, path: drawn.append(fig))
    rows = [{"step": 0, "epoch": 0, "set": "held_out", "split": "val", "accuracy": 0.5, "normalized_margin": 0.0,
             "signed_normalized_margin": 0.0},
            {"step": 1, "epoch": 0, "set": "train", "split": "train", "accuracy": 1.0, "margin": 0.2},
            {"step": 1, "epoch": 0, "set": "held_out", "split": "val", "accuracy": 0.75, "normalized_margin": 0.8,
             "signed_normalized_margin": 0.4}]
    margin_history.plot_history(rows, tmp_path / "plot.png", "exrm_persona/version_0 · ExplicitRM · tiny-llama")
    (fig,) = drawn
    assert fig._suptitle.get_text() == "exrm_persona/version_0 · ExplicitRM · tiny-llama"
    assert len(fig.legends) == 1 and all(axis.get_legend() is None for axis in fig.axes)
    eval_axis, train_axis, _ = fig.axes
    assert [line.get_xdata()[0] for line in eval_axis.lines if len(line.get_xdata())][:1] == [0]
    assert list(train_axis.lines[0].get_ydata()) == [0.2]  # the raw train margin, alone on its axis
    assert eval_axis is not train_axis and not any(0.2 in line.get_ydata() for line in eval_axis.lines)


LIBRARY_NOTICES = ["The 'train_dataloader' does not have many workers which may be a bottleneck.",
                   "LightningCLI's args parameter is intended to run from within Python like if it were from the "
                   "command line.", "`isinstance(treespec, LeafSpec)` is deprecated, use ..."]


def test_library_notices_are_silenced_by_message_and_other_warnings_still_show():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_console()
        for message in LIBRARY_NOTICES[:2]:
            warnings.warn(message, UserWarning)
        warnings.warn(LIBRARY_NOTICES[2], FutureWarning)
        warnings.warn("GPU available but not used.", UserWarning)
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", UserWarning)  # another category: kept
    assert [str(w.message) for w in caught] == ["GPU available but not used.",
                                                "`isinstance(treespec, LeafSpec)` is deprecated"]


def test_lightning_tip_lines_are_dropped_and_other_info_kept(caplog):
    quiet_console()
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger=logger.name):
        for line in ("💡 Tip: For seamless cloud logging ...", "GPU available: False, used: False",
                     "TPU available: False, using: 0 TPU cores", "Seed set to 0"):
            logger.info(line)
    assert [record.getMessage() for record in caplog.records] == ["Seed set to 0"]


@pytest.mark.slow
def test_a_normal_start_prints_no_library_tips_or_deprecations(tmp_path):
    """``cli.py fit --config configs/exrm_persona.yaml`` (tiny model) as a user runs it, in its own process."""
    override = tiny_override(tmp_path, max_steps=2)
    done = subprocess.run([sys.executable, "cli.py", "fit", "--config", "configs/exrm_persona.yaml", "--config",
                           str(override), *TINY_DATA], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    console = done.stdout + done.stderr
    for notice in ("Tip:", "litlogger", "GPU available", "TPU available", "does not have many workers",
                   "LightningCLI's args", "deprecated", "Warning:"):
        assert notice not in console, notice
    assert sum(line.startswith("precision: auto -> ") for line in console.splitlines()) == 1


def test_a_checkout_without_install_reads_the_version_tomllib_reads():
    """results.json's rm-lightning version from pyproject.toml, without tomllib (not in Python 3.10)."""
    import tomllib

    pyproject = PROJECT_ROOT / "pyproject.toml"
    assert results._source_tree_version(pyproject) == tomllib.loads(pyproject.read_text())["project"]["version"]
