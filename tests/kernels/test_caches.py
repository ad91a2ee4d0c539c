"""The grouped GEMM's host-side caches: one object, emptied in place by ``clear()``."""

import dataclasses

from kernels import grouped_gemm, grouped_gemm_pingpong
from kernels.caches import GroupedGemmCaches


def test_the_host_side_and_the_pingpong_kernel_share_one_cache_object():
    assert grouped_gemm.CACHES is grouped_gemm_pingpong.CACHES
    assert grouped_gemm._compiled is grouped_gemm.CACHES.compiled


def test_clear_empties_every_cache_in_place():
    caches = GroupedGemmCaches()
    held = {field.name: getattr(caches, field.name) for field in dataclasses.fields(caches)}
    assert set(held) == {"plans", "tuned", "compiled", "schedules", "pingpong"}
    for cache in held.values():
        cache["key"] = "value"
    caches.clear()
    for name, cache in held.items():
        assert getattr(caches, name) is cache and cache == {}, name


def test_plans_start_over_past_their_bound():
    caches = GroupedGemmCaches()
    for key in range(caches.MAX_PLANS):
        assert caches.remember_plan(key, f"plan {key}") == f"plan {key}"
    assert len(caches.plans) == caches.MAX_PLANS
    caches.remember_plan("one more", "plan")
    assert caches.plans == {"one more": "plan"}
