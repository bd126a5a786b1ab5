"""The model options a checkpoint brings, and which of them a command keeps.

LightningCLI, given ``--ckpt_path FILE``, merges the model options saved in the checkpoint over the
parsed config, so that ``validate``/``test``/``predict`` rebuild the model its weights belong to. For
``fit`` that silently undid what a resumed run was given: the README's resume is the same command plus
``--ckpt_path``, and a ``token_budget`` or ``activation_checkpointing`` added after running out of memory
must hold. So (``RewardCLI._parse_ckpt_path``):

* ``fit`` resumes with the options it is given; a checkpoint of another RM type is one error line, and
  options that differ from the checkpoint's are said in one line;
* ``validate``, ``test`` and ``predict`` take the checkpoint's options, except those that change how
  rewards are computed but not what they are (``HOW_NOT_WHAT``), where the config's value holds; one
  line says what the checkpoint changed.

The checkpoint is read memory-mapped: its options without its 1.6 GB of tensors.
"""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path
from typing import Any, Optional

from rm_lightning.errors import SettingError

# options of the reward module that set memory or speed, never a reward's value
HOW_NOT_WHAT = frozenset({"token_budget", "memory_limit", "logprob_chunk_size", "activation_checkpointing",
                          "compile_layers", "packed_attention", "decoder_layout", "reference_cache_dir",
                          "cache_reference", "optimizer_in_backward"})
INTERNAL_KEYS = ("_class_path", "_instantiator")


def check_checkpoint_path(path: Path) -> None:
    """A folder is a checkpoint only as FSDP's sharded one (its ``.metadata``); a run folder is named as such."""
    if not path.is_dir() or is_sharded_checkpoint(path):
        return
    inside = path / "checkpoints" / "last.ckpt"
    hint = f"; its checkpoint is {inside}" if inside.is_file() else ""
    raise SettingError(f"ckpt_path: {path} is a folder, not a checkpoint (give a .ckpt file{hint})")


CONSOLIDATE = "python -m lightning.fabric.utilities.consolidate_checkpoint"  # writes <folder>.consolidated


def is_sharded_checkpoint(path: Path) -> bool:
    """FSDP's sharded checkpoint (``configs/trainer/fsdp.yaml``): a folder of one shard per process, a ``.metadata``."""
    return path.is_dir() and (path / ".metadata").is_file()


def sharded_checkpoint_error(path: Path, reader: str, otherwise: str = "") -> SettingError:
    """``reader`` loads one checkpoint file, which a sharded folder is not; Lightning's own tool gathers the
    shards into that file (its default name: the folder's plus ``.consolidated``)."""
    return SettingError(f"{reader}: {path} is a sharded FSDP checkpoint (a folder, one shard per process), not one "
                        f"file; consolidate it with `{CONSOLIDATE} {path}` and give {path}.consolidated{otherwise}")


def check_sharded_checkpoint_use(path: Path, subcommand: str, strategy: Any) -> None:
    """A sharded checkpoint loads only under the FSDP strategy that wrote it; ``predict`` runs in one process."""
    if not is_sharded_checkpoint(path):
        return
    if subcommand == "predict":
        raise sharded_checkpoint_error(path, "predict --ckpt_path")
    if "ModelParallelStrategy" not in str(strategy):
        raise sharded_checkpoint_error(path, f"{subcommand} --ckpt_path",
                                       " (or load it as it was written: add --config configs/trainer/fsdp.yaml)")


def read_model_options(path: Path) -> Optional[dict[str, Any]]:
    """The checkpoint's saved model options (``_class_path`` among them), or None when it saved none."""
    import torch

    try:
        stored = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise SettingError(f"ckpt_path: {path} is not a Lightning checkpoint (torch.load: {type(err).__name__})"
                           ) from None
    if not isinstance(stored, dict):
        raise SettingError(f"ckpt_path: {path} is not a Lightning checkpoint (it holds a {type(stored).__name__})")
    options = dict(stored.get("hyper_parameters") or {})
    options.pop("_instantiator", None)
    return options or None


def rm_class(class_path: Optional[str]):
    """The class a class path names (``rm_lightning.ImplicitRM`` and its module's own path name the same one)."""
    if not class_path:
        return None
    module, _, name = str(class_path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def short_name(class_path: Optional[str]) -> str:
    return str(class_path).rpartition(".")[2] if class_path else "no model"


def differences(given: dict[str, Any], saved: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """option -> (the checkpoint's value, the given value), for the options both name and that differ."""
    return {key: (saved[key], given[key]) for key in saved
            if key not in INTERNAL_KEYS and key in given and _plain(given[key]) != _plain(saved[key])}


def describe(changed: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changed.items())


def check_resume(path: Path, class_path: Optional[str], given: dict[str, Any], saved: dict[str, Any]) -> str:
    """For ``fit``: the same RM type as the checkpoint's, or one error line; the line to say about the options
    that differ (empty when none do)."""
    saved_class = saved.get("_class_path")
    if saved_class and rm_class(saved_class) is not rm_class(class_path):
        raise SettingError(f"ckpt_path: {path} is a checkpoint of {short_name(saved_class)}, but the config trains "
                           f"{short_name(class_path)}; resume with the config it was trained with (its run's "
                           f"config.yaml) or leave out --ckpt_path")
    check_resumed_adapters(path, given, saved)
    changed = differences(given, saved)
    return f"resuming with model options other than the checkpoint's: {describe(changed)}" if changed else ""


def check_resumed_adapters(path: Path, given: dict[str, Any], saved: dict[str, Any]) -> None:
    """LoRA's adapters are parameters of the checkpoint: with none where it has them (or the other way round),
    another rank or other target modules, its state cannot load, and Lightning ends in a traceback listing every
    weight. ``alpha`` and ``dropout`` are no parameters and may change."""
    from rm_lightning.models.lora import lora_settings

    def adapters(options: Any) -> Any:
        settings = lora_settings(_plain(options)) if isinstance(_plain(options), dict) else options
        return {key: settings[key] for key in ("r", "target_modules")} if isinstance(settings, dict) else settings

    if "lora" in given and _plain(adapters(given["lora"])) != _plain(adapters(saved.get("lora"))):
        raise SettingError(f"model.init_args.lora: {path} was trained with lora {saved.get('lora')!r}, the config "
                           f"gives {given['lora']!r}; its adapters (r, target_modules) must match to resume: give "
                           f"the checkpoint's, or leave out --ckpt_path to start a new run")


def describe_checkpoint_model(class_path: Optional[str], given: dict[str, Any], saved: dict[str, Any]) -> str:
    """For validate/test/predict: the line naming what the checkpoint changed in the given model (empty: nothing)."""
    parts = []
    saved_class = saved.get("_class_path")
    if saved_class and rm_class(saved_class) is not rm_class(class_path):
        parts.append(f"RM type {short_name(class_path)} -> {short_name(saved_class)}")
    # the given value -> the checkpoint's, which replaces it (``differences`` pairs them the other way)
    changed = {key: (given_value, saved_value) for key, (saved_value, given_value) in differences(given, saved).items()
               if key not in HOW_NOT_WHAT}
    if changed:
        parts.append(describe(changed))
    return f"the model is the checkpoint's: {', '.join(parts)}" if parts else ""


def evaluation_options(given: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
    """For validate/test/predict: the checkpoint's options, with the given ``HOW_NOT_WHAT`` ones kept."""
    options = {key: value for key, value in saved.items() if key != "_class_path"}
    options.update({key: given[key] for key in HOW_NOT_WHAT if key in given and key in options})
    return options


def _plain(value: Any) -> Any:
    """A comparable form of a parsed value (jsonargparse Namespaces and tuples included)."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value
