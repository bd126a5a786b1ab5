"""``trainer.precision: auto``: bf16 autocast where the machine computes bf16 natively, fp32 elsewhere.

bf16-mixed halves activation memory and, on hardware with bf16 arithmetic, speeds matmuls up; on a CPU
without it (no AVX512-BF16, no AMX: e.g. AMD EPYC before Zen 4, most laptops) PyTorch emulates bf16 and a
training step is tens of times slower than in fp32. So ``auto`` reads what the machine has:

* CPU: ``bf16-mixed`` when /proc/cpuinfo lists ``avx512_bf16`` or ``amx_bf16``, else ``32-true``;
* CUDA GPU: ``bf16-mixed`` when the GPU computes bf16 natively (Ampere and newer), else ``32-true``;
* anything else (MPS, an accelerator object): ``32-true``.

The CLI resolves ``auto`` before the Trainer is built (``resolve_in_config``), says the choice in one
line, and the run's config.yaml, results.json and the IM-RM reference cache all see the resolved value.
A precision given explicitly (``--trainer.precision 32-true``) is never changed; when it computes in bf16 on
a CPU without native bf16, one warning line says so. Which flags were read is injectable (``choose``,
``emulated_bf16_warning``), so the decisions are testable on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

import lightning as L
from lightning.pytorch.trainer.connectors.accelerator_connector import _PRECISION_INPUT

from rm_lightning.console import say_once

AUTO = "auto"
BF16 = "bf16-mixed"
FP32 = "32-true"
# explicit precisions that compute in bf16 on a CPU (16-mixed: Lightning swaps in bf16-mixed there)
BF16_ON_CPU = frozenset({"bf16-mixed", "bf16-true", "bf16", "16-mixed", "16"})
# /proc/cpuinfo flag -> the name people know it by
NATIVE_BF16_FLAGS = {"avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX"}
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class Choice:
    precision: str
    reason: str

    def line(self) -> str:
        """The one line the CLI prints at start."""
        return f"precision: {AUTO} -> {self.precision} ({self.reason})"


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset[str]


def parse_cpuinfo(text: str) -> Optional[CpuInfo]:
    """Model name and flags of the first processor in /proc/cpuinfo's text; None without a flags line."""
    model, flags = None, None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key == "flags" and flags is None:
            flags = frozenset(value.split())
    return None if flags is None else CpuInfo(model or "this CPU", flags)


def read_cpuinfo(path: Path = CPUINFO) -> Optional[CpuInfo]:
    try:
        return parse_cpuinfo(path.read_text())
    except OSError:
        return None  # not Linux: no flags to read


def native_bf16_instructions(flags: frozenset[str]) -> list[str]:
    """The bf16 instruction sets among ``flags`` (AVX512-BF16, AMX), by their usual names."""
    return [name for flag, name in NATIVE_BF16_FLAGS.items() if flag in flags]


def cpu_has_native_bf16(cpu: Optional[CpuInfo] = None) -> bool:
    """Whether bf16 autocast pays on this CPU (read from /proc/cpuinfo when ``cpu`` is not given)."""
    cpu = cpu if cpu is not None else read_cpuinfo()
    return cpu is not None and bool(native_bf16_instructions(cpu.flags))


def choose_for_cpu(cpu: Optional[CpuInfo]) -> Choice:
    if cpu is None:
        return Choice(FP32, "no /proc/cpuinfo to tell whether this CPU has AVX512-BF16/AMX")
    found = native_bf16_instructions(cpu.flags)
    if found:
        return Choice(BF16, f"{cpu.model}: {'/'.join(found)}")
    return Choice(FP32, f"{cpu.model}: no AVX512-BF16/AMX")


def choose_for_cuda(gpu_name: str, native_bf16: bool) -> Choice:
    if native_bf16:
        return Choice(BF16, f"{gpu_name}: native bf16")
    return Choice(FP32, f"{gpu_name}: no native bf16")


@dataclass(frozen=True)
class Machine:
    """What ``auto`` looks at: the CPU (None: flags unknown) and the CUDA GPU, as (name, native bf16)
    (None: no GPU)."""

    cpu: Optional[CpuInfo]
    gpu: Optional[tuple[str, bool]] = None
    mps: bool = False

    @classmethod
    def this_one(cls) -> "Machine":
        return cls(read_cpuinfo(), _cuda_description(), _mps_available())


def accelerator_kind(accelerator: object, machine: Machine) -> str:
    """``cpu``, ``cuda`` or ``other`` for a Trainer's ``accelerator`` setting, as Lightning would pick."""
    if not isinstance(accelerator, str):
        return "other"  # an Accelerator object or a class_path block: not ours to guess
    name = accelerator.lower()
    if name == "auto":
        return "cuda" if machine.gpu is not None else "other" if machine.mps else "cpu"
    return {"cpu": "cpu", "gpu": "cuda", "cuda": "cuda"}.get(name, "other")


def choose(accelerator: object, machine: Optional[Machine] = None) -> Choice:
    """What ``auto`` means for ``accelerator`` on ``machine`` (default: this one)."""
    machine = machine if machine is not None else Machine.this_one()
    kind = accelerator_kind(accelerator, machine)
    if kind == "cpu":
        return choose_for_cpu(machine.cpu)
    if kind == "cuda":
        return choose_for_cuda(*machine.gpu) if machine.gpu is not None else Choice(FP32, "no CUDA device visible")
    return Choice(FP32, f"accelerator {accelerator!r}: bf16 support not known")


def _cuda_description() -> Optional[tuple[str, bool]]:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(), torch.cuda.is_bf16_supported(including_emulation=False)


def _mps_available() -> bool:
    import torch

    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def emulated_bf16_warning(accelerator: object, given: object, machine: Machine) -> Optional[str]:
    """The line to say when an explicit precision runs bf16 on a CPU that only emulates it, else None.

    Lightning runs ``16-mixed`` on a CPU as ``bf16-mixed`` (fp16 autocast has no CPU path), so it counts too.
    """
    name = str(given)
    if accelerator_kind(accelerator, machine) != "cpu" or name not in BF16_ON_CPU:
        return None
    if machine.cpu is None or cpu_has_native_bf16(machine.cpu):
        return None  # native, or flags unknown: nothing to warn about
    becomes = "" if name.startswith("bf16") else f" (Lightning runs it as {BF16} on a CPU)"
    return (f"warning: precision {name}{becomes} on {machine.cpu.model}, which has no AVX512-BF16/AMX: PyTorch "
            f"emulates bf16 here, tens of times slower than {FP32}; precision {AUTO} picks {FP32} on this CPU")


def resolve_in_config(trainer: dict, say=None, machine: Optional[Machine] = None) -> Optional[Choice]:
    """Replace ``precision: auto`` in a parsed ``trainer`` block by the resolved value, in place.

    Returns the choice (None when the precision was given explicitly: kept, with a warning when it is bf16
    on a CPU that emulates bf16); ``say`` (default: print to stderr on the first process only) gets the
    one line.
    """
    say = say or say_once
    accelerator, given = trainer.get("accelerator", "auto"), trainer.get("precision")
    machine = machine if machine is not None else Machine.this_one()
    if given != AUTO:
        warning = emulated_bf16_warning(accelerator, given, machine)
        if warning:
            say(warning)
        return None
    choice = choose(accelerator, machine)
    trainer["precision"] = choice.precision
    say(choice.line())
    return choice


class Trainer(L.Trainer):
    """Lightning's Trainer, also taking precision auto (bf16-mixed where the hardware computes bf16).

    ``auto`` is this module's docstring's rule.

    The CLI builds its trainer from this class so that a config may say ``auto``; the CLI resolves it
    first, and a Trainer built from Python resolves it here.

    Args:
        precision: any of Lightning's precisions, or ``auto``: bf16-mixed where the CPU (AVX512-BF16/AMX) or
            GPU computes bf16 natively, 32-true elsewhere.
    """

    def __init__(self, *, precision: Optional[Union[_PRECISION_INPUT, Literal["auto"]]] = None, **kwargs):
        if precision == AUTO:
            choice = choose(kwargs.get("accelerator", "auto"))
            say_once(choice.line())
            precision = choice.precision
        super().__init__(precision=precision, **kwargs)
