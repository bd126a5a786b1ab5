"""Whole runs: each persona config through ``cli.py fit`` as a user runs it, beside the same run through TRL.

    python benchmarks/whole_run.py [--configs configs/exrm_persona.yaml ...] [--skip-trl | --trl-only]
                                   [--epochs N] [--train-prompts N --test-prompts N] [--json runs/whole_run.json]

Ours: ``cli.py fit --config <config>`` in its own process under ``/usr/bin/time -v`` (wall clock and peak
memory from outside), with a fresh IM-RM reference cache (a first run's cost) and the progress bar off; its
phases come from the run's ``results.json`` (``timings``, rm_lightning/callbacks/phase_times.py).

TRL, where it has a trainer for the RM type (EX-RM: ``RewardTrainer``; IM-RM: ``DPOTrainer`` with
``precompute_ref_log_probs=True`` and no reference model held, TRL's fairest setting; the EX-GRM has no TRL
trainer), in its own process the same way, on the same backbone, the very pairs of the config's
``PersonaDataModule(...).load_pairs()`` (train set and the four eval sets), the config's batch sizes, epochs,
optimizer (Adam = AdamW without weight decay) and learning rate at a constant schedule, no clipping, the
precision ``trainer.precision: auto`` picks, one full checkpoint (weights and optimizer state) at the end, as
ours writes ``last.ckpt`` once in a run shorter than ``last_checkpoint.every_minutes``, and ``trainer.evaluate`` over the eval sets at step 0 and at every epoch's end on the
config's schedule (``eval_every_n_epochs``, the rule rm-lightning applies), so both sides evaluate the same
pairs as often. Its process gets cli.py's tuning too (freed host memory kept for reuse, bounded oneDNN kernel
caches). Its phases are measured the same way (rm_lightning.callbacks.phase_times.PhaseClock).
A benchmark, not a test: see benchmarks/README.md, "Whole runs".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from benchmarks.timed_fit import max_rss_kib  # noqa: E402

CONFIGS = ("configs/exrm_persona.yaml", "configs/imrm_persona.yaml", "configs/exgrm_persona.yaml")
RM_TYPES = {"ExplicitRM": "exrm", "ImplicitRM": "imrm", "ExplicitGenerativeRM": "exgrm"}
TRL_TRAINERS = {"exrm": "RewardTrainer", "imrm": "DPOTrainer"}
PHASES = ("start_up", "reference", "training", "evaluation", "checkpoints")
SHORT = {"start_up": "su", "reference": "ref", "training": "train", "evaluation": "eval", "checkpoints": "ckpt"}
FINAL_SET = "paraphrased_test_prompts"


# --- the config, as the CLI would resolve it ---------------------------------------------------------


def merged_config(config: Path) -> dict:
    """The config with the files it composes merged in first (dicts merged key by key, as the CLI does here)."""
    from rm_lightning.cli import config_arguments

    files = [Path(a) for a in config_arguments(config) if a != "--config"]
    merged: dict = {}
    for file in files:
        merged = deep_merge(merged, yaml.safe_load(file.read_text()) or {})
    merged.pop("compose", None)
    return merged


def deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def run_settings(config: Path, args) -> dict:
    """What both sides share: RM type, backbone, data settings, batch sizes, epochs, learning rate."""
    from data_modules.persona import PersonaDataModule
    from rm_lightning.models.backbones import BUNDLED_MODEL

    merged = merged_config(config)
    model = merged["model"]
    rm = RM_TYPES[model["class_path"].rsplit(".", 1)[-1]]
    data_args = dict((merged.get("data") or {}).get("init_args") or {})
    data_args.update({k: v for k, v in (("num_train", args.train_prompts), ("num_test", args.test_prompts)) if v})
    data = PersonaDataModule(**data_args)
    optimizer = (model.get("init_args") or {}).get("optimizer") or {}
    return {"config": str(config), "name": config.stem, "rm": rm,
            "backbone": (model.get("init_args") or {}).get("backbone", BUNDLED_MODEL),
            "data_args": data_args, "batch_size": data.batch_size, "eval_batch_size": data.eval_batch_size,
            "eval_every_n_epochs": data.eval_every_n_epochs,
            "epochs": args.epochs or merged["trainer"]["max_epochs"],
            "lr": float((optimizer.get("init_args") or {}).get("lr", 1e-5)), "seed": merged.get("seed_everything", 0)}


# --- ours ---------------------------------------------------------------------------------------------


def ours_command(settings: dict, workdir: Path) -> list[str]:
    command = ["/usr/bin/time", "-v", sys.executable, str(ROOT / "cli.py"), "fit", "--config", settings["config"],
               "--trainer.default_root_dir", str(workdir / "ours"), "--trainer.max_epochs", str(settings["epochs"]),
               "--trainer.enable_progress_bar", "false"]
    if settings["rm"] == "imrm":  # a first run's reference pass, not one read from an earlier run's cache
        command += ["--model.init_args.reference_cache_dir", str(workdir / "reference_cache")]
    for key in ("num_train", "num_test"):
        if key in settings["data_args"]:
            command += [f"--data.init_args.{key}", str(settings["data_args"][key])]
    return command


def run_ours(settings: dict, workdir: Path) -> dict:
    started = time.perf_counter()
    done = subprocess.run(ours_command(settings, workdir), cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    log = done.stdout + done.stderr
    (workdir / "ours.log").write_text(log)
    if done.returncode != 0:
        return {"error": f"cli.py fit exited with status {done.returncode}; log: {workdir / 'ours.log'}"}
    results = json.loads(next((workdir / "ours").rglob("results.json")).read_text())
    return {"wall_s": wall, "max_rss_kib": max_rss_kib(log), "timings": results["timings"],
            "accuracy": {name: entry.get("accuracy") for name, entry in results["eval_sets"].items()},
            "status": results["status"]}


# --- TRL ------------------------------------------------------------------------------------------------


def run_trl(settings: dict, workdir: Path) -> dict:
    """The TRL side in its own process (this script with ``--trl-worker``), timed from outside."""
    spec_path, result_path = workdir / "trl_spec.json", workdir / "trl_result.json"
    spec_path.write_text(json.dumps({**settings, "output_dir": str(workdir / "trl"), "result_path": str(result_path)}))
    started = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", sys.executable, __file__, "--trl-worker", str(spec_path)],
                          cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    log = done.stdout + done.stderr
    (workdir / "trl.log").write_text(log)
    if done.returncode != 0 or not result_path.is_file():
        return {"error": f"TRL worker exited with status {done.returncode}; log: {workdir / 'trl.log'}"}
    return {"wall_s": wall, "max_rss_kib": max_rss_kib(log), **json.loads(result_path.read_text())}


def due_sets(names: list[str], every_n_epochs: dict, epoch: int, epochs: int, step: int) -> list[str]:
    """The eval sets rm-lightning evaluates after ``step`` optimizer steps in ``epoch`` (0-based; the step-0
    validation is epoch 0's start, the others epochs' ends), by its own rule (rm_lightning.metrics.eval_sets.is_due)."""
    from rm_lightning.metrics.eval_sets import is_due

    trainer = SimpleNamespace(state=SimpleNamespace(fn="fit"), sanity_checking=False, current_epoch=epoch,
                              max_epochs=epochs, max_steps=-1, global_step=step, should_stop=False)
    return [name for name in names if is_due(name, every_n_epochs, trainer)]


def trl_worker(spec_path: Path) -> None:
    """Build TRL's trainer for ``spec``, evaluate at step 0, train with evaluations at epoch ends, write the result."""
    from rm_lightning.perf.process_tuning import tune_process

    tune_process()  # cli.py's, before any model exists, so both sides run alike

    import datasets
    import torch
    from transformers import PrinterCallback, TrainerCallback

    from benchmarks.trl_peers import _common_args, _dpo_trainer, _reward_trainer
    from rm_lightning.callbacks.phase_times import PhaseClock, process_start_seconds_ago
    from rm_lightning.perf import precision as auto_precision

    clock = PhaseClock("start_up", time.perf_counter() - process_start_seconds_ago())
    spec = json.loads(spec_path.read_text())
    datasets.disable_progress_bars()
    torch.manual_seed(spec["seed"])
    from data_modules.persona import PersonaDataModule

    train, eval_sets = PersonaDataModule(**spec["data_args"]).load_pairs()
    eval_pairs = {name: evaluation.pairs for name, evaluation in eval_sets.items()}
    precision = "bf16" if auto_precision.choose("cpu").precision == auto_precision.BF16 else "fp32"
    args = {**_common_args("cpu", precision, -1, spec["output_dir"], "trl", spec["batch_size"]),
            "num_train_epochs": spec["epochs"], "learning_rate": spec["lr"],
            "per_device_eval_batch_size": spec["eval_batch_size"], "save_strategy": "no"}
    if spec["rm"] == "imrm":
        from trl import DPOTrainer

        timed(DPOTrainer, "_precompute_ref_logps", clock, "reference")  # runs inside the constructor
    accuracies: dict[str, float] = {}
    state = {"epoch": 0, "trainer": None}

    def evaluate(epoch: int) -> None:
        step = state["trainer"].state.global_step
        for name in due_sets(list(eval_pairs), spec["eval_every_n_epochs"], epoch, spec["epochs"], step):
            metrics = state["trainer"].evaluate(eval_dataset=name, metric_key_prefix=f"eval_{name}")
            accuracies[name] = metrics.get("eval_rewards/accuracies", metrics.get("eval_accuracy"))

    class Phases(TrainerCallback):
        def on_step_begin(self, args, state_, control, **kwargs):
            if clock.stack[0] == "start_up":
                clock.switch("training")

        def on_epoch_end(self, args, state_, control, **kwargs):
            evaluate(state["epoch"])
            state["epoch"] += 1

    build = _dpo_trainer if spec["rm"] == "imrm" else _reward_trainer
    extra = {"precompute_ref_log_probs": True} if spec["rm"] == "imrm" else {}
    trainer, _ = build(spec["backbone"], train, args, Phases(), eval_sets=eval_pairs, **extra)
    trainer.remove_callback(PrinterCallback)
    state["trainer"] = trainer
    timed(trainer, "evaluate", clock, "evaluation")
    timed(trainer, "_save_checkpoint", clock, "checkpoints")
    evaluate(0)  # step 0, as MarginHistory(validate_at_start) does
    trainer.train()
    trainer._save_checkpoint(trainer.model, trial=None)  # once, at the end, as ours (timed as "checkpoints")
    clock.switch("other")
    seconds = clock.snapshot()
    Path(spec["result_path"]).write_text(json.dumps({
        "trainer": type(trainer).__name__, "precision": precision, "accuracy": accuracies,
        "timings": {f"{phase}_s": round(value, 3) for phase, value in seconds.items()},
        "training_steps": trainer.state.global_step}))


def timed(owner, name: str, clock, phase: str) -> None:
    """Charge every call of ``owner.name`` (a class's method, or an instance's) to ``phase`` of ``clock``."""
    original = getattr(owner, name)  # a function on a class (bound again when called), a bound method otherwise

    def wrapper(*args, **kwargs):
        clock.enter(phase)
        try:
            return original(*args, **kwargs)
        finally:
            clock.leave(phase)

    setattr(owner, name, wrapper)


# --- the table -------------------------------------------------------------------------------------------


def split(timings: dict) -> str:
    return "/".join(f"{timings.get(f'{phase}_s', 0):.0f}" for phase in PHASES)


def table(rows: list[dict]) -> str:
    header = (f"{'config':<18} {'ours wall':>9}  {'su/ref/train/eval/ckpt':<24} {'TRL':<14} {'TRL wall':>8}  "
              f"{'su/ref/train/eval/ckpt':<24} {'ratio':>6}  {'para-test acc ours / TRL':<24}")
    lines = [header, "-" * len(header)]
    for row in rows:
        ours, trl = row.get("ours") or {}, row.get("trl") or {}
        ours_wall = f"{ours['wall_s']:.0f} s" if "wall_s" in ours else ("failed" if "error" in ours else "-")
        trl_wall = f"{trl['wall_s']:.0f} s" if "wall_s" in trl else ("failed" if "error" in trl else "-")
        ratio = f"{trl['wall_s'] / ours['wall_s']:.2f}x" if "wall_s" in ours and "wall_s" in trl else "-"
        accuracy = " / ".join("-" if side.get("accuracy", {}).get(FINAL_SET) is None
                              else f"{side['accuracy'][FINAL_SET]:.3f}" for side in (ours, trl))
        lines.append(f"{row['name']:<18} {ours_wall:>9}  {split(ours.get('timings', {})) if ours.get('timings') else '-':<24} "
                     f"{row['trl_trainer']:<14} {trl_wall:>8}  "
                     f"{split(trl.get('timings', {})) if trl.get('timings') else '-':<24} {ratio:>6}  {accuracy:<24}")
    totals = [(row["ours"]["wall_s"], row["trl"]["wall_s"]) for row in rows
              if "wall_s" in (row.get("ours") or {}) and "wall_s" in (row.get("trl") or {})]
    if totals:
        ours_total, trl_total = (sum(t[i] for t in totals) for i in (0, 1))
        lines.append(f"{'together':<18} {ours_total:>7.0f} s  {'':<24} {'':<14} {trl_total:>6.0f} s  {'':<24} "
                     f"{trl_total / ours_total:>5.2f}x")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), help="persona configs to run")
    side = parser.add_mutually_exclusive_group()
    side.add_argument("--skip-trl", action="store_true", help="only ours")
    side.add_argument("--trl-only", action="store_true", help="only TRL (configs without a TRL trainer are skipped)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs on both sides (default: the config's)")
    parser.add_argument("--train-prompts", type=int, default=None,
                        help="persona training prompts on both sides (data.num_train; default: the config's), "
                             "for a quick look")
    parser.add_argument("--test-prompts", type=int, default=None, help="persona test prompts (data.num_test)")
    parser.add_argument("--json", type=Path, default=Path("runs/whole_run.json"), help="every figure, as JSON")
    parser.add_argument("--trl-worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for option in ("epochs", "train_prompts", "test_prompts"):
        value = getattr(args, option)
        if value is not None and value < 1:
            parser.error(f"--{option.replace('_', '-')} must be >= 1, got {value}")
    for config in args.configs:
        if not Path(config).is_file():
            parser.error(f"--configs: {config} is not a file")
    return args


# below these, page faults and checkpoint saves ran several times slower (benchmarks/README.md, 2026-12-05)
ROOMY_DISK_GIB = 10
DIRTY_BACKLOG_MIB = 512


def machine_state() -> dict:
    """Free disk where the runs write (the temporary folder) and the page cache's unwritten backlog."""
    import shutil

    state = {"disk_free_gib": round(shutil.disk_usage(tempfile.gettempdir()).free / 2 ** 30, 1)}
    try:
        with open("/proc/meminfo") as meminfo:
            dirty_kib = next(int(line.split()[1]) for line in meminfo if line.startswith("Dirty:"))
        state["dirty_page_cache_mib"] = round(dirty_kib / 1024)
    except (OSError, StopIteration, ValueError):  # not Linux
        pass
    return state


def machine_state_notes(state: dict) -> list[str]:
    notes = []
    if state["disk_free_gib"] < ROOMY_DISK_GIB:
        notes.append(f"only {state['disk_free_gib']} GiB free in {tempfile.gettempdir()} (each run writes a 1.5 GiB "
                     f"checkpoint); a nearly full disk made saves and page faults several times slower")
    if state.get("dirty_page_cache_mib", 0) > DIRTY_BACKLOG_MIB:
        notes.append(f"{state['dirty_page_cache_mib']} MiB of the page cache not yet written to disk (run `sync` "
                     f"first): checkpoint saves wait behind it")
    return notes


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.trl_worker is not None:
        trl_worker(args.trl_worker)
        return 0
    import platform

    from rm_lightning.files import write_json_atomically

    print(f"whole runs on {platform.processor() or platform.machine()} ({os.cpu_count()} CPUs); "
          f"wall seconds from outside, phases start-up/reference/training/evaluation/checkpoints", flush=True)
    state = machine_state()
    for note in machine_state_notes(state):
        print(f"note: {note}", flush=True)
    rows = []
    for config in args.configs:
        settings = run_settings(Path(config), args)
        row = {"name": settings["name"], "settings": settings, "trl_trainer": TRL_TRAINERS.get(settings["rm"], "none")}
        with tempfile.TemporaryDirectory(prefix=f"whole-run-{settings['name']}-") as workdir:
            if not args.trl_only:
                print(f"{settings['name']}: cli.py fit ...", flush=True)
                row["ours"] = run_ours(settings, Path(workdir))
            if not args.skip_trl and settings["rm"] in TRL_TRAINERS:
                print(f"{settings['name']}: TRL {TRL_TRAINERS[settings['rm']]} ...", flush=True)
                row["trl"] = run_trl(settings, Path(workdir))
            for side in ("ours", "trl"):
                if "error" in (row.get(side) or {}):  # the log outlives the work directory
                    keep = ROOT / "runs" / f"whole_run_{settings['name']}_{side}.log"
                    keep.parent.mkdir(parents=True, exist_ok=True)
                    keep.write_text((Path(workdir) / f"{side}.log").read_text())
                    row[side]["error"] += f" (kept as {keep})"
                    print(f"  {side}: {row[side]['error']}", flush=True)
        rows.append(row)
    print()
    print(table(rows))
    print("\nwall: seconds from outside (process start to exit); su/ref/train/eval/ckpt: start-up, reference pass, "
          "training, evaluation (step 0 included), checkpoint saving; ratio: TRL wall / ours; TRL none: TRL has no "
          "trainer for this RM type (EX-GRM)")
    write_json_atomically(args.json, {"rows": rows, "settings": {k: str(v) for k, v in vars(args).items()},
                                      "machine_at_start": state})
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
