"""The CPU matmul kernel caches are bounded unless the user set their capacities."""

from rm_lightning import cli
from rm_lightning.perf.kernel_caches import CAPACITY_ENVS, KERNEL_CACHE_CAPACITY, bound_kernel_caches


def test_unset_capacities_get_the_bound():
    assert bound_kernel_caches(environ={}) == {name: str(KERNEL_CACHE_CAPACITY) for name in CAPACITY_ENVS}


def test_a_capacity_the_user_set_is_kept():
    assert bound_kernel_caches(environ={"LRU_CACHE_CAPACITY": "1024"})["LRU_CACHE_CAPACITY"] == "1024"


def test_cli_bounds_the_caches_before_building_anything(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "bound_kernel_caches", lambda: calls.append("bounded"))
    monkeypatch.setattr(cli, "RewardCLI", lambda *args, **kwargs: calls.append("cli"))
    cli.main(["fit", "--help"])
    assert calls == ["bounded", "cli"]
