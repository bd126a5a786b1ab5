"""The max-margin separator an EX-RM head tends to, and how it ranks unseen responses (Theorem 2).

    python -m rm_lightning.dynamics.max_margin RUN_DIR            # a fitted EX-RM run (its config.yaml
                                                                  # and newest checkpoint)
    python -m rm_lightning.dynamics.max_margin RUN_DIR/checkpoints/last.ckpt   # the run, that checkpoint
    python -m rm_lightning.dynamics.max_margin --config CONFIG    # a backbone and a data config, no head

With the hidden representations h fixed, a linear head trained with the Bradley-Terry (logistic)
loss on separable differences d_i = h(x_i, y_i+) - h(x_i, y_i-) converges in direction to their
hard-margin separator u* = argmin |u| s.t. <u, d_i> >= 1 (Soudry et al., 2018). So the EX-RM
ranks an unseen pair as u* does. This command solves for u* (the dual quadratic programme, with
cvxopt), and reports:

* the cosine between the trained head u and u* (for a run with a head);
* per eval set, the accuracy u* predicts beside the head's own accuracy;
* the paper's footnote-3 statistics: inner products and cosines between the training ("seen")
  differences and those of each token-shift eval set ("unseen"), and against u*.

Writes ``max_margin.json`` and ``max_margin.png`` (to the run directory, or for ``--config`` to
``runs/max_margin/<config file stem>``, or ``--out``) and prints the tables.
"""

from __future__ import annotations

import argparse
import logging
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
import yaml

from rm_lightning.errors import RMLightningError, exit_status
from rm_lightning.files import save_figure_atomically, write_json_atomically

FIT_ONLY_KEYS = ("ckpt_path", "weights_only")  # in a run's config.yaml, not options of the model or data
QUANTILES = {"min": 0.0, "q1": 0.25, "median": 0.5, "q3": 0.75, "max": 1.0}


@dataclass
class Separator:
    direction: torch.Tensor  # u* [H], float64
    margin: float  # min_i <u*, d_i> / |u*|: the geometric margin
    support_vectors: int


def hard_margin_separator(differences: torch.Tensor) -> Separator:
    """u* = argmin |u|^2 / 2 s.t. <u, d_i> >= 1, from its dual: max sum(a) - |sum_i a_i d_i|^2 / 2, a >= 0."""
    from cvxopt import matrix, solvers

    d = differences.double()
    n = d.shape[0]
    gram = (d @ d.T).numpy()
    solvers.options.update({"show_progress": False, "abstol": 1e-10, "reltol": 1e-10, "feastol": 1e-10})
    solution = solvers.qp(matrix(gram), matrix(-1.0, (n, 1)), matrix(-torch.eye(n, dtype=torch.float64).numpy()),
                          matrix(0.0, (n, 1)))
    alpha = torch.tensor(list(solution["x"]), dtype=torch.float64).clamp(min=0)
    direction = d.T @ alpha
    margins = d @ direction
    if solution["status"] != "optimal" or margins.min() < 1 - 1e-4:
        raise RMLightningError(f"the {n} training differences are not linearly separable (solver: "
                               f"{solution['status']}, smallest functional margin {margins.min():.3g}): "
                               f"there is no hard-margin separator")
    return Separator(direction, float(margins.min() / direction.norm()), int((alpha > 1e-6 * alpha.max()).sum()))


def accuracy(scores: torch.Tensor) -> float:
    """The paper's pairwise accuracy of margins: positive counts 1, zero counts 1/2."""
    return float(((scores > 0).double() + 0.5 * (scores == 0).double()).mean())


def spread(values: torch.Tensor) -> dict[str, float]:
    values = values.double().flatten()
    stats = {name: float(torch.quantile(values, q)) for name, q in QUANTILES.items()}
    return {"mean": float(values.mean()), **stats, "fraction_positive": float((values > 0).double().mean())}


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a @ b.T) / (a.norm(dim=-1, keepdim=True) * b.norm(dim=-1).unsqueeze(0)).clamp(min=1e-12)


def footnote3(seen: torch.Tensor, unseen: dict[str, torch.Tensor], separator: torch.Tensor) -> dict:
    """Seen vs unseen yes-minus-no differences (every pair of one seen and one unseen), and each against u*."""
    out = {}
    for name, differences in unseen.items():
        out[name] = {
            "inner_product": spread(seen @ differences.T),
            "cosine": spread(cosines(seen, differences)),
            "separator_cosine": spread(cosines(separator[None], differences)),
        }
    out["seen"] = {"separator_cosine": spread(cosines(separator[None], seen))}
    return out


# --- features of a run ----------------------------------------------------------------------------


def run_and_checkpoint(path: Optional[Path]) -> tuple[Optional[Path], Optional[Path]]:
    """(run directory, checkpoint): a checkpoint file ``<run>/checkpoints/<name>.ckpt`` stands for its run,
    analysed with that checkpoint instead of the newest; any other file is not a run."""
    if path is None or not path.is_file():
        return path, None
    if path.suffix == ".ckpt" and path.parent.name == "checkpoints":
        return path.parent.parent, path
    raise RMLightningError(f"{path} is a file: give a run directory (holding config.yaml and checkpoints/), "
                           f"one of its checkpoints, or --config FILE")


def load_run(run: Optional[Path], config: Optional[Path], checkpoint: Optional[Path] = None):
    """(module with its trained weights when the run has a checkpoint, data module, the checkpoint loaded):
    ``checkpoint``, or else the run's newest."""
    from data_modules.base import PreferenceDataModule
    from rm_lightning.cli import RewardCLI, expand_composed_configs
    from rm_lightning.models.explicit import ExplicitRM
    from rm_lightning.models.reward_module import RewardModule

    path = config if config is not None else run / "config.yaml"
    if not path.is_file():
        raise RMLightningError(f"no config at {path}: give a run directory (holding config.yaml) or --config")
    if config is None:  # a run's resolved config.yaml, written by `fit`: without that subcommand's own keys
        args = yaml.safe_load(path.read_text())
        for key in FIT_ONLY_KEYS:
            args.pop(key, None)
        args["trainer"]["logger"] = False
    else:
        args = expand_composed_configs(["--config", str(config)]) + ["--trainer.logger", "false"]
    with quiet_cli():
        cli = RewardCLI(RewardModule, PreferenceDataModule, subclass_mode_model=True, subclass_mode_data=True,
                        run=False, args=args, save_config_callback=None)
    module, data = cli.model, cli.datamodule
    if not isinstance(module, ExplicitRM):
        raise RMLightningError(f"{path}: the max-margin analysis is about an EX-RM head; this model is "
                               f"{type(module).__name__} (give an EX-RM run, or --config with an EX-RM config)")
    if checkpoint is not None:
        checkpoints = [checkpoint]
    else:
        checkpoints = sorted((run / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime) if run else []
    if checkpoints:
        state = torch.load(checkpoints[-1], map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
    return module, data, (checkpoints[-1] if checkpoints else None)


@contextmanager
def quiet_cli() -> Iterator[None]:
    """Build a LightningCLI from given arguments only: without this command's own argv (which it would
    warn about) and without the trainer's start-up banner."""
    argv, sys.argv = sys.argv, sys.argv[:1]
    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    lightning_log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        sys.argv = argv
        lightning_log.setLevel(level)


@torch.no_grad()
def set_differences(module, data) -> dict[str, torch.Tensor]:
    """h(x, y+) - h(x, y-) [pairs, H] of every tokenized set, under the module's current backbone."""
    from rm_lightning.perf.frozen_features import attach_frozen_features

    data.attach(module).setup("fit")
    module.eval()
    sets = data.encoded_sets()
    attach_frozen_features(module, sets.values())  # every sequence once, whether the backbone trained or not
    differences = {}
    for name, dataset in sets.items():
        batch = module.collator()(dataset.pairs)
        chosen, rejected = module.features(batch["hidden_states"], batch).double().chunk(2)
        differences[name] = chosen - rejected
    return differences


# --- the command -----------------------------------------------------------------------------------


def analyse(differences: dict[str, torch.Tensor], head: Optional[torch.Tensor], tags: dict[str, str]) -> dict:
    differences = {name: d.double() for name, d in differences.items()}
    separator = hard_margin_separator(differences["train"])
    u_star = separator.direction
    unseen = {name: d for name, d in differences.items() if tags.get(name) == "token_shift"}
    report = {
        "train_pairs": int(differences["train"].shape[0]),
        "separator": {"geometric_margin": separator.margin, "support_vectors": separator.support_vectors},
        "head_cosine_to_separator": (float(cosines(head.double()[None], u_star[None])) if head is not None else None),
        "eval_sets": {name: {"shift_tag": tags.get(name), "pairs": int(d.shape[0]),
                             "separator_accuracy": accuracy(d @ u_star),
                             "head_accuracy": accuracy(d @ head.double()) if head is not None else None}
                      for name, d in differences.items() if name != "train"},
        "footnote3": footnote3(differences["train"], unseen, u_star),
    }
    return report


def table(report: dict) -> str:
    lines = [f"hard-margin separator u* of {report['train_pairs']} training differences: geometric margin "
             f"{report['separator']['geometric_margin']:.4g}, {report['separator']['support_vectors']} support vectors"]
    if report["head_cosine_to_separator"] is not None:
        lines.append(f"cosine between the trained EX-RM head and u*: {report['head_cosine_to_separator']:.4f}")
    lines += ["", f"  {'eval set':<30} {'tag':<16} {'pairs':>6} {'u* accuracy':>12} {'head accuracy':>14}"]
    for name, row in report["eval_sets"].items():
        head = "-" if row["head_accuracy"] is None else f"{row['head_accuracy']:.3f}"
        lines.append(f"  {name:<30} {str(row['shift_tag']):<16} {row['pairs']:>6} "
                     f"{row['separator_accuracy']:>12.3f} {head:>14}")
    lines += ["", "footnote 3: training (seen) yes-minus-no differences against unseen ones, and u* against both",
              f"  {'':<34} {'mean':>9} {'min':>9} {'median':>9} {'max':>9} {'> 0':>6}"]
    for name, stats in report["footnote3"].items():
        lines.append(f"  {name}")
        for key, label in (("inner_product", "seen x unseen, inner product"), ("cosine", "seen x unseen, cosine"),
                           ("separator_cosine", "u* x differences, cosine")):
            if key in stats:
                s = stats[key]
                lines.append(f"    {label:<32} {s['mean']:>9.3g} {s['min']:>9.3g} {s['median']:>9.3g} "
                             f"{s['max']:>9.3g} {s['fraction_positive']:>6.2f}")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(report["eval_sets"])
    fig, (bars, spreads) = plt.subplots(1, 2, figsize=(12, 4.5))
    xs = range(len(sets))
    bars.bar([x - 0.2 for x in xs], [report["eval_sets"][s]["separator_accuracy"] for s in sets], 0.4, label="u*")
    if report["head_cosine_to_separator"] is not None:
        bars.bar([x + 0.2 for x in xs], [report["eval_sets"][s]["head_accuracy"] for s in sets], 0.4,
                 label=f"trained head (cosine to u* {report['head_cosine_to_separator']:.3f})")
    bars.set_xticks(list(xs), [s.replace("_", "\n") for s in sets], fontsize=7)
    bars.axhline(0.5, color="0.5", ls=":", lw=1)
    bars.set(title="accuracy per eval set", ylim=(0, 1.05))
    bars.legend(fontsize=8)
    names = list(report["footnote3"])
    for i, name in enumerate(names):
        stats = report["footnote3"][name]["separator_cosine"]
        spreads.errorbar([i], [stats["median"]], yerr=[[stats["median"] - stats["min"]], [stats["max"] - stats["median"]]],
                         fmt="o", capsize=4)
    spreads.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names], fontsize=7)
    spreads.axhline(0.0, color="0.5", ls=":", lw=1)
    spreads.set(title="cosine of u* with each set's differences (median, min-max)")
    fig.tight_layout()
    save_figure_atomically(fig, path)
    plt.close(fig)


def run(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rm_lightning.dynamics.max_margin",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", nargs="?", type=Path,
                        help="a fitted EX-RM run directory (config.yaml, checkpoints/), or one of its checkpoints")
    parser.add_argument("--config", type=Path, help="a config instead of a run: the backbone's features, no head")
    parser.add_argument("--out", type=Path, help="where to write max_margin.json/.png (default: the run directory; "
                                                 "with --config, runs/max_margin/<config file stem>)")
    args = parser.parse_args(argv)
    if (args.run_dir is None) == (args.config is None):
        parser.error("give a run directory or --config (one of them)")
    args.run_dir, checkpoint = run_and_checkpoint(args.run_dir)
    module, data, checkpoint = load_run(args.run_dir, args.config, checkpoint)
    differences = set_differences(module, data)
    head = module.head.weight[0].detach() if checkpoint is not None else None
    if args.run_dir is not None and checkpoint is None:  # e.g. stopped before its first save
        print(f"{args.run_dir}: no checkpoint in checkpoints/: the initial model's features and no trained head "
              f"(nothing of the run's training)")
    report = analyse(differences, head, data.eval_set_tags)
    report["source"] = {"config": str(args.config or args.run_dir / "config.yaml"),
                        "checkpoint": str(checkpoint) if checkpoint else None}
    out = args.out or args.run_dir or Path("runs") / "max_margin" / args.config.stem
    write_json_atomically(out / "max_margin.json", report)
    plot(report, out / "max_margin.png")
    print(table(report))
    print(f"\nwrote {out / 'max_margin.json'}, {out / 'max_margin.png'}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return exit_status(run, argv)


if __name__ == "__main__":
    sys.exit(main())
