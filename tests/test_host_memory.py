"""Freed host memory kept for reuse (rm_lightning.host_memory), checked through glibc's own accounting."""

import json
import os
import subprocess
import sys

import pytest

from rm_lightning import cli
from conftest import PROJECT_ROOT
from rm_lightning.perf import host_memory
from rm_lightning.perf.host_memory import OPT_OUT_ENV, keep_freed_memory, why_not_tuned

needs_glibc = pytest.mark.skipif(not host_memory.is_glibc(), reason="the setting is glibc's")

# Allocates and frees a 64 MiB tensor, then reports glibc's mallinfo2: bytes in mmap'd blocks while
# the tensor is alive, and free bytes the heap keeps after it is gone.
PROBE = """
import ctypes, json, torch
from rm_lightning.perf.host_memory import keep_freed_memory

FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in FIELDS]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
tuned = keep_freed_memory()
tensor = torch.ones(16 * 2 ** 20)
mapped = libc.mallinfo2().hblkhd
del tensor
print(json.dumps({"tuned": tuned, "mapped": mapped, "kept_free": libc.mallinfo2().fordblks}))
"""
MIB = 2 ** 20


def probe(**env_changes) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")}
    env.pop(OPT_OUT_ENV, None)
    env.update(env_changes)
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                          timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_glibc
def test_a_freed_tensor_stays_in_the_heap_for_the_next_one():
    tuned = probe()
    assert tuned["tuned"] is True
    assert tuned["mapped"] < 64 * MIB  # the tensor came from the heap, not from its own mmap
    assert tuned["kept_free"] >= 64 * MIB  # and its memory stayed there once freed

    default = probe(**{OPT_OUT_ENV: "0"})
    assert default["tuned"] is False
    assert default["mapped"] >= 64 * MIB  # glibc's default: a block of its own, unmapped when freed
    assert default["kept_free"] < 64 * MIB


@pytest.mark.parametrize("env, reason", [
    ({OPT_OUT_ENV: "0"}, f"{OPT_OUT_ENV} is off"),
    ({OPT_OUT_ENV: "off"}, f"{OPT_OUT_ENV} is off"),
    ({"MALLOC_TRIM_THRESHOLD_": "1000000"}, "MALLOC_TRIM_THRESHOLD_ already set"),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "jemalloc is preloaded"),
])
def test_a_users_own_choice_is_left_alone(monkeypatch, env, reason):
    for key in [OPT_OUT_ENV, "LD_PRELOAD", *host_memory.GLIBC_TUNING_ENVS]:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert why_not_tuned() == reason
    assert keep_freed_memory() is False


def test_cli_keeps_freed_memory_before_loading_anything(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append("tuned"))
    monkeypatch.setattr(cli, "RewardCLI", lambda *args, **kwargs: calls.append("cli"))
    cli.main(["fit", "--help"])
    assert calls == ["tuned", "cli"]
