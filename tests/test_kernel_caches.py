"""The CPU matmul kernel caches are bounded unless the user set their capacities."""

from rm_lightning.perf.kernel_caches import CAPACITY_ENVS, KERNEL_CACHE_CAPACITY, bound_kernel_caches


def test_unset_capacities_get_the_bound():
    assert bound_kernel_caches(environ={}) == {name: str(KERNEL_CACHE_CAPACITY) for name in CAPACITY_ENVS}


def test_a_capacity_the_user_set_is_kept():
    assert bound_kernel_caches(environ={"LRU_CACHE_CAPACITY": "1024"})["LRU_CACHE_CAPACITY"] == "1024"
