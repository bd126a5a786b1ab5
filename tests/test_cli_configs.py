"""The shipped configs run end to end (tiny model) and bad input ends in one clear line."""

import csv
import json
from pathlib import Path

import pytest

from rm_lightning import cli
from conftest import PROJECT_ROOT, tiny_override

PERSONA_CONFIGS = ["configs/exrm_persona.yaml", "configs/imrm_persona.yaml", "configs/exgrm_persona.yaml"]


def run_dir_of(root: Path) -> Path:
    versions = sorted((root / "lightning_logs").glob("version_*"))
    assert versions, f"no run directory under {root}"
    return versions[-1]


def fit_persona_config(config: str, tmp_path: Path, max_steps: int, *args: str) -> Path:
    """``cli.py fit`` of a shipped persona config on a tiny model; returns the run directory."""
    override = tiny_override(tmp_path, max_steps=max_steps, reference_cache_dir=tmp_path / "ref"
                             if "imrm" in config else None)
    cli.main(["fit", "--config", str(PROJECT_ROOT / config), "--config", str(override), *args])
    return run_dir_of(tmp_path)


@pytest.mark.parametrize("config", PERSONA_CONFIGS)
def test_shipped_persona_config_fits_and_leaves_artifacts(config, tmp_path):
    run = fit_persona_config(config, tmp_path, 3, "--data.init_args.num_train", "12", "--data.init_args.num_test", "4",
                             "--trainer.val_check_interval", "2", "--trainer.check_val_every_n_epoch", "null")
    assert list(run.glob("events.out.tfevents.*"))
    assert (run / "margin_history.png").stat().st_size > 1000
    rows = list(csv.DictReader(open(run / "margin_history.csv")))
    sets = {row["set"] for row in rows}
    assert {"train", "original_test_prompts", "paraphrased_test_prompts"} <= sets
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 for r in rows if r["split"] == "val")


@pytest.mark.parametrize("config", PERSONA_CONFIGS)
def test_bf16_mixed_precision_trains_on_cpu(config, tmp_path):
    """`trainer.precision: bf16-mixed` runs on the CPU (autocast) with finite losses."""
    run = fit_persona_config(config, tmp_path, 2, "--trainer.precision", "bf16-mixed",
                             "--trainer.limit_val_batches", "1", "--data.init_args.num_train", "8",
                             "--data.init_args.num_test", "4")
    rows = [row for row in csv.DictReader(open(run / "margin_history.csv")) if row["split"] == "train"]
    assert len(rows) == 2
    losses = [float(row["loss"]) for row in rows]
    assert all(0.0 < loss < 10.0 for loss in losses)


def test_tensorboard_holds_margin_scalars_and_histograms(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    override = tiny_override(tmp_path, max_steps=2)
    cli.main(["fit", "--config", str(PROJECT_ROOT / "configs/exrm_persona.yaml"), "--config", str(override),
              "--data.init_args.num_train", "8", "--data.init_args.num_test", "4"])
    events = EventAccumulator(str(run_dir_of(tmp_path)), size_guidance={"histograms": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for name in ["train/chosen_reward", "train/rejected_reward", "train/margin",
                 "val/paraphrased_test_prompts/accuracy", "val/paraphrased_test_prompts/normalized_margin",
                 "val/original_test_prompts/chosen_reward"]:
        assert name in scalars
    assert "val/paraphrased_test_prompts/margins" in events.Tags()["histograms"]


@pytest.fixture(scope="module")
def scheduled_eval_rows(tmp_path_factory) -> list[dict]:
    """The validation rows of margin_history.csv of a 3-epoch fit with two sets on a schedule."""
    tmp_path = tmp_path_factory.mktemp("eval_schedule")
    override = tiny_override(tmp_path, max_steps=-1, max_epochs=3)
    cli.main(["fit", "--config", str(PROJECT_ROOT / "configs/exrm_persona.yaml"), "--config", str(override),
              "--data.init_args.num_train", "8", "--data.init_args.num_test", "4",
              "--data.init_args.eval_every_n_epochs", '{"paraphrased_train_prompts": 2, "original_train_prompts": 5}'])
    return [row for row in csv.DictReader(open(run_dir_of(tmp_path) / "margin_history.csv")) if row["split"] == "val"]


def test_eval_every_n_epochs_evaluates_a_set_at_its_epochs_and_the_last(scheduled_eval_rows):
    rows = [row for row in scheduled_eval_rows if row["step"] != "0"]  # step 0: the evaluation before training

    def epochs(name: str) -> list[int]:
        return sorted(int(row["epoch"]) for row in rows if row["set"] == name)

    assert epochs("paraphrased_test_prompts") == epochs("original_test_prompts") == [0, 1, 2]
    assert epochs("paraphrased_train_prompts") == [1, 2]
    assert epochs("original_train_prompts") == [2]


def test_every_eval_set_is_evaluated_before_the_first_step_whatever_its_schedule(scheduled_eval_rows):
    at_start = sorted(row["set"] for row in scheduled_eval_rows if row["step"] == "0")
    assert at_start == sorted(["original_train_prompts", "original_test_prompts", "paraphrased_train_prompts",
                               "paraphrased_test_prompts"])


def test_fast_dev_run_trains_one_step_and_writes_its_results_in_the_root_dir(tmp_path):
    """Lightning swaps the logger for a stand-in without a directory under ``fast_dev_run``: no version is claimed."""
    override = tiny_override(tmp_path)
    cli.main(["fit", "--config", str(PROJECT_ROOT / "configs/exrm_persona.yaml"), "--config", str(override),
              "--data.init_args.num_train", "8", "--data.init_args.num_test", "4", "--trainer.fast_dev_run", "true"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert (results["status"], results["global_step"]) == ("finished", 1)


def test_runs_without_a_logger_each_keep_their_own_directory(tmp_path):
    """With ``trainer.logger: false`` a second run in the same root replaced the first one's results and checkpoint."""
    override = tiny_override(tmp_path, max_steps=1)
    args = ["fit", "--config", str(PROJECT_ROOT / "configs/exrm_persona.yaml"), "--config", str(override),
            "--data.init_args.num_train", "8", "--data.init_args.num_test", "4", "--trainer.logger", "false"]
    cli.main(args)
    cli.main(args)
    runs = tmp_path / "lightning_logs"
    written = sorted(p.relative_to(runs).as_posix() for p in runs.glob("version_*/*")
                     if p.name in ("results.json", "checkpoints"))
    assert written == ["version_0/checkpoints", "version_0/results.json",
                       "version_1/checkpoints", "version_1/results.json"]


def error_line(capsys, *args: str) -> str:
    """The one ``error:`` line ``cli.main(args)`` ends with (exit status 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        cli.main(list(args))
    assert exited.value.code == 2
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


def test_bad_inputs_end_in_one_clear_line(tmp_path, capsys):
    override = tiny_override(tmp_path)
    base = ["fit", "--config", str(PROJECT_ROOT / "configs/exrm_persona.yaml"), "--config", str(override)]
    missing = error_line(capsys, *base, "--data.init_args.source", "anthropic",
                         "--data.init_args.path", str(tmp_path / "nope.jsonl"))
    assert "data file not found" in missing and "nope.jsonl" in missing
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "q", "answer_matching_behavior": " Yes"}\n[1, 2]\n')
    assert "broken.jsonl:2" in error_line(capsys, *base, "--data.init_args.source", "anthropic",
                                          "--data.init_args.path", str(broken))
    backbone = error_line(capsys, *base, "--model.init_args.backbone", str(tmp_path / "no-model"))
    assert "cannot load backbone" in backbone
    schedule = error_line(capsys, *base, "--data.init_args.eval_every_n_epochs", '{"paraphrased": 2}')
    assert "eval_every_n_epochs" in schedule and "'paraphrased'" in schedule and "paraphrased_test_prompts" in schedule
    with pytest.raises(SystemExit) as unknown_source:
        cli.main([*base, "--data.init_args.source", "wikipedia"])
    assert unknown_source.value.code != 0 and "source" in capsys.readouterr().err
    assert not (tmp_path / "lightning_logs").exists() or not list((tmp_path / "lightning_logs").rglob("*.csv"))


def test_fit_help_group_titles_are_whole_sentences_for_a_user(capsys):
    """The titles are the first line of each class's docstring: none cut mid-sentence, none pointing into the code."""
    with pytest.raises(SystemExit):
        cli.main(["fit", "--help"])
    shown = capsys.readouterr().out
    assert "when a fit is:" not in shown and "this module's docstring" not in shown
