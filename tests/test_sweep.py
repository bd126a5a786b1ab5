"""Sweeps: grid files, run layout, resuming, failures, and one real tiny sweep end to end."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
import yaml

from rm_lightning.errors import RMLightningError
from rm_lightning.experiments.report import collect
from rm_lightning import cli
from rm_lightning.experiments.sweep import check_rm_types, command, is_finished, load_grid, main, plan_runs

REPO = Path(__file__).resolve().parent.parent
IMRM_CONFIG = REPO / "configs" / "imrm_persona.yaml"
EXRM_CONFIG = REPO / "configs" / "exrm_persona.yaml"
TINY_OVERRIDES = ["--trainer.max_epochs 1 --trainer.max_steps 2",
                  "--data.init_args.num_train 4 --data.init_args.num_test 2 --data.init_args.batch_size 4",
                  "--trainer.enable_progress_bar false --trainer.enable_model_summary false"]


def write_grid(path: Path, **grid) -> Path:
    path.write_text(yaml.safe_dump(grid))
    return path


def test_grid_errors_name_the_file_and_key(tmp_path):
    with pytest.raises(RMLightningError, match="grid file not found"):
        load_grid(tmp_path / "missing.yaml")
    base = dict(configs=[str(EXRM_CONFIG)], rm_types=["rm_lightning.ExplicitRM"], backbones=["tiny-llama"], seeds=[0])
    cases = [({**base, "seeds": []}, "'seeds' must be a non-empty list"),
             ({**base, "seeds": ["zero"]}, "'seeds' must be integers"),
             ({**base, "backbone": ["x"]}, "unknown key"),
             ({**base, "configs": ["nowhere.yaml"]}, "config 'nowhere.yaml' not found"),
             ({**base, "rm_type_overrides": {"rm_lightning.ImplicitRM": ["--x 1"]}}, "not in 'rm_types'")]
    for index, (grid, message) in enumerate(cases):
        path = write_grid(tmp_path / f"grid{index}.yaml", **grid)
        with pytest.raises(RMLightningError, match=message) as caught:
            load_grid(path)
        assert str(path) in str(caught.value)
    bogus = load_grid(write_grid(tmp_path / "bogus.yaml", **{**base, "rm_types": ["rm_lightning.NoSuchRM"]}))
    with pytest.raises(RMLightningError, match="'rm_lightning.NoSuchRM' is not an importable RewardModule"):
        check_rm_types(bogus)


def test_plan_layout_and_command(tmp_path):
    grid = load_grid(write_grid(tmp_path / "grid.yaml", configs=[str(EXRM_CONFIG)],
                                rm_types=["rm_lightning.ExplicitRM", "rm_lightning.ImplicitRM"],
                                backbones=["org/model-1B"], seeds=[3, 4], overrides=["--trainer.max_steps 2", 7],
                                rm_type_overrides={"rm_lightning.ImplicitRM": ["--model.init_args.beta=0.1"]}))
    assert grid.overrides == ["--trainer.max_steps", "2", "7"]
    runs = plan_runs(grid, tmp_path / "out")
    assert [r.name for r in runs] == ["exrm_persona/ExplicitRM/org__model-1B/seed3",
                                      "exrm_persona/ImplicitRM/org__model-1B/seed3",
                                      "exrm_persona/ExplicitRM/org__model-1B/seed4",
                                      "exrm_persona/ImplicitRM/org__model-1B/seed4"]
    assert runs[1].directory == tmp_path / "out" / "exrm_persona" / "ImplicitRM" / "org__model-1B" / "seed3"
    arguments = command(runs[1], grid)
    joined = " ".join(arguments)
    assert "--model rm_lightning.ImplicitRM --model.init_args.backbone org/model-1B --seed_everything 3" in joined
    assert "--trainer.max_steps 2 7 --model.init_args.beta=0.1" in joined
    assert f"--results.dirpath {runs[1].directory}" in joined
    assert "--model.init_args.beta=0.1" not in command(runs[0], grid)


def test_finished_means_a_readable_finished_results_file(tmp_path):
    assert not is_finished(tmp_path)
    results = tmp_path / "results.json"
    for text in ('{"status": "finished"', '["finished"]', '{"status": "running"}'):
        results.write_text(text)
        assert not is_finished(tmp_path)
    results.write_text('{"status": "finished", "stage": "fit"}')
    assert is_finished(tmp_path)


def _print_config(capsys, monkeypatch, config: Path, rm_type: str) -> dict:
    monkeypatch.setattr("sys.argv", ["cli.py"])
    with pytest.raises(SystemExit) as exited:
        cli.main(["fit", "--config", str(config), "--model", rm_type, "--model.init_args.backbone", "tiny-llama",
                  "--print_config"])
    assert exited.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)["model"]


def test_switching_rm_type_drops_init_args_of_the_other_class(capsys, monkeypatch):
    explicit = _print_config(capsys, monkeypatch, IMRM_CONFIG, "rm_lightning.ExplicitRM")
    assert explicit["class_path"] == "rm_lightning.ExplicitRM"
    assert "beta" not in explicit["init_args"] and explicit["init_args"]["pooling"] == "last"
    configured_lr = yaml.safe_load(IMRM_CONFIG.read_text())["model"]["init_args"]["optimizer"]["init_args"]["lr"]
    assert explicit["init_args"]["optimizer"]["init_args"]["lr"] == pytest.approx(float(configured_lr))  # shared args survive
    implicit = _print_config(capsys, monkeypatch, EXRM_CONFIG, "rm_lightning.ImplicitRM")
    assert "pooling" not in implicit["init_args"] and implicit["init_args"]["beta"] == pytest.approx(0.01)


def test_results_writer_after_fit_and_test_without_cli(tmp_path):
    """Outside LightningCLI: no extra evaluation when fit validated nothing, and test overwrites."""
    import lightning as L

    from data_modules import PersonaDataModule
    from rm_lightning import ExplicitRM
    from rm_lightning.callbacks import ResultsWriter

    L.seed_everything(3, verbose=False)
    module, data = ExplicitRM(backbone="tiny-llama-chat"), PersonaDataModule(num_train=4, num_test=2, batch_size=4)
    trainer = L.Trainer(max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[ResultsWriter()])
    trainer.fit(module, datamodule=data)
    after_fit = json.loads((tmp_path / "results.json").read_text())
    # a fit that evaluated nothing is not finished (issue 16): a sweep runs it again
    assert (after_fit["status"], after_fit["stage"], after_fit["global_step"]) == ("not_evaluated", "fit", 1)
    assert after_fit["eval_sets"] == {} and after_fit["eval_source"] is None
    assert after_fit["seed"] == 3 and after_fit["config"]["model"]["backbone"] == "tiny-llama-chat"
    assert set(after_fit["versions"]) == {"torch", "lightning", "transformers", "rm-lightning"}
    trainer.test(module, datamodule=data, verbose=False)
    after_test = json.loads((tmp_path / "results.json").read_text())
    assert (after_test["stage"], after_test["eval_source"], after_test["eval_step"]) == ("test", "test", 1)
    paraphrased = after_test["eval_sets"]["paraphrased_train_prompts"]
    assert paraphrased["shift_tag"] == "token_shift" and paraphrased["num_pairs"] == 16
    assert 0.0 <= paraphrased["accuracy"] <= 1.0 and set(paraphrased) >= {"normalized_margin", "loss", "margin"}


CRASHING_MODULE = textwrap.dedent('''
    from rm_lightning import ExplicitRM


    class CrashingRM(ExplicitRM):
        """A user-defined RM type whose training dies, as an out-of-memory error would."""

        def on_train_start(self):
            raise RuntimeError("boom: simulated crash")
''')


@pytest.mark.slow
def test_tiny_sweep_resumes_and_survives_a_failing_run(tmp_path, monkeypatch, capsys):
    (tmp_path / "user_rms.py").write_text(CRASHING_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("RM_LIGHTNING_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "sweep"
    grid = dict(configs=[str(IMRM_CONFIG)], backbones=["tiny-llama-chat"], seeds=[0], overrides=TINY_OVERRIDES,
                rm_types=["rm_lightning.ExplicitRM", "rm_lightning.ImplicitRM", "user_rms.CrashingRM"])
    grid_path = write_grid(tmp_path / "grid.yaml", **grid)

    assert main([str(grid_path), "--out", str(out)]) == 1
    printed = capsys.readouterr().out
    crashed_log = out / "imrm_persona" / "CrashingRM" / "tiny-llama-chat" / "seed0" / "run.log"
    assert "2 finished, 0 skipped, 1 failed" in printed
    assert f"log: {crashed_log}" in printed
    assert "boom: simulated crash" in crashed_log.read_text()
    run_dirs = {rm: out / "imrm_persona" / rm / "tiny-llama-chat" / "seed0" for rm in ("ExplicitRM", "ImplicitRM")}
    for rm_type, directory in run_dirs.items():
        record = json.loads((directory / "results.json").read_text())
        assert (record["status"], record["rm_type"], record["backbone"]) == ("finished", rm_type, "tiny-llama-chat")
        assert (record["seed"], record["config_name"], record["stage"]) == (0, "imrm_persona", "fit")
        assert record["eval_sets"]["paraphrased_test_prompts"]["shift_tag"] == "token_shift"
        assert record["config"]["model"]["class_path"] == f"rm_lightning.{rm_type}"
        assert (directory / "config.yaml").is_file() and (directory / "run.log").is_file()

    # An EX-RM run interrupted before its first checkpoint: its results.json is gone and a stale file is left
    # in its directory.
    (run_dirs["ExplicitRM"] / "results.json").unlink()
    shutil.rmtree(run_dirs["ExplicitRM"] / "checkpoints")
    (run_dirs["ExplicitRM"] / "stale.txt").write_text("from the interrupted run")
    implicit_results = (run_dirs["ImplicitRM"] / "results.json").read_text()
    grid["rm_types"] = grid["rm_types"][:2]
    assert main([str(write_grid(grid_path, **grid)), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "1 finished, 1 skipped, 0 failed" in printed
    assert "skip      imrm_persona/ImplicitRM/tiny-llama-chat/seed0 (finished earlier)" in printed
    assert not (run_dirs["ExplicitRM"] / "stale.txt").exists() and is_finished(run_dirs["ExplicitRM"])
    assert (run_dirs["ImplicitRM"] / "results.json").read_text() == implicit_results

    collection = collect(out)
    assert collection.rm_types == ["ExplicitRM", "ImplicitRM"]
    assert collection.shift_tags == ["in_distribution", "token_shift"]
    assert len(collection.evaluations) == 8


# a cli.py stand-in: records the arguments of each launch and finishes at once
RECORDING_CLI = """
import json, sys
from pathlib import Path
directory = Path(sys.argv[sys.argv.index("--results.dirpath") + 1])
with open(directory / "launches.txt", "a") as launches:
    launches.write(" ".join(sys.argv[1:]) + "\\n")
(directory / "results.json").write_text(json.dumps({"status": "finished", "stage": "fit"}))
"""


def interrupted_run(tmp_path: Path, checkpoint: bool):
    """A one-run grid whose run was launched once, left a stale file and (or not) a last.ckpt, and did not finish."""
    cli_script = tmp_path / "recording_cli.py"
    cli_script.write_text(RECORDING_CLI)
    grid_path = write_grid(tmp_path / "grid.yaml", configs=[str(EXRM_CONFIG)], rm_types=["rm_lightning.ExplicitRM"],
                           backbones=["tiny-llama-chat"], seeds=[0])
    out = tmp_path / "sweep"
    assert main([str(grid_path), "--out", str(out), "--cli", str(cli_script)]) == 0
    run = plan_runs(load_grid(grid_path), out)[0]
    (run.directory / "results.json").write_text(json.dumps({"status": "interrupted"}))
    (run.directory / "stale.txt").write_text("from the interrupted run")
    if checkpoint:
        run.checkpoint.parent.mkdir()
        run.checkpoint.write_bytes(b"weights")
    return grid_path, out, cli_script, run


def test_an_interrupted_run_with_a_checkpoint_resumes_from_it_in_its_directory(tmp_path, capsys):
    grid_path, out, cli_script, run = interrupted_run(tmp_path, checkpoint=True)
    first_line = run.log_path.read_text().splitlines()[0]
    assert main([str(grid_path), "--out", str(out), "--cli", str(cli_script)]) == 0
    assert f"resume    {run.name} (an unfinished run, from {run.checkpoint})" in capsys.readouterr().out
    launches = (run.directory / "launches.txt").read_text().splitlines()
    assert launches[1] == launches[0] + f" --ckpt_path {run.checkpoint}"
    assert (run.directory / "stale.txt").exists() and run.log_path.read_text().splitlines()[0] == first_line


def test_restart_starts_an_interrupted_run_afresh_even_with_a_checkpoint(tmp_path, capsys):
    grid_path, out, cli_script, run = interrupted_run(tmp_path, checkpoint=True)
    assert main([str(grid_path), "--out", str(out), "--cli", str(cli_script), "--restart"]) == 0
    assert "--ckpt_path" not in (run.directory / "launches.txt").read_text()
    assert not (run.directory / "stale.txt").exists()


def test_an_interrupted_run_launched_with_other_arguments_restarts(tmp_path):
    grid_path, out, cli_script, run = interrupted_run(tmp_path, checkpoint=True)
    grid = yaml.safe_load(grid_path.read_text())
    assert main([str(write_grid(grid_path, **grid, overrides=["--trainer.max_epochs 3"])), "--out", str(out),
                 "--cli", str(cli_script)]) == 0
    launches = (run.directory / "launches.txt").read_text().splitlines()
    assert len(launches) == 1 and "--ckpt_path" not in launches[0]


@pytest.fixture(scope="module")
def tested_sweep_run(tmp_path_factory):
    """A sweep run trained in-process, its files before and after the README's evaluation command on it."""
    tmp_path = tmp_path_factory.mktemp("tested_sweep_run")
    grid = load_grid(write_grid(tmp_path / "grid.yaml", configs=[str(EXRM_CONFIG)], seeds=[0],
                                rm_types=["rm_lightning.ExplicitRM"], backbones=["tiny-llama-chat"],
                                overrides=TINY_OVERRIDES))
    run = plan_runs(grid, tmp_path / "sweep")[0]
    run.directory.mkdir(parents=True)
    cli.main(command(run, grid)[3:])  # the sweep's fit, without its interpreter and module name

    def files() -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in run.directory.iterdir() if p.is_file()}

    before = files()
    cli.main(["test", "--config", str(run.directory / "config.yaml"), "--ckpt_path", str(run.checkpoint),
              "--trainer.enable_progress_bar", "false"])
    return run, before, files()


def test_testing_a_sweep_run_leaves_its_files_alone(tested_sweep_run):
    run, before, after = tested_sweep_run
    assert after == before  # results.json and config.yaml included: the test writes in a directory of its own


def test_test_of_a_checkpoint_records_the_checkpoints_step_and_epoch(tested_sweep_run):
    import torch

    run, _, _ = tested_sweep_run
    (record,) = [r for p in run.directory.rglob("results.json") if (r := json.loads(p.read_text()))["stage"] == "test"]
    checkpoint = torch.load(run.checkpoint, map_location="cpu", weights_only=False)
    assert (record["global_step"], record["epoch"], record["eval_step"]) == (
        checkpoint["global_step"], checkpoint["epoch"], checkpoint["global_step"])


def test_a_test_record_in_a_run_directory_is_not_a_finished_run(tmp_path, capsys):
    grid_path, out, cli_script, run = interrupted_run(tmp_path, checkpoint=True)
    (run.directory / "results.json").write_text(json.dumps({"status": "finished", "stage": "test"}))
    assert main([str(grid_path), "--out", str(out), "--cli", str(cli_script)]) == 1
    assert f"{run.directory / 'results.json'} is a 'test' record, not this run's training" in capsys.readouterr().out


def test_a_grid_file_that_does_not_parse_is_one_line_naming_the_file_and_where(tmp_path):
    """The YAML parser's message runs over several lines (with a caret drawing); the user gets one line."""
    path = tmp_path / "grid.yaml"
    path.write_text("configs: [a]\noverrides: [--trainer.max_epochs 1\n")
    with pytest.raises(RMLightningError) as caught:
        load_grid(path)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value) and "line 2" in str(caught.value)
    path.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(RMLightningError, match="not valid YAML"):
        load_grid(path)


def test_an_override_with_an_unclosed_quote_names_the_key_and_entry(tmp_path):
    base = dict(configs=[str(EXRM_CONFIG)], rm_types=["rm_lightning.ExplicitRM"], backbones=["tiny-llama"], seeds=[0])
    path = write_grid(tmp_path / "grid.yaml", **base, overrides=['--trainer.max_epochs "1'])
    with pytest.raises(RMLightningError, match=r"'overrides' entry '--trainer.max_epochs \"1': No closing quotation"):
        load_grid(path)


def test_a_value_listed_twice_in_a_grid_is_named(tmp_path):
    """``seeds: [0, 0]`` used to be reported as colliding config stems, RM class names or backbone names."""
    base = dict(configs=[str(EXRM_CONFIG)], rm_types=["rm_lightning.ExplicitRM"], backbones=["tiny-llama"], seeds=[0])
    path = write_grid(tmp_path / "grid.yaml", **{**base, "seeds": [0, 1, 0]})
    with pytest.raises(RMLightningError, match="'seeds' lists 0 twice"):
        load_grid(path)


def test_a_sweep_folder_that_cannot_be_made_is_one_error_line(tmp_path, capsys):
    grid = write_grid(tmp_path / "grid.yaml", configs=[str(EXRM_CONFIG)], rm_types=["rm_lightning.ExplicitRM"],
                      backbones=["tiny-llama-chat"], seeds=[0])
    taken = tmp_path / "out"
    taken.write_text("a file where the sweep folder should go")
    assert main([str(grid), "--out", str(taken)]) == 2
    assert f"error: sweep: cannot write the sweep into {taken}" in capsys.readouterr().err


# a cli.py stand-in that, while it starts (before a real run would have locked its directory), has a second
# sweep of the same grid arrive at its run, then finishes
RACED_CLI = """
import json, os, subprocess, sys
from pathlib import Path
directory = Path(sys.argv[sys.argv.index("--results.dirpath") + 1])
print("the first sweep's run", flush=True)
grid, out, recording_cli = os.environ["RACE_GRID"], os.environ["RACE_OUT"], os.environ["RACE_CLI"]
subprocess.run([sys.executable, "-m", "rm_lightning.sweep", grid, "--out", out, "--cli", recording_cli])
(directory / "results.json").write_text(json.dumps({"status": "finished", "stage": "fit"}))
"""


def test_a_second_sweep_leaves_a_run_that_is_still_starting_alone(tmp_path, monkeypatch):
    """A second sweep of the same grid used to find no lock in a run directory whose process was still starting,
    and removed it: the first run's run.log was gone and the directory held the second sweep's."""
    recording_cli, raced_cli = tmp_path / "recording_cli.py", tmp_path / "raced_cli.py"
    recording_cli.write_text(RECORDING_CLI)
    raced_cli.write_text(RACED_CLI)
    out = tmp_path / "sweep"
    grid_path = tmp_path / "grid.yaml"
    write_grid(grid_path, configs=[str(EXRM_CONFIG)], rm_types=["rm_lightning.ExplicitRM"],
               backbones=["tiny-llama-chat"], seeds=[0])
    for name, value in (("RACE_GRID", grid_path), ("RACE_OUT", out), ("RACE_CLI", recording_cli)):
        monkeypatch.setenv(name, str(value))
    assert main([str(grid_path), "--out", str(out), "--cli", str(raced_cli)]) == 0
    run = plan_runs(load_grid(grid_path), out)[0]
    assert "the first sweep's run" in run.log_path.read_text()


@pytest.mark.parametrize("source, reason", [
    ("import rm_lightning\nimport a_package_not_installed\n", "No module named 'a_package_not_installed'"),
    ("import rm_lightning\nclass BrokenRM(rm_lightning.ExplicitRM)\n    pass\n", "SyntaxError: expected ':'"),
])
def test_an_rm_type_whose_module_fails_to_import_says_why(source, reason, tmp_path, monkeypatch):
    """A user module that fails to import was reported as a wrong class path (or as a traceback)."""
    module = f"user_rms_{len(source)}"
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    grid = load_grid(write_grid(tmp_path / "grid.yaml", configs=[str(EXRM_CONFIG)], rm_types=[f"{module}.BrokenRM"],
                                backbones=["tiny-llama"], seeds=[0]))
    with pytest.raises(RMLightningError, match=f"importing {module} failed: .*{reason}"):
        check_rm_types(grid)


def test_a_run_that_ends_unevaluated_says_why(tmp_path, capsys):
    """'exit code 0 but results.json says not_evaluated' left out results.json's reason (for a resumed run: the
    limit already reached, so every re-run failed alike with nothing saying how to get out)."""
    cli_script = tmp_path / "unevaluated_cli.py"
    cli_script.write_text(RECORDING_CLI.replace('{"status": "finished", "stage": "fit"}',
                                                '{"status": "not_evaluated", "stage": "fit", "reason": "max_epochs reached"}'))
    grid_path = write_grid(tmp_path / "grid.yaml", configs=[str(EXRM_CONFIG)], rm_types=["rm_lightning.ExplicitRM"],
                           backbones=["tiny-llama-chat"], seeds=[0])
    assert main([str(grid_path), "--out", str(tmp_path / "sweep"), "--cli", str(cli_script)]) == 1
    assert "results.json says 'not_evaluated' (max_epochs reached), not 'finished'" in capsys.readouterr().out


def test_a_checkpoint_left_behind_for_other_arguments_is_named_before_and_when_it_goes(tmp_path, capsys):
    """An edited grid restarts an interrupted run afresh, removing its last.ckpt; the dry run said only
    'would run' and the sweep 'restarting an unfinished run', nothing about the checkpoint being dropped."""
    grid_path, out, cli_script, run = interrupted_run(tmp_path, checkpoint=True)
    grid = yaml.safe_load(grid_path.read_text())
    write_grid(grid_path, **grid, overrides=["--trainer.max_epochs 3"])
    capsys.readouterr()
    for dry_run in (["--dry-run"], []):
        assert main([str(grid_path), "--out", str(out), "--cli", str(cli_script), *dry_run]) == 0
        assert f"discarding {run.checkpoint} (written under other arguments" in capsys.readouterr().out


def test_a_failed_run_is_reported_with_its_error_line(tmp_path, capsys):
    """A failed run's summary said only 'exit code 2; log: ...': the reason (a backbone that does not load, for
    the Figure 4 grid without Gemma's extra) was in each run.log."""
    cli_script = tmp_path / "failing_cli.py"
    cli_script.write_text("import sys\nprint('Seed set to 0')\nprint(\"error: cannot load backbone 'gemma3-270m'\", "
                          "file=sys.stderr)\nsys.exit(2)\n")
    grid_path = write_grid(tmp_path / "grid.yaml", configs=[str(EXRM_CONFIG)], rm_types=["rm_lightning.ExplicitRM"],
                           backbones=["gemma3-270m"], seeds=[0])
    assert main([str(grid_path), "--out", str(tmp_path / "sweep"), "--cli", str(cli_script)]) == 1
    assert "exit code 2: error: cannot load backbone 'gemma3-270m'; log: " in capsys.readouterr().out


@pytest.mark.parametrize("key, entry, use", [
    ("overrides", "--seed_everything 5", "'seeds'"),
    ("overrides", "--model.init_args.backbone=tiny-llama", "'backbones'"),
    ("rm_type_overrides", "--model.backbone tiny-llama", "'backbones'"),
    ("overrides", "--trainer.logger false", "--out"),
])
def test_an_override_of_what_the_grid_sets_per_run_is_refused(key, entry, use, tmp_path):
    """Overrides come after the grid's own arguments, so '--seed_everything 5' trained every 'seed<k>' run with
    seed 5 (and a backbone override trained another model than the directory names), without a word."""
    base = dict(configs=[str(EXRM_CONFIG)], rm_types=["rm_lightning.ExplicitRM"], backbones=["tiny-llama-chat"],
                seeds=[0, 1])
    value = {"rm_lightning.ExplicitRM": [entry]} if key == "rm_type_overrides" else [entry]
    path = write_grid(tmp_path / "grid.yaml", **base, **{key: value})
    option = entry.split("=")[0].split()[0]
    with pytest.raises(RMLightningError, match=f"sets {option}, which the sweep sets for each run: use {use}"):
        load_grid(path)


def test_a_misspelt_model_option_in_rm_type_overrides_fails_before_any_run(tmp_path):
    """The class is known, so its runs would each fail at start-up; said once, before any, with the near name."""
    grid = load_grid(write_grid(tmp_path / "grid.yaml", configs=[str(EXRM_CONFIG)],
                                rm_types=["rm_lightning.ExplicitRM", "rm_lightning.ImplicitRM"],
                                backbones=["tiny-llama-chat"], seeds=[0],
                                rm_type_overrides={"rm_lightning.ImplicitRM": ["--model.init_args.betta 0.1",
                                                                               "--model.init_args.lora '{r: 4}'"]}))
    with pytest.raises(RMLightningError, match="--model.init_args.betta is no option of ImplicitRM; did you mean beta"):
        check_rm_types(grid)
    check_rm_types(load_grid(write_grid(tmp_path / "ok.yaml", configs=[str(EXRM_CONFIG)],
                                        rm_types=["rm_lightning.ImplicitRM"], backbones=["tiny-llama-chat"], seeds=[0],
                                        rm_type_overrides={"rm_lightning.ImplicitRM": ["--model.init_args.lora={r: 4}",
                                                                                       "--model.beta", "0.1"]})))
