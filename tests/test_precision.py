"""``trainer.precision: auto``: the choice from given CPU flags / GPU facts (never this machine's), the one
line said at start, and the resolved value where a run records its precision."""

import json

import pytest
import torch
import yaml

from conftest import PROJECT_ROOT, tiny_override
from rm_lightning import cli
from rm_lightning.perf import precision
from rm_lightning.perf.precision import Choice, CpuInfo, Machine, choose, parse_cpuinfo, resolve_in_config

EPYC = CpuInfo("AMD EPYC", frozenset({"fpu", "sse2", "avx2", "fma"}))
SAPPHIRE_RAPIDS = CpuInfo("Intel(R) Xeon(R) Platinum 8480+",
                          frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}))
ZEN4 = CpuInfo("AMD EPYC 9654", frozenset({"avx2", "avx512f", "avx512_bf16"}))
CPUINFO_TEXT = """processor\t: 0
model name\t: AMD EPYC 9654 96-Core Processor
flags\t\t: fpu avx2 avx512f avx512_bf16
processor\t: 1
model name\t: AMD EPYC 9654 96-Core Processor
flags\t\t: fpu avx2 avx512f avx512_bf16
"""


def test_cpu_without_native_bf16_trains_in_fp32_and_says_why():
    choice = choose("cpu", Machine(EPYC))
    assert choice.line() == "precision: auto -> 32-true (AMD EPYC: no AVX512-BF16/AMX)"


@pytest.mark.parametrize("cpu, named", [(SAPPHIRE_RAPIDS, "AVX512-BF16/AMX"), (ZEN4, "AVX512-BF16"),
                                        (CpuInfo("x", frozenset({"amx_bf16"})), "AMX")])
def test_cpu_with_avx512_bf16_or_amx_trains_in_bf16_mixed(cpu, named):
    assert choose("cpu", Machine(cpu)) == Choice("bf16-mixed", f"{cpu.model}: {named}")


def test_unknown_cpu_flags_mean_fp32():
    assert choose("cpu", Machine(cpu=None)).precision == "32-true"


@pytest.mark.parametrize("accelerator, gpu, expected", [
    ("gpu", ("NVIDIA H100", True), "bf16-mixed"), ("cuda", ("Tesla V100", False), "32-true"),
    ("auto", ("NVIDIA A100", True), "bf16-mixed"), ("gpu", None, "32-true"),
    ("auto", None, "32-true"),  # no GPU: Lightning picks the CPU, whose flags (EPYC) have no bf16
])
def test_gpu_uses_bf16_mixed_where_it_computes_bf16_natively(accelerator, gpu, expected):
    assert choose(accelerator, Machine(EPYC, gpu)).precision == expected


def test_auto_accelerator_without_gpu_follows_the_cpu():
    assert choose("auto", Machine(SAPPHIRE_RAPIDS)).precision == "bf16-mixed"


def test_other_accelerators_stay_in_fp32():
    assert choose("mps", Machine(SAPPHIRE_RAPIDS)).precision == "32-true"
    assert choose("auto", Machine(SAPPHIRE_RAPIDS, mps=True)).precision == "32-true"


def test_cpuinfo_is_read_from_the_first_processor():
    assert parse_cpuinfo(CPUINFO_TEXT) == CpuInfo("AMD EPYC 9654 96-Core Processor",
                                                  frozenset({"fpu", "avx2", "avx512f", "avx512_bf16"}))
    assert parse_cpuinfo("processor : 0\n") is None


def test_an_explicit_precision_is_kept_and_nothing_is_said():
    said = []
    trainer = {"accelerator": "cpu", "precision": "bf16-mixed"}
    assert resolve_in_config(trainer, say=said.append, machine=Machine(ZEN4)) is None
    assert trainer["precision"] == "bf16-mixed" and said == []


@pytest.mark.parametrize("given", ["bf16-mixed", "bf16-true", "16-mixed"])
def test_an_explicit_bf16_precision_on_a_cpu_that_emulates_bf16_is_kept_with_a_warning(given):
    said = []
    trainer = {"accelerator": "cpu", "precision": given}
    resolve_in_config(trainer, say=said.append, machine=Machine(EPYC))
    assert trainer["precision"] == given
    assert len(said) == 1 and said[0].startswith(f"warning: precision {given}") and "emulates bf16" in said[0]


@pytest.mark.parametrize("accelerator, given, machine", [
    ("cpu", "32-true", Machine(EPYC)), ("gpu", "bf16-mixed", Machine(EPYC, ("NVIDIA H100", True))),
    ("cpu", "bf16-mixed", Machine(cpu=None)),  # flags unknown: no claim about them
])
def test_no_warning_where_bf16_is_not_emulated_on_a_cpu(accelerator, given, machine):
    said = []
    resolve_in_config({"accelerator": accelerator, "precision": given}, say=said.append, machine=machine)
    assert said == []


def test_auto_is_replaced_in_the_config_and_said_once(monkeypatch):
    monkeypatch.setattr(Machine, "this_one", classmethod(lambda cls: Machine(EPYC)))
    said = []
    trainer = {"accelerator": "cpu", "precision": "auto"}
    resolve_in_config(trainer, say=said.append)
    assert trainer["precision"] == "32-true"
    assert said == ["precision: auto -> 32-true (AMD EPYC: no AVX512-BF16/AMX)"]


def tiny_imrm_fit(tmp_path, *args):
    override = tiny_override(tmp_path, max_steps=1, reference_cache_dir=tmp_path / "ref")
    cli.main(["fit", "--config", str(PROJECT_ROOT / "configs/imrm_persona.yaml"), "--config", str(override),
              "--data.init_args.num_train", "4", "--data.init_args.num_test", "4", "--trainer.limit_val_batches", "1",
              *args])
    (run,) = (tmp_path / "lightning_logs").glob("version_*")
    return run


def test_a_run_records_the_resolved_precision_everywhere(tmp_path, monkeypatch, capsys):
    """config.yaml, results.json and the IM-RM reference cache's key hold what ``auto`` became."""
    monkeypatch.setattr(Machine, "this_one", classmethod(lambda cls: Machine(SAPPHIRE_RAPIDS)))
    run = tiny_imrm_fit(tmp_path)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("precision:")]
    assert lines == ["precision: auto -> bf16-mixed (Intel(R) Xeon(R) Platinum 8480+: AVX512-BF16/AMX)"]
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["precision"] == "bf16-mixed"
    assert json.loads((run / "results.json").read_text())["config"]["trainer"]["precision"] == "bf16-mixed"
    entries = [torch.load(path, weights_only=True) for path in (tmp_path / "ref").rglob("*.pt")]
    assert entries and all(entry["identity"]["precision"] == "bf16-mixed" for entry in entries)


def test_a_precision_given_on_the_command_line_wins(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Machine, "this_one", classmethod(lambda cls: Machine(SAPPHIRE_RAPIDS)))
    run = tiny_imrm_fit(tmp_path, "--trainer.precision", "32-true")
    assert "precision: auto" not in capsys.readouterr().err
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["precision"] == "32-true"


def test_a_trainer_built_from_python_accepts_auto(monkeypatch):
    monkeypatch.setattr(Machine, "this_one", classmethod(lambda cls: Machine(EPYC)))
    trainer = precision.Trainer(accelerator="cpu", precision="auto", logger=False, enable_checkpointing=False)
    assert trainer.precision == "32-true"
