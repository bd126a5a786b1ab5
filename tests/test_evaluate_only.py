"""Evaluating without training (issue 17, item 2): eval-only data modules, results.json from validate, one table."""

import json
from pathlib import Path

import pytest
import yaml

from conftest import PROJECT_ROOT, tiny_override
from data_modules import RealWorldDataModule
from rm_lightning import ExplicitRM, cli
from rm_lightning.errors import DataError
from test_predict import PAIRS, write_jsonl

TRAINER, EXRM, IMRM = (str(PROJECT_ROOT / f"configs/{name}.yaml") for name in ("trainer/cpu", "model/exrm", "model/imrm"))


def eval_only_data(folder: Path, cadence: str = "") -> Path:
    """A data block with two eval sets of pairs and no training set."""
    pairs = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]
    write_jsonl(folder / "a.jsonl", pairs[:5])
    write_jsonl(folder / "b.jsonl", pairs[5:])
    path = folder / "eval_only.yaml"
    path.write_text("data:\n  class_path: data_modules.RealWorldDataModule\n  init_args:\n    eval_sets:\n"
                    f"      set_a: {{path: {folder / 'a.jsonl'}}}\n"
                    f"      set_b: {{path: {folder / 'b.jsonl'}, tag: domain_shift}}\n" + cadence)
    return path


def results_of(tmp_path: Path) -> dict:
    (path,) = tmp_path.glob("lightning_logs/version_*/results.json")
    return json.loads(path.read_text())


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_validate_and_test_need_no_training_set_and_print_one_table(stage, tmp_path, capsys):
    cli.main([stage, "--config", TRAINER, "--config", EXRM, "--config", str(eval_only_data(tmp_path)),
              "--config", str(tiny_override(tmp_path))])
    results = results_of(tmp_path)
    assert results["stage"] == stage and results["status"] == "finished"
    assert {name: s["num_pairs"] for name, s in results["eval_sets"].items()} == {"set_a": 5, "set_b": 3}
    out = capsys.readouterr().out
    assert out.count(f"{stage} results") == 1  # our table, once, with a row per set
    assert f"{stage} metric".capitalize() not in out  # not Lightning's table per dataloader (its header)
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines() if line.startswith("set_")}
    assert rows == {"set_a": "in_distribution", "set_b": "domain_shift"}


def test_evaluation_evaluates_every_set_whatever_the_fit_cadence(tmp_path):
    # a run's config may name sets (here one that is gone) in eval_every_n_epochs: outside fit it does not apply
    cadence = "    eval_every_n_epochs: {set_a: 5, ultrafeedback_paraphrase: 2}\n"
    cli.main(["validate", "--config", TRAINER, "--config", EXRM, "--config", str(eval_only_data(tmp_path, cadence)),
              "--config", str(tiny_override(tmp_path))])
    assert sorted(results_of(tmp_path)["eval_sets"]) == ["set_a", "set_b"]


def test_fit_without_a_training_set_fails_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--config", TRAINER, "--config", EXRM, "--config", str(eval_only_data(tmp_path)),
                  "--config", str(tiny_override(tmp_path))])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(errors) == 1 and "fit needs a training set" in errors[0]


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_evaluating_sets_that_screening_empties_is_one_line(stage, tmp_path, capsys):
    identical = write_jsonl(tmp_path / "identical.jsonl", [{"prompt": p, "chosen": c, "rejected": c}
                                                           for p, c, _ in PAIRS])
    data = tmp_path / "data.yaml"
    data.write_text("data:\n  class_path: data_modules.RealWorldDataModule\n  init_args:\n    eval_sets:\n"
                    f"      same: {{path: {identical}}}\n")
    with pytest.raises(SystemExit) as exit_info:
        cli.main([stage, "--config", TRAINER, "--config", EXRM, "--config", str(data),
                  "--config", str(tiny_override(tmp_path))])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(errors) == 1 and f"{stage} has nothing to score" in errors[0]


def test_an_eval_set_that_screening_empties_is_named_in_one_warning(tmp_path):
    # fit went on with the set left out of the final table and results.json, and only Lightning's "Total length
    # of `DataLoader` across ranks is zero" said anything; nothing named the set or why it was empty
    pairs = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]
    write_jsonl(tmp_path / "train.jsonl", pairs)
    write_jsonl(tmp_path / "same.jsonl", [{**pair, "rejected": pair["chosen"]} for pair in pairs])
    data = RealWorldDataModule(train={"path": str(tmp_path / "train.jsonl")},
                               eval_sets={"kept": {"path": str(tmp_path / "train.jsonl")},
                                          "same": {"path": str(tmp_path / "same.jsonl")}})
    data.attach(ExplicitRM(backbone="tiny-llama-chat"))
    with pytest.warns(UserWarning, match=r"eval set 'same' is empty: its 8 pairs were dropped \(8 as identical\)"
                                         r"; it is not evaluated") as warned:
        data.setup("fit")
    assert len([w for w in warned if "is empty" in str(w.message)]) == 1


def test_eval_only_data_module_from_python(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS])
    data = RealWorldDataModule(eval_sets={"a": {"path": str(tmp_path / "a.jsonl")}})
    data.attach(ExplicitRM(backbone="tiny-llama-chat"))
    data.setup("test")
    assert data.train_set is None and len(data.eval_sets["a"]) == len(PAIRS)
    with pytest.raises(DataError, match="fit needs a training set"):
        data.setup("fit")


def test_shipped_evaluate_config_scores_the_model_as_imrm_against_itself_at_zero(shared_data, tmp_path):
    # the bundled model's stand-in: an IM-RM whose policy is its reference gives every pair the reward 0,
    # and a tie counts 1/2 (PairwiseAccuracy), so accuracy is exactly 0.5
    cli.main(["test", "--config", str(PROJECT_ROOT / "configs/evaluate_rewardbench_math.yaml"), "--config", IMRM,
              "--config", str(tiny_override(tmp_path, reference_cache_dir=tmp_path / "cache")),
              "--data.init_args.eval_sets.rewardbench_math.limit", "4",
              "--data.init_args.max_prompt_tokens", "96", "--data.init_args.max_response_tokens", "96",
              "--data.init_args.truncate", "true"])
    results = results_of(tmp_path)
    entry = results["eval_sets"]["rewardbench_math"]
    assert results["rm_type"] == "ImplicitRM" and results["config_name"] == "evaluate_rewardbench_math"
    assert entry["shift_tag"] == "token_shift" and entry["num_pairs"] == 4
    assert entry["accuracy"] == 0.5 and entry["chosen_reward"] == entry["rejected_reward"] == entry["margin"] == 0.0


def test_validate_without_a_checkpoint_says_its_steps_are_unknown(tmp_path):
    cli.main(["validate", "--config", TRAINER, "--config", EXRM, "--config", str(eval_only_data(tmp_path)),
              "--config", str(tiny_override(tmp_path))])
    results = results_of(tmp_path)
    assert (results["global_step"], results["epoch"], results["eval_step"], results.get("checkpoint")) == (None,) * 4
    assert "no checkpoint loaded" in results["steps_unknown"]


def test_evaluate_config_after_a_run_config_draws_the_pairs_it_draws_alone(tmp_path, capsys):
    # README: `test --config $RUN/config.yaml --config configs/evaluate_rewardbench_math.yaml`. A Persona run's
    # config holds the Persona module's data_seed (875); stacked, it reached the evaluation's RealWorldDataModule,
    # so a `limit` drew other pairs than for a model evaluated alone, and an UltraFeedback run's truncate: true cut
    # the eval set's texts instead of dropping the long pairs: the same command scored two models on different pairs.
    def resolved(stage: str, *configs: str) -> str:
        with pytest.raises(SystemExit):
            cli.main([stage, *(arg for config in configs for arg in ("--config", config)), "--print_config"])
        return capsys.readouterr().out

    def what_is_evaluated(text: str) -> dict:
        data = yaml.safe_load(text)["data"]["init_args"]
        return {key: data[key] for key in ("eval_sets", "data_seed", "truncate", "eval_max_prompt_tokens",
                                           "eval_max_response_tokens")}

    evaluate = str(PROJECT_ROOT / "configs/evaluate_rewardbench_math.yaml")
    alone = what_is_evaluated(resolved("test", evaluate, EXRM))
    for experiment in ("exrm_persona", "exrm_ultrafeedback"):
        run_config = tmp_path / f"{experiment}.yaml"  # what a run saves: every option resolved
        run_config.write_text(resolved("fit", str(PROJECT_ROOT / f"configs/{experiment}.yaml")))
        assert what_is_evaluated(resolved("test", str(run_config), evaluate)) == alone, experiment
