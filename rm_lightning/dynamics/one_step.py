"""What one gradient step on a training batch does to the rewards of other pairs (the paper's §4).

``one_step_change`` takes one plain gradient step of size ``eta`` on the training batch's loss,
measures the exact change of every probe pair's rewards, restores the weights bit for bit, and
returns beside the measurement its first-order prediction:

* for any RM type and any trainable parameters, ``-eta * <grad r(probe), grad L(train)>``: the
  empirical neural-tangent-kernel form, exact as ``eta -> 0``; computed as the derivative of the
  probe rewards along ``-eta * grad L`` in one forward-mode pass (a backward per pair as fallback);
* the part of that prediction that flows through the output layer, in the paper's closed forms
  (``rm_lightning.dynamics.closed_forms``): for an EX-RM the hidden-similarity term, for an IM-RM
  the token terms split into matching and non-matching tokens.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from rm_lightning.dynamics.closed_forms import output_layer_terms
from rm_lightning.pairs.records import EncodedPair

Batch = dict[str, torch.Tensor]


@dataclass
class OneStepChange:
    """Per probe pair, rewards as ``[pairs, 2]`` (chosen, rejected) and margins as ``[pairs]``."""

    eta: float
    before: torch.Tensor  # rewards before the step
    measured: torch.Tensor  # exact change of the rewards after one step of size eta
    predicted_margin: torch.Tensor  # -eta * <grad margin, grad L>
    predicted: torch.Tensor | None = None  # -eta * <grad reward, grad L>, when asked for
    output_layer: dict[str, torch.Tensor] = field(default_factory=dict)  # closed-form margin terms

    @property
    def measured_margin(self) -> torch.Tensor:
        return self.measured[:, 0] - self.measured[:, 1]


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def loss_gradient(module, batch: Batch, params: Sequence[torch.nn.Parameter]) -> list[torch.Tensor]:
    """grad of the module's own training loss (``pair_loss``) on ``batch``; no ``.grad`` is touched."""
    with torch.enable_grad():
        loss = module.pair_loss(batch)[0]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def inner(a: Sequence[torch.Tensor | None], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b) if x is not None)


@torch.no_grad()
def probe_rewards(module, probe: Batch, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """[pairs, 2] rewards (chosen, rejected) of a collated probe batch (from its hidden states, if given)."""
    hidden = module.hidden_states(probe) if hidden is None else hidden
    chosen, rejected = module.compute_rewards(hidden, probe).float().chunk(2)
    return torch.stack([chosen, rejected], dim=1)


@torch.no_grad()
def measured_change(module, params: Sequence[torch.nn.Parameter], grads: Sequence[torch.Tensor], eta: float,
                    probe: Batch, before: torch.Tensor) -> torch.Tensor:
    """Rewards after ``params -= eta * grads``, minus ``before``; the parameters are restored bit for bit."""
    saved = [p.detach().clone() for p in params]
    try:
        for p, g in zip(params, grads):
            p.sub_(eta * g.to(p.dtype))
        return probe_rewards(module, probe) - before
    finally:
        for p, value in zip(params, saved):
            p.copy_(value)


def predicted_change(module, params: Sequence[torch.nn.Parameter], grads: Sequence[torch.Tensor], eta: float,
                     pairs: Sequence[EncodedPair], rewards: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """-eta * <grad r, grad L> for every probe pair: the margin prediction [pairs] and, with ``rewards``,
    the chosen and rejected predictions [pairs, 2].

    One forward-mode pass over the whole probe batch (the derivative of every reward along -grad L)
    where the model's operations support forward-mode differentiation; otherwise a backward pass
    per pair, which costs a full parameter gradient each.
    """
    try:
        both = predicted_by_forward_mode(module, params, grads, eta, pairs)
    except (RuntimeError, NotImplementedError) as error:
        warn_once(f"dynamics: forward-mode differentiation failed ({str(error).splitlines()[0][:120]}); "
                  f"predicting with one backward pass per probe pair instead")
        return predicted_by_backward(module, params, grads, eta, pairs, rewards)
    return both[:, 0] - both[:, 1], (both if rewards else None)


class RewardsOf(torch.nn.Module):
    """A reward module seen as a function of its parameters, for ``torch.func.functional_call``."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.module.rewards(batch).float()


def predicted_by_forward_mode(module, params: Sequence[torch.nn.Parameter], grads: Sequence[torch.Tensor],
                              eta: float, pairs: Sequence[EncodedPair]) -> torch.Tensor:
    """[pairs, 2]: the directional derivative of every probe reward along -eta * grad L (a JVP)."""
    import torch.autograd.forward_ad as forward_ad
    from torch.func import functional_call

    probe = {k: v.to(module.device) for k, v in module.collator()(list(pairs)).items()}
    wrapper = RewardsOf(module)
    direction = {id(p): -eta * g.to(p.dtype) for p, g in zip(params, grads)}
    named = [(name, p) for name, p in wrapper.named_parameters() if id(p) in direction]
    if len(named) != len(params):
        raise RuntimeError("some trainable parameters are not parameters of the module")
    with torch.no_grad(), forward_ad.dual_level():
        duals = {name: forward_ad.make_dual(p.detach(), direction[id(p)]) for name, p in named}
        derivative = forward_ad.unpack_dual(functional_call(wrapper, duals, (probe,), strict=False)).tangent
    if derivative is None:  # no reward depends on the trainable parameters
        derivative = torch.zeros(2 * len(pairs))
    chosen, rejected = derivative.float().chunk(2)
    return torch.stack([chosen, rejected], dim=1)


def predicted_by_backward(module, params: Sequence[torch.nn.Parameter], grads: Sequence[torch.Tensor], eta: float,
                          pairs: Sequence[EncodedPair], rewards: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``predicted_change`` one pair at a time (a backward per pair, memory of one pair)."""
    collate, margins, both = module.collator(), [], []
    for pair in pairs:
        batch = {k: v.to(module.device) for k, v in collate([pair]).items()}
        with torch.enable_grad():
            chosen, rejected = module.rewards(batch).float()
            if rewards:
                g_chosen = torch.autograd.grad(chosen, params, retain_graph=True, allow_unused=True)
                g_rejected = torch.autograd.grad(rejected, params, allow_unused=True)
                pair_change = torch.stack([inner(g_chosen, grads), inner(g_rejected, grads)])
                both.append(-eta * pair_change)
                margins.append(-eta * (pair_change[0] - pair_change[1]))
            else:
                g_margin = torch.autograd.grad(chosen - rejected, params, allow_unused=True)
                margins.append(-eta * inner(g_margin, grads))
    margin = torch.stack(margins).float() if margins else torch.zeros(0)
    return margin, (torch.stack(both).float() if rewards and both else None)


_warned: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def one_step_change(module, train_batch: Batch, probe_pairs: Sequence[EncodedPair], eta: float,
                    predict_rewards: bool = True, closed_forms: bool = True,
                    context: Callable[[], object] = nullcontext) -> OneStepChange:
    """One plain gradient step of size ``eta`` on ``train_batch``, its measured effect on ``probe_pairs``
    and its first-order prediction (see the module docstring). The module's weights, ``.grad``
    and train/eval mode are left as they were found.

    ``context`` is entered around every forward (e.g. a trainer's precision context factory).
    """
    return one_step_changes(module, train_batch, {"probe": probe_pairs}, eta, predict_rewards, closed_forms,
                            context)["probe"]


def one_step_changes(module, train_batch: Batch, probe_sets: Mapping[str, Sequence[EncodedPair]], eta: float,
                     predict_rewards: bool = True, closed_forms: bool = True,
                     context: Callable[[], object] = nullcontext) -> dict[str, OneStepChange]:
    """``one_step_change`` for several named probe sets, sharing the training batch's gradient and
    hidden states (the costly part of a check after the probes' own backward passes)."""
    was_training = module.training
    module.eval()
    # the step below moves the weights and restores them: an IM-RM scores every probe one way throughout
    # (policy minus reference, not its exact 0 at the reference) and keeps knowing where it started
    weights_moved = getattr(module, "weights_moved_then_restored", nullcontext)
    try:
        with weights_moved():
            params = trainable_parameters(module)
            train_batch = {k: v.to(module.device) for k, v in train_batch.items()}
            with context():
                grads = loss_gradient(module, train_batch, params)
            with context(), torch.no_grad():
                train_hidden = module.hidden_states(train_batch) if closed_forms else None
            return {name: probe_change(module, params, grads, train_batch, train_hidden, pairs, eta,
                                       predict_rewards, context)
                    for name, pairs in probe_sets.items()}
    finally:
        module.train(was_training)


def probe_change(module, params, grads, train_batch: Batch, train_hidden: torch.Tensor | None,
                 probe_pairs: Sequence[EncodedPair], eta: float, predict_rewards: bool,
                 context: Callable[[], object]) -> OneStepChange:
    """The step's measured and predicted effect on one probe set, given the training gradient."""
    probe = {k: v.to(module.device) for k, v in module.collator()(list(probe_pairs)).items()}
    # rewards before and after a step are scored outside the precision context, in the weights' own precision:
    # a learning-rate-sized step moves rewards by about what bf16 autocast resolves, so scored there the change
    # is largely rounding (often exactly 0); ``before`` also serves the monitor's real optimizer step
    before = probe_rewards(module, probe)
    measured = measured_change(module, params, grads, eta, probe, before)
    with context():
        margin, rewards = predicted_change(module, params, grads, eta, probe_pairs, predict_rewards)
    terms = {}
    if train_hidden is not None:
        with context(), torch.no_grad():
            probe_hidden = module.hidden_states(probe)
        with context():
            terms = output_layer_terms(module, train_batch, train_hidden, probe, probe_hidden, eta)
    return OneStepChange(eta, before, measured, margin, rewards, terms)
