"""value_batch + update_batch over int64 keys vs the same lookups in a dict loop; memory per entry."""
import pytest

from statecore import workloads as w


@pytest.mark.benchmark(group="batch")
@pytest.mark.parametrize("impl", ["dict-loop", "statecore-batch", "statecore-batch-ttl"])
def test_batch(benchmark, n, impl):
    run = w.batch_dict(n) if impl == "dict-loop" else w.batch_state(n, ttl=impl.endswith("ttl"))
    benchmark.extra_info["keys"] = n
    assert benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1) == 2 * n


def test_bytes_per_entry(n, record_property):
    sc_bytes, dict_bytes = w.bytes_per_entry(n)
    record_property("statecore_bytes_per_entry", sc_bytes)
    record_property("dict_bytes_per_entry", dict_bytes)
    print(f"\nbytes per entry at n={n}: statecore {sc_bytes:.1f}, dict {dict_bytes:.1f}")
    assert sc_bytes > 0 and dict_bytes > 0
