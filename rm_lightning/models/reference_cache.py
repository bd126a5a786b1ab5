"""IM-RM reference log-probs: computed once per dataset, stored with its pairs and on disk.

The reference is the frozen initial model and the data is fixed, so each pair's reference
log-probs never change. They are computed in one pass before training, attached to the
encoded pairs (the collator hands them to every batch) and saved under a key that names
everything they depend on, so the next run with the same weights, data, precision and layout
reads them back instead.
"""

from __future__ import annotations

import hashlib
from contextlib import nullcontext
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from rm_lightning.files import write_atomically
from rm_lightning.pairs.records import EncodedPairs
from rm_lightning.perf.micro_batches import pair_tokens, plan_micro_batches, select_pairs


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A cheap hash of a model's weights (names, shapes and the first values of every tensor)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)[:64].float().cpu()
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(flat.numpy().tobytes())
    return digest.hexdigest()


def cache_path(directory: Path, weights: str, dataset: EncodedPairs, precision: str, layout: str) -> Path:
    """Where the log-probs of ``dataset`` under these weights, precision and decoder layout are kept.

    The layout is part of the key: layouts agree only up to float rounding, and the policy's
    log-probs at the initial weights must equal the reference's exactly.
    """
    identity = f"{weights}|{dataset.fingerprint()}|{precision}|{layout}"
    return directory / f"{hashlib.sha256(identity.encode()).hexdigest()[:32]}.pt"


def attach(dataset: EncodedPairs, values: torch.Tensor) -> None:
    """Give each pair its (chosen, rejected) reference log-probs from a [pairs, 2] tensor."""
    for pair, (chosen, rejected) in zip(dataset.pairs, values.tolist()):
        pair.reference_logps = (chosen, rejected)


def load_or_compute(path: Path, dataset: EncodedPairs, compute) -> torch.Tensor:
    """The [pairs, 2] log-probs stored at ``path``, or ``compute()``'s, stored there for next time."""
    if path.is_file():
        values = torch.load(path)
        rank_zero_info(f"IM-RM: reference log-probs of '{dataset.name}' read from {path}")
        return values
    values = compute()
    write_atomically(path, lambda staging: torch.save(values, staging))
    return values


@torch.no_grad()
def reference_pass(module, model: torch.nn.Module, dataset: EncodedPairs, batch_size: int) -> torch.Tensor:
    """[pairs, 2] float64 response log-probs of ``model`` on ``dataset``, in ``module``'s layout and
    under its trainer's precision (the reference of the policy's own forward), each batch in
    micro-batches within the module's token budget when it has one (``auto`` is resolved only at
    the first training batch, so this pass runs whole batches then)."""
    trainer = getattr(module, "_trainer", None)
    device = trainer.strategy.root_device if trainer is not None else module.device
    # a factory, entered once per batch: the precision plugin's autocast contexts are single-use
    context = trainer.precision_plugin.forward_context if trainer is not None else nullcontext
    was_training, original_device = model.training, next(model.parameters()).device
    model.eval().to(device)
    loader = DataLoader(dataset.pairs, batch_size=batch_size, collate_fn=module.collator())
    values = []
    show = trainer is None or trainer.is_global_zero
    for batch in tqdm(loader, desc=f"reference log-probs [{dataset.name}]", disable=not show, leave=False):
        batch = {k: v.to(device) for k, v in batch.items() if k != "reference_logps"}
        layout = module.hparams.decoder_layout
        plan = plan_micro_batches(pair_tokens(batch, layout), getattr(module, "resolved_token_budget", None),
                                  padded=layout == "padded")
        batch_values = torch.empty(batch["input_ids"].shape[0] // 2, 2, dtype=torch.float64)
        for members in plan:
            micro = select_pairs(batch, members)
            with context():
                hidden = module.hidden_states(micro, decoder=model.base_model)
                chosen, rejected = module.response_logps(hidden, micro, model=model).double().cpu().chunk(2)
            batch_values[members] = torch.stack([chosen, rejected], dim=1)
        values.append(batch_values)
    model.train(was_training).to(original_device)
    return torch.cat(values)
