"""Win rates both ways (issue 18): the paper's, ties excluded, beside the three-way split, per training dataset and
never pooled across training datasets; a note where a dataset has no shared evaluation."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from test_report import row, write_result
from rm_lightning.experiments.report import (collect, main, overall_win_rates, pairwise_win_rates, sections,
                                             write_report)


@pytest.fixture()
def with_ties(tmp_path: Path) -> Path:
    """EX vs IM on four token-shift evaluations: EX wins two, IM one, one tie (0.750 vs 0.755)."""
    for seed, (ex, im) in enumerate([(0.9, 0.6), (0.8, 0.5), (0.4, 0.7), (0.75, 0.755)]):
        write_result(tmp_path, "ExplicitRM", seed, {"para": ("token_shift", ex, 1.0)})
        write_result(tmp_path, "ImplicitRM", seed, {"para": ("token_shift", im, 1.0)})
    return tmp_path


def test_paper_pairwise_win_rates_exclude_ties_and_add_up_to_100(with_ties):
    pair = row(pairwise_win_rates(collect(with_ties)), shift_tag="token_shift")
    assert (pair["evaluations"], pair["decisive"]) == (4, 3)
    assert (pair["a_paper_win_rate"], pair["b_paper_win_rate"]) == (pytest.approx(2 / 3), pytest.approx(1 / 3))


def test_three_way_split_keeps_ties_as_a_share(with_ties):
    pair = row(pairwise_win_rates(collect(with_ties)), shift_tag="token_shift")
    assert (pair["a_win_rate"], pair["b_win_rate"], pair["tie_rate"]) == (0.5, 0.25, 0.25)


def test_paper_rates_among_all_rm_types_add_up_to_100(tmp_path):
    # eval a: A first alone; eval b: B first alone; eval c: A and C tie for first (not decisive)
    for name, accuracies in {"a": (0.9, 0.5, 0.6), "b": (0.5, 0.9, 0.6), "c": (0.8, 0.5, 0.795)}.items():
        for rm_type, accuracy in zip("ABC", accuracies):
            write_result(tmp_path / name, rm_type, 0, {name: ("domain_shift", accuracy, 1.0)})
    overall = overall_win_rates(collect(tmp_path))[0]
    assert overall["decisive"] == 2 and overall["paper_win_rates"] == {"A": 0.5, "B": 0.5, "C": 0.0}


def test_every_evaluation_tied_leaves_the_paper_rate_undefined(tmp_path):
    write_result(tmp_path, "ExplicitRM", 0, {"orig": ("in_distribution", 1.0, 1.0)})
    write_result(tmp_path, "ImplicitRM", 0, {"orig": ("in_distribution", 1.0, 1.0)})
    text = write_report(collect(tmp_path), tmp_path / "out")["markdown"].read_text()
    assert "| in_distribution | ExplicitRM | ImplicitRM | 1 | 0.0% | 0.0% | 100.0% | - / - (0) |" in text


def test_runs_of_two_training_datasets_are_never_paired(tmp_path):
    """Same config name, backbone, seed and eval set, different training files: no shared evaluation."""
    write_result(tmp_path / "uf", "ExplicitRM", 0, {"para": ("token_shift", 0.9, 1.0)}, config="rw",
                 train_path="ultrafeedback/train.jsonl")
    write_result(tmp_path / "math", "ImplicitRM", 0, {"para": ("token_shift", 0.5, 1.0)}, config="rw",
                 train_path="rewardmath/train.jsonl")
    parts = sections(collect(tmp_path), tie_pp=1.0)
    assert [(p.training_data, p.pairwise, p.overall) for p in parts] == [("rewardmath", [], []),
                                                                         ("ultrafeedback", [], [])]


def test_csv_files_carry_both_ways_per_training_dataset(with_ties, tmp_path_factory):
    paths = write_report(collect(with_ties), tmp_path_factory.mktemp("out"))
    summary = row(list(csv.DictReader(paths["summary_csv"].open())), rm_type="ImplicitRM")
    pairwise = list(csv.DictReader(paths["win_rates_csv"].open()))[0]
    assert ((summary["training_data"], float(summary["paper_win_rate"]), float(summary["win_rate"]),
             summary["decisive_evaluations"], float(pairwise["b_paper_win_rate"]), float(pairwise["tie_rate"]))
            == ("persona", pytest.approx(1 / 3), 0.25, "3", pytest.approx(1 / 3), 0.25))


def test_markdown_gives_the_paper_table_beside_the_three_way_one(with_ties, tmp_path_factory):
    text = write_report(collect(with_ties), tmp_path_factory.mktemp("out"))["markdown"].read_text()
    assert ("| token_shift | 3 / 4 | 66.7% | 33.3% |" in text
            and "| token_shift | 4 | 50.0% / 25.0% | 25.0% / 25.0% | 25.0% |" in text)


def test_a_dataset_without_shared_evaluations_gets_a_one_line_note(tmp_path, capsys):
    write_result(tmp_path, "ExplicitRM", 0, {"para": ("token_shift", 0.9, 1.0)})
    write_result(tmp_path, "ImplicitRM", 1, {"para": ("token_shift", 0.5, 1.0)})
    assert main([str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    note = ("trained on persona: no two RM types have runs of the same config, backbone and seed "
            "(ExplicitRM, ImplicitRM never meet), so no win rates")
    assert f"note: {note}\n" in capsys.readouterr().err and f"Note: {note}." in (tmp_path / "out" / "report.md").read_text()


def test_runs_that_recorded_no_accuracy_are_not_said_to_never_meet(tmp_path, capsys):
    for rm_type in ("ExplicitRM", "ImplicitRM"):
        write_result(tmp_path, rm_type, 0, {"para": ("token_shift", None, None)})
    assert main([str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    assert "no run recorded an accuracy" in capsys.readouterr().err
