"""Turn a sweep's ``results.json`` files into the paper's comparison: accuracy and normalized margin
per RM type and shift tag (mean ± sd over seeds), and win rates, for each training dataset.

    python -m rm_lightning.report runs/sweeps/persona_small [--out DIR] [--tie-pp 1.0]

Writes ``report.md`` (the tables), ``report.csv`` (means and win shares per RM type and shift
tag), ``win_rates.csv`` (pairwise), ``runs.csv`` (one row per run and eval set) and
``report.png`` (grouped bars and win rates); for Persona runs also ``figure4.csv`` and
``figure4.png`` (the paper's Figure 4 layout, below). RM types are the class names stored in
results.json, so any number of them works, user-defined subclasses included. Only training runs count
(``"stage": "fit"``): the results.json of a validate or test below the directory evaluates a model
trained by another run, and is left out and listed (in report.md, and as a ``note:``); so is a sweep run directory
with a ``run.log`` and no ``results.json`` (it failed before any work, or was killed).

Grouping. Runs are grouped by what they were trained on (the paper reports UltraFeedback-trained and
RewardMATH-trained models apart): the data module, and its training file or hub dataset where it has
one. Each group gets its own tables, win rates and plots; runs of different groups are never pooled.

Spread. Each seed's evaluations (its eval sets, configs and backbones of the group) are averaged first;
the tables give the mean ± sd (sample sd) of those per-seed means. Margins are given twice: the paper's
normalized margin mean |r+ - r-| / sd(r), which grows whichever way the rewards part, and the signed one,
mean (r+ - r-) / sd(r), negative when the rejected responses score higher (results.json files written
before it was recorded show ``-``).

Win rates (paper §5.2), given two ways. An *evaluation* is one (config, backbone, seed, eval set) of
one training dataset; each RM type trained on the same config, backbone and seed is scored on it, and
the one with the higher accuracy wins it; accuracies within ``tie_pp`` percentage points (inclusive)
are a tie. This follows the paper's text (PAPER.md: "the share of (model, seed, eval set) evaluations
in which one RM type has the higher accuracy; within 1 percentage point counts as a tie"), per shift
tag and per training dataset; the authors' public code (princeton-pli/exrm-vs-imrm) has no win-rate
script, so the text is the definition followed.
- The paper's win rate: ties excluded, over the *decisive* evaluations (those not tied), so the RM
  types' shares add up to 100% (EX% + IM% = 100 for two types). With no decisive evaluation it is
  undefined and shown as ``-``.
- The three-way split: over all shared evaluations, the share each RM type wins and the share tied.
Both are given pairwise, for every pair of RM types over the evaluations both have, and among all RM
types over the evaluations every RM type has: first place goes to the RM types within ``tie_pp`` of
the best accuracy; the share in which each is first alone (ahead of every other by more than
``tie_pp``), the share in which it shares first place with others, and the share with no single
first (the paper's rate divides the first-alone counts by the evaluations with a single first). With
two RM types "among all" is the pairwise table. A training dataset without any shared evaluation gets
a note instead of win rates.

Figure 4 (paper §5.1). Where a training dataset's runs have the Persona eval sets (original and
paraphrased responses of train and test prompts), the report adds the paper's Figure 4 layout: per RM
type, the accuracy on each of the four sets as mean ± sd over runs, a run being one (config, model,
seed), so over models and seeds together; then the same per model (over seeds).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import textwrap
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from rm_lightning.callbacks.results import RESULTS_FILENAME
from rm_lightning.experiments.sweep import LOG_FILENAME
from rm_lightning.errors import RMLightningError, exit_status, first_line
from rm_lightning.files import csv_text, save_figure_atomically, write_text_atomically
from rm_lightning.metrics.keys import EVAL_METRICS as METRICS
from rm_lightning.pairs.records import SHIFT_TAGS as SHIFT_TAG_ORDER

UNTAGGED = "untagged"
FLOAT_SLACK = 1e-9  # 0.76 - 0.75 is 0.010000000000000009 in floating point, still a 1 pp tie


@dataclass(frozen=True)
class Evaluation:
    """One RM type's metrics on one eval set of one run."""

    path: Path
    rm_type: str
    config: str
    backbone: str
    seed: str
    eval_set: str
    shift_tag: str
    metrics: dict[str, Optional[float]]
    global_step: Optional[int]
    training_data: str = "-"
    epochs: Optional[int] = None  # epochs trained: where a run stops at a plateau, they differ by run

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        """What RM types are compared on: the same training data, config, backbone, seed and eval set."""
        return self.training_data, self.config, self.backbone, self.seed, self.eval_set


@dataclass
class Collection:
    evaluations: list[Evaluation]
    unfinished: list[Path]
    # finished records of validate/test runs (path, stage): an evaluation of a trained model, not a training run
    not_training: list[tuple[Path, str]] = field(default_factory=list)
    # sweep run directories (a run.log) without results.json: failed before any work, or killed
    no_results: list[Path] = field(default_factory=list)

    @property
    def rm_types(self) -> list[str]:
        return sorted({e.rm_type for e in self.evaluations})

    @property
    def training_datasets(self) -> list[str]:
        return sorted({e.training_data for e in self.evaluations})

    def trained_on(self, training_data: Optional[str]) -> "Collection":
        """The evaluations of runs trained on ``training_data`` (all of them for None)."""
        if training_data is None:
            return self
        return Collection([e for e in self.evaluations if e.training_data == training_data], self.unfinished,
                          self.not_training, self.no_results)

    @property
    def shift_tags(self) -> list[str]:
        tags = {e.shift_tag for e in self.evaluations}
        return [t for t in SHIFT_TAG_ORDER if t in tags] + sorted(tags - set(SHIFT_TAG_ORDER))


# --- reading ---------------------------------------------------------------------------------------

def collect(root: str | Path) -> Collection:
    """Every finished evaluation below ``root``; a malformed file is an error naming it."""
    root = Path(root)
    if not root.is_dir():
        raise RMLightningError(f"report: {root} is not a directory")
    paths = sorted(root.rglob(RESULTS_FILENAME))
    # a run that never wrote results.json (a backbone that does not load, an OOM kill) would vanish from the
    # report without a word, the sweep's summary long scrolled away: list it, pointing at its log
    no_results = sorted(log.parent for log in root.rglob(LOG_FILENAME) if not (log.parent / RESULTS_FILENAME).is_file())
    if not paths:
        failed = (f" ({len(no_results)} sweep runs without one: the reason is at the end of their {LOG_FILENAME})"
                  if no_results else "")
        raise RMLightningError(f"report: no {RESULTS_FILENAME} found below {root}{failed}")
    evaluations, unfinished, not_training = [], [], []
    seen: dict[tuple, Path] = {}
    for path in paths:
        record = read_results(path)
        if record is None:
            unfinished.append(path)
            continue
        if record.get("stage") != "fit":  # its model, trained elsewhere, would count as a run of its own
            not_training.append((path, str(record.get("stage"))))
            continue
        check_training_record(path, record)
        for evaluation in evaluations_of(path, record):
            identity = (evaluation.rm_type, *evaluation.key)
            if identity in seen:
                raise RMLightningError(f"report: {path} and {seen[identity]} both hold {evaluation.rm_type} on "
                                       f"{'/'.join(evaluation.key)} (the same config, backbone and seed trained "
                                       f"twice: a resumed or repeated run, or two sweeps); report a folder that "
                                       f"holds each run once, such as one sweep")
            seen[identity] = path
            evaluations.append(evaluation)
    if not evaluations:
        raise RMLightningError(f"report: no finished training run with eval results below {root} "
                               f"({len(unfinished)} unfinished {RESULTS_FILENAME}, {len(not_training)} of "
                               f"validate/test runs)")
    return Collection(evaluations, unfinished, not_training, no_results)


def read_results(path: Path) -> Optional[dict[str, Any]]:
    """The record of a finished run (of any stage), ``None`` for an unfinished one."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RMLightningError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(record, dict) or "status" not in record:
        raise RMLightningError(f"{path}: not a results file (expected a JSON object with a 'status' field)")
    if record["status"] != "finished":
        return None
    return record


def check_training_record(path: Path, record: dict[str, Any]) -> None:
    """Every field the report reads from a finished training run's record; an error names the file and field."""
    if not isinstance(record.get("rm_type"), str) or not record["rm_type"]:
        raise RMLightningError(f"{path}: field 'rm_type' must be a non-empty string")
    if not isinstance(record.get("eval_sets"), dict):
        raise RMLightningError(f"{path}: field 'eval_sets' must be an object of eval set name -> metrics")
    for name, entry in record["eval_sets"].items():
        if not isinstance(entry, dict) or "accuracy" not in entry:
            raise RMLightningError(f"{path}: eval_sets.{name} must be an object with an 'accuracy'")
        for metric in METRICS:
            value = entry.get(metric)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise RMLightningError(f"{path}: eval_sets.{name}.{metric} must be a number or null, got {value!r}")
        if entry.get("shift_tag") is not None and not isinstance(entry["shift_tag"], str):
            raise RMLightningError(f"{path}: eval_sets.{name}.shift_tag must be a string or null")


def evaluations_of(path: Path, record: dict[str, Any]) -> Iterable[Evaluation]:
    for name, entry in record["eval_sets"].items():
        yield Evaluation(
            path=path, rm_type=record["rm_type"], config=str(record.get("config_name") or "-"),
            backbone=str(record.get("backbone") or "-"), seed=str(record.get("seed")), eval_set=name,
            shift_tag=entry.get("shift_tag") or UNTAGGED,
            metrics={m: _number(entry.get(m)) for m in METRICS}, global_step=record.get("global_step"),
            training_data=training_data_of(record), epochs=record.get("epoch"))


def training_data_of(record: dict[str, Any]) -> str:
    """What a run was trained on, as a short name: the data module (``persona``, ``hamiltoniancycle``), or
    its training file's folder or hub dataset (``ultrafeedback``, ``org/name``) where it names one."""
    config = record.get("config") if isinstance(record.get("config"), dict) else {}
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    options = data.get("init_args") if isinstance(data.get("init_args"), dict) else {}
    train = options.get("train")
    if isinstance(train, dict):
        if train.get("hub"):
            return str(train["hub"])
        if train.get("path"):
            path = Path(str(train["path"]))
            return path.parent.name or path.stem
    module = str(record.get("datamodule") or str(data.get("class_path") or "-").rsplit(".", 1)[-1])
    name = module.removesuffix("DataModule").lower() or "-"
    source = options.get("source")
    return f"{name} ({source})" if isinstance(source, str) and source not in ("builtin", "") else name


def _number(value) -> Optional[float]:
    return float(value) if value is not None and math.isfinite(value) else None


# --- arithmetic ------------------------------------------------------------------------------------

MEAN_METRICS = {"accuracy": "accuracy", "normalized_margin": "normalized_margin",
                "signed_normalized_margin": "signed_normalized_margin"}


def mean_rows(collection: Collection) -> list[dict[str, Any]]:
    """Per RM type and shift tag: mean and sd over seeds of accuracy and both normalized margins.

    Each seed's evaluations are averaged first, so the sd is the spread between seeds (None with one).
    """
    rows = []
    for rm_type, tag in itertools.product(collection.rm_types, collection.shift_tags):
        chosen = [e for e in collection.evaluations if e.rm_type == rm_type and e.shift_tag == tag]
        if not chosen:
            continue
        row: dict[str, Any] = {"rm_type": rm_type, "shift_tag": tag,
                               "evaluations": sum(e.metrics["accuracy"] is not None for e in chosen),
                               "seeds": len({e.seed for e in chosen if e.metrics["accuracy"] is not None})}
        for metric in MEAN_METRICS:
            mean, sd = mean_and_sd_over_seeds(chosen, metric)
            row[f"mean_{metric}"], row[f"sd_{metric}"] = mean, sd
        rows.append(row)
    return rows


def mean_and_sd_over_seeds(evaluations: list[Evaluation], metric: str) -> tuple[Optional[float], Optional[float]]:
    by_seed: dict[str, list[float]] = defaultdict(list)
    for e in evaluations:
        if e.metrics.get(metric) is not None:
            by_seed[e.seed].append(e.metrics[metric])
    per_seed = [statistics.fmean(values) for values in by_seed.values()]
    if not per_seed:
        return None, None
    return statistics.fmean(per_seed), statistics.stdev(per_seed) if len(per_seed) > 1 else None


def compare(a: float, b: float, tie_pp: float) -> int:
    """1 when ``a`` wins, -1 when ``b`` wins, 0 for a tie (within ``tie_pp`` points, inclusive)."""
    difference = a - b
    if abs(difference) <= tie_pp / 100 + FLOAT_SLACK:
        return 0
    return 1 if difference > 0 else -1


def accuracies_by_evaluation(collection: Collection, tag: str) -> dict[tuple, dict[str, float]]:
    table: dict[tuple, dict[str, float]] = defaultdict(dict)
    for e in collection.evaluations:
        if e.shift_tag == tag and e.metrics["accuracy"] is not None:
            table[e.key][e.rm_type] = e.metrics["accuracy"]
    return table


def pairwise_win_rates(collection: Collection, tie_pp: float = 1.0) -> list[dict[str, Any]]:
    """For every pair of RM types and shift tag, over the evaluations both have: the three-way split
    (``a_win_rate``, ``b_win_rate``, ``tie_rate``, adding up to 1) and the paper's rates over the
    ``decisive`` (untied) evaluations (``a_paper_win_rate`` + ``b_paper_win_rate`` = 1; None when every
    evaluation tied). Call it on one training dataset's collection: evaluations of different training
    data never share a key, so they are never paired anyway."""
    rows = []
    for tag in collection.shift_tags:
        table = accuracies_by_evaluation(collection, tag)
        for a, b in itertools.combinations(collection.rm_types, 2):
            results = [compare(accs[a], accs[b], tie_pp) for accs in table.values() if a in accs and b in accs]
            if not results:
                continue
            n, a_wins, b_wins = len(results), results.count(1), results.count(-1)
            decisive = a_wins + b_wins
            rows.append({"shift_tag": tag, "rm_type_a": a, "rm_type_b": b, "evaluations": n,
                         "a_win_rate": a_wins / n, "b_win_rate": b_wins / n, "tie_rate": results.count(0) / n,
                         "decisive": decisive, "a_paper_win_rate": a_wins / decisive if decisive else None,
                         "b_paper_win_rate": b_wins / decisive if decisive else None})
    return rows


def first_place(accuracies: dict[str, float], tie_pp: float) -> list[str]:
    """The RM types within ``tie_pp`` of the best accuracy of one evaluation."""
    best = max(accuracies.values())
    return [rm for rm, accuracy in accuracies.items() if compare(accuracy, best, tie_pp) == 0]


def overall_win_rates(collection: Collection, tie_pp: float = 1.0) -> list[dict[str, Any]]:
    """Per shift tag, over the evaluations every RM type has: the share each RM type is first alone
    (``win_rates``), the share it shares first place (``shared_first_rates``), and the share with no
    single first (``tie_rate``); and the paper's rates, ties excluded (``paper_win_rates``: first alone
    over the ``decisive`` evaluations, those with a single first; adding up to 1, None without any)."""
    rm_types = collection.rm_types
    rows = []
    for tag in collection.shift_tags:
        shared = [accs for accs in accuracies_by_evaluation(collection, tag).values() if len(accs) == len(rm_types)]
        if len(rm_types) < 2 or not shared:
            continue
        alone, sharing = dict.fromkeys(rm_types, 0), dict.fromkeys(rm_types, 0)
        for accs in shared:
            first = first_place(accs, tie_pp)
            for rm in first:
                (alone if len(first) == 1 else sharing)[rm] += 1
        n, decisive = len(shared), sum(alone.values())
        rows.append({"shift_tag": tag, "evaluations": n, "win_rates": {r: alone[r] / n for r in rm_types},
                     "shared_first_rates": {r: sharing[r] / n for r in rm_types}, "tie_rate": (n - decisive) / n,
                     "decisive": decisive,
                     "paper_win_rates": {r: alone[r] / decisive if decisive else None for r in rm_types}})
    return rows


def win_rate_note(collection: Collection, training_data: str) -> Optional[str]:
    """One line saying why a training dataset has no win rates, None when it has some."""
    rm_types = collection.rm_types
    if len(rm_types) < 2:
        return (f"trained on {training_data}: only one RM type ({', '.join(rm_types)}), so no win rates "
                f"(add runs of another RM type on the same config, backbone and seed)")
    shared = [accs for tag in collection.shift_tags for accs in accuracies_by_evaluation(collection, tag).values()
              if len(accs) > 1]
    if not shared:
        if all(e.metrics["accuracy"] is None for e in collection.evaluations):
            return f"trained on {training_data}: no run recorded an accuracy (every eval set empty?), so no win rates"
        return (f"trained on {training_data}: no two RM types have runs of the same config, backbone and seed "
                f"({', '.join(rm_types)} never meet), so no win rates")
    return None


FIGURE4_SETS = {  # (prompts, responses) -> the Persona eval set, in the paper's Figure 4 order
    ("train", "original"): "original_train_prompts",
    ("train", "paraphrased"): "paraphrased_train_prompts",
    ("test", "original"): "original_test_prompts",
    ("test", "paraphrased"): "paraphrased_test_prompts",
}
ALL_MODELS = "all models"


def figure4_rows(collection: Collection) -> list[dict[str, Any]]:
    """The paper's Figure 4 as rows: per RM type and Persona eval set, the accuracy as mean ± sd over
    runs, one run being one (config, backbone, seed), first over every model (``backbone`` is
    ``ALL_MODELS``), then per model (over its seeds). Empty without the Persona eval sets."""
    chosen = [e for e in collection.evaluations
              if e.eval_set in FIGURE4_SETS.values() and e.metrics["accuracy"] is not None]
    rows = []
    for model in [ALL_MODELS, *sorted({e.backbone for e in chosen})]:
        for rm_type, ((prompts, responses), eval_set) in itertools.product(collection.rm_types, FIGURE4_SETS.items()):
            accuracies = [e.metrics["accuracy"] for e in chosen
                          if e.rm_type == rm_type and e.eval_set == eval_set and model in (ALL_MODELS, e.backbone)]
            if accuracies:
                rows.append({"backbone": model, "rm_type": rm_type, "prompts": prompts, "responses": responses,
                             "eval_set": eval_set, "runs": len(accuracies),
                             "mean_accuracy": statistics.fmean(accuracies),
                             "sd_accuracy": statistics.stdev(accuracies) if len(accuracies) > 1 else None})
    return rows


# --- writing ---------------------------------------------------------------------------------------

SUMMARY_COLUMNS = ["training_data", "rm_type", "shift_tag", "evaluations", "seeds", "mean_accuracy", "sd_accuracy",
                   "mean_normalized_margin", "sd_normalized_margin", "mean_signed_normalized_margin",
                   "sd_signed_normalized_margin", "win_rate", "shared_first_rate", "tie_rate", "win_rate_evaluations",
                   "paper_win_rate", "decisive_evaluations"]
PAIRWISE_COLUMNS = ["training_data", "shift_tag", "rm_type_a", "rm_type_b", "evaluations", "a_win_rate", "b_win_rate",
                    "tie_rate", "decisive", "a_paper_win_rate", "b_paper_win_rate"]
FIGURE4_COLUMNS = ["training_data", "backbone", "rm_type", "prompts", "responses", "eval_set", "runs", "mean_accuracy",
                   "sd_accuracy"]


@dataclass
class Section:
    """The tables of one training dataset."""

    training_data: str
    collection: Collection
    means: list[dict]
    pairwise: list[dict]
    overall: list[dict]
    figure4: list[dict]
    note: Optional[str]  # why there are no win rates, when there are none


def sections(collection: Collection, tie_pp: float) -> list[Section]:
    """One section per training dataset; runs of different training data are never pooled."""
    parts = []
    for name in collection.training_datasets:
        group = collection.trained_on(name)
        parts.append(Section(name, group, mean_rows(group), pairwise_win_rates(group, tie_pp),
                             overall_win_rates(group, tie_pp), figure4_rows(group), win_rate_note(group, name)))
    return parts


def write_report(collection: Collection, out: Path, tie_pp: float = 1.0, title: str = "") -> dict[str, Path]:
    """Write every report file into ``out``; returns their paths by kind (``figure4_*`` only for Persona runs)."""
    out.mkdir(parents=True, exist_ok=True)
    parts = sections(collection, tie_pp)
    paths = {"markdown": out / "report.md", "summary_csv": out / "report.csv", "win_rates_csv": out / "win_rates.csv",
             "runs_csv": out / "runs.csv", "png": out / "report.png"}
    with_figure4 = [part for part in parts if part.figure4]
    if with_figure4:
        paths.update(figure4_csv=out / "figure4.csv", figure4_png=out / "figure4.png")
    write_text_atomically(paths["markdown"], markdown(collection, parts, tie_pp, title))
    write_text_atomically(paths["summary_csv"], summary_csv(parts))
    write_text_atomically(paths["win_rates_csv"], csv_text(
        [{"training_data": part.training_data, **row} for part in parts for row in part.pairwise], PAIRWISE_COLUMNS))
    write_text_atomically(paths["runs_csv"], runs_csv(collection))
    plot(parts, paths["png"], tie_pp, title)
    if with_figure4:
        write_text_atomically(paths["figure4_csv"], csv_text(
            [{"training_data": part.training_data, **row} for part in with_figure4 for row in part.figure4],
            FIGURE4_COLUMNS))
        plot_figure4(with_figure4, paths["figure4_png"], title)
    else:  # an earlier report's Figure 4 in a reused folder would read as this one's
        for stale in ("figure4.csv", "figure4.png"):
            (out / stale).unlink(missing_ok=True)
    return paths


def summary_csv(parts: list[Section]) -> str:
    rows = []
    for part in parts:
        by_tag = {row["shift_tag"]: row for row in part.overall}
        for row in part.means:
            win = by_tag.get(row["shift_tag"])
            rows.append({"training_data": part.training_data, **row,
                         "win_rate": win["win_rates"][row["rm_type"]] if win else None,
                         "shared_first_rate": win["shared_first_rates"][row["rm_type"]] if win else None,
                         "tie_rate": win["tie_rate"] if win else None,
                         "win_rate_evaluations": win["evaluations"] if win else 0,
                         "paper_win_rate": win["paper_win_rates"][row["rm_type"]] if win else None,
                         "decisive_evaluations": win["decisive"] if win else 0})
    return csv_text(rows, SUMMARY_COLUMNS)


def runs_csv(collection: Collection) -> str:
    rows = [{"training_data": e.training_data, "config": e.config, "rm_type": e.rm_type, "backbone": e.backbone,
             "seed": e.seed, "eval_set": e.eval_set, "shift_tag": e.shift_tag, "global_step": e.global_step,
             "epochs": e.epochs, **e.metrics, "results_file": str(e.path)} for e in collection.evaluations]
    return csv_text(rows, ["training_data", "config", "rm_type", "backbone", "seed", "eval_set", "shift_tag",
                           "global_step", "epochs", *METRICS, "results_file"])


def markdown(collection: Collection, parts: list[Section], tie_pp: float, title: str) -> str:
    evaluations, rm_types = collection.evaluations, collection.rm_types
    runs = {e.path for e in evaluations}
    lines = [f"# Reward model comparison{': ' + title if title else ''}", "",
             f"{len(runs)} finished runs ({len(evaluations)} evaluations); RM types: {', '.join(rm_types)}; "
             f"training data: {_distinct(e.training_data for e in evaluations)}; "
             f"configs: {_distinct(e.config for e in evaluations)}; backbones: {_distinct(e.backbone for e in evaluations)}; "
             f"seeds: {_distinct(e.seed for e in evaluations)}."]
    if collection.unfinished:
        lines += ["", f"Left out, not finished: {', '.join(str(p) for p in collection.unfinished)}."]
    if collection.not_training:
        lines += ["", f"Left out, not training runs: {not_training_text(collection)}."]
    if collection.no_results:
        lines += ["", f"Left out, no {RESULTS_FILENAME} (see the end of each {LOG_FILENAME}): "
                      f"{', '.join(str(p) for p in collection.no_results)}."]
    lines += ["", "Each training dataset has its own section; runs trained on different data are never pooled. "
              "Cells are the mean ± sd over seeds (each seed's evaluations, i.e. eval sets x configs x backbones, "
              "averaged first; no sd with one seed) and, in brackets, the number of seeds."]
    for part in parts:
        lines += ["", *section_markdown(part, tie_pp)]
    lines += ["", "## Accuracy per eval set", "", "Mean ± sd over seeds (seeds), backbones averaged within a seed.", ""]
    lines += md_table(["training data", "config", "eval set", "shift tag", *rm_types], per_eval_set_rows(collection))
    return "\n".join(lines) + "\n"


def not_training_text(collection: Collection) -> str:
    return ", ".join(f"{path} (stage {stage})" for path, stage in collection.not_training)


def section_markdown(part: Section, tie_pp: float) -> list[str]:
    tags, rm_types = part.collection.shift_tags, part.collection.rm_types
    configs = _distinct(e.config for e in part.collection.evaluations)
    cell = {(r["rm_type"], r["shift_tag"]): r for r in part.means}
    lines = [f"## Trained on {part.training_data}", "", f"Configs: {configs}.", ""]
    if part.figure4:
        lines += [*figure4_markdown(part.figure4), ""]
    lines += ["### Accuracy", ""]
    lines += md_table(["RM type", *tags], [[rm, *[_accuracy_cell(cell.get((rm, t))) for t in tags]] for rm in rm_types])
    lines += ["", "### Normalized reward margin", "",
              "Absolute mean |r+ - r-| / sd(r) (the paper's) · signed mean (r+ - r-) / sd(r), negative where the "
              "rejected responses score higher.", ""]
    lines += md_table(["RM type", *tags], [[rm, *[_margin_cell(cell.get((rm, t))) for t in tags]] for rm in rm_types])
    lines += ["", f"### Win rates (accuracy; within {tie_pp:g} pp is a tie)", ""]
    if part.note:
        return lines + [f"Note: {part.note}."]
    lines += [f"The paper's win rate, ties excluded: over the decisive evaluations (a single RM type ahead of every "
              f"other by more than {tie_pp:g} pp), the share each RM type wins; the shares add up to 100% ('-' where "
              "every evaluation tied). Over the evaluations every RM type has; with two RM types these are the "
              "pairwise rates.", ""]
    lines += md_table(["shift tag", "decisive / evaluations", *rm_types],
                      [[r["shift_tag"], f"{r['decisive']} / {r['evaluations']}",
                        *[_percent(r["paper_win_rates"][rm]) for rm in rm_types]] for r in part.overall])
    lines += ["", "The three-way split, ties a share of their own. Among all RM types, over the evaluations every RM "
              f"type has: first place goes to every RM type within {tie_pp:g} pp of the best. Cells: first alone / "
              "first shared with others; the last column is the share with no single first.", ""]
    lines += md_table(["shift tag", "evaluations", *rm_types, "no single first"],
                      [[r["shift_tag"], r["evaluations"],
                        *[f"{_percent(r['win_rates'][rm])} / {_percent(r['shared_first_rates'][rm])}" for rm in rm_types],
                        _percent(r["tie_rate"])] for r in part.overall])
    lines += ["", "Pairwise (evaluations both RM types have), both ways:", ""]
    lines += md_table(["shift tag", "A", "B", "evaluations", "A wins", "B wins", "ties", "paper: A / B (decisive)"],
                      [[r["shift_tag"], r["rm_type_a"], r["rm_type_b"], r["evaluations"], _percent(r["a_win_rate"]),
                        _percent(r["b_win_rate"]), _percent(r["tie_rate"]),
                        f"{_percent(r['a_paper_win_rate'])} / {_percent(r['b_paper_win_rate'])} ({r['decisive']})"]
                       for r in part.pairwise])
    return lines


def figure4_markdown(rows: list[dict]) -> list[str]:
    """The paper's Figure 4 as tables: RM types x (train/test prompts x original/paraphrased responses)."""
    headers = [f"{prompts} prompts, {responses}" for prompts, responses in FIGURE4_SETS]
    cell = {(r["backbone"], r["rm_type"], r["prompts"], r["responses"]): r for r in rows}
    rm_types = list(dict.fromkeys(r["rm_type"] for r in rows))
    models = list(dict.fromkeys(r["backbone"] for r in rows if r["backbone"] != ALL_MODELS))

    def cells(model: str, rm_type: str) -> list[str]:
        found = [cell.get((model, rm_type, *key)) for key in FIGURE4_SETS]
        return [_spread(r["mean_accuracy"], r["sd_accuracy"], r["runs"]) if r else "-" for r in found]

    lines = ["### Figure 4 layout (paper §5.1): accuracy on original and paraphrased responses", "",
             f"Mean ± sd over runs (runs), a run being one model and seed; models: {', '.join(models)}.", ""]
    lines += md_table(["RM type", *headers], [[rm, *cells(ALL_MODELS, rm)] for rm in rm_types])
    if len(models) > 1:
        lines += ["", "Per model (mean ± sd over seeds):", ""]
        lines += md_table(["model", "RM type", *headers],
                          [[model, rm, *cells(model, rm)] for model in models for rm in rm_types])
    return lines


def per_eval_set_rows(collection: Collection) -> list[list[str]]:
    groups: dict[tuple, dict[str, list[Evaluation]]] = defaultdict(lambda: defaultdict(list))
    for e in collection.evaluations:
        groups[(e.training_data, e.config, e.eval_set, e.shift_tag)][e.rm_type].append(e)
    rows = []
    for key in sorted(groups):
        by_type = groups[key]
        cells = [_spread(*mean_and_sd_over_seeds(by_type.get(rm, []), "accuracy"), _seeds(by_type.get(rm, [])))
                 for rm in collection.rm_types]
        rows.append([*key, *cells])
    return rows


def md_table(headers: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
            *["| " + " | ".join(str(c) for c in row) + " |" for row in rows]]


def _spread(mean: Optional[float], sd: Optional[float], seeds: Optional[int] = None, sign: bool = False) -> str:
    if mean is None:
        return "-"
    text = f"{mean:+.3f}" if sign else f"{mean:.3f}"
    text += f" ± {sd:.3f}" if sd is not None else ""
    return text + (f" ({seeds})" if seeds is not None else "")


def _seeds(evaluations: list[Evaluation]) -> int:
    return len({e.seed for e in evaluations if e.metrics["accuracy"] is not None})


def _accuracy_cell(row: Optional[dict]) -> str:
    if row is None:
        return "-"
    return _spread(row["mean_accuracy"], row["sd_accuracy"], row["seeds"])


def _margin_cell(row: Optional[dict]) -> str:
    if row is None:
        return "-"
    return (f"{_spread(row['mean_normalized_margin'], row['sd_normalized_margin'])} · "
            f"{_spread(row['mean_signed_normalized_margin'], row['sd_signed_normalized_margin'], sign=True)}")


def _percent(share: Optional[float]) -> str:
    return "-" if share is None else f"{100 * share:.1f}%"


def _distinct(values: Iterable[str]) -> str:
    return ", ".join(sorted(set(values)))


def plot(parts: list[Section], path: Path, tie_pp: float = 1.0, title: str = "") -> None:
    """One row per training dataset: grouped bars per shift tag, one bar per RM type, of accuracy (sd as error
    bar) and normalized margin; and the win rates both ways (stacked: the three-way split, then ties excluded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widest = max(len(part.collection.shift_tags) for part in parts)
    fig, axes = plt.subplots(len(parts), 3, figsize=(max(14.0, 6.0 + 3.2 * widest), 4.3 * len(parts)), squeeze=False)
    all_types = sorted({rm for part in parts for rm in part.collection.rm_types})
    colors = {rm: f"C{i % 10}" for i, rm in enumerate(all_types)}
    for part, (ax_acc, ax_margin, ax_win) in zip(parts, axes):
        plot_means(part, ax_acc, ax_margin, colors)
        plot_win_rates(part, ax_win, colors, tie_pp)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[rm]) for rm in all_types]
    handles.append(plt.Rectangle((0, 0), 1, 1, facecolor="0.8", hatch="//"))
    fig.legend(handles, [*all_types, "tie (no single first)"], loc="lower center", ncol=min(len(all_types) + 1, 7),
               fontsize=9, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06 / len(parts), 1, 0.97 if title else 1))
    save_figure_atomically(fig, path)
    plt.close(fig)


def accuracy_error_bars(means: list[float], sds: list[float]) -> list[list[float]]:
    """Matplotlib's (below, above) error bars of mean +- sd, cut at 0 and 1: an accuracy has no values beyond,
    and a bar drawn past 1 also pushed the value label above it out of the axes."""
    below = [0.0 if math.isnan(m) else max(0.0, min(sd, m)) for m, sd in zip(means, sds)]
    above = [0.0 if math.isnan(m) else max(0.0, min(sd, 1.0 - m)) for m, sd in zip(means, sds)]
    return [below, above]


def plot_means(part: Section, ax_acc, ax_margin, colors: dict[str, str]) -> None:
    tags, rm_types = part.collection.shift_tags, part.collection.rm_types
    cell = {(r["rm_type"], r["shift_tag"]): r for r in part.means}
    width = 0.8 / len(rm_types)
    for i, rm in enumerate(rm_types):
        xs = [t + (i - (len(rm_types) - 1) / 2) * width for t in range(len(tags))]
        rows = [cell.get((rm, tag)) for tag in tags]
        accuracy = [_value(r, "mean_accuracy") for r in rows]
        errors = accuracy_error_bars(accuracy, [_value(r, "sd_accuracy", 0.0) for r in rows])
        bars = ax_acc.bar(xs, accuracy, width, yerr=errors, capsize=3, color=colors[rm], label=rm)
        ax_acc.bar_label(bars, labels=[f"{a:.2f}" if not math.isnan(a) else "" for a in accuracy], fontsize=7,
                         padding=2)
        ax_margin.bar(xs, [_value(r, "mean_normalized_margin") for r in rows], width, color=colors[rm], label=rm)
    for axis in (ax_acc, ax_margin):
        axis.set_xticks(range(len(tags)), [t.replace("_", " ") for t in tags])
    ax_acc.axhline(0.5, color="0.5", ls=":", lw=1)
    # on lines of their own: in one, a hub dataset's name ran the title past the figure's edge
    title = [*textwrap.wrap(f"trained on {part.training_data}", 48), "accuracy (error bar: sd over seeds)"]
    ax_acc.set(title="\n".join(title), ylabel="accuracy", ylim=(0, 1.12))
    ax_margin.set(title="mean normalized reward margin", ylabel="|r+ - r-| / sd(r)")


def plot_win_rates(part: Section, axis, colors: dict[str, str], tie_pp: float) -> None:
    """Per shift tag two stacked bars: the three-way split (first alone per RM type, then no single first in
    grey) and the paper's rate over the decisive evaluations (adds up to 100%)."""
    axis.set(title=f"win rates (within {tie_pp:g} pp: tie)", ylabel="share of evaluations (%)", ylim=(0, 112))
    if part.note or not part.overall:
        reason = ("one RM type" if len(part.collection.rm_types) < 2 else "no shared evaluations" if part.note
                  else "no evaluation has every RM type\n(pairwise rates: report.md)")
        axis.text(0.5, 0.5, f"no win rates:\n{reason}", ha="center", va="center", transform=axis.transAxes)
        axis.set_xticks([])
        return
    ticks, labels = [], []
    for t, row in enumerate(part.overall):
        for offset, (kind, shares) in zip((-0.2, 0.2), (("3-way", row["win_rates"]), ("ties excl.", row["paper_win_rates"]))):
            x, bottom = t + offset, 0.0
            for rm in part.collection.rm_types:
                share = 100 * (shares[rm] or 0.0)
                axis.bar(x, share, 0.36, bottom=bottom, color=colors[rm])
                bottom += share
            if kind == "3-way":
                axis.bar(x, 100 * row["tie_rate"], 0.36, bottom=bottom, color="0.8", hatch="//")
            elif row["decisive"] == 0:
                axis.text(x, 50, "all tied", rotation=90, ha="center", va="center", fontsize=7)
            ticks.append(x)
            labels.append(f"{row['shift_tag'].replace('_', ' ')}\n{kind}")
    axis.set_xticks(ticks, labels, fontsize=7)


def plot_figure4(parts: list[Section], path: Path, title: str = "") -> None:
    """The paper's Figure 4: per training dataset, a panel for train prompts and one for test prompts, each with
    the original and paraphrased responses as groups and one bar per RM type (error bar: sd over models and seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(parts), 2, figsize=(11.0, 4.2 * len(parts)), squeeze=False, sharey=True)
    all_types = sorted({r["rm_type"] for part in parts for r in part.figure4})
    colors = {rm: f"C{i % 10}" for i, rm in enumerate(all_types)}
    width = 0.8 / len(all_types)
    for part, row_axes in zip(parts, axes):
        cell = {(r["rm_type"], r["prompts"], r["responses"]): r for r in part.figure4 if r["backbone"] == ALL_MODELS}
        for axis, prompts in zip(row_axes, ("train", "test")):
            for i, rm in enumerate(all_types):
                rows = [cell.get((rm, prompts, responses)) for responses in ("original", "paraphrased")]
                xs = [g + (i - (len(all_types) - 1) / 2) * width for g in range(2)]
                means = [_value(r, "mean_accuracy") for r in rows]
                errors = accuracy_error_bars(means, [_value(r, "sd_accuracy", 0.0) for r in rows])
                bars = axis.bar(xs, means, width, yerr=errors, capsize=3, color=colors[rm], label=rm)
                axis.bar_label(bars, labels=[f"{m:.2f}" if not math.isnan(m) else "" for m in means], fontsize=7,
                               padding=2)
            axis.set_xticks(range(2), ["original responses", "paraphrased responses"])
            axis.axhline(0.5, color="0.5", ls=":", lw=1)
            axis.set(title=f"{prompts} prompts (trained on {part.training_data})", ylim=(0, 1.12))
        row_axes[0].set_ylabel("accuracy (mean ± sd over models and seeds)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[rm]) for rm in all_types]
    fig.legend(handles, all_types, loc="lower center", ncol=min(len(all_types), 6), fontsize=9, frameon=False)
    fig.suptitle(f"Figure 4 layout{': ' + title if title else ''}")
    fig.tight_layout(rect=(0, 0.07 / len(parts), 1, 0.95))
    save_figure_atomically(fig, path)
    plt.close(fig)


def _value(row: Optional[dict], key: str, missing: float = math.nan) -> float:
    value = row.get(key) if row else None
    return missing if value is None else value


def run(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rm_lightning.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", help="directory searched recursively for results.json files")
    parser.add_argument("--out", help="where to write the report (default: the sweep directory)")
    parser.add_argument("--tie-pp", type=float, default=1.0,
                        help="accuracies within this many percentage points are a tie (default: %(default)s)")
    args = parser.parse_args(argv)
    if not (math.isfinite(args.tie_pp) and args.tie_pp >= 0):  # below 0 or nan, not even the best is first
        raise RMLightningError(f"--tie-pp: expected a number of percentage points >= 0, got {args.tie_pp:g}")
    collection = collect(args.sweep_dir)
    out = Path(args.out or args.sweep_dir)
    try:
        paths = write_report(collection, out, args.tie_pp, title=Path(args.sweep_dir).resolve().name)
    except OSError as err:  # a file in the folder's place, no permission, a full disk: the user's to fix
        raise RMLightningError(f"report: cannot write the report into {out}: "
                               f"{err.strerror or first_line(err)} ({err.filename or out})") from None
    print(paths["markdown"].read_text())
    for part in sections(collection, args.tie_pp):
        if part.note:
            print(f"note: {part.note}", file=sys.stderr)
    if collection.not_training:
        print(f"note: left out {len(collection.not_training)} {RESULTS_FILENAME} of validate/test runs (evaluations "
              f"of a trained model, not training runs): {not_training_text(collection)}", file=sys.stderr)
    if collection.no_results:
        print(f"note: left out {len(collection.no_results)} run(s) without {RESULTS_FILENAME} (failed before any work "
              f"or killed; the reason is at the end of their {LOG_FILENAME}): "
              f"{', '.join(str(p) for p in collection.no_results)}", file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """The command's exit status; bad input is one ``error:`` line and status 2."""
    return exit_status(run, argv)


if __name__ == "__main__":
    sys.exit(main())
