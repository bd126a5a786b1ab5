"""Freed host memory kept for reuse (rm_lightning.perf.host_memory): what glibc is asked, and when it is not;
and the rest of the process tuning (rm_lightning.perf.process_tuning)."""

import gc
import subprocess
import sys

import pytest

from rm_lightning import cli
from rm_lightning.perf import host_memory, process_tuning
from rm_lightning.perf.host_memory import OPT_OUT_ENV, keep_freed_memory, why_not_tuned


class RecordingLibc:
    def __init__(self, answer: int = 1):
        self.calls, self.answer = [], answer

    def mallopt(self, parameter: int, value: int) -> int:
        self.calls.append((parameter, value))
        return self.answer


@pytest.mark.parametrize("answer, tuned", [(1, True), (0, False)])
def test_glibc_is_asked_never_to_unmap_or_trim(monkeypatch, answer, tuned):
    libc = RecordingLibc(answer)
    monkeypatch.setattr(host_memory.ctypes, "CDLL", lambda _: libc)
    monkeypatch.setattr(host_memory, "why_not_tuned", lambda: None)
    assert keep_freed_memory() is tuned
    expected = [(host_memory.M_MMAP_MAX, 0), (host_memory.M_TRIM_THRESHOLD, host_memory.LARGEST_TRIM_THRESHOLD)]
    assert libc.calls == (expected if tuned else expected[:1])  # a refused setting stops there


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


def test_cli_tunes_the_allocator_and_kernel_caches_before_loading_anything(monkeypatch):
    calls = []
    monkeypatch.setattr(process_tuning, "keep_freed_memory", lambda: calls.append("tuned"))
    monkeypatch.setattr(process_tuning, "bound_kernel_caches", lambda: calls.append("bounded"))
    monkeypatch.setattr(cli, "RewardCLI", lambda *args, **kwargs: calls.append("cli"))
    cli.main(["fit", "--help"])
    assert calls == ["tuned", "bounded", "cli"]


def test_glibcs_own_behaviour_asked_for_still_bounds_the_kernel_caches(monkeypatch):
    calls = []
    monkeypatch.setattr(process_tuning, "keep_freed_memory", lambda: calls.append("tuned") or True)
    monkeypatch.setattr(process_tuning, "bound_kernel_caches", lambda: calls.append("bounded"))
    assert process_tuning.tune_process(keep_freed=False) is False
    assert calls == ["bounded"]


def test_free_pages_are_handed_back_with_malloc_trim(monkeypatch):
    trims = []
    libc = type("Libc", (), {"malloc_trim": lambda self, pad: trims.append(pad) or 1})()
    monkeypatch.setattr(host_memory.ctypes, "CDLL", lambda _: libc)
    monkeypatch.setattr(host_memory, "is_glibc", lambda: True)
    assert host_memory.release_free_pages() is True
    assert trims == [0]


def test_the_exit_collections_skip_every_object_once_tuned():
    """After ``tune_process`` the objects are frozen by the time the interpreter's exit collects garbage."""
    script = ("import atexit, gc\n"
              "atexit.register(lambda: print('frozen at exit:', gc.get_freeze_count() > 0))\n"  # runs after tuning's
              "from rm_lightning.perf.process_tuning import tune_process\n"
              "tune_process()\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "frozen at exit: True", done.stderr[-2000:]


@pytest.mark.parametrize("collecting", [True, False])
def test_imports_run_without_collections_and_leave_the_collector_as_found(collecting):
    was = gc.isenabled()
    try:
        (gc.enable if collecting else gc.disable)()
        with process_tuning.imports_without_collections():
            assert not gc.isenabled()
        assert gc.isenabled() is collecting and gc.get_freeze_count() > 0
    finally:
        (gc.enable if was else gc.disable)()
