"""The timed training steps of rm-lightning ("ours") and of a plain implementation ("naive").

Both run forward + loss, backward and the optimizer step (the module's own optimizer, Adam
at lr 1e-5) on the same collated batch. The naive step is what a first implementation
would write: it calls the causal LM, so logits over the full vocabulary are computed at
every position; IM-RM also takes a full-vocabulary log-softmax everywhere and runs a frozen
reference model on every step instead of reading cached reference log-probs.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator

import torch

from benchmarks.bucketed import bucketed_hidden_states
from rm_lightning.models.loss import bradley_terry_loss
from rm_lightning.perf import packed_pairs
from rm_lightning.perf.layouts import DECODER_LAYOUTS


def autocast(device: str, precision: str):
    return torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


class TrainingStep:
    """One optimizer step per call; keeps each phase's seconds and the loss."""

    def __init__(self, loss_fn: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer, device: str,
                 precision: str):
        self.loss_fn, self.optimizer, self.device, self.precision = loss_fn, optimizer, device, precision
        self.phases: list[dict[str, float]] = []
        self.losses: list[float] = []

    def _now(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def __call__(self) -> None:
        start = self._now()
        with autocast(self.device, self.precision):
            loss = self.loss_fn()
        forward = self._now()
        loss.backward()
        backward = self._now()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        end = self._now()
        self.losses.append(loss.item())
        self.phases.append({"forward": forward - start, "backward": backward - forward, "optimizer": end - backward})


# the module's decoder layouts, plus two only the benchmark runs: "bucketed" (``benchmarks/bucketed.py``)
# and "unshared", packed but with each row's prompt computed for itself
LAYOUTS = (*DECODER_LAYOUTS, "bucketed", "unshared")


@contextmanager
def prefixes_unshared() -> Iterator[None]:
    """Pack rows without sharing a pair's common prefix, as a padded batch computes it: the padding saving alone."""
    shared = packed_pairs.common_prefix_length
    packed_pairs.common_prefix_length = lambda a, b: 0
    try:
        yield
    finally:
        packed_pairs.common_prefix_length = shared


def use_decoder_layout(module, layout: str) -> None:
    """Run ``module`` with one of ``LAYOUTS``, whatever it was built with.

    The module's own layouts go through its own ``hidden_states``. The two benchmark-only ones
    replace ``hidden_states`` on the instance (the reference pass of an IM-RM goes through it too).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown decoder layout {layout!r}; expected one of {LAYOUTS}")
    module.__dict__.pop("hidden_states", None)  # an earlier benchmark-only layout
    module.hparams.decoder_layout = layout if layout in DECODER_LAYOUTS else "packed"
    if layout in DECODER_LAYOUTS:
        return

    def hidden_states(batch, decoder=None):
        decoder = module.decoder if decoder is None else decoder
        if layout == "bucketed":
            return bucketed_hidden_states(decoder, batch)
        with prefixes_unshared():
            return packed_pairs.packed_hidden_states(decoder, batch)
    module.hidden_states = hidden_states


def our_loss(module, batch: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    return lambda: module.run_pair_loss(batch)[0]


# --- naive ---------------------------------------------------------------------------------------


def _causal_lm(model, batch, **kwargs):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 position_ids=batch["position_ids"], use_cache=False, **kwargs)


def full_vocab_response_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of response-token log-probs per row from a log-softmax over every position and token."""
    logps = torch.log_softmax(_causal_lm(model, batch).logits[:, :-1].float(), dim=-1)
    token_logps = logps.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (token_logps * batch["response_mask"][:, 1:]).sum(dim=1)


def naive_imrm_loss(module, reference, batch) -> Callable[[], torch.Tensor]:
    def loss():
        policy = full_vocab_response_logps(module.model, batch)
        with torch.no_grad():
            frozen = full_vocab_response_logps(reference, batch)
        chosen, rejected = (module.beta * (policy - frozen)).chunk(2)
        return bradley_terry_loss(chosen, rejected)
    return loss


def naive_exrm_loss(module, batch) -> Callable[[], torch.Tensor]:
    rows = torch.arange(batch["input_ids"].shape[0], device=batch["input_ids"].device)

    def loss():
        final = _causal_lm(module.model, batch, output_hidden_states=True).hidden_states[-1]
        rewards = module.head(final[rows, batch["last_index"]].to(module.head.weight.dtype)).squeeze(-1).float()
        return bradley_terry_loss(*rewards.chunk(2))
    return loss


def naive_exgrm_loss(module, batch) -> Callable[[], torch.Tensor]:
    rows = torch.arange(batch["input_ids"].shape[0], device=batch["input_ids"].device)

    def loss():
        logps = torch.log_softmax(_causal_lm(module.model, batch).logits.float(), dim=-1)
        p_yes = logps[rows, batch["last_index"], module.answer_ids[0]].exp()
        return bradley_terry_loss(*p_yes.chunk(2))
    return loss
