"""IM-RM reference log-probs: computed once per dataset, stored with its pairs and on disk.

The reference is the frozen initial model and the data is fixed, so each pair's reference
log-probs never change. They are computed in one pass before training, attached to the
encoded pairs (the collator hands them to every batch) and saved under a key that names
everything they depend on, so the next run with the same weights, data, precision and layout
reads them back instead.

A cache file checks itself (``rm_lightning/cache_entries.py``): it holds what it was computed from
(``identity``: weights fingerprint, token-id hash, precision, layout, format version) and a SHA-256 of
its values. A file whose identity or checksum does not match, or that cannot be read, is reported in
one line naming it and recomputed, never used: a wrong reference silently shifts every IM-RM reward.
A cache folder that cannot be written (read-only, a file) means computing in memory, with one warning.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Optional

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from rm_lightning.cache_entries import UnusableEntry, entry_path, read_entry, write_entry
from rm_lightning.models.lora import base_state_dict
from rm_lightning.pairs.records import EncodedPair, EncodedPairs
from rm_lightning.perf.by_prompt import collated_batches, distinct_by_prompt, pair_key
from rm_lightning.perf.micro_batches import pair_tokens, plan_micro_batches, select_pairs
from rm_lightning.perf.sharding import is_sharded, local_part
from rm_lightning.perf.weight_casts import evaluation_forward, shared_weight_casts


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A cheap hash of a model's weights (names, shapes and the first values of every tensor); of a LoRA
    model, its base weights' (its reference, shared with the full fine-tuning run's cache)."""
    return _first_values_digest((f"{name}{tuple(tensor.shape)}", tensor)
                                for name, tensor in base_state_dict(model).items())


def parameters_fingerprint(model: torch.nn.Module) -> str:
    """A hash of every weight's first values and sum, LoRA adapters included: whether a policy has moved at all.

    The sums matter: a step can leave every weight's first values as they were (with only the
    unembedding trained, the rows of the tokens in the batch move and row 0 need not), and a policy
    taken for its own reference then would score exactly 0. Names are left out, so wrappers that
    rename modules (compiled or checkpointed layers) do not count as moves; of a sharded weight,
    this process's part.
    """
    locals_ = [local_part(tensor) for tensor in model.state_dict().values()]
    sums = torch.stack([float64_sum(local) for local in locals_]).cpu()  # one device sync
    first_values = _first_values_digest((f"{tuple(local.shape)}", local) for local in locals_)
    return hashlib.sha256(first_values.encode() + sums.numpy().tobytes()).hexdigest()


def float64_sum(tensor: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
    """The sum of every value, accumulated in float64 a chunk at a time: ``sum(dtype=torch.float64)`` of a
    whole tensor first makes a float64 copy of it (216 MB for SmolLM2's embedding), which a process that
    keeps freed memory (``perf/host_memory``) then holds for the rest of the run."""
    flat = tensor.detach().reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    for part in flat.split(chunk):
        total += part.sum(dtype=torch.float64)
    return total


def _first_values_digest(labelled: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over each (label, tensor): the label, then the tensor's first 64 values as float32."""
    digest = hashlib.sha256()
    for label, tensor in labelled:
        digest.update(label.encode())
        digest.update(tensor.detach().reshape(-1)[:64].float().cpu().numpy().tobytes())
    return digest.hexdigest()


FORMAT_VERSION = 4  # 3: the packed layout shares prefixes across the pairs of a batch (other float rounding);
# 4: the pass batches the pairs of every set together, by prompt (other batches, other rounding)


def cache_identity(weights: str, dataset: EncodedPairs, precision: str, layout: str) -> dict[str, str]:
    """What the log-probs of ``dataset`` depend on: weights, token ids, precision, decoder layout, format.

    The layout is part of it: layouts agree only up to float rounding, and the policy's log-probs
    at the initial weights must equal the reference's exactly.
    """
    return {"format_version": str(FORMAT_VERSION), "weights": weights, "tokens": dataset.fingerprint(),
            "precision": precision, "layout": layout}


def read_values(path: Path, identity: dict[str, str], num_pairs: int) -> torch.Tensor:
    """The [num_pairs, 2] float64 values stored at ``path`` for ``identity``; ``UnusableEntry`` otherwise."""
    values = read_entry(path, identity, ("values",), "reference cache")["values"]
    if values.dtype != torch.float64 or tuple(values.shape) != (num_pairs, 2):
        raise UnusableEntry(f"holds {tuple(values.shape)} {values.dtype} values, expected float64 [{num_pairs}, 2]")
    return values


def attach(dataset: EncodedPairs, values: torch.Tensor) -> None:
    """Give each pair its (chosen, rejected) reference log-probs from a [pairs, 2] tensor."""
    for pair, (chosen, rejected) in zip(dataset.pairs, values.tolist()):
        pair.reference_logps = (chosen, rejected)


def reuse_known(dataset: EncodedPairs, known: dict[tuple, tuple[float, float]]) -> None:
    """Give the pairs of ``dataset`` that another set of the run already scored (``known``, by ``pair_key``)
    those log-probs: Persona's original responses of train prompts are the training pairs themselves, so
    that set then needs no pass of its own."""
    for pair in dataset.pairs:
        if pair.reference_logps is None:
            pair.reference_logps = known.get(pair_key(pair))


def remember(dataset: EncodedPairs, known: dict[tuple, tuple[float, float]]) -> None:
    known.update((pair_key(pair), pair.reference_logps) for pair in dataset.pairs if pair.reference_logps is not None)


def cached_values(directory: Path, identity: dict[str, str], dataset: EncodedPairs) -> Optional[torch.Tensor]:
    """The [pairs, 2] log-probs cached for ``identity`` in ``directory``, or None (none there, or unusable: said)."""
    path = entry_path(directory, identity)
    if not path.is_file():
        return None
    try:
        values = read_values(path, identity, len(dataset))
    except UnusableEntry as why:
        rank_zero_warn(f"IM-RM reference cache {path}: {why}; recomputing it")
        return None
    rank_zero_info(f"IM-RM: reference log-probs of '{dataset.name}' read from {path}")
    return values


def store(directory: Path, identity: dict[str, str], dataset: EncodedPairs) -> None:
    """Cache the log-probs every pair of ``dataset`` now has, under ``identity``, for the next run."""
    values = torch.tensor([pair.reference_logps for pair in dataset.pairs], dtype=torch.float64).reshape(-1, 2)
    write_entry(directory, identity, {"values": values},
                "IM-RM reference cache folder {directory} cannot be written ({why}); "
                "reference log-probs are computed in memory for this run only")


def unscored_pairs(datasets: Iterable[EncodedPairs]) -> list[EncodedPair]:
    """Each distinct pair of ``datasets`` still without reference log-probs, those of one prompt side by side,
    whichever set they are in (``perf/by_prompt.py``)."""
    return distinct_by_prompt(pair for dataset in datasets for pair in dataset.pairs if pair.reference_logps is None)


@torch.no_grad()
def reference_pass(module, model: torch.nn.Module, dataset: EncodedPairs, batches: list[list[int]]) -> torch.Tensor:
    """[pairs, 2] float64 response log-probs of ``model`` on ``dataset`` (pair indices per batch in
    ``batches``), in ``module``'s layout and under its trainer's precision (the reference of the
    policy's own forward), each batch in micro-batches within the module's token budget when it has
    one (``auto`` is resolved only at the first training batch, so this pass runs whole batches then)."""
    trainer = getattr(module, "_trainer", None)
    device = trainer.strategy.root_device if trainer is not None else module.device
    was_training, original_device = model.training, next(model.parameters()).device
    model.eval().to(device)
    # as Lightning's own bars: rank 0 only, and not at all with ``trainer.enable_progress_bar: false``
    show = trainer is None or (trainer.is_global_zero and trainer.progress_bar_callback is not None)
    values = torch.empty(len(dataset), 2, dtype=torch.float64)
    # the weights do not change in this pass: one cast to the autocast dtype for all of it, unless sharded
    with shared_weight_casts(enabled=not is_sharded(module)):
        for members, batch in collated_batches(module, dataset.pairs, batches,
                                               f"reference log-probs [{dataset.name}]", show):
            values[members] = _reference_batch(module, model, batch, device)
    model.train(was_training).to(original_device)
    return values


def _reference_batch(module, model: torch.nn.Module, batch: dict, device) -> torch.Tensor:
    """[pairs, 2] log-probs of one batch, in micro-batches within the module's token budget."""
    batch = {k: v.to(device) for k, v in batch.items() if k != "reference_logps"}
    layout = module.hparams.decoder_layout
    plan = plan_micro_batches(pair_tokens(batch, layout), getattr(module, "resolved_token_budget", None),
                              padded=layout == "padded")
    batch_values = torch.empty(batch["input_ids"].shape[0] // 2, 2, dtype=torch.float64)
    for members in plan:
        micro = select_pairs(batch, members)
        with evaluation_forward(module):
            hidden = module.hidden_states(micro, decoder=model.base_model)
            chosen, rejected = module.response_logps(hidden, micro, model=model).double().cpu().chunk(2)
        batch_values[members] = torch.stack([chosen, rejected], dim=1)
    return batch_values
