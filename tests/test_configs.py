"""Composable configs: every experiment resolves to the settings it had before the split into blocks,
twins differ only in their model, and ``compose:`` merges like ``--config`` given several times."""

import inspect
from pathlib import Path

import pytest
import yaml
from lightning.pytorch import Trainer

from conftest import PROJECT_ROOT
from rm_lightning import cli
from rm_lightning.cli import expand_composed_configs, first_experiment_name, with_run_defaults
from rm_lightning.errors import RMLightningError

CONFIGS = PROJECT_ROOT / "configs"
SNAPSHOTS = Path(__file__).parent / "fixtures" / "resolved_configs_6723d7e"
# evaluate_*.yaml have no model on purpose (the RM type is given after them): tests/test_evaluate_only.py
EXPERIMENTS = sorted(path.stem for path in CONFIGS.glob("*.yaml") if not path.stem.startswith("evaluate_"))
SNAPSHOTTED = sorted(path.stem for path in SNAPSHOTS.glob("*.yaml") if "+" not in path.stem)
# the snapshots' top-level keys that are arguments of ``Trainer.fit`` (its sections aside)
FIT_ARGUMENTS = ("ckpt_path", "weights_only")
# what the module's default optimizer, ``adam_1e5``, is: the configs before the split spelled it out
DEFAULT_OPTIMIZER = "rm_lightning.models.reward_module.adam_1e5"
ADAM_1E5 = {"class_path": "torch.optim.Adam", "init_args": {
    "lr": 1.0e-05, "betas": [0.9, 0.999], "eps": 1.0e-08, "weight_decay": 0.0, "amsgrad": False, "foreach": None,
    "maximize": False, "capturable": False, "differentiable": False, "fused": True, "decoupled_weight_decay": False}}


def resolve(capsys, *configs: Path) -> dict:
    arguments = ["fit"] + [arg for config in configs for arg in ("--config", str(config))] + ["--print_config"]
    with pytest.raises(SystemExit) as exited:
        cli.main(arguments)
    assert exited.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


# options added since 6723d7e, at the value that keeps the behaviour of then (packed attention was grouped
# unless an environment variable said otherwise)
ADDED = {"model": {"packed_attention": "grouped", "trainable": "all", "token_budget": None, "memory_limit": None,
                   "center_rewards_coefficient": None, "label_smoothing": 0.0, "lora": None},
         "data": {"response_format": "sentence", "invalid_pairs": "drop"}}
ADDED["model"]["reference_backbone"] = None  # issue 17: an IM-RM's reference model (null: the initial weights)
ADDED["model"]["base_format"] = "authors"  # issue 18: base models only; the bundled model has its own template
ADDED["data"]["cache_tokenized"] = True  # issue 20: tokenized sets kept on disk (the same ids, read back)
# issue 18: the real-world data blocks evaluate 200 training pairs, and cap their eval sets explicitly (the
# training caps no longer apply to them); the RewardMATH runs meet the UltraFeedback variants as domain shifts
REAL_WORLD = {"train_sample": 200, "eval_max_prompt_tokens": 128, "eval_max_response_tokens": 128}
ULTRAFEEDBACK_VARIANTS = ["ultrafeedback_paraphrase", "ultrafeedback_translate_french", "ultrafeedback_translate_spanish"]
# options set on purpose since then, per experiment: the UltraFeedback runs size their micro-batches to the
# machine's memory (a batch that fits runs whole, so what they compute is unchanged)
CHANGED = {"exrm_ultrafeedback": {"model": {"token_budget": "auto"}, "data": REAL_WORLD},
           "imrm_ultrafeedback": {"model": {"token_budget": "auto"}, "data": REAL_WORLD},
           "exrm_rewardmath": {"data": REAL_WORLD}, "imrm_rewardmath": {"data": REAL_WORLD}}


# pair-source options added since (issue 17: any dataset; an eval set of single responses), at the defaults
# that read files as before
SOURCE_ADDED = {"subset": None, "columns": None, "format": "auto", "kind": "pairs",  # kind: eval sets only
                "max_prompt_tokens": None, "max_response_tokens": None}  # issue 18: an eval set's own caps


def as_before(resolved: dict, experiment: str) -> dict:
    """Today's resolved config in the terms of 6723d7e: the options added since at the behaviour they
    replace, results named after the first config file, and the default optimizer as the Adam it is."""
    for group, options in CHANGED.get(experiment, {}).items():
        for name, value in options.items():
            assert resolved[group]["init_args"].pop(name) == value, (experiment, group, name)
    for group, options in ADDED.items():
        for name, value in options.items():
            assert resolved[group]["init_args"].pop(name, value) == value, (group, name)
    data = resolved["data"]["init_args"]
    if resolved["data"]["class_path"] == "data_modules.PersonaDataModule":  # issue 20: eval batches of 64 pairs
        assert data["eval_batch_size"] == 64
        data["eval_batch_size"] = 32
    if experiment.endswith("_rewardmath"):
        for name in ULTRAFEEDBACK_VARIANTS:
            added = data["eval_sets"].pop(name)
            assert (added["path"], added["tag"], added["limit"]) == (f"{name}/test.jsonl", "domain_shift", 32)
    sources = [data["train"]] if isinstance(data.get("train"), dict) else []
    for source in sources + list(data.get("eval_sets", {}).values()):
        for name, value in SOURCE_ADDED.items():
            assert source.pop(name, value) == value, ("data source", name)
    # issue 18: the generation check takes one prompt count for both splits (max_prompts) and may run every n-th
    # epoch; the CPU config keeps its one check at the end of fit on 40 train and 40 test prompts
    for callback in resolved["trainer"].get("callbacks") or []:
        if callback["class_path"].endswith("GenerationCheck"):
            options = callback["init_args"]
            assert options.pop("every_n_epochs") == 0
            options["num_train_prompts"] = options["num_test_prompts"] = options.pop("max_prompts")
    model = resolved["model"]["init_args"]
    assert resolved["results"].pop("config_name") == experiment
    if resolved["model"]["class_path"] == "rm_lightning.ImplicitRM":  # issue 17: the IM-RM's loss choice
        assert model.pop("loss") == "bt"
    # issue 16: every shipped run keeps checkpoints/last.ckpt (before, only the DDP/FSDP overlays kept a checkpoint)
    assert resolved["trainer"].pop("enable_checkpointing") is True
    # issue 17: every trainer block picks its precision from the machine (32-true or bf16-mixed before)
    assert resolved["trainer"].pop("precision") == "auto"
    # issue 17: the margin history evaluates once before the first step (a point at step 0)
    assert resolved["margin_history"].pop("validate_at_start") is True
    # issue 20: last.ckpt at the end of fit and at an epoch's end at most every 10 minutes (before: every epoch)
    assert resolved.pop("last_checkpoint") == {"every_minutes": 10.0}
    if model["optimizer"] == DEFAULT_OPTIMIZER:
        model["optimizer"] = ADAM_1E5
    return resolved


def without_options_lightning_lacks(before: dict) -> dict:
    """A snapshot less the Trainer's and ``fit``'s arguments that the installed Lightning does not have: a
    resolved config lists every one at its default, and the snapshots were resolved with a newer Lightning."""
    trainer_options = inspect.signature(Trainer.__init__).parameters
    fit_options = inspect.signature(Trainer.fit).parameters
    before["trainer"] = {key: value for key, value in before["trainer"].items() if key in trainer_options}
    return {key: value for key, value in before.items() if key in fit_options or key not in FIT_ARGUMENTS}


def snapshot(name: str) -> dict:
    before = without_options_lightning_lacks(yaml.safe_load((SNAPSHOTS / f"{name}.yaml").read_text()))
    # an option removed since: rewards never depended on it
    assert before["model"]["init_args"].pop("padding_side") == "right"
    before["trainer"].pop("enable_checkpointing")
    assert before["trainer"].pop("precision") in ("32-true", "bf16-mixed")
    return before


@pytest.mark.parametrize("experiment", sorted(set(EXPERIMENTS) - set(SNAPSHOTTED)))  # the others: below
def test_every_experiment_resolves(experiment, capsys):
    resolved = resolve(capsys, CONFIGS / f"{experiment}.yaml")
    assert resolved["model"]["class_path"].startswith("rm_lightning.") and resolved["data"]["class_path"]


@pytest.mark.parametrize("experiment", SNAPSHOTTED)
def test_experiment_resolves_to_its_settings_before_the_split(experiment, capsys):
    assert as_before(resolve(capsys, CONFIGS / f"{experiment}.yaml"), experiment) == snapshot(experiment)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_strategy_overlay_resolves_as_before(strategy, capsys):
    resolved = resolve(capsys, CONFIGS / "imrm_persona.yaml", CONFIGS / "trainer" / f"{strategy}.yaml")
    if strategy == "ddp":  # off since an EX-RM freezes the untied LM head its reward never reads
        options = resolved["trainer"]["strategy"]["init_args"]
        assert options["find_unused_parameters"] is False
        options["find_unused_parameters"] = True
    assert as_before(resolved, "imrm_persona") == snapshot(f"imrm_persona+{strategy}")


def without_model_and_comments(path: Path) -> dict:
    config = yaml.safe_load(path.read_text())
    config["compose"] = [entry for entry in config["compose"] if not entry.startswith("model/")]
    return config


@pytest.mark.parametrize("experiment", ["persona", "hamcycle", "ultrafeedback", "rewardmath", "ultrafeedback_full"])
def test_twins_differ_only_in_the_model_they_name(experiment):
    twins = sorted(path for path in CONFIGS.glob(f"*rm_{experiment}.yaml") if "_" not in path.stem.split("rm_")[0])
    assert len(twins) >= 2
    models = [next(e for e in yaml.safe_load(t.read_text())["compose"] if e.startswith("model/")) for t in twins]
    assert len(set(models)) == len(twins)
    shared = [without_model_and_comments(t) for t in twins]
    if experiment == "hamcycle":  # the IM-RM's generation check: its policy is what it would generate with
        imrm = twins.index(CONFIGS / "imrm_hamcycle.yaml")
        callbacks = shared[imrm]["trainer"].pop("callbacks")
        assert [c["class_path"] for c in callbacks] == ["rm_lightning.callbacks.GenerationCheck"]
    assert all(config == shared[0] for config in shared)


def test_theorem2_twins_differ_in_the_model_and_in_what_the_ex_rm_half_of_the_theorem_needs():
    exrm, imrm = (without_model_and_comments(CONFIGS / f"theorem2_{t}_persona.yaml") for t in ("exrm", "imrm"))
    ex_model, im_model = exrm.pop("model")["init_args"], imrm.pop("model")["init_args"]
    assert exrm.pop("trainer")["max_epochs"] > imrm.pop("trainer")["max_epochs"]
    assert exrm == imrm
    assert ex_model.pop("head_init") == "zeros" and ex_model["optimizer"]["class_path"] == "torch.optim.SGD"
    assert ex_model["trainable"] == im_model["trainable"] == "output_layer"
    assert ex_model["optimizer"]["init_args"]["weight_decay"] == im_model["optimizer"]["init_args"]["weight_decay"] == 0


def test_dynamics_configs_are_the_persona_experiments_with_the_monitor():
    for rm in ("exrm", "imrm"):
        composed = yaml.safe_load((CONFIGS / f"dynamics_{rm}_persona.yaml").read_text())
        assert composed == {"compose": [f"{rm}_persona.yaml", "callbacks/dynamics.yaml"]}


def test_compose_is_never_written_back(capsys, tmp_path):
    printed = resolve(capsys, CONFIGS / "exrm_persona.yaml")
    assert "compose" not in printed


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_composed_files_merge_in_order_before_the_file_itself(tmp_path, capsys):
    write(tmp_path / "blocks" / "model.yaml", "model: {class_path: rm_lightning.ImplicitRM, init_args: {beta: 0.2}}\n")
    write(tmp_path / "blocks" / "more.yaml", "model: {init_args: {beta: 0.3, backbone: tiny-llama}}\n")
    experiment = write(tmp_path / "exp.yaml", "compose: [blocks/model.yaml, blocks/more.yaml]\n"
                                              "model: {init_args: {logprob_chunk_size: 7}}\n")
    assert expand_composed_configs(["fit", "--config", str(experiment)]) == [
        "fit", "--config", str(tmp_path / "blocks" / "model.yaml"), "--config", str(tmp_path / "blocks" / "more.yaml"),
        "--config", str(experiment)]
    model = resolve(capsys, experiment)["model"]
    assert model["class_path"] == "rm_lightning.ImplicitRM"
    assert (model["init_args"]["beta"], model["init_args"]["backbone"]) == (0.3, "tiny-llama")
    assert model["init_args"]["logprob_chunk_size"] == 7


def test_a_run_is_named_after_its_first_experiment_config(tmp_path):
    block = write(tmp_path / "trainer" / "cpu.yaml", "trainer: {devices: 1}\n")
    experiment = write(tmp_path / "my_run.yaml", "compose: [trainer/cpu.yaml]\n")
    overlay = write(tmp_path / "overlay.yaml", "trainer: {max_epochs: 1}\n")
    args = expand_composed_configs(["fit", "--config", str(experiment), "--config", str(overlay)])
    assert first_experiment_name(args) == "my_run" and args[2] == str(block)
    assert with_run_defaults(args)[:5] == ["fit", "--trainer.default_root_dir", str(Path("runs") / "my_run"),
                                           "--results.config_name", "my_run"]
    assert with_run_defaults(["fit", "--help"]) == ["fit", "--help"]


@pytest.mark.parametrize("compose, message", [
    ("[missing.yaml]", "'compose' names 'missing.yaml', but"),
    ("{a: 1}", "'compose' must be a list of config file paths"),
    ("[exp.yaml]", "includes"),
])
def test_bad_compose_ends_in_one_line(tmp_path, capsys, compose, message):
    experiment = write(tmp_path / "exp.yaml", f"compose: {compose}\n")
    with pytest.raises(RMLightningError, match=message):
        expand_composed_configs(["fit", "--config", str(experiment)])
    with pytest.raises(SystemExit) as exited:
        cli.main(["fit", "--config", str(experiment)])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(experiment) in err[0]


def test_a_key_given_twice_in_one_config_file_ends_in_one_line_naming_it(tmp_path, capsys):
    # YAML keeps the last of two equal keys: a second `held_out:` eval set replaced the first without a word
    data = write(tmp_path / "data.yaml", "data:\n  class_path: data_modules.RealWorldDataModule\n  init_args:\n"
                                         "    eval_sets:\n      held_out: {path: a.jsonl}\n"
                                         "      other: {path: b.jsonl}\n      held_out: {path: c.jsonl}\n")
    with pytest.raises(SystemExit) as exited:
        cli.main(["fit", "--config", str(CONFIGS / "exrm_persona.yaml"), "--config", str(data), "--print_config"])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {data}:7: key 'held_out' given twice in one mapping (first on line 5); YAML would keep "
                   f"only the last"]


def test_ultrafeedback_full_uses_every_pair_and_stops_at_a_plateau(capsys):
    resolved = resolve(capsys, CONFIGS / "exrm_ultrafeedback_full.yaml")
    data = resolved["data"]["init_args"]
    limits = [data["train"]["limit"]] + [source["limit"] for source in data["eval_sets"].values()]
    caps = (data["max_prompt_tokens"], data["max_response_tokens"], data["truncate"],
            data["eval_max_prompt_tokens"], data["eval_max_response_tokens"], data["train_sample"])
    callbacks = [callback["class_path"] for callback in resolved["trainer"]["callbacks"]]
    assert (set(limits), caps, callbacks, len(data["eval_sets"])) == (
        {None}, (512, 512, False, None, None, 200), ["rm_lightning.callbacks.TrainingPlateau"], 7)


def test_the_callbacks_files_add_to_an_experiment_s_own_callbacks(capsys):
    resolved = resolve(capsys, CONFIGS / "imrm_hamcycle.yaml", CONFIGS / "callbacks" / "training_plateau.yaml",
                       CONFIGS / "callbacks" / "dynamics.yaml")
    assert [callback["class_path"] for callback in resolved["trainer"]["callbacks"]] == [
        "rm_lightning.callbacks.GenerationCheck", "rm_lightning.callbacks.TrainingPlateau",
        "rm_lightning.dynamics.DynamicsMonitor"]


def test_ultrafeedback_full_sweep_runs_both_rm_types_from_their_configs_over_three_seeds(tmp_path):
    from rm_lightning.experiments.sweep import command, load_grid, plan_runs

    grid = load_grid(CONFIGS / "sweeps" / "ultrafeedback_full.yaml")
    started_from = set()
    for run in plan_runs(grid, tmp_path):
        arguments = command(run, grid)
        started_from.add((run.rm_type, run.seed, Path(arguments[arguments.index("--config") + 1]).name))
    assert started_from == {(f"rm_lightning.{rm_type}", seed, f"{prefix}_ultrafeedback_full.yaml") for seed in (0, 1, 2)
                            for rm_type, prefix in (("ExplicitRM", "exrm"), ("ImplicitRM", "imrm"))}
