"""Turn a sweep's ``results.json`` files into the paper's comparison: accuracy and normalized margin
per RM type and shift tag (mean ± sd over seeds), and win rates, for each training dataset.

    python -m rm_lightning.report runs/sweeps/persona_small [--out DIR] [--tie-pp 1.0]

Writes ``report.md`` (the tables), ``report.csv`` (means and win shares per RM type and shift
tag), ``win_rates.csv`` (pairwise), ``runs.csv`` (one row per run and eval set) and
``report.png`` (grouped bars). RM types are the class names stored in results.json, so any
number of them works, user-defined subclasses included.

Grouping. Runs are grouped by what they were trained on (the paper reports UltraFeedback-trained and
RewardMATH-trained models apart): the data module, and its training file or hub dataset where it has
one. Each group gets its own tables and win rates; with several groups, a pooled section follows.

Spread. Each seed's evaluations (its eval sets, configs and backbones of the group) are averaged first;
the tables give the mean ± sd (sample sd) of those per-seed means. Margins are given twice: the paper's
normalized margin mean |r+ - r-| / sd(r), which grows whichever way the rewards part, and the signed one,
mean (r+ - r-) / sd(r), negative when the rejected responses score higher (results.json files written
before it was recorded show ``-``).

Win rates (paper §5.2). An *evaluation* is one (config, backbone, seed, eval set); each RM type
trained on the same config, backbone and seed is scored on it. Accuracies within ``tie_pp``
percentage points (inclusive) are a tie.
- Pairwise, for every pair of RM types: over the evaluations both have, the share each wins
  and the share tied.
- Among all RM types: over the evaluations every RM type has, the first place goes to the RM types
  within ``tie_pp`` of the best accuracy. The share in which each is first alone (ahead of every
  other by more than ``tie_pp``), the share in which it shares first place with others, and the
  share with no single first. With two RM types this is the pairwise table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from rm_lightning.callbacks.results import RESULTS_FILENAME
from rm_lightning.errors import RMLightningError, exit_status
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

    @property
    def key(self) -> tuple[str, str, str, str]:
        """What RM types are compared on: the same config, backbone, seed and eval set."""
        return self.config, self.backbone, self.seed, self.eval_set


@dataclass
class Collection:
    evaluations: list[Evaluation]
    unfinished: list[Path]

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
        return Collection([e for e in self.evaluations if e.training_data == training_data], self.unfinished)

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
    if not paths:
        raise RMLightningError(f"report: no {RESULTS_FILENAME} found below {root}")
    evaluations, unfinished = [], []
    seen: dict[tuple, Path] = {}
    for path in paths:
        record = read_results(path)
        if record is None:
            unfinished.append(path)
            continue
        for evaluation in evaluations_of(path, record):
            identity = (evaluation.rm_type, *evaluation.key)
            if identity in seen:
                raise RMLightningError(f"report: {path} and {seen[identity]} both hold {evaluation.rm_type} on "
                                       f"{'/'.join(evaluation.key)}; report one sweep at a time")
            seen[identity] = path
            evaluations.append(evaluation)
    if not evaluations:
        raise RMLightningError(f"report: no finished run with eval results below {root} "
                               f"({len(unfinished)} unfinished {RESULTS_FILENAME})")
    return Collection(evaluations, unfinished)


def read_results(path: Path) -> Optional[dict[str, Any]]:
    """The record of a finished run, ``None`` for an unfinished one."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RMLightningError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(record, dict) or "status" not in record:
        raise RMLightningError(f"{path}: not a results file (expected a JSON object with a 'status' field)")
    if record["status"] != "finished":
        return None
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
    return record


def evaluations_of(path: Path, record: dict[str, Any]) -> Iterable[Evaluation]:
    for name, entry in record["eval_sets"].items():
        yield Evaluation(
            path=path, rm_type=record["rm_type"], config=str(record.get("config_name") or "-"),
            backbone=str(record.get("backbone") or "-"), seed=str(record.get("seed")), eval_set=name,
            shift_tag=entry.get("shift_tag") or UNTAGGED,
            metrics={m: _number(entry.get(m)) for m in METRICS}, global_step=record.get("global_step"),
            training_data=training_data_of(record))


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
    """For every pair of RM types and shift tag: win and tie shares over shared evaluations."""
    rows = []
    for tag in collection.shift_tags:
        table = accuracies_by_evaluation(collection, tag)
        for a, b in itertools.combinations(collection.rm_types, 2):
            results = [compare(accs[a], accs[b], tie_pp) for accs in table.values() if a in accs and b in accs]
            if not results:
                continue
            n = len(results)
            rows.append({"shift_tag": tag, "rm_type_a": a, "rm_type_b": b, "evaluations": n,
                         "a_win_rate": results.count(1) / n, "b_win_rate": results.count(-1) / n,
                         "tie_rate": results.count(0) / n})
    return rows


def first_place(accuracies: dict[str, float], tie_pp: float) -> list[str]:
    """The RM types within ``tie_pp`` of the best accuracy of one evaluation."""
    best = max(accuracies.values())
    return [rm for rm, accuracy in accuracies.items() if compare(accuracy, best, tie_pp) == 0]


def overall_win_rates(collection: Collection, tie_pp: float = 1.0) -> list[dict[str, Any]]:
    """Per shift tag, over the evaluations every RM type has: the share each RM type is first alone
    (``win_rates``), the share it shares first place (``shared_first_rates``), and the share with no
    single first (``tie_rate``)."""
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
        n = len(shared)
        ties = n - sum(alone.values())
        rows.append({"shift_tag": tag, "evaluations": n, "win_rates": {r: alone[r] / n for r in rm_types},
                     "shared_first_rates": {r: sharing[r] / n for r in rm_types}, "tie_rate": ties / n})
    return rows


# --- writing ---------------------------------------------------------------------------------------

POOLED = "all training data"
SUMMARY_COLUMNS = ["training_data", "rm_type", "shift_tag", "evaluations", "seeds", "mean_accuracy", "sd_accuracy",
                   "mean_normalized_margin", "sd_normalized_margin", "mean_signed_normalized_margin",
                   "sd_signed_normalized_margin", "win_rate", "shared_first_rate", "tie_rate", "win_rate_evaluations"]
PAIRWISE_COLUMNS = ["training_data", "shift_tag", "rm_type_a", "rm_type_b", "evaluations", "a_win_rate", "b_win_rate",
                    "tie_rate"]


@dataclass
class Section:
    """The tables of one training dataset (or of all of them pooled)."""

    training_data: str
    collection: Collection
    means: list[dict]
    pairwise: list[dict]
    overall: list[dict]


def sections(collection: Collection, tie_pp: float) -> list[Section]:
    """One section per training dataset, then a pooled one when there are several."""
    names = collection.training_datasets
    groups = [(name, collection.trained_on(name)) for name in names] + ([(POOLED, collection)] if len(names) > 1 else [])
    return [Section(name, group, mean_rows(group), pairwise_win_rates(group, tie_pp), overall_win_rates(group, tie_pp))
            for name, group in groups]


def write_report(collection: Collection, out: Path, tie_pp: float = 1.0, title: str = "") -> dict[str, Path]:
    """Write every report file into ``out``; returns their paths by kind."""
    out.mkdir(parents=True, exist_ok=True)
    parts = sections(collection, tie_pp)
    paths = {"markdown": out / "report.md", "summary_csv": out / "report.csv", "win_rates_csv": out / "win_rates.csv",
             "runs_csv": out / "runs.csv", "png": out / "report.png"}
    write_text_atomically(paths["markdown"], markdown(collection, parts, tie_pp, title))
    write_text_atomically(paths["summary_csv"], summary_csv(parts))
    write_text_atomically(paths["win_rates_csv"], csv_text(
        [{"training_data": part.training_data, **row} for part in parts for row in part.pairwise], PAIRWISE_COLUMNS))
    write_text_atomically(paths["runs_csv"], runs_csv(collection))
    plot(collection, mean_rows(collection), paths["png"], title)
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
                         "win_rate_evaluations": win["evaluations"] if win else 0})
    return csv_text(rows, SUMMARY_COLUMNS)


def runs_csv(collection: Collection) -> str:
    rows = [{"training_data": e.training_data, "config": e.config, "rm_type": e.rm_type, "backbone": e.backbone,
             "seed": e.seed, "eval_set": e.eval_set, "shift_tag": e.shift_tag, "global_step": e.global_step,
             **e.metrics, "results_file": str(e.path)} for e in collection.evaluations]
    return csv_text(rows, ["training_data", "config", "rm_type", "backbone", "seed", "eval_set", "shift_tag",
                           "global_step", *METRICS, "results_file"])


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
    lines += ["", "Cells are the mean ± sd over seeds (each seed's evaluations, i.e. eval sets x configs x backbones, "
              "averaged first; no sd with one seed) and, in brackets, the number of seeds."]
    for part in parts:
        lines += ["", *section_markdown(part, tie_pp)]
    lines += ["", "## Accuracy per eval set", "", "Mean ± sd over seeds (seeds), backbones averaged within a seed.", ""]
    lines += md_table(["training data", "config", "eval set", "shift tag", *rm_types], per_eval_set_rows(collection))
    return "\n".join(lines) + "\n"


def section_markdown(part: Section, tie_pp: float) -> list[str]:
    tags, rm_types = part.collection.shift_tags, part.collection.rm_types
    configs = _distinct(e.config for e in part.collection.evaluations)
    cell = {(r["rm_type"], r["shift_tag"]): r for r in part.means}
    lines = [f"## Trained on {part.training_data}" if part.training_data != POOLED else "## All training data, pooled", "",
             f"Configs: {configs}.", "", "### Accuracy", ""]
    lines += md_table(["RM type", *tags], [[rm, *[_accuracy_cell(cell.get((rm, t))) for t in tags]] for rm in rm_types])
    lines += ["", "### Normalized reward margin", "",
              "Absolute mean |r+ - r-| / sd(r) (the paper's) · signed mean (r+ - r-) / sd(r), negative where the "
              "rejected responses score higher.", ""]
    lines += md_table(["RM type", *tags], [[rm, *[_margin_cell(cell.get((rm, t))) for t in tags]] for rm in rm_types])
    lines += ["", f"### Win rates (accuracy; within {tie_pp:g} pp is a tie)", ""]
    if len(rm_types) < 2:
        return lines + ["Only one RM type: nothing to compare."]
    lines += ["Among all RM types, over the evaluations every RM type has: first place goes to every RM type within "
              f"{tie_pp:g} pp of the best. Cells: first alone / first shared with others; the last column is the "
              "share with no single first.", ""]
    lines += md_table(["shift tag", "evaluations", *rm_types, "no single first"],
                      [[r["shift_tag"], r["evaluations"],
                        *[f"{_percent(r['win_rates'][rm])} / {_percent(r['shared_first_rates'][rm])}" for rm in rm_types],
                        _percent(r["tie_rate"])] for r in part.overall])
    lines += ["", "Pairwise (evaluations both RM types have):", ""]
    lines += md_table(["shift tag", "A", "B", "evaluations", "A wins", "B wins", "ties"],
                      [[r["shift_tag"], r["rm_type_a"], r["rm_type_b"], r["evaluations"], _percent(r["a_win_rate"]),
                        _percent(r["b_win_rate"]), _percent(r["tie_rate"])] for r in part.pairwise])
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


def _percent(share: float) -> str:
    return f"{100 * share:.1f}%"


def _distinct(values: Iterable[str]) -> str:
    return ", ".join(sorted(set(values)))


def plot(collection: Collection, means: list[dict], path: Path, title: str = "") -> None:
    """Grouped bars per shift tag, one bar per RM type: accuracy (sd as error bar) and normalized margin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tags, rm_types = collection.shift_tags, collection.rm_types
    cell = {(r["rm_type"], r["shift_tag"]): r for r in means}
    width = 0.8 / len(rm_types)
    fig, (ax_acc, ax_margin) = plt.subplots(1, 2, figsize=(max(10.0, 4.0 + 2.4 * len(tags)), 4.5))
    for i, rm in enumerate(rm_types):
        xs = [t + (i - (len(rm_types) - 1) / 2) * width for t in range(len(tags))]
        rows = [cell.get((rm, tag)) for tag in tags]
        accuracy = [_value(r, "mean_accuracy") for r in rows]
        errors = [_value(r, "sd_accuracy", 0.0) for r in rows]
        bars = ax_acc.bar(xs, accuracy, width, yerr=errors, capsize=3, label=rm)
        ax_acc.bar_label(bars, labels=[f"{a:.2f}" if not math.isnan(a) else "" for a in accuracy], fontsize=7,
                         padding=2)
        ax_margin.bar(xs, [_value(r, "mean_normalized_margin") for r in rows], width, label=rm)
    for axis in (ax_acc, ax_margin):
        axis.set_xticks(range(len(tags)), [t.replace("_", " ") for t in tags])
    ax_acc.axhline(0.5, color="0.5", ls=":", lw=1)
    ax_acc.set(title="mean accuracy (error bar: sd over seeds)", ylabel="accuracy", ylim=(0, 1.12))
    ax_margin.set(title="mean normalized reward margin", ylabel="|r+ - r-| / sd(r)")
    handles, labels = ax_acc.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(rm_types), 6), fontsize=9, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
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
    collection = collect(args.sweep_dir)
    out = Path(args.out or args.sweep_dir)
    paths = write_report(collection, out, args.tie_pp, title=Path(args.sweep_dir).resolve().name)
    print(paths["markdown"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """The command's exit status; bad input is one ``error:`` line and status 2."""
    return exit_status(run, argv)


if __name__ == "__main__":
    sys.exit(main())
