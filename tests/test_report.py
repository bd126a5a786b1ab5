"""Report arithmetic on hand-written results.json files: means and spread over seeds, win rates, ties, groups by
training data, errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from rm_lightning.errors import RMLightningError
from rm_lightning.experiments.report import (collect, compare, main, mean_rows, overall_win_rates, pairwise_win_rates,
                                 write_report)


def write_result(root: Path, rm_type: str, seed: int, eval_sets: dict[str, tuple],
                 config: str = "persona", backbone: str = "tiny", status: str = "finished",
                 train_path: str | None = None, epochs: int | None = None, stage: str = "fit") -> Path:
    """eval_sets: name -> (shift tag, accuracy, normalized margin[, signed normalized margin]); ``train_path``:
    the training file of a RealWorldDataModule run (else a PersonaDataModule run)."""
    path = root / config / rm_type / backbone / f"seed{seed}" / "results.json"
    path.parent.mkdir(parents=True)
    module = "RealWorldDataModule" if train_path else "PersonaDataModule"
    data = {"class_path": f"data_modules.{module}", "init_args": {"train": {"path": train_path}} if train_path else {}}
    path.write_text(json.dumps({
        "status": status, "stage": stage, "rm_type": rm_type, "backbone": backbone, "config_name": config, "seed": seed,
        "global_step": 10, "datamodule": module, "config": {"data": data},
        **({"epoch": epochs} if epochs is not None else {}),
        "eval_sets": {name: {"shift_tag": values[0], "accuracy": values[1], "normalized_margin": values[2],
                             "loss": 0.5, **({"signed_normalized_margin": values[3]} if len(values) > 3 else {})}
                      for name, values in eval_sets.items()},
    }))
    return path


def row(rows: list[dict], **match) -> dict:
    found = [r for r in rows if all(r[k] == v for k, v in match.items())]
    assert len(found) == 1, (match, rows)
    return found[0]


@pytest.fixture()
def two_types(tmp_path: Path) -> Path:
    """EX vs IM over two seeds; token-shift accuracies chosen to hit every win/tie case."""
    write_result(tmp_path, "ExplicitRM", 0, {"orig": ("in_distribution", 1.0, 2.0), "para": ("token_shift", 0.80, 1.0)})
    write_result(tmp_path, "ImplicitRM", 0, {"orig": ("in_distribution", 0.9, 1.0), "para": ("token_shift", 0.60, 0.5)})
    write_result(tmp_path, "ExplicitRM", 1, {"orig": ("in_distribution", 0.8, 3.0), "para": ("token_shift", 0.75, 0.0)})
    write_result(tmp_path, "ImplicitRM", 1, {"orig": ("in_distribution", 0.6, 2.0), "para": ("token_shift", 0.76, 1.5)})
    return tmp_path


def test_means_per_rm_type_and_shift_tag(two_types):
    means = mean_rows(collect(two_types))
    ex_id = row(means, rm_type="ExplicitRM", shift_tag="in_distribution")
    assert ex_id["evaluations"] == 2
    assert ex_id["mean_accuracy"] == pytest.approx(0.9)
    assert ex_id["mean_normalized_margin"] == pytest.approx(2.5)
    im_ts = row(means, rm_type="ImplicitRM", shift_tag="token_shift")
    assert im_ts["mean_accuracy"] == pytest.approx(0.68)
    assert im_ts["mean_normalized_margin"] == pytest.approx(1.0)
    assert im_ts["sd_accuracy"] == pytest.approx(0.1131371, abs=1e-6)
    assert [r["shift_tag"] for r in means[:2]] == ["in_distribution", "token_shift"]


def test_ties_within_one_point_inclusive():
    assert compare(0.76, 0.75, 1.0) == 0  # exactly 1 pp, despite 0.76 - 0.75 > 0.01 in floating point
    assert compare(0.50, 0.51, 1.0) == 0
    assert compare(0.29, 0.30, 1.0) == 0
    assert compare(0.7601, 0.75, 1.0) == 1
    assert compare(0.50, 0.5101, 1.0) == -1
    assert compare(0.50, 0.505, 0.0) == -1
    assert compare(0.50, 0.50, 0.0) == 0


def test_two_type_win_rates(two_types):
    collection = collect(two_types)
    pairwise = pairwise_win_rates(collection)
    in_dist = row(pairwise, shift_tag="in_distribution")
    assert (in_dist["rm_type_a"], in_dist["rm_type_b"], in_dist["evaluations"]) == ("ExplicitRM", "ImplicitRM", 2)
    assert (in_dist["a_win_rate"], in_dist["b_win_rate"], in_dist["tie_rate"]) == (1.0, 0.0, 0.0)
    token = row(pairwise, shift_tag="token_shift")
    assert (token["a_win_rate"], token["b_win_rate"], token["tie_rate"]) == (0.5, 0.0, 0.5)  # 0.75 vs 0.76 ties
    overall = row(overall_win_rates(collection), shift_tag="token_shift")
    assert overall["win_rates"] == {"ExplicitRM": 0.5, "ImplicitRM": 0.0} and overall["tie_rate"] == 0.5
    assert overall["shared_first_rates"] == {"ExplicitRM": 0.5, "ImplicitRM": 0.5}


def test_three_rm_types_pairwise_and_outright_wins(tmp_path):
    # eval a: A 0.9, B 0.5, C 0.895 -> A and C tie for best; eval b: C best by 5 pp; eval c: only A and B ran.
    write_result(tmp_path, "A", 0, {"a": ("domain_shift", 0.9, 1.0), "b": ("domain_shift", 0.6, 1.0)})
    write_result(tmp_path, "B", 0, {"a": ("domain_shift", 0.5, 1.0), "b": ("domain_shift", 0.7, 1.0)})
    write_result(tmp_path, "C", 0, {"a": ("domain_shift", 0.895, 1.0), "b": ("domain_shift", 0.75, 1.0)})
    write_result(tmp_path, "A", 1, {"a": ("domain_shift", 0.4, 1.0)})
    write_result(tmp_path, "B", 1, {"a": ("domain_shift", 0.3, 1.0)})
    collection = collect(tmp_path)
    assert collection.rm_types == ["A", "B", "C"]
    pairwise = pairwise_win_rates(collection)
    assert len(pairwise) == 3
    ab = row(pairwise, rm_type_a="A", rm_type_b="B")
    assert ab["evaluations"] == 3 and ab["a_win_rate"] == pytest.approx(2 / 3) and ab["b_win_rate"] == pytest.approx(1 / 3)
    ac = row(pairwise, rm_type_a="A", rm_type_b="C")
    assert (ac["evaluations"], ac["a_win_rate"], ac["b_win_rate"], ac["tie_rate"]) == (2, 0.0, 0.5, 0.5)
    overall = row(overall_win_rates(collection), shift_tag="domain_shift")
    assert overall["evaluations"] == 2  # the evaluation without C is not shared by every type
    assert overall["win_rates"] == {"A": 0.0, "B": 0.0, "C": 0.5} and overall["tie_rate"] == 0.5
    # eval a: A and C share first place, B is not in it
    assert overall["shared_first_rates"] == {"A": 0.5, "B": 0.0, "C": 0.5}
    text = (write_report(collection, tmp_path / "report")["markdown"]).read_text()
    assert "| domain_shift | 2 | 0.0% / 50.0% | 0.0% / 0.0% | 50.0% / 50.0% | 50.0% |" in text


def test_report_files(two_types, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    paths = write_report(collect(two_types), out, title="demo")
    assert {p.name for p in out.iterdir()} == {"report.md", "report.csv", "win_rates.csv", "runs.csv", "report.png"}
    summary = list(csv.DictReader(paths["summary_csv"].open()))
    ex_token = row(summary, rm_type="ExplicitRM", shift_tag="token_shift")
    assert float(ex_token["mean_accuracy"]) == pytest.approx(0.775)
    assert float(ex_token["win_rate"]) == 0.5 and float(ex_token["tie_rate"]) == 0.5
    assert len(list(csv.DictReader(paths["runs_csv"].open()))) == 8
    text = paths["markdown"].read_text()
    assert "| ExplicitRM | 0.900 ± 0.141 (2) | 0.775 ± 0.035 (2) |" in text
    assert "| ExplicitRM | 2.500 ± 0.707 · - | 0.500 ± 0.707 · - |" in text  # no signed margin recorded
    assert "| token_shift | 2 | 50.0% / 50.0% | 0.0% / 50.0% | 50.0% |" in text
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_spread_is_over_seeds_not_over_evaluations(tmp_path):
    # seed 0 averages 0.7 over its two eval sets, seed 1 averages 0.9: sd over seeds is that of (0.7, 0.9)
    write_result(tmp_path, "ExplicitRM", 0, {"a": ("in_distribution", 0.6, 1.0, 0.5), "b": ("in_distribution", 0.8, 1.0, 0.7)})
    write_result(tmp_path, "ExplicitRM", 1, {"a": ("in_distribution", 0.8, 2.0, -1.5), "b": ("in_distribution", 1.0, 2.0, -0.5)})
    means = row(mean_rows(collect(tmp_path)), rm_type="ExplicitRM", shift_tag="in_distribution")
    assert (means["evaluations"], means["seeds"]) == (4, 2)
    assert means["mean_accuracy"] == pytest.approx(0.8) and means["sd_accuracy"] == pytest.approx(0.1414214, abs=1e-6)
    assert means["mean_signed_normalized_margin"] == pytest.approx(-0.2)
    assert means["sd_signed_normalized_margin"] == pytest.approx(1.1313708, abs=1e-6)  # sd of (0.6, -1.0)
    text = write_report(collect(tmp_path), tmp_path / "out")["markdown"].read_text()
    assert "| ExplicitRM | 1.500 ± 0.707 · -0.200 ± 1.131 |" in text


def test_runs_are_grouped_by_training_data(tmp_path):
    """UltraFeedback-trained and RewardMATH-trained runs get their own tables and win rates, and no pooled ones
    (issue 18: the paper reports them apart)."""
    for train, (ex, im) in {"ultrafeedback/train.jsonl": (0.9, 0.6), "rewardmath/train.jsonl": (0.5, 0.8)}.items():
        config = train.split("/")[0]
        write_result(tmp_path, "ExplicitRM", 0, {"para": ("token_shift", ex, 1.0)}, config=config, train_path=train)
        write_result(tmp_path, "ImplicitRM", 0, {"para": ("token_shift", im, 1.0)}, config=config, train_path=train)
    collection = collect(tmp_path)
    assert collection.training_datasets == ["rewardmath", "ultrafeedback"]
    uf = overall_win_rates(collection.trained_on("ultrafeedback"))[0]
    assert uf["win_rates"] == {"ExplicitRM": 1.0, "ImplicitRM": 0.0}
    paths = write_report(collection, tmp_path / "out")
    text = paths["markdown"].read_text()
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings == ["## Trained on rewardmath", "## Trained on ultrafeedback", "## Accuracy per eval set"]
    summary = list(csv.DictReader(paths["summary_csv"].open()))
    assert float(row(summary, training_data="rewardmath", rm_type="ImplicitRM")["win_rate"]) == 1.0
    assert {r["training_data"] for r in summary} == {"rewardmath", "ultrafeedback"}
    assert "| rewardmath | rewardmath | para | token_shift | 0.500 (1) | 0.800 (1) |" in text


def test_unfinished_runs_are_left_out_and_listed(two_types):
    partial = write_result(two_types, "ImplicitRM", 2, {"orig": ("in_distribution", 0.0, 0.0)}, status="running")
    collection = collect(two_types)
    assert collection.unfinished == [partial]
    assert len(collection.evaluations) == 8


def test_malformed_json_names_the_file(two_types):
    bad = two_types / "persona" / "ExplicitRM" / "tiny" / "seed0" / "results.json"
    bad.write_text('{"status": "finished", ')
    with pytest.raises(RMLightningError, match=str(bad)):
        collect(two_types)


def test_missing_field_names_file_and_field(two_types):
    bad = two_types / "persona" / "ImplicitRM" / "tiny" / "seed1" / "results.json"
    record = json.loads(bad.read_text())
    record["eval_sets"]["para"]["accuracy"] = "high"
    bad.write_text(json.dumps(record))
    with pytest.raises(RMLightningError, match=rf"{bad}: eval_sets\.para\.accuracy"):
        collect(two_types)


def test_duplicate_evaluations_are_an_error(two_types):
    write_result(two_types / "again", "ExplicitRM", 0, {"orig": ("in_distribution", 1.0, 2.0)})
    with pytest.raises(RMLightningError, match="both hold ExplicitRM.*trained twice: a resumed or repeated run"):
        collect(two_types)


def test_command_line(two_types, tmp_path_factory, capsys):
    out = tmp_path_factory.mktemp("cli")
    assert main([str(two_types), "--out", str(out)]) == 0
    assert "## Win rates" in capsys.readouterr().out
    empty = tmp_path_factory.mktemp("empty")
    assert main([str(empty)]) == 2
    assert f"no results.json found below {empty}" in capsys.readouterr().err


def test_runs_csv_says_how_many_epochs_each_run_trained(tmp_path, tmp_path_factory):
    """Runs stopped at a training plateau train for different numbers of epochs."""
    for rm_type, epochs in (("ExplicitRM", 4), ("ImplicitRM", 3)):
        write_result(tmp_path, rm_type, 0, {"orig": ("in_distribution", 0.6, 1.0)}, epochs=epochs)
    paths = write_report(collect(tmp_path), tmp_path_factory.mktemp("report"), title="plateau")
    epochs = {r["rm_type"]: r["epochs"] for r in csv.DictReader(paths["runs_csv"].open())}
    assert epochs == {"ExplicitRM": "4", "ImplicitRM": "3"}


def test_records_of_test_runs_are_left_out_and_listed(two_types):
    # a test of seed 0's IM-RM on another set: not a training run of its own
    evaluation = write_result(two_types / "evaluations", "ImplicitRM", 0, {"math": ("domain_shift", 0.2, 0.1)},
                              stage="test")
    collection = collect(two_types)
    assert (len(collection.evaluations), collection.not_training) == (8, [(evaluation, "test")])


def test_a_tie_margin_that_is_no_number_of_points_is_refused(two_types, tmp_path_factory, capsys):
    """--tie-pp -1 or nan put no RM type in first place, not even the best: every evaluation a 'tie'."""
    for value in ("-1", "nan", "inf"):
        assert main([str(two_types), "--out", str(tmp_path_factory.mktemp("tie")), "--tie-pp", value]) == 2
        assert "--tie-pp: expected a number of percentage points >= 0" in capsys.readouterr().err


def test_an_output_folder_that_cannot_be_written_is_one_error_line(two_types, tmp_path_factory, capsys):
    taken = tmp_path_factory.mktemp("out") / "report"
    taken.write_text("a file where the report folder should go")
    assert main([str(two_types), "--out", str(taken)]) == 2
    assert f"error: report: cannot write the report into {taken}" in capsys.readouterr().err


def test_sweep_runs_without_results_are_listed_not_silently_dropped(two_types, tmp_path_factory):
    """A sweep run that failed before any work (a backbone that does not load) or was killed leaves its run.log
    and no results.json; the report used to leave it out without a word."""
    failed = two_types / "persona" / "ImplicitRM" / "gemma3-270m" / "seed0"
    failed.mkdir(parents=True)
    (failed / "run.log").write_text("$ python -m rm_lightning fit ...\nerror: cannot load backbone 'gemma3-270m'\n")
    paths = write_report(collect(two_types), tmp_path_factory.mktemp("report"))
    assert f"Left out, no results.json (see the end of each run.log): {failed}." in paths["markdown"].read_text()


def test_panel_titles_fit_in_the_figure(tmp_path, tmp_path_factory, monkeypatch):
    """The accuracy panel's title ran past the figure's left edge ("rained on hamiltoniancycle: ..."), cut off."""
    from rm_lightning.experiments import report

    for rm_type in ("ExplicitRM", "ImplicitRM"):
        write_result(tmp_path, rm_type, 0, {"orig": ("in_distribution", 0.6, 1.0)},
                     train_path="/data/HuggingFaceH4-ultrafeedback_binarized/train.jsonl")
    figures = []
    monkeypatch.setattr(report, "save_figure_atomically", lambda figure, path: figures.append(figure))
    write_report(collect(tmp_path), tmp_path_factory.mktemp("report"))
    [figure] = figures
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(figure).get_renderer()  # the pyplot canvas is gone once the figure is closed
    for axis in figure.axes:
        extent = axis.title.get_window_extent(renderer)
        assert 0 <= extent.x0 and extent.x1 <= figure.bbox.width, axis.get_title()


def test_accuracy_error_bars_stop_at_0_and_1():
    from rm_lightning.experiments.report import accuracy_error_bars

    below, above = accuracy_error_bars([0.97, 0.02, 0.5, float("nan")], [0.1, 0.1, 0.1, 0.1])
    assert below == pytest.approx([0.1, 0.02, 0.1, 0.0]) and above == pytest.approx([0.03, 0.1, 0.1, 0.0])
