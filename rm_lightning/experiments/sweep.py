"""Run a grid of ``cli.py fit`` runs: configs x RM types x backbones x seeds, resumable.

    python -m rm_lightning.sweep configs/sweeps/persona_small.yaml [--out DIR] [--dry-run] [--restart]

Every run gets its own directory ``<out>/<config stem>/<RM class name>/<backbone>/seed<k>/``
holding its logs, ``run.log`` (stdout and stderr) and ``results.json``. A run counts as done
only when ``results.json`` is its training's record (``"stage": "fit"``) and says ``"status": "finished"``,
so re-running the same command skips finished runs. A finished ``validate``/``test`` record in its place
(an evaluation from the run's config.yaml wrote there before evaluations got a directory of their own)
fails that run with a note, and ``--restart`` trains it again. An unfinished run resumes from its
``checkpoints/last.ckpt`` when it has one and was launched with the same arguments (``--ckpt_path``, the
log appended to), and restarts from scratch otherwise or with ``--restart``. Each run is a separate
process: a crash, a bad override or an out-of-memory error fails that run only.

Grid file keys (lists; ``overrides``, ``rm_type_overrides`` and ``rm_type_configs`` optional):

    configs: [configs/exrm_persona.yaml]      # relative to the working dir or to the grid file
    rm_types: [rm_lightning.ExplicitRM, rm_lightning.ImplicitRM]   # model class paths
    backbones: [smollm2-135m-instruct]
    seeds: [0, 1]                             # seed_everything and the data module's shuffling seed
    overrides: ["--trainer.max_epochs 1"]     # extra cli.py arguments for every run
    rm_type_overrides:                        # extra arguments for runs of one RM type only
      rm_lightning.ImplicitRM: ["--model.init_args.beta 0.01"]
    rm_type_configs:                          # another base config for one RM type (one entry in configs)
      rm_lightning.ExplicitGenerativeRM: configs/exgrm_persona.yaml

Overrides may not set what the sweep sets for each run (``PER_RUN_OPTIONS``: the RM type, backbone, seeds, run
directory, logger): coming after the sweep's own arguments they would win, and a run's directory would name a
seed or backbone it was not trained with.

The RM type is switched with ``--model <class path>``; init args the new class does not take
(``beta`` of a config written for IM-RM, say) are dropped by the parser, shared ones are kept.
An RM type named in ``rm_type_configs`` starts from its own config file instead of the grid's one
(EX-GRM's prompt and settings live in their own file). Its runs still belong to the grid's experiment:
same directory layout under the grid config's stem and the same ``config_name`` in results.json
(passed as ``--results.config_name``), so the report compares them with the other RM types' runs.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import yaml

from rm_lightning.callbacks.results import RESULTS_FILENAME
from rm_lightning.callbacks.run_directory import LOCK_FILENAME, holder_of, release_lock
from rm_lightning.errors import RMLightningError, exit_status, first_line

GRID_KEYS = ("configs", "rm_types", "backbones", "seeds", "overrides", "rm_type_overrides", "rm_type_configs")
REQUIRED_KEYS = ("configs", "rm_types", "backbones", "seeds")
LOG_FILENAME = "run.log"
CHECKPOINT = Path("checkpoints") / "last.ckpt"  # where LastCheckpoint writes in a run directory
CLI_MODULE = "rm_lightning"  # ``python -m rm_lightning`` runs the same CLI as ``cli.py``


@dataclass(frozen=True)
class Grid:
    path: Path
    configs: list[Path]
    rm_types: list[str]
    backbones: list[str]
    seeds: list[int]
    overrides: list[str] = field(default_factory=list)
    rm_type_overrides: dict[str, list[str]] = field(default_factory=dict)
    rm_type_configs: dict[str, Path] = field(default_factory=dict)  # RM class path -> its own base config


@dataclass(frozen=True)
class Run:
    config: Path  # the grid's config: the experiment, which names the directory and config_name
    rm_type: str
    backbone: str
    seed: int
    directory: Path
    config_file: Optional[Path] = None  # the file the run starts from when it is not ``config``

    @property
    def name(self) -> str:
        return f"{self.config.stem}/{class_name(self.rm_type)}/{path_component(self.backbone)}/seed{self.seed}"

    @property
    def starts_from(self) -> Path:
        return self.config_file or self.config

    @property
    def log_path(self) -> Path:
        return self.directory / LOG_FILENAME

    @property
    def checkpoint(self) -> Path:
        return self.directory / CHECKPOINT


@dataclass
class Outcome:
    run: Run
    status: str  # finished (ran now), skipped (finished earlier), failed, interrupted, planned (dry run)
    elapsed_s: float = 0.0
    reason: str = ""


# --- the grid file ---------------------------------------------------------------------------------

def load_grid(path: str | Path) -> Grid:
    """Read and check a grid YAML; every problem names the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise RMLightningError(f"sweep grid file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise RMLightningError(f"{path}: not valid YAML ({yaml_problem(err)})") from None
    if not isinstance(raw, dict):
        raise RMLightningError(f"{path}: expected a mapping with keys {', '.join(REQUIRED_KEYS)}")
    unknown = set(raw) - set(GRID_KEYS)
    if unknown:
        raise RMLightningError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(GRID_KEYS)}")
    for key in REQUIRED_KEYS:
        if not isinstance(raw.get(key), list) or not raw[key]:
            raise RMLightningError(f"{path}: '{key}' must be a non-empty list")
    seeds = raw["seeds"]
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise RMLightningError(f"{path}: 'seeds' must be integers, got {seeds}")
    for key in ("rm_types", "backbones"):
        if not all(isinstance(v, str) and v for v in raw[key]):
            raise RMLightningError(f"{path}: '{key}' must be non-empty strings, got {raw[key]}")
    for key in REQUIRED_KEYS:  # a repeat is a typo; left to plan_runs it reads as a name collision
        repeated = next((v for i, v in enumerate(raw[key]) if v in raw[key][:i]), None)
        if repeated is not None:
            raise RMLightningError(f"{path}: '{key}' lists {repeated} twice")
    rm_type_overrides = raw.get("rm_type_overrides") or {}
    if not isinstance(rm_type_overrides, dict):
        raise RMLightningError(f"{path}: 'rm_type_overrides' must map an RM class path to a list of arguments")
    for rm_type in rm_type_overrides:
        if rm_type not in raw["rm_types"]:
            raise RMLightningError(f"{path}: 'rm_type_overrides' names {rm_type!r}, which is not in 'rm_types'")
    return Grid(
        path=path,
        configs=[_resolve_config(path, c) for c in raw["configs"]],
        rm_types=list(raw["rm_types"]),
        backbones=list(raw["backbones"]),
        seeds=list(seeds),
        overrides=_split_arguments(path, "overrides", raw.get("overrides") or []),
        rm_type_overrides={k: _split_arguments(path, f"rm_type_overrides.{k}", v or [])
                           for k, v in rm_type_overrides.items()},
        rm_type_configs=_rm_type_configs(path, raw),
    )


def yaml_problem(err: Exception) -> str:
    """A parse error in one line: PyYAML's own message spans several (context, the line again, a caret)."""
    def where(mark) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}"

    mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
    if mark is None or not problem:
        return first_line(err)
    context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
    opened = f"{context} at {where(context_mark)}: " if context and context_mark is not None else ""
    return f"{opened}{problem} at {where(mark)}"


def _rm_type_configs(grid_path: Path, raw: dict) -> dict[str, Path]:
    """``rm_type_configs``: RM class path -> the config file its runs start from instead of the grid's."""
    entries = raw.get("rm_type_configs") or {}
    if not isinstance(entries, dict):
        raise RMLightningError(f"{grid_path}: 'rm_type_configs' must map an RM class path to a config file")
    if entries and len(raw["configs"]) != 1:
        raise RMLightningError(f"{grid_path}: 'rm_type_configs' needs exactly one entry in 'configs' (got "
                               f"{len(raw['configs'])}); write one grid file per base config")
    for rm_type in entries:
        if rm_type not in raw["rm_types"]:
            raise RMLightningError(f"{grid_path}: 'rm_type_configs' names {rm_type!r}, which is not in 'rm_types'")
    return {rm_type: _resolve_config(grid_path, config, key=f"rm_type_configs.{rm_type}")
            for rm_type, config in entries.items()}


def _resolve_config(grid_path: Path, config, key: str = "configs") -> Path:
    if not isinstance(config, str):
        raise RMLightningError(f"{grid_path}: '{key}' entries must be paths, got {config!r}")
    for candidate in (Path(config), grid_path.parent / config):
        if candidate.is_file():
            return candidate.resolve()
    label = "config" if key == "configs" else key
    raise RMLightningError(f"{grid_path}: {label} {config!r} not found (relative to {Path.cwd()} "
                           f"or to {grid_path.parent})")


# options ``command`` gives every run itself, and what sets them instead. Overrides come after them, so one of
# these in a grid won silently: '--seed_everything 5' trained every seed<k> run with seed 5, a backbone override
# another model than the run's directory names.
PER_RUN_OPTIONS = {
    "--model": "'rm_types'", "--model.class_path": "'rm_types'",
    "--model.init_args.backbone": "'backbones'", "--model.backbone": "'backbones'",
    "--seed_everything": "'seeds'", "--data.init_args.seed": "'seeds'", "--data.seed": "'seeds'",
    "--trainer.default_root_dir": "--out", "--trainer.logger": "--out", "--results.dirpath": "--out",
    "--results.config_name": "the stem of the grid's config", "--ckpt_path": "--restart (runs resume by themselves)",
}


def _per_run_option(argument: str) -> Optional[str]:
    name = argument.split("=", 1)[0]
    if name.startswith("--trainer.logger."):
        name = "--trainer.logger"
    return name if name in PER_RUN_OPTIONS else None


def _split_arguments(grid_path: Path, key: str, items) -> list[str]:
    """Each entry may hold several shell words (``"--trainer.max_steps 2"``) or just one."""
    if not isinstance(items, list):
        raise RMLightningError(f"{grid_path}: '{key}' must be a list of command-line arguments")
    arguments = []
    for item in items:
        if not isinstance(item, (str, int, float)):
            raise RMLightningError(f"{grid_path}: '{key}' entry {item!r} is not a command-line argument")
        try:  # shell quoting: an unclosed quote is the user's typo, not a crash of the sweep
            arguments.extend(shlex.split(item) if isinstance(item, str) else [str(item)])
        except ValueError as err:
            raise RMLightningError(f"{grid_path}: '{key}' entry {item!r}: {err}") from None
    for argument in arguments:
        option = _per_run_option(argument)
        if option is not None:
            raise RMLightningError(f"{grid_path}: '{key}' sets {argument.split('=', 1)[0]}, which the sweep sets for "
                                   f"each run: use {PER_RUN_OPTIONS[option]}")
    return arguments


def check_rm_types(grid: Grid) -> None:
    """Fail before any run starts when an RM type does not import or is not a RewardModule."""
    from rm_lightning.models.reward_module import RewardModule

    for class_path in grid.rm_types:
        module_name, _, name = class_path.rpartition(".")
        try:
            module = importlib.import_module(module_name) if module_name else None
        except ModuleNotFoundError as err:
            if not f"{module_name}.".startswith(f"{err.name}."):  # the module exists; something it imports does not
                raise _import_failed(grid, class_path, module_name, err) from None
            module = None  # the path's own module (or a package of it): a wrong class path
        except Exception as err:  # the user's module itself fails (a syntax error, an error at import time):
            raise _import_failed(grid, class_path, module_name, err) from None  # say so, not "wrong class path"
        cls = getattr(module, name, None)
        if not (isinstance(cls, type) and issubclass(cls, RewardModule)):
            raise RMLightningError(f"{grid.path}: rm_types entry {class_path!r} is not an importable "
                                   f"RewardModule subclass (give a class path such as rm_lightning.ExplicitRM)")
        check_model_options(grid, class_path, cls, grid.rm_type_overrides.get(class_path, []))


def model_options(cls: type) -> set[str]:
    """The init args a reward-module class takes: its own and, through ``**kwargs``, its bases'."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        parameters = inspect.signature(init).parameters.values()
        names |= {p.name for p in parameters if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            break
    return names


def check_model_options(grid: Grid, class_path: str, cls: type, arguments: list[str]) -> None:
    """An ``rm_type_overrides`` model option the class does not take (``--model.init_args.betta``) fails here, not
    in every run of that type after its start-up: the class is known, so the parser would refuse it anyway.
    (``overrides`` apply to every RM type, and an option one type lacks is dropped for it by design.)"""
    known = model_options(cls)
    for argument in arguments:
        match = re.match(r"--model\.(?:init_args\.)?([A-Za-z_][A-Za-z0-9_]*)", argument)
        if match and match.group(1) not in {"init_args", "class_path", "help", *known}:
            near = difflib.get_close_matches(match.group(1), sorted(known), n=1)
            hint = f"; did you mean {near[0]}?" if near else ""
            raise RMLightningError(f"{grid.path}: rm_type_overrides.{class_path}: {argument.split('=', 1)[0]} is no "
                                   f"option of {cls.__name__}{hint}")


def _import_failed(grid: Grid, class_path: str, module_name: str, err: Exception) -> RMLightningError:
    return RMLightningError(f"{grid.path}: rm_types entry {class_path!r}: importing {module_name} failed: "
                            f"{type(err).__name__}: {first_line(err)}")


# --- planning --------------------------------------------------------------------------------------

def class_name(class_path: str) -> str:
    return class_path.rpartition(".")[2]


def path_component(name: str) -> str:
    """A backbone name or path as one directory name (``org/model`` -> ``org__model``)."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "__", name).strip("_.") or "backbone"


def plan_runs(grid: Grid, out: Path) -> list[Run]:
    """Every run of the grid. The RM type varies fastest, so runs that are compared with each
    other finish close together and a report of a half-done sweep already has complete pairs."""
    runs = [Run(config, rm_type, backbone, seed,
                out / config.stem / class_name(rm_type) / path_component(backbone) / f"seed{seed}",
                grid.rm_type_configs.get(rm_type))
            for config, backbone, seed, rm_type in itertools.product(grid.configs, grid.backbones, grid.seeds,
                                                                     grid.rm_types)]
    seen: dict[Path, Run] = {}
    for run in runs:
        if run.directory in seen:
            raise RMLightningError(f"{grid.path}: two grid points share the run directory {run.directory} "
                                   f"(config stems, RM class names or backbone names collide)")
        seen[run.directory] = run
    return runs


def command(run: Run, grid: Grid, cli: Optional[Path] = None) -> list[str]:
    """The ``fit`` command of one run (``python -m rm_lightning``, or the script ``cli``); the logger and
    results.json write into its directory."""
    directory = str(run.directory)
    launcher = [sys.executable, str(cli)] if cli is not None else [sys.executable, "-m", CLI_MODULE]
    # a run started from its RM type's own config keeps the grid experiment's name, so reports pair it
    experiment = ["--results.config_name", run.config.stem] if run.config_file is not None else []
    return [
        *launcher, "fit", "--config", str(run.starts_from),
        "--model", run.rm_type, "--model.init_args.backbone", run.backbone,
        "--seed_everything", str(run.seed), "--data.init_args.seed", str(run.seed),
        *grid.overrides, *grid.rm_type_overrides.get(run.rm_type, []),
        "--trainer.default_root_dir", directory,
        "--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger",
        "--trainer.logger.init_args.save_dir", directory,
        "--trainer.logger.init_args.name", "", "--trainer.logger.init_args.version", "",
        "--results.dirpath", directory, *experiment,
    ]


# --- state and execution ---------------------------------------------------------------------------

def is_finished(directory: Path) -> bool:
    """True when the run left a readable results.json of its training (stage fit) with status finished."""
    record = results_record(directory)
    return record.get("status") == "finished" and record.get("stage") == "fit"


def evaluation_in_place(directory: Path) -> Optional[str]:
    """The stage of a finished validate/test record that took the place of the run's own results.json.

    Before evaluations got a directory of their own, one started from a sweep run's config.yaml wrote into
    the run's directory; its record is no training run, and treating it as unfinished would resume a
    finished run, which trains nothing.
    """
    record = results_record(directory)
    stage = record.get("stage")
    return str(stage) if record.get("status") == "finished" and stage != "fit" else None


def results_record(directory: Path) -> dict:
    """The run's results.json, or an empty dict when it is missing or unreadable."""
    try:
        record = json.loads((directory / RESULTS_FILENAME).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def previous_arguments(run: Run) -> Optional[list[str]]:
    """The arguments (without the interpreter) a finished run was launched with, from run.log."""
    try:
        with open(run.log_path) as log:
            first_line = log.readline()
    except OSError:
        return None
    return shlex.split(first_line[2:])[1:] if first_line.startswith("$ ") else None


def can_resume(run: Run, arguments: list[str]) -> bool:
    """Whether an unfinished run left a checkpoint to go on from, under the arguments it would get now."""
    return run.checkpoint.is_file() and previous_arguments(run) == arguments[1:]


def launch(run: Run, arguments: list[str], resume: bool = False) -> Outcome:
    """Run one training process, stdout and stderr into run.log: from a clean directory, or with
    ``resume`` from the run's ``last.ckpt`` in the directory it has, the log appended to.

    A directory that a live process still holds (an orphan of a killed sweep, a second sweep) is
    left alone; this sweep holds the directory from before it empties it until its child has locked it.
    The child runs in its own process group and dies with the sweep: Ctrl-C, an exception or the
    sweep's own death (``PR_SET_PDEATHSIG`` on Linux) ends it.
    """
    holder = hold(run.directory)
    if holder is not None:
        return Outcome(run, "failed", 0.0, f"{run.directory} is in use by the live process {holder}; left alone")
    try:
        if resume:
            arguments = [*arguments, "--ckpt_path", str(run.checkpoint)]
        else:
            empty_but_the_lock(run.directory)
        started = time.monotonic()
        with open(run.log_path, "a" if resume else "w") as log:
            # the first line stays the run's own command: what a later sweep compares its arguments with
            log.write(f"\n$ resumed: {shlex.join(arguments)}\n\n" if resume else f"$ {shlex.join(arguments)}\n\n")
            log.flush()
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            returncode = run_child(arguments, stdout=log, stderr=subprocess.STDOUT, env=env)
        elapsed = time.monotonic() - started
    finally:
        release_lock(run.directory)  # the lock ``hold`` wrote, unless the child's is there now
    if returncode != 0:
        last = last_log_line(run.log_path)
        return Outcome(run, "failed", elapsed, f"exit code {returncode}{': ' + last if last else ''}")
    if not is_finished(run.directory):
        record = results_record(run.directory)
        # its reason (a resume that found the limit reached, validation off) is what tells the user what to change
        why = f" ({record['reason']})" if record.get("reason") else ""
        return Outcome(run, "failed", elapsed,
                       f"exit code 0 but {RESULTS_FILENAME} says {record.get('status')!r}{why}, not 'finished'")
    return Outcome(run, "finished", elapsed)


def last_log_line(path: Path, limit: int = 200) -> str:
    """The last line a failed run printed (its ``error:`` line, or a traceback's exception), shortened: the
    summary says why a run failed, not only its exit code."""
    try:
        with open(path, "rb") as log:
            log.seek(max(0, log.seek(0, os.SEEK_END) - 4096))
            lines = log.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    last = next((line.strip() for line in reversed(lines) if line.strip()), "")
    return last if len(last) <= limit else last[:limit - 3] + "..."


def hold(directory: Path) -> Optional[int]:
    """Lock ``directory`` for the run about to start in it, or return the live process that holds it.

    The child locks its directory only seconds after it starts (once its arguments are parsed); until then a
    second sweep of the same grid found no lock, emptied the directory and started the run again. So the
    sweep locks it first, in the run's own lock file (``O_EXCL``: one of two sweeps gets it), and the child,
    whose parent holds it, takes the lock over (``RunClaim``).
    """
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / LOCK_FILENAME
    holder = holder_of(directory)
    if holder is not None and holder != os.getpid():
        return holder
    lock.unlink(missing_ok=True)  # stale: its process is gone
    try:
        descriptor = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    except FileExistsError:  # another sweep locked it since
        return holder_of(directory) or -1
    with os.fdopen(descriptor, "w") as file:
        file.write(f"{os.getpid()}\n")
    return None


def empty_but_the_lock(directory: Path) -> None:
    """A fresh start: remove everything an earlier attempt left in ``directory``, except the sweep's lock."""
    for entry in directory.iterdir():
        if entry.name == LOCK_FILENAME:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the sweep dies, however it dies (Linux only)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_child(arguments: list[str], grace_s: float = 30.0, **popen) -> int:
    """The exit status of ``arguments``, run in a process group of its own that never outlives this call."""
    child = subprocess.Popen(arguments, start_new_session=True, preexec_fn=_die_with_parent, **popen)
    try:
        return child.wait()
    except BaseException:
        stop_group(child, grace_s)
        raise


def stop_group(child: subprocess.Popen, grace_s: float) -> None:
    """Ctrl-C to the child's whole group (it writes its results as interrupted), then SIGKILL after ``grace_s``."""
    for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        try:
            child.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_sweep(grid: Grid, out: Path, cli: Optional[Path] = None, dry_run: bool = False,
              echo: Callable[[str], None] = print, restart: bool = False) -> list[Outcome]:
    """Run (or, with ``dry_run``, list) every unfinished run of the grid, one after another; an
    interrupted one resumes from its checkpoint unless ``restart``."""
    runs = plan_runs(grid, out)
    outcomes: list[Outcome] = []
    width = len(str(len(runs)))
    for index, run in enumerate(runs, 1):
        prefix = f"[{index:>{width}}/{len(runs)}]"
        arguments = command(run, grid, cli)
        if is_finished(run.directory):
            reason = "finished earlier"
            if previous_arguments(run) not in (None, arguments[1:]):
                reason += f", with other arguments (first line of {run.log_path}); delete the directory to rerun"
            outcomes.append(Outcome(run, "skipped", reason=reason))
            echo(f"{prefix} skip      {run.name} ({reason})")
            continue
        stage = evaluation_in_place(run.directory)
        if stage is not None and not restart:
            reason = (f"{run.directory / RESULTS_FILENAME} is a '{stage}' record, not this run's training: an "
                      f"evaluation written into the run directory replaced it; --restart trains the run again "
                      f"(replacing the directory)")
            outcomes.append(Outcome(run, "failed", reason=reason))
            echo(f"{prefix} failed    {run.name} ({reason})")
            continue
        resume = not restart and can_resume(run, arguments)
        # a fresh start removes the directory's last.ckpt, maybe hours of training: say so, in the dry run too
        dropped = (f", discarding {run.checkpoint} (written under other arguments: the first line of {run.log_path})"
                   if not resume and not restart and run.checkpoint.is_file() else "")
        if dry_run:
            outcomes.append(Outcome(run, "planned"))
            how = (f"would resume {run.name} from {run.checkpoint}" if resume
                   else f"would run {run.name}{' (from scratch' + dropped + ')' if dropped else ''}")
            echo(f"{prefix} {how}\n    {shlex.join(arguments)}")
            continue
        if resume:
            echo(f"{prefix} resume    {run.name} (an unfinished run, from {run.checkpoint})")
        else:
            again = f" (restarting an unfinished run{dropped})" if run.directory.exists() else ""
            echo(f"{prefix} start     {run.name}{again}")
        try:
            outcome = launch(run, arguments, resume)
        except KeyboardInterrupt:
            outcomes.append(Outcome(run, "interrupted", reason="interrupted by the user"))
            echo(f"{prefix} interrupted {run.name}")
            break
        outcomes.append(outcome)
        detail = f" ({outcome.reason}; log: {run.log_path})" if outcome.status == "failed" else ""
        echo(f"{prefix} {outcome.status:<9} {run.name} in {format_seconds(outcome.elapsed_s)}{detail}")
    return outcomes


def format_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


def summary(outcomes: list[Outcome]) -> str:
    """A table of every run's status, failures with their log file, then the counts."""
    name_width = max([len(o.run.name) for o in outcomes] + [3])
    lines = [f"{'run':<{name_width}}  {'status':<11}  {'time':>9}  note"]
    for o in outcomes:
        note = f"{o.reason}; log: {o.run.log_path}" if o.status in ("failed", "interrupted") else o.reason
        time_text = format_seconds(o.elapsed_s) if o.elapsed_s else "-"
        lines.append(f"{o.run.name:<{name_width}}  {o.status:<11}  {time_text:>9}  {note}".rstrip())
    counts = {s: sum(o.status == s for o in outcomes)
              for s in ("finished", "skipped", "failed", "interrupted", "planned")}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items() if n or s in ("finished", "skipped", "failed")))
    return "\n".join(lines)


def default_out(grid_path: Path) -> Path:
    return Path("runs") / "sweeps" / grid_path.stem


def run(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rm_lightning.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("grid", help="grid YAML (configs, rm_types, backbones, seeds, overrides)")
    parser.add_argument("--out", help="sweep directory (default: runs/sweeps/<grid file stem>)")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and their commands, run nothing")
    parser.add_argument("--cli", help="a cli.py-like script to launch instead of `python -m rm_lightning`")
    parser.add_argument("--restart", action="store_true",
                        help="start unfinished runs from scratch instead of resuming them from their last.ckpt, "
                             "and runs whose results.json an evaluation replaced")
    args = parser.parse_args(argv)
    grid = load_grid(args.grid)
    cli = Path(args.cli) if args.cli else None
    if cli is not None and not cli.is_file():
        raise RMLightningError(f"--cli: no script at {cli}")
    check_rm_types(grid)
    out = Path(args.out or default_out(grid.path)).resolve()
    if not args.dry_run:
        try:  # here, once, rather than as a traceback from the first run's directory
            out.mkdir(parents=True, exist_ok=True)
            if not os.access(out, os.W_OK):
                raise PermissionError(13, "Permission denied", str(out))
        except OSError as err:
            raise RMLightningError(f"sweep: cannot write the sweep into {out}: "
                                   f"{err.strerror or err} ({err.filename or out})") from None
    print(f"sweep {grid.path} -> {out}")
    started = time.monotonic()
    outcomes = run_sweep(grid, out, cli, dry_run=args.dry_run, restart=args.restart)
    print(f"\nsummary ({format_seconds(time.monotonic() - started)})\n{summary(outcomes)}")
    if any(o.status == "interrupted" for o in outcomes):
        return 130
    return 1 if any(o.status == "failed" for o in outcomes) else 0


def main(argv: Optional[list[str]] = None) -> int:
    """The command's exit status; bad input is one ``error:`` line and status 2."""
    return exit_status(run, argv)


if __name__ == "__main__":
    sys.exit(main())
