"""The generation check per epoch (issue 18): when it runs, which prompts, where its rates land, bad options,
and that it generates from the prompt the reward model sees."""

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from tokenizers.processors import TemplateProcessing

from conftest import PROJECT_ROOT
from data_modules.hamiltonian import EXTRA_TOKENS, HamiltonianCycleDataModule
from rm_lightning import ImplicitRM, cli
from rm_lightning.callbacks import GenerationCheck, ResultsWriter
from rm_lightning.callbacks.generation_check import encode_prefix
from rm_lightning.errors import SettingError
from rm_lightning.settings import check_config

# 6-vertex graphs, 8 training pairs in batches of 4: two optimizer steps an epoch
DATA = dict(num_vertices=6, num_train=8, num_test=5, data_seed=3, batch_size=4, eval_batch_size=8)


pytestmark = pytest.mark.usefixtures("single_thread")


def fit(root, max_epochs: int, ckpt_path=None, **check_options):
    """A tiny IM-RM fit on Hamiltonian graphs with a generation check; returns (check, trainer, run directory)."""
    module = ImplicitRM(backbone="tiny-llama-chat", extra_tokens=list(EXTRA_TOKENS), reference_cache_dir=str(root))
    datamodule = HamiltonianCycleDataModule(**DATA).attach(module)
    check = GenerationCheck(**{"max_new_tokens": 4, "batch_size": 8, **check_options})
    logger = CSVLogger(save_dir=str(root))
    trainer = L.Trainer(accelerator="cpu", max_epochs=max_epochs, logger=logger, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[ResultsWriter(), check])
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return check, trainer, logger.log_dir


@pytest.fixture(scope="module")
def every_second_epoch(tmp_path_factory):
    """Three epochs, a check every second one: at the end of epoch 2 and at the end of fit (epoch 3)."""
    return fit(tmp_path_factory.mktemp("every_second"), max_epochs=3, every_n_epochs=2, max_prompts="all")


def test_checks_at_every_nth_epoch_and_at_the_end_of_fit(every_second_epoch):
    check, _, _ = every_second_epoch
    assert [(c["epoch"], c["step"], c["trigger"]) for c in check.history] == [(2, 4, "epoch_end"), (3, 6, "fit_end")]


def test_the_end_of_fit_does_not_repeat_the_last_epochs_check(tmp_path):
    check, _, _ = fit(tmp_path, max_epochs=2, every_n_epochs=1, max_prompts=2)
    assert [c["epoch"] for c in check.history] == [1, 2]


def test_every_n_epochs_zero_checks_only_at_the_end_of_fit(tmp_path):
    check, _, _ = fit(tmp_path, max_epochs=2, every_n_epochs=0, max_prompts=2)
    assert [(c["epoch"], c["trigger"]) for c in check.history] == [(2, "fit_end")]


def test_all_checks_every_train_and_test_prompt(every_second_epoch):
    check, _, _ = every_second_epoch
    assert all(c["total"] == {"train": DATA["num_train"], "test": DATA["num_test"]} for c in check.history)


def test_a_number_checks_the_first_prompts_of_each_split():
    assert GenerationCheck(max_prompts=2).chosen_prompts({"train": list("abc"), "test": ["x"]}) == \
        {"train": ["a", "b"], "test": ["x"]}


def test_results_json_keeps_the_correct_rate_of_every_epoch(every_second_epoch):
    check, _, log_dir = every_second_epoch
    results = json.loads((Path(log_dir) / "results.json").read_text())
    assert [(c["epoch"], c["rates"]) for c in results["generation_check"]["history"]] == \
        [(c["epoch"], c["rates"]) for c in check.history]


def test_the_loggers_get_the_correct_rates_at_each_checks_step(every_second_epoch):
    check, _, log_dir = every_second_epoch
    with open(f"{log_dir}/metrics.csv") as file:
        rows = [row for row in csv.DictReader(file) if row.get("gen/test_correct_rate")]
    assert [(int(row["step"]), float(row["gen/test_correct_rate"]), float(row["gen/epoch"])) for row in rows] == \
        [(c["step"], c["rates"]["test"], c["epoch"]) for c in check.history]


def test_the_plot_of_correct_rate_against_epochs_is_written(every_second_epoch):
    _, _, log_dir = every_second_epoch
    assert (Path(log_dir) / "generation_check.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_resumed_fit_continues_the_history(tmp_path):
    _, first, _ = fit(tmp_path / "first", max_epochs=1, max_prompts=1)
    first.save_checkpoint(tmp_path / "epoch1.ckpt")
    check, _, _ = fit(tmp_path / "resumed", max_epochs=2, ckpt_path=tmp_path / "epoch1.ckpt", max_prompts=1)
    assert [c["epoch"] for c in check.history] == [1, 2]


# --- bad values: one line naming the option and what it may be -----------------------------------------------

BAD_VALUES = [("max_prompts", "some", "GenerationCheck.max_prompts: expected a whole number >= 1 or 'all', got 'some'"),
              ("max_prompts", 0, "GenerationCheck.max_prompts: expected a whole number >= 1 or 'all', got 0"),
              ("every_n_epochs", -1, "GenerationCheck.every_n_epochs: expected a whole number >= 0, got -1"),
              ("max_new_tokens", 0, "GenerationCheck.max_new_tokens: expected a whole number >= 1, got 0")]


@pytest.mark.parametrize("option, value, message", BAD_VALUES)
def test_a_bad_option_value_is_one_line_naming_it_and_its_range(option, value, message):
    with pytest.raises(SettingError) as raised:
        GenerationCheck(**{option: value})
    assert str(raised.value) == message


def test_the_cli_refuses_a_bad_value_before_any_model_loads(capsys, monkeypatch):
    def no_model_yet(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr("rm_lightning.models.reward_module.load_backbone", no_model_yet)
    with pytest.raises(SystemExit) as exited:
        cli.main(["fit", "--config", str(PROJECT_ROOT / "configs" / "imrm_hamcycle.yaml"),
                  "--trainer.callbacks.init_args.every_n_epochs", "-2"])
    assert (exited.value.code, capsys.readouterr().err.strip()) == \
        (2, "error: GenerationCheck.every_n_epochs: expected a whole number >= 0, got -2")


def test_the_config_check_covers_the_configured_generation_check():
    callbacks = [{"class_path": "rm_lightning.callbacks.GenerationCheck", "init_args": {"max_prompts": -5}}]
    with pytest.raises(SettingError, match=r"^GenerationCheck.max_prompts: expected a whole number >= 1 or 'all'"):
        check_config({"trainer": {"callbacks": callbacks}})


# --- the prompt the policy generates from is the one the reward model sees -----------------------------------


@pytest.mark.parametrize("base_format", ["authors", "plain"])
def test_generation_prompt_is_the_pair_encodings_prefix_for_a_base_model(base_format):
    module = ImplicitRM(backbone="tiny-llama", base_format=base_format)
    bos = module.tokenizer.bos_token
    # a tokenizer that puts BOS first when asked for special tokens, as Llama's and Pythia's do
    module.tokenizer._tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, module.tokenizer.bos_token_id)])
    ids, start = module.pair_encoder().encode_response("Is 7 prime?", "yes")
    assert encode_prefix(module, "Is 7 prime?") == ids[:start]
