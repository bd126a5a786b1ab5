"""A fit's wall time by phase (callbacks/phase_times.py): recorded in results.json and printed after the
final table, the parts adding up to the total. Structure only: nothing here depends on how fast it ran."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import PROJECT_ROOT, tiny_override
from rm_lightning import cli
from rm_lightning.callbacks.phase_times import PHASES, PhaseClock, PhaseTimes, describe_timings, start_ticks

TINY_DATA = ["--data.init_args.num_train", "8", "--data.init_args.num_test", "4"]
KEYS = [f"{phase}_s" for phase in PHASES] + ["total_s"]


def fit(config: str, tmp_path: Path, *args: str):
    override = tiny_override(tmp_path, max_steps=2, reference_cache_dir=tmp_path / "ref" if "imrm" in config else None)
    run = cli.main(["fit", "--config", str(PROJECT_ROOT / config), "--config", str(override), *TINY_DATA, *args])
    (results,) = (tmp_path / "lightning_logs").glob("version_*/results.json")
    return run, json.loads(results.read_text())["timings"]


@pytest.mark.parametrize("config", ["configs/exrm_persona.yaml", "configs/imrm_persona.yaml"])
def test_results_record_every_phase_and_the_parts_add_up_to_the_total(config, tmp_path, capfd):
    run, timings = fit(config, tmp_path)
    assert set(KEYS) <= set(timings)
    assert all(timings[key] >= 0 for key in KEYS)
    assert sum(timings[f"{phase}_s"] for phase in PHASES) == pytest.approx(timings["total_s"], abs=1e-6)
    assert timings["training_batches"] == 2
    assert timings["evaluations"] == 2  # the step-0 validation and the one at the end
    assert timings["checkpoints_s"] > 0  # the shipped configs keep checkpoints/last.ckpt
    assert describe_timings(timings) in capfd.readouterr().out
    # the callback's wrappers are gone, and the CLI added it once
    assert "setup" not in vars(run.model) and "save_checkpoint" not in vars(run.trainer)
    assert sum(isinstance(c, PhaseTimes) for c in run.trainer.callbacks) == 1


def test_the_printed_line_names_every_phase():
    timings = {key: 1.0 for key in KEYS} | {"total_s": 6.0}
    line = describe_timings(timings)
    assert re.fullmatch(r"time: 6\.0 s = start-up 1\.0 \+ reference 1\.0 \+ training 1\.0 \+ evaluation 1\.0 "
                        r"\+ checkpoints 1\.0 \+ other 1\.0", line)


def test_no_checkpoint_time_without_checkpoints(tmp_path):
    _, timings = fit("configs/exrm_persona.yaml", tmp_path, "--trainer.enable_checkpointing", "false")
    assert timings["checkpoints_s"] == 0


def test_time_is_charged_to_the_innermost_phase_only():
    now = [0.0]
    clock = PhaseClock("start_up", started=0.0, clock=lambda: now[0])

    def after(seconds, action, phase):
        now[0] += seconds
        getattr(clock, action)(phase)

    after(2, "enter", "reference")      # start-up 2
    after(3, "leave", "reference")      # reference 3
    after(1, "enter", "evaluation")     # start-up 1 more
    after(4, "enter", "checkpoints")    # evaluation 4
    after(5, "leave", "checkpoints")    # checkpoints 5
    after(6, "leave", "evaluation")     # evaluation 6 more
    after(1, "switch", "training")      # start-up 1 more
    after(7, "switch", "other")         # training 7
    now[0] += 2                         # other 2
    assert clock.snapshot() == {"start_up": 4, "reference": 3, "training": 7, "evaluation": 10, "checkpoints": 5,
                                "other": 2, "total": 31}


def test_work_of_other_callbacks_before_the_first_step_is_training_not_start_up():
    now = [0.0]
    times = PhaseTimes()
    times.clock = PhaseClock("start_up", started=0.0, clock=lambda: now[0])
    now[0] += 4                         # imports, model, data
    times.on_train_start(None, None)
    now[0] += 20                        # e.g. DynamicsMonitor's step-0 analysis in on_train_batch_start
    times.on_train_batch_end(None, None, None, None, 0)
    seconds = times.clock.snapshot()
    assert (seconds["start_up"], seconds["training"]) == (4, 20)


def test_leaving_an_outer_phase_also_leaves_one_an_exception_left_open():
    now = [0.0]
    clock = PhaseClock("training", started=0.0, clock=lambda: now[0])
    clock.enter("evaluation")
    clock.enter("checkpoints")  # never left: the save raised
    clock.leave("evaluation")
    assert clock.stack == ["training"]


# --- the whole-run benchmark (benchmarks/whole_run.py) reads what a fit records ---------------------------


def test_the_benchmark_takes_its_settings_from_the_config():
    from benchmarks import whole_run

    settings = whole_run.run_settings(PROJECT_ROOT / "configs/imrm_persona.yaml",
                                      whole_run.parse_args(["--epochs", "1", "--train-prompts", "8"]))
    assert (settings["rm"], settings["batch_size"], settings["lr"]) == ("imrm", 16, 2e-5)
    assert settings["eval_batch_size"] == 64
    assert settings["epochs"] == 1 and settings["data_args"]["num_train"] == 8
    assert settings["eval_every_n_epochs"] == {"paraphrased_train_prompts": 2}


def test_the_trl_side_evaluates_the_sets_the_cli_evaluates_when_it_does():
    from benchmarks.whole_run import due_sets

    names = ["original_train_prompts", "paraphrased_train_prompts"]
    every = {"paraphrased_train_prompts": 2}
    assert [len(due_sets(names, every, epoch, 4, step=5 * (epoch + 1))) for epoch in range(4)] == [1, 2, 1, 2]
    assert due_sets(names, every, 0, 4, step=0) == names  # before the first step every set, as every curve starts there
    assert due_sets(names, every, 0, 1, step=5) == names  # the last epoch evaluates every set


def test_the_table_shows_both_sides_and_says_when_trl_has_no_trainer():
    from benchmarks.whole_run import FINAL_SET, table

    timings = {f"{phase}_s": 1.0 for phase in PHASES}
    side = {"wall_s": 10.0, "timings": timings, "accuracy": {FINAL_SET: 1.0}}
    text = table([{"name": "exrm_persona", "trl_trainer": "RewardTrainer", "ours": side, "trl": {**side, "wall_s": 30.0}},
                  {"name": "exgrm_persona", "trl_trainer": "none", "ours": side}])
    assert "3.00x" in text and "none" in text and "1.000 / 1.000" in text and "1.000 / -" in text


def test_a_process_age_never_dates_its_start_before_it_was_launched():
    """Start-up counts from the process's start: a child's own reading of it must fall after the moment its
    parent launched it (less one clock tick of rounding), not up to a second before, as a start time built
    on Linux's whole-second boot time can."""
    child = ("import time; from rm_lightning.callbacks.phase_times import process_start_seconds_ago as ago; "
             "print(time.time() - ago())")
    launched = time.time()
    started = float(subprocess.run([sys.executable, "-c", child], check=True, capture_output=True,
                                   text=True).stdout)
    assert started >= launched - 0.02


def test_the_start_time_is_read_after_the_command_name_whatever_it_holds():
    line = "4242 (a) b (c) S 1 4242 4242 0 -1 4194560 500 0 0 0 7 3 0 0 20 0 1 0 98765 1000 200"
    assert start_ticks(line) == 98765


def test_whole_run_notes_a_nearly_full_disk_and_a_backlog_of_unwritten_pages():
    from benchmarks import whole_run

    assert whole_run.machine_state_notes({"disk_free_gib": 46.0, "dirty_page_cache_mib": 2}) == []
    notes = whole_run.machine_state_notes({"disk_free_gib": 1.3, "dirty_page_cache_mib": 1500})
    assert len(notes) == 2 and "1.3 GiB free" in notes[0] and "1500 MiB" in notes[1]
