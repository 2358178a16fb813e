"""Per-record loop: ValueState read-modify-write vs a bare dict, TTL off and on (same run)."""
import pytest

from statecore import workloads as w


@pytest.mark.benchmark(group="record-rmw")
@pytest.mark.parametrize("impl", ["dict", "statecore", "statecore-ttl"])
def test_record_rmw(benchmark, n, impl):
    if impl == "dict":
        run = w.record_rmw_dict(n)
    else:
        run = w.record_rmw_state(n, ttl=impl.endswith("ttl"))
    benchmark.extra_info["records"] = n
    assert benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1) == n
