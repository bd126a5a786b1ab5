"""The paper's Figure 4 as a sweep (issue 18): configs/sweeps/persona_models.yaml, a base config per RM type
(``rm_type_configs``), and the report's Figure 4 layout (mean ± sd over models and seeds)."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from test_report import row, write_result
from test_sweep import TINY_OVERRIDES
from rm_lightning.errors import RMLightningError
from rm_lightning.experiments.report import ALL_MODELS, collect, figure4_rows, write_report
from rm_lightning.experiments.sweep import command, load_grid, main, plan_runs

REPO = Path(__file__).resolve().parent.parent
GRID = REPO / "configs" / "sweeps" / "persona_models.yaml"
CONFIGS = REPO / "configs"
RM_CONFIGS = {"ExplicitRM": CONFIGS / "exrm_persona.yaml", "ImplicitRM": CONFIGS / "imrm_persona.yaml",
              "ExplicitGenerativeRM": CONFIGS / "exgrm_persona.yaml"}
PERSONA_SETS = ("original_train_prompts", "original_test_prompts", "paraphrased_train_prompts",
                "paraphrased_test_prompts")


def _argument(arguments: list[str], option: str) -> str:
    return arguments[arguments.index(option) + 1]


def test_persona_models_expands_to_18_runs_each_from_its_rm_types_config(tmp_path):
    grid = load_grid(GRID)
    runs = plan_runs(grid, tmp_path)
    started_from = Counter((r.rm_type.rpartition(".")[2], Path(_argument(command(r, grid), "--config")))
                           for r in runs)
    assert started_from == {(rm_type, config): 6 for rm_type, config in RM_CONFIGS.items()}


def test_runs_from_another_config_keep_the_experiment_name(tmp_path):
    """Every run of the grid reports as one experiment, so the report pairs EX-GRM and IM-RM runs with EX-RM ones."""
    grid = load_grid(GRID)
    names = {r.directory.relative_to(tmp_path).parts[0] for r in plan_runs(grid, tmp_path)}
    config_names = {_argument(command(r, grid), "--results.config_name") for r in plan_runs(grid, tmp_path)
                    if r.config_file is not None}
    assert names == config_names == {"exrm_persona"}


def test_persona_small_still_starts_every_run_from_its_one_config(tmp_path):
    grid = load_grid(CONFIGS / "sweeps" / "persona_small.yaml")
    arguments = [command(r, grid) for r in plan_runs(grid, tmp_path)]
    assert ({Path(_argument(a, "--config")) for a in arguments}, any("--results.config_name" in a for a in arguments)) \
        == ({RM_CONFIGS["ExplicitRM"]}, False)


@pytest.mark.parametrize("change, message", [
    ({"rm_type_configs": {"rm_lightning.ExplicitGenerativeRM": "nowhere.yaml"}},
     "rm_type_configs.rm_lightning.ExplicitGenerativeRM 'nowhere.yaml' not found"),
    ({"rm_type_configs": {"rm_lightning.OtherRM": str(RM_CONFIGS["ExplicitRM"])}},
     "'rm_type_configs' names 'rm_lightning.OtherRM', which is not in 'rm_types'"),
    ({"configs": [str(RM_CONFIGS["ExplicitRM"]), str(RM_CONFIGS["ImplicitRM"])]},
     "'rm_type_configs' needs exactly one entry in 'configs' \\(got 2\\)"),
])
def test_rm_type_configs_errors_name_the_file_and_key(tmp_path, change, message):
    grid = {**yaml.safe_load(GRID.read_text()), "configs": [str(RM_CONFIGS["ExplicitRM"])], **change}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    with pytest.raises(RMLightningError, match=f"{path}: {message}"):
        load_grid(path)


@pytest.fixture()
def persona_runs(tmp_path: Path) -> Path:
    """Two models x two seeds; ExplicitRM's paraphrased test accuracy is 0.6, 0.8 (model m1) and 0.9, 0.9 (m2)."""
    paraphrased_test = {("m1", 0): 0.6, ("m1", 1): 0.8, ("m2", 0): 0.9, ("m2", 1): 0.9}
    for (model, seed), accuracy in paraphrased_test.items():
        for rm_type, para in (("ExplicitRM", accuracy), ("ImplicitRM", 0.0)):
            eval_sets = {name: ("token_shift" if name.startswith("para") else "in_distribution",
                                para if name == "paraphrased_test_prompts" else 1.0, 1.0) for name in PERSONA_SETS}
            write_result(tmp_path, rm_type, seed, eval_sets, backbone=model)
    return tmp_path


def test_figure4_mean_and_sd_over_models_and_seeds(persona_runs):
    cell = row(figure4_rows(collect(persona_runs)), backbone=ALL_MODELS, rm_type="ExplicitRM", prompts="test",
               responses="paraphrased")
    assert (cell["runs"], cell["mean_accuracy"], cell["sd_accuracy"]) == (4, pytest.approx(0.8),
                                                                         pytest.approx(0.1414214, abs=1e-6))


def test_figure4_per_model_is_over_its_seeds(persona_runs):
    cell = row(figure4_rows(collect(persona_runs)), backbone="m1", rm_type="ExplicitRM", eval_set="paraphrased_test_prompts")
    assert (cell["runs"], cell["mean_accuracy"], cell["sd_accuracy"]) == (2, pytest.approx(0.7),
                                                                         pytest.approx(0.1414214, abs=1e-6))


def test_figure4_table_in_the_report(persona_runs):
    text = write_report(collect(persona_runs), persona_runs / "out")["markdown"].read_text()
    assert ("| RM type | train prompts, original | train prompts, paraphrased | test prompts, original "
            "| test prompts, paraphrased |\n|---|---|---|---|---|\n"
            "| ExplicitRM | 1.000 ± 0.000 (4) | 1.000 ± 0.000 (4) | 1.000 ± 0.000 (4) | 0.800 ± 0.141 (4) |") in text


def test_figure4_csv_and_png_are_written(persona_runs):
    paths = write_report(collect(persona_runs), persona_runs / "out")
    rows = list(csv.DictReader(paths["figure4_csv"].open()))
    assert (len(rows), paths["figure4_png"].read_bytes()[:8]) == (3 * 2 * 4, b"\x89PNG\r\n\x1a\n")  # (all, m1, m2)


def test_no_figure4_without_the_persona_eval_sets(tmp_path):
    write_result(tmp_path, "ExplicitRM", 0, {"para": ("token_shift", 0.9, 1.0)})
    assert "figure4_png" not in write_report(collect(tmp_path), tmp_path / "out")


def test_a_reused_report_folder_keeps_no_earlier_figure4(persona_runs, tmp_path):
    out = tmp_path / "out"
    write_report(collect(persona_runs), out)
    other = tmp_path / "other_runs"
    write_result(other, "ExplicitRM", 0, {"para": ("token_shift", 0.9, 1.0)})
    write_report(collect(other), out)
    assert not list(out.glob("figure4.*"))


@pytest.mark.slow
def test_tiny_persona_models_sweep_reports_figure4(tmp_path, monkeypatch, capsys):
    """The shipped grid with tiny backbones, one seed, a few pairs: every RM type runs from its own config,
    reports under the experiment's name, and the report draws Figure 4."""
    monkeypatch.setenv("RM_LIGHTNING_CACHE", str(tmp_path / "cache"))
    grid = {**yaml.safe_load(GRID.read_text()), "backbones": ["tiny-llama-chat"], "seeds": [0],
            "configs": [str(RM_CONFIGS["ExplicitRM"])],
            "rm_type_configs": {f"rm_lightning.{rm}": str(path) for rm, path in RM_CONFIGS.items() if rm != "ExplicitRM"}}
    grid["overrides"] = grid["overrides"] + TINY_OVERRIDES
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    out = tmp_path / "sweep"
    assert main([str(path), "--out", str(out)]) == 0
    records = [json.loads(p.read_text()) for p in sorted(out.rglob("results.json"))]
    assert sorted((r["rm_type"], r["config_name"], Path(r["config_files"][-1]).name) for r in records) == [
        ("ExplicitGenerativeRM", "exrm_persona", "exgrm_persona.yaml"), ("ExplicitRM", "exrm_persona", "exrm_persona.yaml"),
        ("ImplicitRM", "exrm_persona", "imrm_persona.yaml")]
    paths = write_report(collect(out), tmp_path / "report")
    assert len(list(csv.DictReader(paths["figure4_csv"].open()))) == 2 * 3 * 4  # (all models, the one model)
