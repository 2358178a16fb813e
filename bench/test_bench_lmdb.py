"""LMDB spill tier (issue 4): spilled point reads, writes with flushes, a MapState workload.

Side by side in one run: statecore's LMDB tier, raw py-lmdb ``txn.get`` on the same keys, and
rocksdict (bench-only; raw mode, 64 MiB memtables, block cache, bloom filter, as Quix Streams
configures it; skipped when not installed), plus the heap backend where it applies.  The workloads
are defined once in statecore/workloads.py (shared with ``statecore bench``).

    STATECORE_BENCH_N=1000000 pytest bench/test_bench_lmdb.py --benchmark-only
"""
import pytest

from statecore import workloads as w


def _need(impl):
    if impl == "rocksdict":
        pytest.importorskip("rocksdict")


@pytest.mark.benchmark(group="lmdb-point-read-spilled")
@pytest.mark.parametrize("impl", ["statecore-lmdb", "py-lmdb", "rocksdict"])
def test_point_reads_spilled(benchmark, n, impl):
    _need(impl)
    run = w.spilled_point_reads(n, impl=impl)
    benchmark.extra_info["keys"] = n
    try:
        assert benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1) == n
    finally:
        w.close_run(run)


@pytest.mark.benchmark(group="lmdb-writes")
@pytest.mark.parametrize("impl", ["statecore-lmdb", "statecore-heap", "rocksdict"])
def test_writes(benchmark, n, impl):
    _need(impl)

    def setup():  # a fresh store per pass; the pass includes its flush and close
        return (w.fresh_writes(n, impl=impl),), {}

    benchmark.extra_info["keys"] = n
    assert benchmark.pedantic(lambda run: run(), setup=setup, rounds=3, iterations=1) == n


@pytest.mark.benchmark(group="lmdb-batch-buffered")
@pytest.mark.parametrize("impl", ["lmdb", "hashmap"])
def test_batch_buffered(benchmark, n, impl):
    """``statecore bench``'s batch workload: value_batch + update_batch of n int64 keys held in the write
    buffer (the LMDB tier runs with ``w.BATCH_LMDB_OPTIONS``); the heap backend beside it.  2 ops per key."""
    run = w.WORKLOADS["batch"].setup(impl, n)
    benchmark.extra_info["ops_per_pass"] = 2 * n
    try:
        assert benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1) == 2 * n
    finally:
        w.close_run(run)


@pytest.mark.benchmark(group="lmdb-rmw-ttl")
@pytest.mark.parametrize("impl", ["lmdb", "lmdb-ttl", "hashmap", "hashmap-ttl"])
def test_rmw_ttl_overhead(benchmark, n, impl):
    """Per-record read-modify-write with and without a 1-day TTL (default background cleanup)."""
    name, _, ttl = impl.partition("-")
    run = w.WORKLOADS["value-rmw-ttl" if ttl else "value-rmw"].setup(name, n)
    try:
        assert benchmark.pedantic(run, rounds=2, iterations=1) == n
    finally:
        w.close_run(run)


@pytest.mark.benchmark(group="lmdb-map-workload")
@pytest.mark.parametrize("impl", ["hashmap", "lmdb", "rocksdict"])
def test_map_workload(benchmark, n, impl):
    """``statecore bench``'s map workload: n/100 keys x 100 user keys (10k x 100 at n = 1M)."""
    _need(impl)
    nkeys = max(1, n // w.MAP_USER_KEYS)
    run = w.WORKLOADS["map"].setup(impl, nkeys)
    benchmark.extra_info["entries"] = nkeys * w.MAP_USER_KEYS
    try:
        assert benchmark.pedantic(run, rounds=2, iterations=1) == 3 * nkeys * w.MAP_USER_KEYS
    finally:
        w.close_run(run)
