"""``token_budget: auto``: the most tokens per forward that fit the memory the process may use.

The budget is the room left for activations divided by what one token's activations cost:

* room = the memory the process may still fill (``memory_limit`` less what the process holds
  now; by default the host's ``MemAvailable`` on a CPU, the device's free memory on a GPU), less
  what training is yet to allocate (a gradient and two Adam moments per trainable parameter,
  ``OPTIMIZER_COPIES``), less a margin (``MARGIN_FRACTION`` of it, and at least
  ``MARGIN_MIN_BYTES``) for the allocator, the data and the Python heap.
* a token's cost is measured once, at the first batch: two probe forwards of one pair each (no
  backward; the data's longest pair and half of it, at most ``PROBE_MAX_PAIR_TOKENS``) under the
  run's precision, counting the bytes of every tensor autograd saves for backward (parameters
  excluded); the difference over the difference in tokens is the cost per token. Attention
  grows with a pair's length, so sizing the probe on the longest pair makes that the cost of the
  costliest tokens. Backward needs more than forward saved, briefly (the gradients of a layer's
  activations, an attention grid, a chunk of logits): ``BACKWARD_FACTOR`` covers that, and under
  a 16-bit autocast ``AUTOCAST_FACTOR`` too (the fp32 tensors kept beside the saved 16-bit copies).
* activation checkpointing keeps only every decoder layer's input and recomputes one layer at a
  time: per token, layers x hidden size x bytes per value, plus twice one layer's share of the
  measured cost, times ``CHECKPOINTED_FACTOR``. It is switched on only when even the data's
  longest pair would not fit without it.
* on a CPU the budget stops at ``CPU_SPEED_TOKENS`` (or the longest pair, if longer): beyond it a
  forward runs no faster per token, so filling all of the host's memory would only risk the
  machine (a first version did: 22.7 GiB resident of 22.7 available, for no speed). A GPU keeps
  the whole fit, where larger forwards do run faster.

``choose_token_budget`` is the arithmetic alone, given those inputs; ``resolve_auto_budget``
gathers them for a reward module and says in one line what it chose.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import torch
from lightning.pytorch.utilities import rank_zero_info

from rm_lightning.errors import RMLightningError
from rm_lightning.perf.sharding import local_part

# what a step needs at its peak per token relative to the estimate, without and with activation
# checkpointing (SmolLM2-135M, fp32, CPU, UltraFeedback: about 1.1 and 1.7; benchmarks/README.md, "Token budget")
BACKWARD_FACTOR = 1.5
CHECKPOINTED_FACTOR = 2.0
# under a 16-bit autocast a step's peak needed 2.1-2.6x the probe's saved bytes per token, not 1.1x (SmolLM2-135M,
# bf16-mixed, CPU, UltraFeedback at caps 512: fp32 originals beside their 16-bit copies, fp32 gradients); the probe's
# measure is multiplied by this before BACKWARD_FACTOR (benchmarks/README.md, "A full run at the paper's caps")
AUTOCAST_FACTOR = 2.0
# the allocator's fragmentation, the data, Lightning and the Python heap: about 1 GiB above weights,
# gradients and Adam state in the same measurements
MARGIN_FRACTION = 0.1
MARGIN_MIN_BYTES = 2 ** 30
# a gradient and two Adam moments for every trainable parameter, allocated at the first backward and step
OPTIMIZER_COPIES = 3
# larger micro-batches ran no faster per pair on a CPU (UltraFeedback, batch 32: 2048 tokens at 0.86x the
# step time of 8192; benchmarks/README.md, "Token budget")
CPU_SPEED_TOKENS = 2048
PROBE_PROMPT_TOKENS = 16
PROBE_DEFAULT_PAIR_TOKENS = 288  # without data to size the probe on
PROBE_MAX_PAIR_TOKENS = 2048
UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
         "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def check_token_budget(token_budget, optimizer_in_backward: bool, memory_limit=None) -> None:
    """Refuse a budget that is not null, ``auto`` or a positive count, and the combinations that cannot work."""
    if token_budget is not None and token_budget != "auto" and (
            isinstance(token_budget, bool) or not isinstance(token_budget, int) or token_budget < 1):
        raise RMLightningError(f"model.init_args.token_budget must be null, 'auto' or a positive number of tokens, "
                               f"got {token_budget!r}")
    if memory_limit is not None and token_budget != "auto":  # read by auto alone: else it would bound nothing, silently
        raise RMLightningError(f"model.init_args.memory_limit is what token_budget: auto plans for, but token_budget "
                               f"is {'null' if token_budget is None else token_budget}; set token_budget: auto, or "
                               f"memory_limit: null")
    if token_budget is not None and optimizer_in_backward:
        raise RMLightningError("token_budget runs a batch as micro-batches whose gradients add up before one step, but "
                               "optimizer_in_backward steps at every backward; set one of them to null/false")


def parse_memory_limit(value) -> Optional[int]:
    """Bytes from ``memory_limit``: an int (bytes) or a string like ``16GB``, ``12GiB``, ``1500MB``; None stays None."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*", str(value), re.IGNORECASE)
    if isinstance(value, str) and match:
        amount = float(match.group(1)) * UNITS[(match.group(2) or "").lower()]
        if amount >= 1:
            return int(amount)
    raise RMLightningError(f"model.init_args.memory_limit must be a positive number of bytes or a size like '16GB' "
                           f"or '12GiB', got {value!r}")


@dataclass
class BudgetChoice:
    """What ``choose_token_budget`` decided, and from what."""

    tokens: int
    checkpointing: bool
    room_bytes: int
    bytes_per_token: float  # the cost per token the budget was divided by (checkpointed if checkpointing)
    longest_pair: Optional[int]
    capped: bool = False  # stopped at ``speed_tokens``, below what would fit

    def describe(self, source: str) -> str:
        why = "activation checkpointing on: the longest pair would not fit without it" if self.checkpointing else \
            "activation checkpointing as configured"
        longest = f", longest pair {self.longest_pair} tokens" if self.longest_pair else ""
        cap = ", no more: larger micro-batches run no faster on a CPU" if self.capped else ""
        return (f"token_budget auto: {self.tokens} tokens per micro-batch{cap} ({gib(self.room_bytes)} left for "
                f"activations of {source}, {self.bytes_per_token / 2 ** 10:.0f} KiB per token{longest}; {why})")


def gib(value: float) -> str:
    return f"{value / 2 ** 30:.1f} GiB"


def choose_token_budget(free_bytes: int, pending_bytes: int, bytes_per_token: float,
                        checkpointed_bytes_per_token: float, longest_pair: Optional[int],
                        checkpointing: bool = False, speed_tokens: Optional[int] = None) -> BudgetChoice:
    """The budget for ``free_bytes`` the process may still fill, of which ``pending_bytes`` training is yet to
    allocate (gradients, optimizer state); checkpointing switched on only when the longest pair needs it; no
    more than ``speed_tokens`` (or the longest pair, if longer), past which a larger forward is no faster."""
    room = free_bytes - pending_bytes
    room -= max(MARGIN_MIN_BYTES, int(MARGIN_FRACTION * room))
    if room <= 0:
        raise RMLightningError(f"token_budget auto: no memory left for activations ({gib(free_bytes)} free, "
                               f"{gib(pending_bytes)} still to be allocated for gradients and optimizer state); "
                               "raise model.init_args.memory_limit or set a token_budget")
    full = bytes_per_token * BACKWARD_FACTOR
    checkpointed = checkpointed_bytes_per_token * CHECKPOINTED_FACTOR
    if not checkpointing and longest_pair is not None and math.floor(room / full) < longest_pair:
        checkpointing = True
    per_token = checkpointed if checkpointing else full
    fits = max(1, math.floor(room / per_token))
    ceiling = None if speed_tokens is None else max(speed_tokens, longest_pair or 0)
    if ceiling is not None and fits > ceiling:
        return BudgetChoice(ceiling, checkpointing, room, per_token, longest_pair, capped=True)
    return BudgetChoice(fits, checkpointing, room, per_token, longest_pair)


def checkpointed_cost(bytes_per_token: float, layers: int, hidden_size: int, value_bytes: int) -> float:
    """Per token under activation checkpointing: every layer's input, plus one layer recomputed and its gradients."""
    return layers * hidden_size * value_bytes + 2 * bytes_per_token / max(layers, 1)


# --- the inputs, for a reward module ------------------------------------------------------------------


def meminfo_available_bytes(meminfo: str | None = None) -> int:
    """``MemAvailable`` of ``/proc/meminfo`` (or of the given text), in bytes."""
    text = Path("/proc/meminfo").read_text() if meminfo is None else meminfo
    match = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.MULTILINE)
    if match is None:
        raise RMLightningError("token_budget auto: /proc/meminfo has no MemAvailable; set model.init_args.memory_limit")
    return int(match.group(1)) * 1024


def resident_bytes() -> int:
    """The process's resident memory now (``VmRSS``)."""
    match = re.search(r"^VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


def free_memory_bytes(device: torch.device, memory_limit: Optional[int], host_processes: int = 1) -> tuple[int, str]:
    """(bytes the process may still fill, where that figure comes from).

    On a CPU the host's available memory is shared by the ``host_processes`` training processes
    of this machine (DDP/FSDP on CPUs), so each may fill its share; ``memory_limit`` is per process.
    """
    if device.type == "cuda":
        if memory_limit is not None:
            return memory_limit - torch.cuda.memory_reserved(device), f"memory_limit {gib(memory_limit)}"
        free = torch.cuda.mem_get_info(device)[0]
        return free, f"{gib(free)} free on {torch.cuda.get_device_name(device)}"
    if memory_limit is not None:
        return memory_limit - resident_bytes(), f"memory_limit {gib(memory_limit)}"
    available = meminfo_available_bytes()
    if host_processes > 1:
        return available // host_processes, (f"{gib(available)} available host memory shared by "
                                              f"{host_processes} processes")
    return available, f"{gib(available)} available host memory"


def pending_training_bytes(module) -> int:
    """Gradients and Adam moments not allocated yet: ``OPTIMIZER_COPIES`` copies of every trainable
    parameter without a gradient (this process's shard, under FSDP), and the module's transient
    buffers whose size does not depend on the tokens (``fixed_transient_bytes``, e.g. a chunk of
    IM-RM's vocabulary logits)."""
    total = module.fixed_transient_bytes()
    for param in module.parameters():
        if param.requires_grad and param.grad is None:
            local = local_part(param)
            total += OPTIMIZER_COPIES * local.numel() * local.element_size()
    return total


def saved_activation_bytes(module, run: Callable[[], object]) -> int:
    """Bytes of the tensors autograd saves for backward while ``run()`` runs, parameters excluded.

    Under FSDP the weights a layer gathers for its forward are saved too; they are the same in
    every probe, so the difference ``measured_bytes_per_token`` takes leaves them out.
    """
    parameters = {local_part(p).untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(seen.values())


def probe_batch(module, response_tokens: int) -> dict[str, torch.Tensor]:
    """One pair of random tokens, chosen and rejected differing from the first token (nothing shared)."""
    from rm_lightning.pairs.records import EncodedPair

    vocab = len(module.tokenizer)
    generator = torch.Generator().manual_seed(response_tokens)
    length = PROBE_PROMPT_TOKENS + response_tokens
    chosen = torch.randint(3, vocab - 1, (length,), generator=generator).tolist()
    rejected = [(token + 1) % (vocab - 3) + 3 for token in chosen]
    pair = EncodedPair(chosen, PROBE_PROMPT_TOKENS, rejected, PROBE_PROMPT_TOKENS, reference_logps=(0.0, 0.0))
    return {key: value.to(module.device) for key, value in module.collator()([pair]).items()}


def probe_response_tokens(longest_pair: Optional[int]) -> tuple[int, int]:
    """Response lengths of the two probe pairs: pairs of about half the longest pair's tokens and all of them."""
    pair = min(longest_pair or PROBE_DEFAULT_PAIR_TOKENS, PROBE_MAX_PAIR_TOKENS)
    large = max(pair // 2 - PROBE_PROMPT_TOKENS, 16)
    return large // 2, large


def measured_bytes_per_token(module) -> float:
    """Saved activation bytes per token of ``module``'s own loss, from two probe pairs, checkpointing off."""
    checkpointed = module.checkpointing
    if checkpointed:
        set_checkpointing(module.model, False)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            sizes = [(2 * (PROBE_PROMPT_TOKENS + n),
                      saved_activation_bytes(module, lambda n=n: module.run_pair_loss(probe_batch(module, n))))
                     for n in probe_response_tokens(module._longest_pair_tokens)]
    finally:
        if checkpointed:
            set_checkpointing(module.model, True)
    (small_tokens, small), (large_tokens, large) = sizes
    return max(large - small, 1) / (large_tokens - small_tokens)


def set_checkpointing(model, enabled: bool) -> None:
    from rm_lightning.perf.checkpointing import enable_activation_checkpointing

    if enabled:
        enable_activation_checkpointing(model)
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def activation_value_bytes(module) -> int:
    """Bytes per activation value: 2 under a 16-bit autocast, else the weights' size."""
    device_type = module.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type).itemsize
    return next(module.model.parameters()).element_size()


def host_processes(module) -> int:
    """Training processes sharing this host's memory: the trainer's devices on a CPU, else 1."""
    trainer = getattr(module, "_trainer", None)
    return max(1, int(trainer.num_devices)) if trainer is not None and module.device.type == "cpu" else 1


def agreed_across_processes(choice: BudgetChoice, device: torch.device) -> BudgetChoice:
    """The smallest budget of all processes, and checkpointing if any of them needs it.

    Under FSDP every process gathers weights collectively in each forward, and a checkpointed
    layer gathers again in backward, so all must checkpoint alike; one budget keeps them alike
    in memory too. Every process resolves ``auto`` at the same first batch.
    """
    distributed = torch.distributed
    if not (distributed.is_available() and distributed.is_initialized()) or distributed.get_world_size() == 1:
        return choice
    values = torch.tensor([-choice.tokens, int(choice.checkpointing)], device=device)
    distributed.all_reduce(values, op=distributed.ReduceOp.MAX)
    return replace(choice, tokens=-int(values[0]), checkpointing=bool(values[1]))


def resolve_auto_budget(module) -> int:
    """``token_budget: auto`` for ``module`` on its device: choose, switch checkpointing on if needed, say so."""
    free, source = free_memory_bytes(module.device, module.memory_limit_bytes, host_processes(module))
    per_token = measured_bytes_per_token(module)
    if torch.is_autocast_enabled(module.device.type):
        per_token *= AUTOCAST_FACTOR
    config = module.model.config
    checkpointed = checkpointed_cost(per_token, config.num_hidden_layers, config.hidden_size,
                                     activation_value_bytes(module))
    choice = choose_token_budget(free, pending_training_bytes(module), per_token, checkpointed,
                                 module._longest_pair_tokens, checkpointing=module.checkpointing,
                                 speed_tokens=CPU_SPEED_TOKENS if module.device.type == "cpu" else None)
    choice = agreed_across_processes(choice, module.device)
    if choice.checkpointing and not module.checkpointing:
        set_checkpointing(module.model, True)
        module.checkpointing = True
    rank_zero_info(choice.describe(source))
    return choice.tokens
