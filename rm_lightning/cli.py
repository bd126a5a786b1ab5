"""The rm-lightning command line: ``rm-lightning fit --config configs/imrm_persona.yaml``.

The same CLI runs as ``python cli.py`` (the repo's script), ``python -m rm_lightning`` and the
``rm-lightning`` console script. It is LightningCLI with the reward module and the data module
given by class path in YAML, plus three things of its own:

* ``compose:`` in a config file lists other config files (paths relative to it) that are merged
  first, in order, exactly as if each had been given with ``--config`` before it. An experiment
  file composes a trainer, a model and a data block and adds only what is its own.
* A run writes under ``runs/<name of the first --config file>`` unless ``trainer.default_root_dir``
  says otherwise, and results.json names that config.
* Bad input (a missing file, a malformed record, an unknown backbone, an option out of range, a
  misspelt option) ends in one ``error:`` line and exit status 2; every setting is checked
  (``rm_lightning.settings``) before any class is built, so before a model loads.
* Runs never share a directory (``callbacks/run_directory.py``): a run claims a fresh
  ``version_N`` atomically and holds it with a lock file; a start that fails before training
  leaves no directory behind.
* ``predict`` writes ``predictions.jsonl`` in its run directory (``callbacks/predictions.py``).
* With ``trainer.enable_checkpointing: true`` (the shipped configs) and no checkpoint callback of
  its own, a run keeps one ``checkpoints/last.ckpt``, written at the end of fit and at an epoch's
  end every ``--last_checkpoint.every_minutes`` (``callbacks/last_checkpoint.py``), straight to disk
  (``perf/checkpoint_io.py``); ``--ckpt_path last`` resumes the newest run under
  ``trainer.default_root_dir`` from it.
* ``null`` given on the command line means null, also for a field of a dataclass inside a
  data module's arguments (jsonargparse turns it into the string "None" there).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from argparse import ArgumentError
from pathlib import Path
from typing import Optional

import yaml

from rm_lightning.perf.process_tuning import imports_without_collections, tune_process

with imports_without_collections():  # Lightning and what it imports: see the function's docstring
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

    from data_modules.base import PreferenceDataModule
    from rm_lightning.callbacks import MarginHistory, ResultsWriter
    from rm_lightning.callbacks.last_checkpoint import DEFAULT_EVERY_MINUTES, LastCheckpoint
    from rm_lightning.callbacks.predictions import PredictionsWriter
    from rm_lightning.callbacks.phase_times import PhaseTimes
    from rm_lightning.callbacks.run_directory import RunClaim, claim_logger_directory, claim_loggerless_directory
    from rm_lightning import checkpoint_options
    from rm_lightning.console import quiet_console, say_once
    from rm_lightning.errors import RMLightningError, SettingError, exit_status, print_user_error, user_error_behind
    from rm_lightning.models.reward_module import RewardModule
    from rm_lightning.models import explicit, generative, implicit  # noqa: F401  every RM type a known --model subclass
    from rm_lightning.perf import precision
    from rm_lightning.perf.checkpoint_io import use_local_checkpoint_io
    from rm_lightning.perf.flex_attention import check_flex_training
    from rm_lightning.settings import check_config, check_one_process, init_args

COMPOSE_KEY = "compose"
SUBCOMMANDS = ("fit", "validate", "test", "predict")
RUNS_ROOT = Path("runs")
SIGTERM_EXIT_STATUS = 128 + 15  # the shell's status for a process ended by SIGTERM
FSDP_ON_CPU_HINT = " (add --config configs/trainer/fsdp.yaml instead: FSDP2, which runs on CPUs too)"


class RewardCLI(LightningCLI):
    def __init__(self, *args, null_options: tuple[str, ...] = (), claims: Optional[list] = None, **kwargs):
        self.null_options = null_options
        self.claims = claims if claims is not None else []
        # parse errors raise (one line, below) instead of printing the whole usage first; a misspelt
        # option is an error, not an abbreviation of the one it resembles (--trainer.max_epoch)
        strict = {"exit_on_error": False, "allow_abbrev": False}
        kwargs["parser_kwargs"] = {**strict, **{name: dict(strict) for name in SUBCOMMANDS}}
        kwargs.setdefault("trainer_class", precision.Trainer)  # Lightning's, accepting ``precision: auto``
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        # results first: results.json is written before the margin plot, which may fail (a full disk)
        parser.add_lightning_class_args(ResultsWriter, "results")
        parser.add_lightning_class_args(MarginHistory, "margin_history")
        # consumed before parsing (``expand_composed_configs``); accepted in files, never dumped
        parser.add_argument(f"--{COMPOSE_KEY}", type=Optional[list[str]], default=None, help=argparse.SUPPRESS)
        parser.add_argument("--last_checkpoint.every_minutes", type=float, default=DEFAULT_EVERY_MINUTES,
                            help="fit: write checkpoints/last.ckpt at an epoch's end only once this many minutes "
                                 "passed since the last save (0: every epoch); the end of fit always writes it")

    def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand in ("validate", "test"):  # ResultsWriter prints one table of every set instead
            parser.set_defaults(verbose=False)
        return parser

    def _parse_ckpt_path(self) -> None:
        """Which model options a checkpoint brings: ``rm_lightning/checkpoint_options.py`` says why fit keeps
        its own and the other commands take the checkpoint's (``--ckpt_path last`` resolved first, so both
        spellings behave alike)."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        # ``logger: false`` runs keep the same lightning_logs/version_N folders (run_directory.py)
        if config.get("ckpt_path") == "last" and config.get("trainer.logger") in (None, True, False):
            config["ckpt_path"] = str(newest_last_checkpoint(config.get("trainer.default_root_dir") or "."))
        path = Path(str(config.get("ckpt_path"))) if config.get("ckpt_path") else None
        if path is None or not path.exists():
            return  # none, or a missing file: check_config says so in one line
        checkpoint_options.check_checkpoint_path(path)
        checkpoint_options.check_sharded_checkpoint_use(path, subcommand, config.get("trainer.strategy"))
        saved = checkpoint_options.read_model_options(path) if path.is_file() else None
        if not saved:
            return
        model = config.get("model")
        class_path = model.get("class_path") if model is not None else None
        given = model.get("init_args").as_dict() if model is not None and model.get("init_args") else {}
        if subcommand == "fit":
            line = checkpoint_options.check_resume(path, class_path, given, saved)
        else:
            options = checkpoint_options.evaluation_options(given, saved)
            merged = {"class_path": saved.get("_class_path") or class_path, "dict_kwargs": options}
            self.config = self.parser.parse_object({subcommand: {"model": merged}}, self.config)
            line = checkpoint_options.describe_checkpoint_model(class_path, given, saved)
        if line:
            say_once(line)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        for option in self.null_options:
            if option in config and config[option] == "None":
                config[option] = None
        plain = config.as_dict()  # one conversion of the whole namespace for the checks below
        check_config(plain)
        if self.subcommand == "predict":
            check_one_process(plain.get("trainer") or {}, "predict")
        if self.subcommand == "fit":
            check_flex_training(init_args(plain.get("model")), plain.get("trainer") or {})
        if config.get("trainer") is not None:  # ``precision: auto``: the value itself from here on (config.yaml too)
            precision.resolve_in_config(config["trainer"])

    def _instantiate_trainer(self, config: dict, callbacks: list):
        configured = config.get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]
        # every subcommand, though only fit writes: predict/test/validate from a run's checkpoint then restore
        # its callback state into this class, which knows it belongs to the other run, not into Lightning's
        # default ModelCheckpoint, which warns that it cannot restore it
        if config.get("enable_checkpointing") is True and not any(
                isinstance(c, ModelCheckpoint) for c in [*configured, *callbacks]):
            callbacks = [*callbacks, LastCheckpoint(self._get(self.config_init, "last_checkpoint.every_minutes"))]
        if self.subcommand == "fit" and not any(isinstance(c, PhaseTimes) for c in configured):
            callbacks = [*callbacks, PhaseTimes()]  # results.json's timings: start-up, reference, training, ...
        if self.subcommand == "predict" and not any(isinstance(c, PredictionsWriter) for c in configured):
            callbacks = [*callbacks, PredictionsWriter()]  # predictions.jsonl in the run directory
        try:
            trainer = super()._instantiate_trainer(config, callbacks)
        except RMLightningError:
            raise  # ours already names its option
        except (MisconfigurationException, ValueError) as err:  # trainer options this machine or Lightning refuses
            hint = FSDP_ON_CPU_HINT if config.get("strategy") == "fsdp" else ""
            raise SettingError(f"trainer: {err}{hint}") from err
        use_local_checkpoint_io(trainer)  # local checkpoints without an in-memory copy
        if os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0":
            # spawned ranks > 0 follow rank 0's directory
            claim = (claim_logger_directory(trainer.logger, self.subcommand, trainer.callbacks)
                     or claim_loggerless_directory(trainer, self.subcommand))
            if claim is not None:
                self.claims.append(claim)
        return trainer


def newest_last_checkpoint(root: str) -> Path:
    """``last.ckpt`` of the newest run (highest version) under ``root``'s runs."""
    from rm_lightning.callbacks.run_directory import DEFAULT_LOGGER_NAME, newest_run_checkpoint

    found = newest_run_checkpoint(root)
    if found is None:
        pattern = Path(root) / DEFAULT_LOGGER_NAME / "version_*" / "checkpoints" / "last.ckpt"
        raise SettingError(f"ckpt_path: 'last' found no {pattern}; give the checkpoint's path")
    return found


def main(args: list[str] | None = None) -> RewardCLI | None:
    """Run the CLI on ``args`` (default: the command line); bad input raises ``SystemExit(2)`` after one line."""
    tune_process()  # before any model is loaded or matmul run (kept freed memory, bounded kernel caches)
    quiet_console()  # Lightning's tips and library deprecation notices (rm_lightning/console.py)
    claims: list[RunClaim] = []
    try:
        return _run(args, claims)
    except SIGTERMException:  # Lightning's is a SystemExit without a code: exit status 0 for a killed run
        raise SystemExit(SIGTERM_EXIT_STATUS) from None
    except ArgumentError as err:
        raise SystemExit(print_user_error(RMLightningError(one_line(str(err))))) from None
    except Exception as err:
        cause = user_error_behind(err)
        if cause is None:
            raise
        raise SystemExit(print_user_error(cause)) from None


def _run(args: list[str] | None, claims: list) -> RewardCLI:
    try:
        expanded = with_run_defaults(expand_composed_configs(list(sys.argv[1:] if args is None else args)))
        if args is None:  # from the shell: LightningCLI reads sys.argv, and warns when given both
            sys.argv[1:] = expanded
        cli = RewardCLI(RewardModule, PreferenceDataModule, subclass_mode_model=True, subclass_mode_data=True,
                        save_config_kwargs={"overwrite": True}, args=None if args is None else expanded,
                        null_options=null_options(expanded), claims=claims)
    except BaseException:
        for claim in claims:  # Ctrl-C and failures keep what the run wrote; an unused start is removed
            claim.release_after_failed_start()
        raise
    for claim in claims:
        claim.release()
    return cli


def one_line(message: str, limit: int = 400) -> str:
    """A parser message as one line naming the option: jsonargparse nests a message per key and lists
    every type of a union it tried; the innermost key and its first reason are what matters."""
    lines = [line.strip(" -") for line in message.strip().splitlines() if line.strip(" -")]
    keys = re.findall(r'Parser key "([^"]+)"', message)
    if keys:
        option = keys[0] + "".join(f".init_args.{key}" for key in keys[1:])
        # an option given on the command line inside a mapping (``eval_sets.<set>.limit``): its whole key, the
        # set's name included, is in the outermost NestedArg; the Parser keys skip the name
        nested = re.findall(r"NestedArg\(key='([^']+)'", message)
        reasons = ([line for line in lines if "Got value" in line]
                   or [line for line in lines if line.startswith("Expected")])
        allowed = list(dict.fromkeys(re.findall(r"Literal\[([^\]]+)\]", message)))
        given = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Given value:")), None)
        unknown = re.search(r"Problem with given class_path '([^']+)':\s*Option '([^']+)' is not accepted", message)
        if len(keys) > 1 and nested and nested[-1].startswith(f"{keys[1]}."):
            option = f"{keys[0]}.init_args.{nested[-1]}"
        elif len(keys) > 1 and given:  # from a file: the whole value is given, so the entry can be found in it
            got = next((r.split("Got value:", 1)[1].strip() for r in reasons if "Got value:" in r), None)
            key = key_in_given(keys, given, unknown.group(2) if unknown else None, got)
            option = f"{keys[0]}.init_args.{key}" if key else option
        required = re.search(r"Problem with given class_path '([^']+)':\s*the following arguments are required: "
                             r"([^\n]+)", message)
        if reasons and "Got value" in reasons[0]:  # a union's other class (a Callback) refusing the option is moot
            text = f"{option}: {reasons[0]}"
        elif unknown and option.endswith(f".{unknown.group(2)}"):  # the whole key, from a NestedArg
            text = f"{option.rsplit('.', 1)[0]}: {unknown.group(1)} has no option '{unknown.group(2)}'"
        elif unknown:
            text = f"{option}.init_args: {unknown.group(1)} has no option '{unknown.group(2)}'"
        elif required:  # else the union's last alternative (an Iterable, a bool) would be named instead
            text = f"{option}.init_args: {required.group(1)} needs {required.group(2).strip()}"
        elif allowed:
            text = f"{option}: expected one of {', '.join(allowed)}{', or null' if 'NoneType' in message else ''}, " \
                   f"got {given}"
        else:
            text = f"{option}: {reasons[0] if reasons else lines[-1]}" + (f" (got {given})" if given else "")
    else:
        text = "; ".join(lines)
        text = re.sub(r"Subcommand '(\w+)' does not accept option '([^']+)'", r"'\1' has no option --\2", text)
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    return f"{text} (see --help for the options)"


def key_in_given(keys: list[str], given: str, unknown: Optional[str], got: Optional[str]) -> Optional[str]:
    """The whole key (below ``init_args``) of a bad option inside a mapping of named entries given in a config
    file, ``eval_sets.held_out.limt``: jsonargparse's Parser keys skip the entry's name (``eval_sets.init_args``),
    so of several sets the one with the typo went unsaid. ``given`` is the value it was given, as Python text (the
    entries parsed already as Namespaces, the bad one still a dict); the entry is the dict holding the ``unknown``
    option, or the value ``got`` under the innermost key. None when it cannot be told."""
    start = given.find(f"'{keys[1]}': {{")
    if start < 0:
        return None
    if unknown is not None:
        field, value = unknown, ""
    elif len(keys) == 3 and got is not None:
        field, value = keys[2], f" (?:'{re.escape(got)}'|{re.escape(got)})[,}}]"
    else:
        return None
    found = re.search(rf"'([^']+)': \{{[^{{}}]*'{re.escape(field)}':{value}", given[start + len(keys[1]) + 4:])
    return f"{keys[1]}.{found.group(1)}.{field}" if found else None


def null_options(args: list[str]) -> tuple[str, ...]:
    """The dotted options given ``null`` on the command line (``--a.b null`` or ``--a.b=null``)."""
    options = []
    for position, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        if "=" in arg:
            name, value = arg[2:].split("=", 1)
        elif position + 1 < len(args):
            name, value = arg[2:], args[position + 1]
        else:
            continue
        if value in ("null", "None", "~"):
            options.append(name)
    return tuple(options)


def console_main() -> int:
    """The ``rm-lightning`` console script."""
    return exit_status(lambda: main() and 0)


# --- composed config files -------------------------------------------------------------------------


def expand_composed_configs(args: list[str]) -> list[str]:
    """Replace every ``--config FILE`` by the files ``FILE`` composes (recursively), then ``FILE`` itself."""
    expanded, position = [], 0
    while position < len(args):
        arg = args[position]
        if arg in ("--config", "-c") and position + 1 < len(args):
            expanded += config_arguments(Path(args[position + 1]))
            position += 2
        elif arg.startswith("--config="):
            expanded += config_arguments(Path(arg.split("=", 1)[1]))
            position += 1
        else:
            expanded.append(arg)
            position += 1
    return expanded


def config_arguments(path: Path, including: tuple[Path, ...] = ()) -> list[str]:
    """``--config`` arguments for ``path``: each file it composes, in order, then ``path``."""
    arguments = []
    for entry in composed_files(path):
        if entry.resolve() in including + (path.resolve(),):
            raise RMLightningError(f"{path}: '{COMPOSE_KEY}' includes {entry}, which includes {path} again")
        arguments += config_arguments(entry, including + (path.resolve(),))
    return arguments + ["--config", str(path)]


class DuplicateKey(Exception):
    """A mapping key given twice in a config file; the message starts with the line of the second."""


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: YAML (and jsonargparse) keep the last one,
    so a second ``held_out:`` eval set, or a second ``trainer:`` block, replaced the first without a word."""

    def construct_mapping(self, node, deep=False):
        first_lines = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: keys after it may override its keys
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                if key in first_lines:
                    raise DuplicateKey(f"{line}: key {key!r} given twice in one mapping (first on line "
                                       f"{first_lines[key]}); YAML would keep only the last")
                first_lines[key] = line
            except TypeError:  # an unhashable key: SafeLoader's own error says so
                break
        return super().construct_mapping(node, deep=deep)


def composed_files(path: Path) -> list[Path]:
    """The files listed under ``compose:`` in ``path`` (a YAML mapping), resolved against its folder."""
    if not path.is_file():
        return []  # not a file (a YAML string, or a missing path): jsonargparse reports it
    try:
        content = yaml.load(path.read_text(), Loader=UniqueKeyLoader)
    except DuplicateKey as err:
        raise RMLightningError(f"{path}:{err}") from None
    except (yaml.YAMLError, UnicodeDecodeError):
        return []  # jsonargparse reports it, with the line
    entries = content.get(COMPOSE_KEY) if isinstance(content, dict) else None
    if entries is None:
        return []
    if isinstance(entries, str):
        entries = [entries]
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise RMLightningError(f"{path}: '{COMPOSE_KEY}' must be a list of config file paths, got {entries!r}")
    files = [path.parent / entry for entry in entries]
    for entry, file in zip(entries, files):
        if not file.is_file():
            raise RMLightningError(f"{path}: '{COMPOSE_KEY}' names {entry!r}, but {file} is not a file")
    return files


def with_run_defaults(args: list[str]) -> list[str]:
    """Give a run named by its first config file its default directory and results name.

    Inserted right after the subcommand, so that every config file and option after it wins.
    """
    subcommand = next((i for i, arg in enumerate(args) if arg in SUBCOMMANDS), None)
    user_configs = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg in ("--config", "-c")]
    if subcommand is None or not user_configs:
        return args
    name = first_experiment_name(args)
    defaults = ["--trainer.default_root_dir", str(RUNS_ROOT / name), "--results.config_name", name]
    return args[:subcommand + 1] + defaults + args[subcommand + 1:]


def first_experiment_name(args: list[str]) -> str:
    """The stem of the first config file that is not composed by another one: the experiment."""
    configs = [Path(args[i + 1]) for i, arg in enumerate(args[:-1]) if arg in ("--config", "-c")]
    composed = {file.resolve() for config in configs for file in composed_files(config)}
    experiments = [config for config in configs if config.resolve() not in composed]
    return (experiments or configs)[0].stem
