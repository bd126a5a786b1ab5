"""Every setting is checked before any expensive work: one ``error:`` line naming the option, exit status 2,
no model loaded and nothing written."""

import os
from pathlib import Path

import pytest

from conftest import PROJECT_ROOT, tiny_override
from rm_lightning import cli
from rm_lightning.errors import BackboneError, SettingError
from rm_lightning.models import reward_module
from rm_lightning.models.backbones import check_backbone_name

EXRM = str(PROJECT_ROOT / "configs" / "exrm_persona.yaml")
IMRM = str(PROJECT_ROOT / "configs" / "imrm_persona.yaml")
FSDP = str(PROJECT_ROOT / "configs" / "trainer" / "fsdp.yaml")


@pytest.fixture
def no_model_load(monkeypatch):
    """A run that gets as far as loading a backbone fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a backbone was loaded before the settings were checked")
    monkeypatch.setattr(reward_module, "load_backbone", refuse)


def one_error_line(capsys, args: list[str]) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        cli.main(args)
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == err[-1], err
    assert not any(line.startswith(("usage:", "Traceback")) for line in err), err
    return errors[0]


BAD_SETTINGS = [
    (EXRM, ["--data.init_args.num_train", "-3"], "data.init_args.num_train: expected a whole number >= 1"),
    (EXRM, ["--data.init_args.num_test", "0"], "data.init_args.num_test: expected a whole number >= 1"),
    (EXRM, ["--data.init_args.batch_size", "0"], "data.init_args.batch_size: expected a whole number >= 1"),
    (EXRM, ["--data.init_args.eval_batch_size", "-2"], "data.init_args.eval_batch_size: expected a whole number"),
    (EXRM, ["--data.init_args.max_response_tokens", "0"], "data.init_args.max_response_tokens: expected a whole"),
    (EXRM, ["--data.init_args.eval_every_n_epochs", '{"paraphrased_test_prompts": 0}'],
     "data.init_args.eval_every_n_epochs.paraphrased_test_prompts: expected a whole number >= 1"),
    (IMRM, ["--model.init_args.beta", "0"], "model.init_args.beta: expected a finite number > 0"),
    (IMRM, ["--model.init_args.beta", "-0.01"], "model.init_args.beta: expected a finite number > 0"),
    (IMRM, ["--model.init_args.beta", "nan"], "model.init_args.beta: Expected a <class 'float'>"),
    (IMRM, ["--model.init_args.logprob_chunk_size", "0"], "model.init_args.logprob_chunk_size: expected a whole"),
    (EXRM, ["--model.init_args.optimizer.init_args.lr=-1e-5"],
     "model.init_args.optimizer.init_args.lr: expected a finite number > 0"),
    (EXRM, ["--model.init_args.optimizer.init_args.lr", "0"], "optimizer.init_args.lr: expected a finite number > 0"),
    (EXRM, ["--trainer.max_epochs", "0"], "trainer.max_epochs: expected a whole number >= 1, or -1, or null"),
    (EXRM, ["--trainer.max_epochs", "-4"], "trainer.max_epochs: expected a whole number >= 1"),
    (EXRM, ["--trainer.max_steps", "0"], "trainer.max_steps: expected a whole number >= 1, or -1"),
    (EXRM, ["--trainer.max_epochs", "-1", "--trainer.max_steps", "-1"], "trainer.max_epochs: -1 (no limit) needs"),
    (EXRM, ["--trainer.val_check_interval", "0"], "trainer.val_check_interval: expected a whole number >= 1"),
    (EXRM, ["--trainer.val_check_interval", "1.5"], "trainer.val_check_interval: expected a whole number >= 1"),
    (EXRM, ["--trainer.check_val_every_n_epoch", "0"], "trainer.check_val_every_n_epoch: expected a whole number"),
    (EXRM, ["--trainer.limit_train_batches", "0"], "trainer.limit_train_batches: expected a whole number >= 1"),
    (EXRM, ["--trainer.accumulate_grad_batches", "0"], "trainer.accumulate_grad_batches: expected a whole number"),
    (EXRM, ["--model.init_args.backbone", "smollm2-135m-instrct"],
     "cannot load backbone 'smollm2-135m-instrct' (model.init_args.backbone): not a built-in name "
     "(smollm2-135m-instruct, gemma3-270m, tiny-llama, tiny-llama-chat)"),
    (EXRM, ["--ckpt_path", "/no/such/run/last.ckpt"], "ckpt_path: no checkpoint file at /no/such/run/last.ckpt"),
    (EXRM, ["--config", FSDP, "--trainer.devices", "3"],
     "trainer.strategy.init_args.data_parallel_size: 2 must equal the number of processes, "
     "trainer.devices 3 x num_nodes 1 = 3; add --trainer.strategy.init_args.data_parallel_size 3"),
    (EXRM, ["--config", FSDP, "--trainer.strategy.init_args.data_parallel_size", "1",
            "--trainer.strategy.init_args.tensor_parallel_size", "2"],
     "trainer.strategy.init_args.tensor_parallel_size: 2, but rm-lightning shards with FSDP only; add "
     "--trainer.strategy.init_args.data_parallel_size 2 --trainer.strategy.init_args.tensor_parallel_size 1"),
    (str(PROJECT_ROOT / "configs" / "exrm_ultrafeedback.yaml"),
     ["--data.init_args.eval_sets", '{"v1.0": {path: any.jsonl}}'],
     "eval set name 'v1.0' is not allowed: use letters, digits, '_' or '-'"),
    # parser errors: one line naming the option, never the usage
    (EXRM, ["--data.init_args.batch_size", "abc"], "data.init_args.batch_size: Expected a <class 'int'>"),
    (EXRM, ["--trainer.precision", "17"], "trainer.precision: expected one of"),
    (EXRM, ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger"],
     "trainer.logger.init_args: lightning.pytorch.loggers.CSVLogger needs save_dir"),
    (EXRM, ["--data.init_args.batch_sise", "3"], "data.init_args: data_modules.PersonaDataModule has no option"),
    # an eval set's option: the line names the set (it said data.init_args.eval_sets.init_args, of seven sets)
    (str(PROJECT_ROOT / "configs" / "exrm_ultrafeedback.yaml"),
     ["--data.init_args.eval_sets.rewardbench_math.limt", "5"],
     "data.init_args.eval_sets.rewardbench_math: data_modules.EvalSetSource has no option 'limt'"),
    (str(PROJECT_ROOT / "configs" / "exrm_ultrafeedback.yaml"),
     ["--data.init_args.eval_sets.rewardbench_math.tag", "domain_shfit"],
     "data.init_args.eval_sets.rewardbench_math.tag: Expected a typing.Literal"),
    (EXRM, ["--model.init_args.decoder_layout", "stacked"], "model.init_args.decoder_layout: Expected a"),
    # FlexAttention has no backward on a CPU: it was a traceback at the first training step, after the model loaded
    (EXRM, ["--model.init_args.packed_attention", "flex"],
     "model.init_args.packed_attention: flex trains on CUDA only (FlexAttention has no backward on a CPU)"),
    (str(PROJECT_ROOT / "configs" / "exrm_hamcycle.yaml"), ["--data.init_args.edge_prob", "1"],
     "data.init_args.edge_prob: expected a probability in [0, 1) (at 1 every graph is complete), got 1"),
    # a callback's option of the wrong type: not "lightning.Callback has no option" (the union's other class)
    (str(PROJECT_ROOT / "configs" / "imrm_hamcycle.yaml"), ["--trainer.callbacks.init_args.max_new_tokens", "abc"],
     "trainer.callbacks.init_args.max_new_tokens: Expected a <class 'int'>. Got value: abc"),
]


@pytest.mark.parametrize("config, args, message", BAD_SETTINGS, ids=[" ".join(a) for _, a, _ in BAD_SETTINGS])
def test_bad_setting_is_one_line_before_any_model_loads(config, args, message, tmp_path, capsys, no_model_load):
    line = one_error_line(capsys, ["fit", "--config", config, "--config", str(tiny_override(tmp_path)), *args])
    assert message in line
    assert not (tmp_path / "lightning_logs").exists()


def test_predict_on_two_processes_is_one_line_before_any_process_starts(tmp_path, capsys, no_model_load):
    """A DDP run's config.yaml says devices: 2; predict refused only inside each launched process, after loading
    the checkpoint: the line twice, and a run directory left behind holding a copy of the training history."""
    ddp = str(PROJECT_ROOT / "configs" / "trainer" / "ddp.yaml")
    line = one_error_line(capsys, ["predict", "--config", EXRM, "--config", ddp,
                                   "--config", str(tiny_override(tmp_path))])
    assert "predict runs in one process: trainer.devices is 2" in line


def test_a_yaml_typo_is_one_line_naming_the_key(tmp_path, capsys, no_model_load):
    typo = tmp_path / "typo.yaml"
    typo.write_text("trainer:\n  max_epoch: 3\n")
    line = one_error_line(capsys, ["fit", "--config", EXRM, "--config", str(typo)])
    assert "'fit' has no option --trainer.max_epoch" in line


def test_a_misspelt_command_line_option_is_not_taken_for_the_one_it_abbreviates(tmp_path, capsys, no_model_load):
    line = one_error_line(capsys, ["fit", "--config", EXRM, "--config", str(tiny_override(tmp_path)),
                                   "--trainer.max_epoch", "3"])
    assert "unrecognized arguments: --trainer.max_epoch 3" in line.lower()  # jsonargparse capitalizes it in some versions


@pytest.mark.parametrize("kind", ["file", "file_parent"])
def test_a_run_directory_that_cannot_be_a_folder_is_one_line(kind, tmp_path, capsys, no_model_load):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    root = blocker if kind == "file" else blocker / "runs"
    line = one_error_line(capsys, ["fit", "--config", EXRM, "--config", str(tiny_override(tmp_path)),
                                   "--trainer.default_root_dir", str(root)])
    assert line.startswith("error: trainer.default_root_dir:") and "is a file, not a folder" in line
    assert blocker.read_text() == "a file"


@pytest.mark.parametrize("args, message", [
    (["--trainer.strategy", "nosuch"], "error: trainer: You selected an invalid strategy name"),
    (["--trainer.strategy", "fsdp", "--trainer.devices", "2"], "add --config configs/trainer/fsdp.yaml instead"),
])
def test_a_trainer_option_lightning_refuses_is_one_line(args, message, tmp_path, capsys):
    """Lightning checks these when it builds the trainer, after the model; its exception is shown as one line."""
    line = one_error_line(capsys, ["fit", "--config", EXRM, "--config", str(tiny_override(tmp_path)), *args])
    assert message in line


def test_our_own_error_from_building_the_trainer_keeps_its_one_line(tmp_path, capsys, monkeypatch):
    """Only Lightning's refusals get the ``trainer:`` prefix; ours already name their option."""
    def refuse(self, config, callbacks):
        raise SettingError("trainer.devices: refused here")
    monkeypatch.setattr(cli.LightningCLI, "_instantiate_trainer", refuse)
    line = one_error_line(capsys, ["fit", "--config", EXRM, "--config", str(tiny_override(tmp_path))])
    assert line == "error: trainer.devices: refused here"


def test_null_on_the_command_line_is_null_inside_a_dataclass(tmp_path, capsys, no_model_load):
    """``train.path null`` used to become the string "None" (a file name); now both sources are null."""
    line = one_error_line(capsys, ["fit", "--config", str(PROJECT_ROOT / "configs" / "exrm_ultrafeedback.yaml"),
                                   "--config", str(tiny_override(tmp_path)), "--data.init_args.train.path", "null"])
    assert "data.init_args.train: give exactly one of `path` or `hub` (got path=None, hub=None)" in line


def test_a_misspelt_eval_set_name_on_the_command_line_names_the_sets_there_are(tmp_path, capsys, no_model_load):
    """``eval_sets.rewardbench_mth.limit 5`` makes a new set with no source: the line said to set the other of
    path/hub to null, which was no help; it now names the config's sets."""
    line = one_error_line(capsys, ["fit", "--config", str(PROJECT_ROOT / "configs" / "exrm_ultrafeedback.yaml"),
                                   "--config", str(tiny_override(tmp_path)),
                                   "--data.init_args.eval_sets.rewardbench_mth.limit", "5"])
    assert "data.init_args.eval_sets.rewardbench_mth: give exactly one of `path` or `hub` (got path=None" in line
    assert "no set of that name in the config (its sets: ultrafeedback, " in line and "rewardbench_math, " in line


@pytest.mark.parametrize("entry, message", [
    ("held_out: {path: a.jsonl, limt: 5}", "data.init_args.eval_sets.held_out: data_modules.EvalSetSource has no "
                                           "option 'limt'"),
    ("held_out: {path: a.jsonl, tag: domain_shfit}", "data.init_args.eval_sets.held_out.tag: Expected a "
                                                     "typing.Literal"),
])
def test_a_misspelt_option_of_an_eval_set_in_a_config_file_names_the_set(entry, message, tmp_path, capsys,
                                                                        no_model_load):
    """In a file, jsonargparse's keys skip the set's name (data.init_args.eval_sets.init_args): of several sets,
    which one held the typo went unsaid."""
    data = tmp_path / "data.yaml"
    data.write_text("data:\n  class_path: data_modules.RealWorldDataModule\n  init_args:\n    train: {path: t.jsonl}\n"
                    f"    eval_sets:\n      other: {{path: b.jsonl}}\n      {entry}\n")
    line = one_error_line(capsys, ["fit", "--config", EXRM, "--config", str(data),
                                   "--config", str(tiny_override(tmp_path))])
    assert message in line


def test_null_options_are_read_from_both_spellings():
    assert cli.null_options(["fit", "--a.b", "null", "--c=null", "--d", "3", "--e=None"]) == ("a.b", "c", "e")


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "tiny-llama", "HuggingFaceTB/SmolLM2-135M-Instruct",
                                  "org/model.v1_2-x"])
def test_builtin_names_and_hub_ids_pass_the_name_check(name):
    check_backbone_name(name)


@pytest.mark.parametrize("name", ["smollm2", "tiny_llama", "a/b/c", "./missing/model", "", "org/"])
def test_implausible_backbone_names_fail_at_once(name):
    with pytest.raises(BackboneError, match="cannot load backbone|expected a backbone name"):
        check_backbone_name(name)


def test_python_callers_get_the_same_checks():
    from data_modules import PersonaDataModule
    from rm_lightning import ImplicitRM

    with pytest.raises(SettingError, match="data.num_test: expected a whole number >= 1, got 0"):
        PersonaDataModule(num_test=0)
    with pytest.raises(SettingError, match="data.batch_size: expected a whole number >= 1, got -1"):
        PersonaDataModule(batch_size=-1)
    with pytest.raises(SettingError, match="model.beta: expected a finite number > 0, got -1"):
        ImplicitRM(beta=-1, backbone="tiny-llama")


def test_a_folder_is_a_backbone(tmp_path):
    check_backbone_name(str(tmp_path))
    assert Path(tmp_path).is_dir()


def test_a_validation_interval_longer_than_an_epoch_is_one_line_before_the_reference_pass(tmp_path, capsys,
                                                                                          monkeypatch):
    from rm_lightning.models import implicit

    def no_reference_pass(*args, **kwargs):
        raise AssertionError("the reference pass ran before the schedule was checked")
    monkeypatch.setattr(implicit.ImplicitRM, "attach_reference_logps", no_reference_pass)
    line = one_error_line(capsys, ["fit", "--config", IMRM, "--config", str(tiny_override(tmp_path)),
                                   "--data.init_args.num_train", "8", "--trainer.val_check_interval", "5"])
    assert "trainer.val_check_interval: 5 is more than the 2 training batches of an epoch" in line
    assert not list((tmp_path / "lightning_logs").glob("version_*"))


def test_a_run_directory_that_cannot_be_written_is_one_line(tmp_path, capsys, no_model_load, monkeypatch):
    """Read-only folders cannot be made for a test run as root, so the permission answer is given."""
    from rm_lightning import settings

    access = os.access
    monkeypatch.setattr(settings.os, "access", lambda path, mode, **kwargs: False if Path(path) == tmp_path and
                        mode & os.W_OK else access(path, mode, **kwargs))
    line = one_error_line(capsys, ["fit", "--config", EXRM, "--config", str(tiny_override(tmp_path)),
                                   "--trainer.default_root_dir", str(tmp_path / "runs")])
    assert line == f"error: trainer.default_root_dir: {tmp_path / 'runs'} is not writable (in {tmp_path})"
