"""Optimizer steps folded into backward: each parameter is updated, and its gradient freed, as
soon as backward has finished accumulating it.

Full fine-tuning with Adam holds weights, gradients and two moments: 16 bytes per fp32
parameter. Gradients are only needed from the moment backward produces them until the
optimizer reads them, so stepping each parameter in its post-accumulate-grad hook means at most
a few gradients exist at once: a quarter of that memory (0.5 GB for a 135M model) disappears.

Adam's moments are allocated up front (``allocate_adam_state``) rather than at each parameter's
first step, which here falls in the middle of the first backward.

The price: nothing can look at all gradients together. Gradient clipping, gradient
accumulation over micro-batches, a loss scaler (fp16) and gradient all-reduce across processes
(DDP, FSDP) all need that, so ``check_trainer_supports`` refuses them with one clear line.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch.optim.optimizer import _get_scalar_dtype

from rm_lightning.errors import RMLightningError


def allocate_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter of an Adam (or AdamW) optimizer the zero state its first step would create.

    Adam creates its moments lazily. Stepped from backward hooks, that happens in the middle of
    the first backward, interleaved with activations freed a moment later; the allocator then
    keeps the holes between them, and on CPU the peak resident memory of the following steps is
    higher. Allocated before training, the moments sit together. The updates are unchanged: Adam only initializes state it finds empty.
    Other optimizers keep their lazy state.
    """
    if not isinstance(optimizer, torch.optim.Adam):
        return
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state[param]
            if state:
                continue
            # where and in which dtype Adam keeps its step count, as its own initialization does
            if group["capturable"] or group["fused"]:
                state["step"] = torch.zeros((), dtype=_get_scalar_dtype(is_fused=group["fused"]), device=param.device)
            else:
                state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
            moments = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group["amsgrad"] else ("exp_avg", "exp_avg_sq")
            for name in moments:
                state[name] = torch.zeros_like(param, memory_format=torch.preserve_format)


class OptimizerInBackward(torch.optim.Optimizer):
    """One optimizer per parameter (from ``factory``), stepped by that parameter's backward hook.

    To Lightning and LR schedulers it looks like one optimizer: ``param_groups`` are the inner
    optimizers' own groups (a scheduler's new lr reaches them), ``state_dict`` holds every inner
    state, and ``step(closure)`` only runs the closure, because backward has already stepped.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], factory: Callable[[list], torch.optim.Optimizer]):
        params = [p for p in params if p.requires_grad]
        if not params:
            raise RMLightningError("optimizer_in_backward: no trainable parameters")
        self.per_parameter = [factory([p]) for p in params]
        for optimizer in self.per_parameter:
            allocate_adam_state(optimizer)
        super().__init__(params, defaults={})
        self._share_param_groups()
        self._hooks = [p.register_post_accumulate_grad_hook(self._step_parameter(optimizer))
                       for p, optimizer in zip(params, self.per_parameter)]

    def _share_param_groups(self) -> None:
        """Point ``param_groups`` at the inner groups (again after loading, which replaces them)."""
        self.param_groups = [group for optimizer in self.per_parameter for group in optimizer.param_groups]

    @staticmethod
    def _step_parameter(optimizer: torch.optim.Optimizer):
        def hook(_parameter: torch.Tensor) -> None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return hook

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.per_parameter:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"per_parameter": [optimizer.state_dict() for optimizer in self.per_parameter]}

    def load_state_dict(self, state_dict: dict) -> None:
        states = state_dict.get("per_parameter")
        if states is None or len(states) != len(self.per_parameter):
            found = "none" if states is None else len(states)
            raise RMLightningError(f"optimizer_in_backward: the checkpoint holds {found} per-parameter optimizer "
                                   f"states, this model has {len(self.per_parameter)} trainable parameters")
        for optimizer, state in zip(self.per_parameter, states):
            optimizer.load_state_dict(state)
        self._share_param_groups()

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []


def check_trainer_supports(trainer) -> None:
    """Refuse the settings that need every gradient at once (see the module docstring)."""
    problems = []
    if trainer.world_size > 1:
        problems.append(f"{trainer.world_size} processes (gradients must be reduced across processes first)")
    if trainer.accumulate_grad_batches > 1:
        problems.append(f"accumulate_grad_batches={trainer.accumulate_grad_batches}")
    if trainer.gradient_clip_val:
        problems.append(f"gradient_clip_val={trainer.gradient_clip_val}")
    if getattr(trainer.precision_plugin, "scaler", None) is not None:
        problems.append(f"precision {trainer.precision} (its loss scaler unscales all gradients together)")
    if problems:
        raise RMLightningError("optimizer_in_backward needs every gradient only once, at its own parameter; it "
                               f"cannot run with {', '.join(problems)}. Set model.init_args.optimizer_in_backward: false")


def backward_optimizer(module, params: list[torch.nn.Parameter],
                       factory: Callable[[list], torch.optim.Optimizer]) -> OptimizerInBackward:
    """The module's ``OptimizerInBackward``, after checking its trainer's settings.

    A second ``fit`` on the same module builds a new one: the first one's hooks are removed,
    or every parameter would be stepped twice.
    """
    if module._trainer is not None:
        check_trainer_supports(module._trainer)
    previous = getattr(module, "_backward_optimizer", None)
    if previous is not None:
        previous.remove_hooks()
    module._backward_optimizer = OptimizerInBackward(params, factory)
    return module._backward_optimizer
