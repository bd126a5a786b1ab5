"""Using a trained reward model: rewards of texts from Python, and the rows ``predict`` writes.

Everything goes through the module's own tokenization (``RewardModule.pair_encoder``) and
collation (``RewardModule.collator``), so a reward scored here is the reward the model had in
training and evaluation. Single responses are laid out as pairs of consecutive responses
(``pairs.records.pair_up``): no second batch layout exists for them.

From Python::

    import rm_lightning
    rm = rm_lightning.load_reward_model("runs/exrm_persona/lightning_logs/version_0/checkpoints/last.ckpt")
    rewards = rm.score(["What is 2+2?"], ["4"])          # tensor([r])
"""

from __future__ import annotations

import importlib
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
import yaml

from rm_lightning.checkpoint_options import is_sharded_checkpoint, sharded_checkpoint_error
from rm_lightning.errors import DataError, SettingError, first_line
from rm_lightning.pairs.records import (EncodedPair, EncodedPairs, EncodedResponses, PreferencePair, pair_up,
                                        unpair)
from rm_lightning.perf.weight_casts import reusing_casts

CLASS_PATH_KEY = "rm_lightning_class_path"  # stored in every checkpoint by ``RewardModule.on_save_checkpoint``


# --- loading ------------------------------------------------------------------------------------


def load_reward_model(checkpoint: str | Path, map_location: str | torch.device = "cpu"):
    """The reward module saved in a Lightning checkpoint, in eval mode.

    Its RM type is read from the checkpoint (written since rm-lightning records it) or, for older
    checkpoints, from the ``config.yaml`` of the run directory the checkpoint sits in.
    """
    path = Path(checkpoint)
    if is_sharded_checkpoint(path):
        raise sharded_checkpoint_error(path, "load_reward_model")
    if path.is_dir():
        raise SettingError(f"{checkpoint} is a folder, not a checkpoint ({_folder_hint(path)})")
    if not path.is_file():
        raise SettingError(f"checkpoint not found: {checkpoint}")
    try:
        stored = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # noqa: BLE001 - truncated, not a torch file, not a zip checkpoint: all unusable
        raise SettingError(f"{checkpoint}: not a readable checkpoint ({type(err).__name__})") from None
    class_path = stored.get(CLASS_PATH_KEY) if isinstance(stored, dict) else None
    class_path = class_path or _class_path_from_run_config(path)
    if class_path is None:
        raise SettingError(f"{checkpoint}: cannot tell its RM type (no {CLASS_PATH_KEY} and no config.yaml in its "
                           f"run directory); load it with e.g. rm_lightning.ExplicitRM.load_from_checkpoint(path)")
    module = reward_module_class(class_path, checkpoint).load_from_checkpoint(path, map_location=map_location)
    return module.eval()


def reward_module_class(class_path: str, checkpoint: str | Path) -> type:
    """The RewardModule subclass a checkpoint names, or one line: a user's RM type whose module is not importable
    here (another working folder, a missing dependency) ended in a bare ModuleNotFoundError traceback."""
    from rm_lightning.models.reward_module import RewardModule  # this module is imported by that one

    module_name, _, class_name = str(class_path).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except ImportError as err:
        raise SettingError(f"{checkpoint}: its RM type {class_path} cannot be imported ({type(err).__name__}: "
                           f"{first_line(err)}); put its module on the Python path (PYTHONPATH)") from None
    except (AttributeError, ValueError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, RewardModule)):
        raise SettingError(f"{checkpoint}: unknown reward-model type {class_path!r}")
    return cls


def _folder_hint(folder: Path) -> str:
    """What to give instead of a folder: a run directory's checkpoint, or ``load_exported`` for an export."""
    inside = folder / "checkpoints" / "last.ckpt"
    if inside.is_file():
        return f"its checkpoint is {inside}"
    if (folder / "config.json").is_file():
        return "an exported reward model loads with rm_lightning.models.export.load_exported(folder)"
    return "give a .ckpt file"


def _class_path_from_run_config(checkpoint: Path) -> Optional[str]:
    """``model.class_path`` of ``<run dir>/config.yaml`` for ``<run dir>/checkpoints/<name>.ckpt``."""
    config = checkpoint.resolve().parent.parent / "config.yaml"
    if not config.is_file():
        return None
    model = (yaml.safe_load(config.read_text()) or {}).get("model") or {}
    return model.get("class_path") if isinstance(model, dict) else None


# --- rewards of texts ---------------------------------------------------------------------------


@contextmanager
def evaluating(module) -> Iterator[None]:
    """Eval mode and no gradients for the duration, then the module's previous mode again."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


def pair_rewards(module, pairs: Sequence[EncodedPair], batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen rewards, rejected rewards) of encoded pairs, ``batch_size`` pairs per forward, on the module's device."""
    if batch_size < 1:
        raise SettingError(f"batch_size must be at least 1, got {batch_size}")
    collate = module.collator()
    chosen, rejected = [], []
    with evaluating(module):
        for begin in range(0, len(pairs), batch_size):
            batch = {k: v.to(module.device) for k, v in collate(pairs[begin:begin + batch_size]).items()}
            rewards = module.rewards(batch).float().cpu()
            part_chosen, part_rejected = rewards.chunk(2)
            chosen.append(part_chosen)
            rejected.append(part_rejected)
    empty = torch.empty(0)
    return (torch.cat(chosen) if chosen else empty), (torch.cat(rejected) if rejected else empty)


def _check_lengths(**texts: Sequence[str]) -> int:
    for name, values in texts.items():
        if isinstance(values, str):  # a string is a sequence too: it would be scored character by character
            raise DataError(f"score: {name} must be a list of strings, got one string (wrap it: [{name}])")
    lengths = {name: len(values) for name, values in texts.items()}
    if len(set(lengths.values())) > 1:
        raise DataError("score: the text lists differ in length (" +
                        ", ".join(f"{name}: {n}" for name, n in lengths.items()) + ")")
    for name, values in texts.items():
        for position, value in enumerate(values):
            if not isinstance(value, str):
                raise DataError(f"score: {name}[{position}] must be a string, got {type(value).__name__}")
    return next(iter(lengths.values()))


def _encoder(module, encoding_options: dict):
    """The module's pair encoder; no length caps unless asked (a text given for scoring is scored whole)."""
    options = {"max_prompt_tokens": None, "max_response_tokens": None, **encoding_options}
    return module.pair_encoder(**options)


def score_responses(module, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 16,
                    **encoding_options) -> torch.Tensor:
    """One reward per (prompt, response), float32 on the CPU, in order."""
    count = _check_lengths(prompts=prompts, responses=responses)
    encoder = _encoder(module, encoding_options)
    encoded = []
    for position, (prompt, response) in enumerate(zip(prompts, responses)):
        item = encoder.encode_response(prompt, response)
        if item is None:
            raise DataError(f"score: response {position} does not fit the length caps {encoding_options}")
        encoded.append(item)
    chosen, rejected = pair_rewards(module, pair_up(encoded), batch_size)
    return unpair(chosen, rejected, count)


def score_pairs(module, prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str],
                batch_size: int = 16, **encoding_options) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen rewards, rejected rewards) of preference pairs, as evaluation computes them."""
    _check_lengths(prompts=prompts, chosen=chosen, rejected=rejected)
    encoder = _encoder(module, encoding_options)
    encoded = []
    for position, texts in enumerate(zip(prompts, chosen, rejected)):
        item = encoder.encode(PreferencePair(*texts))
        if item is None:
            raise DataError(f"score_pairs: pair {position} does not fit the length caps {encoding_options}")
        encoded.append(item)
    return pair_rewards(module, encoded, batch_size)


# --- predict ------------------------------------------------------------------------------------


def predict_batch(module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``predict_step``'s output: each pair's index in its set and its two rewards (float32, CPU)."""
    with reusing_casts(module):  # the predict loop holds one cast of the weights for all of its batches
        chosen, rejected = module.rewards(batch).float().chunk(2)
    return {"pair_index": batch["pair_index"].cpu(), "chosen": chosen.cpu(), "rejected": rejected.cpu()}


def _reward(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None


def prediction_rows(dataset: EncodedPairs, outputs: Sequence[dict[str, torch.Tensor]]) -> list[dict]:
    """The predictions file's rows of one set, in the set's order.

    A set of pairs gives a row per pair (prompt, chosen and rejected rewards, margin); a set of
    single responses (``EncodedResponses``) a row per response (prompt, response, reward).
    """
    index = torch.cat([o["pair_index"] for o in outputs]) if outputs else torch.empty(0, dtype=torch.long)
    chosen = torch.cat([o["chosen"] for o in outputs]) if outputs else torch.empty(0)
    rejected = torch.cat([o["rejected"] for o in outputs]) if outputs else torch.empty(0)
    order = index.argsort()
    index, chosen, rejected = index[order].tolist(), chosen[order].tolist(), rejected[order].tolist()
    texts = dataset.texts or [None] * len(dataset)
    head = {"eval_set": dataset.name, "shift_tag": dataset.tag}
    if isinstance(dataset, EncodedResponses):  # pair k holds responses 2k and 2k + 1 (``pair_up``)
        rewards = {}
        for k, c, r in zip(index, chosen, rejected):
            rewards[2 * k] = c
            if 2 * k + 1 < dataset.num_responses:
                rewards[2 * k + 1] = r
        return [{**head, "kind": "response", "index": _position(dataset, i), "source": _source(texts[i]),
                 "prompt": _text(texts[i], "prompt"), "response": _text(texts[i], "response"),
                 "reward": _reward(reward)} for i, reward in sorted(rewards.items())]
    return [{**head, "kind": "pair", "index": _position(dataset, i), "source": _source(texts[i]),
             "prompt": _text(texts[i], "prompt"), "chosen_reward": _reward(c), "rejected_reward": _reward(r),
             "margin": _reward(c - r)} for i, c, r in zip(index, chosen, rejected)]


def _position(dataset: EncodedPairs, kept_index: int) -> int:
    """Where a kept item stood among the items its source gave (dropped ones counted)."""
    return dataset.positions[kept_index] if dataset.positions is not None else kept_index


def _source(record) -> Optional[str]:
    return getattr(record, "source", None) or None


def _text(record, field: str):
    """A text field as JSON: a string, or a conversation's turns as the ``{role, content}`` messages it was read
    from."""
    value = getattr(record, field, None)
    return [turn.as_message() for turn in value] if isinstance(value, tuple) else value
