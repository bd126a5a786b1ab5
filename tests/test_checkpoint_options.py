"""``--ckpt_path``: fit resumes with the options it is given, the other commands rebuild the checkpoint's
model, and a path that is no checkpoint is one line. Tiny model, in-process, seconds each."""

from pathlib import Path

import pytest
import yaml

from conftest import PROJECT_ROOT, tiny_override
from rm_lightning import cli

EXRM = str(PROJECT_ROOT / "configs" / "exrm_persona.yaml")
IMRM = str(PROJECT_ROOT / "configs" / "imrm_persona.yaml")
SMALL = ["--data.init_args.num_train", "8", "--data.init_args.num_test", "4", "--trainer.enable_progress_bar", "false"]


@pytest.fixture(scope="module")
def exrm_checkpoint(tmp_path_factory) -> Path:
    """last.ckpt of a one-step tiny EX-RM run (token_budget unset)."""
    root = tmp_path_factory.mktemp("trained")
    cli.main(["fit", "--config", EXRM, "--config", str(tiny_override(root, max_steps=1)), *SMALL])
    return root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"


def run_command(subcommand: str, config: str, root: Path, *args: str) -> Path:
    """The run directory ``subcommand`` wrote under ``root``."""
    cli.main([subcommand, "--config", config, "--config", str(tiny_override(root, max_steps=2)), *SMALL, *args])
    return max((root / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))


def model_options(run: Path) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())["model"]


def error_line(capsys, *args: str) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        cli.main(list(args))
    assert exited.value.code == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    return line


def test_a_resumed_fit_keeps_an_option_given_on_the_command_line(exrm_checkpoint, tmp_path, capsys):
    run = run_command("fit", EXRM, tmp_path, "--ckpt_path", str(exrm_checkpoint),
                      "--model.init_args.token_budget", "512")
    assert model_options(run)["init_args"]["token_budget"] == 512
    assert "resuming with model options other than the checkpoint's: token_budget None -> 512" in \
        capsys.readouterr().err


def test_resuming_a_checkpoint_of_another_rm_type_is_one_line(exrm_checkpoint, tmp_path, capsys):
    line = error_line(capsys, "fit", "--config", IMRM, "--config", str(tiny_override(tmp_path)),
                      "--ckpt_path", str(exrm_checkpoint))
    assert "is a checkpoint of ExplicitRM, but the config trains ImplicitRM" in line


def test_resuming_with_adapters_other_than_the_checkpoint_s_is_one_line_naming_lora(exrm_checkpoint, tmp_path, capsys):
    """The adapters are parameters: a checkpoint without them (or of another rank) cannot load into the model."""
    line = error_line(capsys, "fit", "--config", EXRM, "--config", str(tiny_override(tmp_path)),
                      "--ckpt_path", str(exrm_checkpoint), "--model.init_args.lora", "{r: 4}")
    assert line.startswith("error: model.init_args.lora:")


def test_test_rebuilds_the_checkpoint_s_rm_type_and_keeps_a_memory_option(exrm_checkpoint, tmp_path, capsys):
    run = run_command("test", IMRM, tmp_path, "--ckpt_path", str(exrm_checkpoint),
                      "--model.init_args.token_budget", "512")
    model = model_options(run)
    assert (model["class_path"], model["init_args"]["token_budget"]) == ("rm_lightning.ExplicitRM", 512)
    assert "the model is the checkpoint's: RM type ImplicitRM -> ExplicitRM" in capsys.readouterr().err


def test_a_run_folder_given_as_checkpoint_is_one_line_naming_its_checkpoint(exrm_checkpoint, tmp_path, capsys):
    run = exrm_checkpoint.parent.parent
    line = error_line(capsys, "test", "--config", EXRM, "--config", str(tiny_override(tmp_path)), "--ckpt_path",
                      str(run))
    assert line.endswith(f"is a folder, not a checkpoint (give a .ckpt file; its checkpoint is {exrm_checkpoint})")


def test_a_file_that_is_no_checkpoint_is_one_line(tmp_path, capsys):
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    line = error_line(capsys, "validate", "--config", EXRM, "--config", str(tiny_override(tmp_path)),
                      "--ckpt_path", str(text))
    assert f"ckpt_path: {text} is not a Lightning checkpoint" in line


@pytest.mark.parametrize("reader", ["predict", "test", "load_reward_model", "export"])
def test_a_sharded_fsdp_checkpoint_read_in_one_process_is_one_line_naming_the_consolidation(reader, tmp_path, capsys):
    """An FSDP run's last.ckpt is a folder of shards (``.metadata``): one process cannot load it (predict
    ended in IsADirectoryError, load_reward_model said 'not found', export 'no checkpoints/last.ckpt')."""
    from rm_lightning.checkpoint_options import CONSOLIDATE
    from rm_lightning.errors import SettingError
    from rm_lightning.models.export import resolve_checkpoint
    from rm_lightning.models.scoring import load_reward_model

    sharded = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    sharded.mkdir(parents=True)
    (sharded / ".metadata").write_bytes(b"")
    if reader in ("predict", "test"):
        line = error_line(capsys, reader, "--config", EXRM, "--config", str(tiny_override(tmp_path)),
                          "--ckpt_path", str(sharded))
    else:  # export is given the run directory, as its --help says it may be
        with pytest.raises(SettingError) as raised:
            load_reward_model(sharded) if reader == "load_reward_model" else resolve_checkpoint(sharded.parent.parent)
        line = str(raised.value)
    assert f"`{CONSOLIDATE} {sharded}`" in line
