"""Turn a sweep's ``results.json`` files into the paper's comparison: mean accuracy and normalized
margin per RM type and shift tag, and win rates.

    python -m rm_lightning.report runs/sweeps/persona_small [--out DIR] [--tie-pp 1.0]

Writes ``report.md`` (the tables), ``report.csv`` (means and win shares per RM type and shift
tag), ``win_rates.csv`` (pairwise), ``runs.csv`` (one row per run and eval set) and
``report.png`` (grouped bars). RM types are the class names stored in results.json, so any
number of them works, user-defined subclasses included.

Win rates (paper §5.2). An *evaluation* is one (config, backbone, seed, eval set); each RM type
trained on the same config, backbone and seed is scored on it. Accuracies within ``tie_pp``
percentage points (inclusive) are a tie.
- Pairwise, for every pair of RM types: over the evaluations both have, the share each wins
  and the share tied.
- Among all RM types: over the evaluations every RM type has, the share in which each is the
  single best (ahead of every other by more than ``tie_pp``), and the share in which the best
  accuracy is tied. With two RM types the two rules agree.
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
            metrics={m: _number(entry.get(m)) for m in METRICS}, global_step=record.get("global_step"))


def _number(value) -> Optional[float]:
    return float(value) if value is not None and math.isfinite(value) else None


# --- arithmetic ------------------------------------------------------------------------------------

def mean_rows(collection: Collection) -> list[dict[str, Any]]:
    """Mean (and sd) accuracy and mean normalized margin per RM type and shift tag."""
    rows = []
    for rm_type, tag in itertools.product(collection.rm_types, collection.shift_tags):
        chosen = [e for e in collection.evaluations if e.rm_type == rm_type and e.shift_tag == tag]
        accuracies = [e.metrics["accuracy"] for e in chosen if e.metrics["accuracy"] is not None]
        margins = [e.metrics["normalized_margin"] for e in chosen if e.metrics["normalized_margin"] is not None]
        if not chosen:
            continue
        rows.append({
            "rm_type": rm_type, "shift_tag": tag, "evaluations": len(accuracies),
            "mean_accuracy": statistics.fmean(accuracies) if accuracies else None,
            "sd_accuracy": statistics.stdev(accuracies) if len(accuracies) > 1 else None,
            "mean_normalized_margin": statistics.fmean(margins) if margins else None,
        })
    return rows


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


def overall_win_rates(collection: Collection, tie_pp: float = 1.0) -> list[dict[str, Any]]:
    """Per shift tag: the share of evaluations (shared by every RM type) each RM type wins outright."""
    rm_types = collection.rm_types
    rows = []
    for tag in collection.shift_tags:
        shared = [accs for accs in accuracies_by_evaluation(collection, tag).values() if len(accs) == len(rm_types)]
        if len(rm_types) < 2 or not shared:
            continue
        wins = dict.fromkeys(rm_types, 0)
        ties = 0
        for accs in shared:
            best = max(rm_types, key=accs.__getitem__)
            if all(compare(accs[best], accs[other], tie_pp) == 1 for other in rm_types if other != best):
                wins[best] += 1
            else:
                ties += 1
        n = len(shared)
        rows.append({"shift_tag": tag, "evaluations": n, "win_rates": {r: wins[r] / n for r in rm_types},
                     "tie_rate": ties / n})
    return rows


# --- writing ---------------------------------------------------------------------------------------

def write_report(collection: Collection, out: Path, tie_pp: float = 1.0, title: str = "") -> dict[str, Path]:
    """Write every report file into ``out``; returns their paths by kind."""
    out.mkdir(parents=True, exist_ok=True)
    means, pairwise = mean_rows(collection), pairwise_win_rates(collection, tie_pp)
    overall = overall_win_rates(collection, tie_pp)
    paths = {"markdown": out / "report.md", "summary_csv": out / "report.csv", "win_rates_csv": out / "win_rates.csv",
             "runs_csv": out / "runs.csv", "png": out / "report.png"}
    write_text_atomically(paths["markdown"], markdown(collection, means, overall, pairwise, tie_pp, title))
    write_text_atomically(paths["summary_csv"], summary_csv(means, overall))
    write_text_atomically(paths["win_rates_csv"], csv_text(pairwise, ["shift_tag", "rm_type_a", "rm_type_b", "evaluations",
                                                                     "a_win_rate", "b_win_rate", "tie_rate"]))
    write_text_atomically(paths["runs_csv"], runs_csv(collection))
    plot(collection, means, paths["png"], title)
    return paths


def summary_csv(means: list[dict], overall: list[dict]) -> str:
    by_tag = {row["shift_tag"]: row for row in overall}
    rows = []
    for row in means:
        win = by_tag.get(row["shift_tag"])
        rows.append({**row, "win_rate": win["win_rates"][row["rm_type"]] if win else None,
                     "tie_rate": win["tie_rate"] if win else None,
                     "win_rate_evaluations": win["evaluations"] if win else 0})
    return csv_text(rows, ["rm_type", "shift_tag", "evaluations", "mean_accuracy", "sd_accuracy",
                         "mean_normalized_margin", "win_rate", "tie_rate", "win_rate_evaluations"])


def runs_csv(collection: Collection) -> str:
    rows = [{"config": e.config, "rm_type": e.rm_type, "backbone": e.backbone, "seed": e.seed,
             "eval_set": e.eval_set, "shift_tag": e.shift_tag, "global_step": e.global_step, **e.metrics,
             "results_file": str(e.path)} for e in collection.evaluations]
    return csv_text(rows, ["config", "rm_type", "backbone", "seed", "eval_set", "shift_tag", "global_step",
                         *METRICS, "results_file"])


def markdown(collection: Collection, means: list[dict], overall: list[dict], pairwise: list[dict],
             tie_pp: float, title: str) -> str:
    evaluations, tags, rm_types = collection.evaluations, collection.shift_tags, collection.rm_types
    runs = {e.path for e in evaluations}
    lines = [f"# Reward model comparison{': ' + title if title else ''}", "",
             f"{len(runs)} finished runs ({len(evaluations)} evaluations); RM types: {', '.join(rm_types)}; "
             f"configs: {_distinct(e.config for e in evaluations)}; backbones: {_distinct(e.backbone for e in evaluations)}; "
             f"seeds: {_distinct(e.seed for e in evaluations)}."]
    if collection.unfinished:
        lines += ["", f"Left out, not finished: {', '.join(str(p) for p in collection.unfinished)}."]
    cell = {(r["rm_type"], r["shift_tag"]): r for r in means}
    lines += ["", "## Accuracy and normalized margin", "",
              "Mean over evaluations (config x backbone x seed x eval set); cells: accuracy / normalized margin (n).", ""]
    lines += md_table(["RM type", *tags], [[rm, *[_mean_cell(cell.get((rm, t))) for t in tags]] for rm in rm_types])
    lines += ["", f"## Win rates (accuracy; within {tie_pp:g} pp is a tie)", ""]
    if len(rm_types) < 2:
        lines.append("Only one RM type: nothing to compare.")
    else:
        lines += ["Among all RM types: share of evaluations each RM type wins outright (evaluations every RM "
                  "type has).", ""]
        lines += md_table(["shift tag", "evaluations", *rm_types, "ties"],
                          [[r["shift_tag"], r["evaluations"], *[_percent(r["win_rates"][rm]) for rm in rm_types],
                            _percent(r["tie_rate"])] for r in overall])
        lines += ["", "Pairwise (evaluations both RM types have):", ""]
        lines += md_table(["shift tag", "A", "B", "evaluations", "A wins", "B wins", "ties"],
                          [[r["shift_tag"], r["rm_type_a"], r["rm_type_b"], r["evaluations"], _percent(r["a_win_rate"]),
                            _percent(r["b_win_rate"]), _percent(r["tie_rate"])] for r in pairwise])
    lines += ["", "## Accuracy per eval set", "", "Mean over backbones and seeds (n).", ""]
    lines += md_table(["config", "eval set", "shift tag", *rm_types], per_eval_set_rows(collection))
    return "\n".join(lines) + "\n"


def per_eval_set_rows(collection: Collection) -> list[list[str]]:
    groups: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for e in collection.evaluations:
        if e.metrics["accuracy"] is not None:
            groups[(e.config, e.eval_set, e.shift_tag)][e.rm_type].append(e.metrics["accuracy"])
    rows = []
    for (config, eval_set, tag), by_type in groups.items():
        cells = [f"{statistics.fmean(v):.3f} ({len(v)})" if (v := by_type.get(rm)) else "-" for rm in collection.rm_types]
        rows.append([config, eval_set, tag, *cells])
    return rows


def md_table(headers: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
            *["| " + " | ".join(str(c) for c in row) + " |" for row in rows]]


def _mean_cell(row: Optional[dict]) -> str:
    if row is None or row["mean_accuracy"] is None:
        return "-"
    margin = row["mean_normalized_margin"]
    return f"{row['mean_accuracy']:.3f} / {'-' if margin is None else f'{margin:.3f}'} ({row['evaluations']})"


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
    ax_acc.set(title="mean accuracy (error bar: sd over evaluations)", ylabel="accuracy", ylim=(0, 1.12))
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
