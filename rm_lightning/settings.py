"""Every setting checked before any expensive work (model load, tokenization, the reference pass).

A bad value ends in one line naming the option and what it may be, exit status 2, before a
backbone is loaded or a pair tokenized: a typo must not cost the minutes a reference pass takes,
and nonsense (a negative size, ``beta 0``, ``max_epochs 0``) must not run and be recorded as a
result. The CLI checks the whole parsed config (``check_config``); the classes check their own
arguments too (``check_options``), so Python callers get the same lines.

Rules go by option name, wherever the option sits (``model.init_args.beta``,
``data.init_args.train.limit``), so a new data module or RM type gets them for free.
"""

from __future__ import annotations

import math
import os
import re
from numbers import Real
from pathlib import Path
from typing import Any, Callable, Sequence

from rm_lightning.errors import DataError, SettingError

Rule = Callable[[str, Any], None]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def whole_number(minimum: int, none: bool = False, also: tuple = ()) -> Rule:
    """A whole number >= ``minimum`` (or null, or one of ``also``)."""
    extra = "".join(f", or {a}" for a in also) + (", or null" if none else "")

    def check(option: str, value: Any) -> None:
        if (value is None and none) or (value in also and _is_int(value)):
            return
        if not _is_int(value) or value < minimum:
            raise SettingError(f"{option}: expected a whole number >= {minimum}{extra}, got {value!r}")
    return check


def finite_number(zero_allowed: bool, none: bool) -> Rule:
    """A finite number > 0 (>= 0 with ``zero_allowed``), or null where ``none``."""
    bound = ">= 0" if zero_allowed else "> 0"

    def check(option: str, value: Any) -> None:
        if value is None and none:
            return
        if not _is_number(value) or not math.isfinite(value) or value < 0 or (value == 0 and not zero_allowed):
            raise SettingError(f"{option}: expected a finite number {bound}{', or null' if none else ''}, got {value!r}")
    return check


def positive_number(none: bool = False) -> Rule:
    return finite_number(zero_allowed=False, none=none)


def non_negative_number(none: bool = True) -> Rule:
    return finite_number(zero_allowed=True, none=none)


def fraction_or_count(minimum_count: int, zero_fraction: bool) -> Rule:
    """Lightning's ``limit_*_batches``/``val_check_interval``: a whole count or a fraction of an epoch."""
    low = "[0, 1]" if zero_fraction else "(0, 1]"

    def check(option: str, value: Any) -> None:
        if value is None:
            return
        if _is_int(value) and value >= minimum_count:
            return
        if isinstance(value, float) and math.isfinite(value) and (0 <= value if zero_fraction else 0 < value) \
                and value <= 1:
            return
        raise SettingError(f"{option}: expected a whole number >= {minimum_count} (batches) or a fraction in "
                           f"{low} of an epoch, or null, got {value!r}")
    return check


def edge_probability(option: str, value: Any) -> None:
    """At 1 every graph is complete, so no vertex order is a wrong answer (``data_modules/hamiltonian.py``)."""
    if not _is_number(value) or not 0 <= value < 1:
        raise SettingError(f"{option}: expected a probability in [0, 1) (at 1 every graph is complete), got {value!r}")


def label_smoothing(option: str, value: Any) -> None:
    """cDPO's flipped-label fraction: at 0.5 the loss no longer says which response is better."""
    if not _is_number(value) or not 0 <= value < 0.5:
        raise SettingError(f"{option}: expected a number in [0, 0.5), got {value!r}")


def one_of(*allowed: str) -> Rule:
    def check(option: str, value: Any) -> None:
        if value not in allowed:
            raise SettingError(f"{option}: expected one of {', '.join(allowed)}, got {value!r}")
    return check


LORA_KEYS = ("r", "alpha", "dropout", "target_modules")


def lora_options(option: str, value: Any) -> None:
    """``lora``: null (full fine-tuning) or a mapping of r, alpha, dropout, target_modules (``models/lora.py``)."""
    if value is None:
        return
    if not isinstance(value, dict):
        raise SettingError(f"{option}: expected null or a mapping with keys {', '.join(LORA_KEYS)}, got {value!r}")
    unknown = sorted(set(value) - set(LORA_KEYS))
    if unknown:
        raise SettingError(f"{option}: unknown key(s) {', '.join(map(str, unknown))}; expected {', '.join(LORA_KEYS)}")
    if "r" in value:
        whole_number(1)(f"{option}.r", value["r"])
    if "alpha" in value:
        positive_number()(f"{option}.alpha", value["alpha"])
    if "dropout" in value and not (_is_number(value["dropout"]) and 0 <= value["dropout"] < 1):
        raise SettingError(f"{option}.dropout: expected a number in [0, 1), got {value['dropout']!r}")
    target = value.get("target_modules", "all-linear")
    names = [target] if isinstance(target, str) else target
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) and n for n in names):
        raise SettingError(f"{option}.target_modules: expected all-linear, a module name or a list of module "
                           f"names, got {target!r}")


def unit_interval_open_right(option: str, value: Any) -> None:
    if value is None:
        return
    values = value if isinstance(value, (list, tuple)) else [value]
    if not all(_is_number(v) and 0 <= v < 1 for v in values):
        raise SettingError(f"{option}: expected numbers in [0, 1), got {value!r}")


# Rules by the option's last name. ``num_workers`` may be 0; every other size or count must
# be at least 1: a size of 0 trains on nothing, a negative one slices a list from its end.
OPTION_RULES: dict[str, Rule] = {
    # data
    "batch_size": whole_number(1), "eval_batch_size": whole_number(1),
    "num_train": whole_number(1), "num_test": whole_number(1), "num_train_eval": whole_number(1, none=True),
    "num_vertices": whole_number(4), "edge_prob": edge_probability, "limit": whole_number(1, none=True),
    "max_prompt_tokens": whole_number(1, none=True), "max_response_tokens": whole_number(1, none=True),
    "eval_max_prompt_tokens": whole_number(1, none=True), "eval_max_response_tokens": whole_number(1, none=True),
    "train_sample": whole_number(0, none=True), "num_workers": whole_number(0),
    # model
    "beta": positive_number(), "logprob_chunk_size": whole_number(1),
    # training options (``models/loss.py``, ``models/lora.py``); each RM type checks which ``loss`` it has
    "center_rewards_coefficient": non_negative_number(none=True), "label_smoothing": label_smoothing,
    "loss": one_of("bt", "sigmoid", "hinge", "ipo", "yes_no_ce"), "lora": lora_options,
    # optimizer init_args
    "lr": positive_number(), "weight_decay": non_negative_number(), "eps": non_negative_number(),
    "momentum": non_negative_number(), "betas": unit_interval_open_right,
}

TRAINER_RULES: dict[str, Rule] = {
    "max_epochs": whole_number(1, none=True, also=(-1,)),
    "min_epochs": whole_number(0, none=True),
    "max_steps": whole_number(1, also=(-1,)),
    "min_steps": whole_number(0, none=True),
    "check_val_every_n_epoch": whole_number(1, none=True),
    "val_check_interval": fraction_or_count(1, zero_fraction=False),
    "limit_train_batches": fraction_or_count(1, zero_fraction=False),
    "limit_val_batches": fraction_or_count(0, zero_fraction=True),
    "limit_test_batches": fraction_or_count(1, zero_fraction=False),
    "accumulate_grad_batches": whole_number(1),
    "log_every_n_steps": whole_number(0, none=True),
    "num_sanity_val_steps": whole_number(0, none=True, also=(-1,)),
    "gradient_clip_val": non_negative_number(),
}


def check_options(prefix: str, options: dict[str, Any], rules: dict[str, Rule] = OPTION_RULES,
                  sets: Sequence[str] = ()) -> None:
    """Check every option of ``options`` (nested mappings too) that a rule names; ``prefix`` names the block.
    ``sets``: the other pair sources beside this one (the sets of an ``eval_sets``), named when it has none."""
    if "path" in options and "hub" in options and (options["path"] is None) == (options["hub"] is None):
        if options["path"] is not None:
            raise SettingError(f"{prefix}: give exactly one of `path` or `hub` (got path={options['path']!r}, "
                               f"hub={options['hub']!r}); an override merges into the config's set, so set the "
                               f"other to null")
        # a set named on the command line that the config lacks (a misspelt name) is a new set with no source
        named = f"; no set of that name in the config (its sets: {', '.join(sets)})?" if sets else ""
        raise SettingError(f"{prefix}: give exactly one of `path` or `hub` (got path=None, hub=None){named}")
    sources = [name for name, value in options.items() if is_source(value) and value.get("path", value.get("hub"))]
    for name, value in options.items():
        option = f"{prefix}.{name}" if prefix else str(name)
        if name in rules:  # a rule may name a mapping (``lora``); other mappings are checked key by key
            rules[name](option, value)
        elif isinstance(value, dict):
            check_options(option, value, rules, sets=[source for source in sources if source != name])


def is_source(value: Any) -> bool:
    """A pair source's options (``PairSource``): a mapping with ``path`` and ``hub``."""
    return isinstance(value, dict) and "path" in value and "hub" in value


def check_eval_every_n_epochs(option: str, value: Any) -> None:
    for name, every in (value or {}).items():
        whole_number(1)(f"{option}.{name}", every)


def check_trainer(trainer: dict[str, Any], prefix: str = "trainer") -> None:
    for name, rule in TRAINER_RULES.items():
        if name in trainer:
            rule(f"{prefix}.{name}", trainer[name])
    if trainer.get("max_epochs") == -1 and trainer.get("max_steps", -1) == -1 and trainer.get("max_time") is None:
        raise SettingError(f"{prefix}.max_epochs: -1 (no limit) needs trainer.max_steps or trainer.max_time, "
                           f"else the run never ends")
    root = trainer.get("default_root_dir")
    if root is not None:
        check_writable_folder(f"{prefix}.default_root_dir", root)
    check_model_parallel_sizes(trainer, prefix)


def check_model_parallel_sizes(trainer: dict[str, Any], prefix: str = "trainer") -> None:
    """ModelParallelStrategy's mesh must hold every process: otherwise each of them fails at its start, each
    with its own traceback. rm-lightning shards along data_parallel only, so tensor_parallel_size must be 1
    and data_parallel_size the number of processes."""
    strategy = trainer.get("strategy")
    if not (isinstance(strategy, dict) and str(strategy.get("class_path", "")).endswith("ModelParallelStrategy")):
        return
    sizes = init_args(strategy)
    data, tensor = sizes.get("data_parallel_size"), sizes.get("tensor_parallel_size")
    devices, nodes = device_count(trainer), trainer.get("num_nodes", 1)
    if not all(_is_int(value) for value in (data, tensor, devices, nodes)):
        return  # "auto" somewhere: Lightning decides
    processes = devices * nodes
    fix = f"--{prefix}.strategy.init_args.data_parallel_size {processes}"
    if tensor != 1:  # perf/sharding refuses it too, in configure_model: here it is one line before any load
        raise SettingError(
            f"{prefix}.strategy.init_args.tensor_parallel_size: {tensor}, but rm-lightning shards with FSDP only; "
            f"add {fix} --{prefix}.strategy.init_args.tensor_parallel_size 1")
    if data != processes:
        raise SettingError(
            f"{prefix}.strategy.init_args.data_parallel_size: {data} must equal the number of processes, "
            f"{prefix}.devices {devices} x num_nodes {nodes} = {processes}; add {fix}")


def device_count(trainer: dict[str, Any]) -> Any:
    """``trainer.devices`` as a number where it is one (a list counts its devices); "auto" stays as it is."""
    devices = trainer.get("devices")
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)  # the command line's --trainer.devices 3 arrives as "3"
    return len(devices) if isinstance(devices, list) else devices


def check_one_process(trainer: dict[str, Any], command: str) -> None:
    """``predict`` writes one predictions file from one process. Checked before Lightning starts the processes,
    each of which would otherwise load the model, fail with the same line and leave a run directory behind."""
    devices, nodes = device_count(trainer), trainer.get("num_nodes", 1)
    if (_is_int(devices) and devices > 1) or (_is_int(nodes) and nodes > 1):
        raise SettingError(f"{command} runs in one process: trainer.devices is {devices} and trainer.num_nodes "
                           f"{nodes}; add --trainer.devices 1 --trainer.num_nodes 1 --trainer.strategy auto")


def check_writable_folder(option: str, path: str | os.PathLike) -> None:
    """A folder that exists and is writable, or that can be created (its nearest existing parent is)."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise SettingError(f"{option}: {path} is a file, not a folder")
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise SettingError(f"{option}: cannot create {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == path else f" (in {existing})"
        raise SettingError(f"{option}: {path} is not writable{where}")


def init_args(block: Any) -> dict[str, Any]:
    """The ``init_args`` of a ``{class_path, init_args}`` block (or the block itself)."""
    if isinstance(block, dict):
        return block.get("init_args") if isinstance(block.get("init_args"), dict) else {}
    return {}


def check_config(config: dict[str, Any]) -> None:
    """Check a parsed CLI config (one subcommand's) before any class is built."""
    from rm_lightning.models.backbones import check_backbone_name

    check_trainer(config.get("trainer") or {})
    check_callbacks((config.get("trainer") or {}).get("callbacks"))
    model, data = init_args(config.get("model")), init_args(config.get("data"))
    if "backbone" in model:
        check_backbone_name(model["backbone"], option="model.init_args.backbone")
    for key in ("optimizer", "lr_scheduler"):
        if isinstance(model.get(key), dict):
            check_options(f"model.init_args.{key}.init_args", init_args(model[key]))
    check_options("model.init_args", {k: v for k, v in model.items() if k not in ("optimizer", "lr_scheduler")})
    check_options("data.init_args", {k: v for k, v in data.items() if k != "eval_every_n_epochs"})
    check_eval_every_n_epochs("data.init_args.eval_every_n_epochs", data.get("eval_every_n_epochs"))
    if isinstance(data.get("eval_sets"), dict):
        check_eval_set_names(data["eval_sets"])
    results = config.get("results") or {}
    if results.get("dirpath"):
        check_writable_folder("results.dirpath", results["dirpath"])
    check_ckpt_path(config.get("ckpt_path"))
    last_checkpoint = config.get("last_checkpoint") or {}
    if "every_minutes" in last_checkpoint:
        non_negative_number(none=False)("last_checkpoint.every_minutes", last_checkpoint["every_minutes"])


EVAL_SET_NAME = re.compile(r"[A-Za-z0-9_-]+")  # no '.': a name keys a torch ModuleDict of its metrics
TRAIN_SAMPLE = "train_sample"  # the eval set of training pairs a data module may add
RESERVED_SET_NAMES = ("train", TRAIN_SAMPLE)  # the training set's name and that one


def check_eval_set_names(names: Any) -> None:
    """Eval set names become metric keys (``val/<name>/accuracy``) and keys of a ``ModuleDict``."""
    for name in names or ():
        if name in RESERVED_SET_NAMES or not EVAL_SET_NAME.fullmatch(str(name)):
            raise DataError(f"eval set name {name!r} is not allowed: use letters, digits, '_' or '-', and not "
                            f"{' or '.join(map(repr, RESERVED_SET_NAMES))}")


def check_callbacks(callbacks: Any) -> None:
    """The options of a configured ``GenerationCheck`` (the one callback of ours configured per experiment)."""
    from rm_lightning.callbacks.generation_check import OPTION_RULES as GENERATION_CHECK_RULES

    for block in callbacks if isinstance(callbacks, list) else [callbacks]:
        if isinstance(block, dict) and str(block.get("class_path", "")).endswith("GenerationCheck"):
            check_options("GenerationCheck", init_args(block), GENERATION_CHECK_RULES)


def check_ckpt_path(ckpt_path: Any) -> None:
    if ckpt_path is None or ckpt_path in ("last", "best", "hpc", "registry") or str(ckpt_path).startswith("registry:"):
        return
    if not Path(ckpt_path).exists():  # a file, or a folder (a sharded FSDP checkpoint)
        raise SettingError(f"ckpt_path: no checkpoint file at {ckpt_path} (give a .ckpt file, or 'last' to resume "
                           f"from the run's last.ckpt)")


def check_validation_fits_an_epoch(trainer, batches_per_epoch: int) -> None:
    """A whole-number ``val_check_interval`` must fit in an epoch (Lightning finds out only after the
    reference pass). Called by the data module once it knows the number of batches, before the model's setup."""
    interval, limit = trainer.val_check_interval, trainer.limit_train_batches
    if isinstance(limit, int):
        batches_per_epoch = min(batches_per_epoch, limit)
    elif isinstance(limit, float):
        batches_per_epoch = int(batches_per_epoch * limit)
    if _is_int(interval) and trainer.check_val_every_n_epoch is not None and interval > batches_per_epoch:
        raise SettingError(f"trainer.val_check_interval: {interval} is more than the {batches_per_epoch} training "
                           f"batches of an epoch; expected at most {batches_per_epoch}, a fraction in (0, 1], or "
                           f"trainer.check_val_every_n_epoch null to count batches across epochs")
