"""Checkpoint and restore throughput (issue 5), against this disk's own sequential write bandwidth.

* ``checkpoint``: ``kb.checkpoint(id)`` of n ValueState entries (int64 -> float64) to local files,
  durable (fsynced) when it returns; MB/s = checkpoint bytes / time.
* ``restore``: ``restore_keyed_state_backend`` of that checkpoint (SHA-256 verify + load); MB/s likewise.
* ``disk``: write + fsync a file of the checkpoint's size in the same directory, measured in the same
  run; the checkpoint/disk ratio (target >= 50 %) is in extra_info and printed.
* ``checkpoint_async`` synchronous part: time until ``checkpoint_async`` returns (target < 50 ms on
  heap at n = 1M); the background write is waited for outside the timed part.

The workloads live in statecore/workloads.py.

    STATECORE_BENCH_N=1000000 python -m pytest bench/test_bench_checkpoint.py --benchmark-only -s -p no:cacheprovider
"""
import pytest

from statecore import workloads as w

ROUNDS = 5


@pytest.fixture(scope="session")
def bench_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("bench-checkpoint"))


@pytest.fixture(scope="session")
def checkpoint_bytes(n, bench_dir):
    """Size of a checkpoint of n entries (heap backend), to size the disk measurement alike."""
    run = w.checkpoint_value_state(n, backend="hashmap", directory=bench_dir)
    try:
        return run()
    finally:
        w.close_run(run)


@pytest.fixture(scope="session")
def disk_mb_s(checkpoint_bytes, bench_dir):
    """This disk's sequential write + fsync bandwidth in MB/s (best of ROUNDS passes), same directory."""
    import time
    run = w.disk_write(checkpoint_bytes, directory=bench_dir)
    try:
        run()  # warm-up
        best = min(_timed(run, time) for _ in range(ROUNDS))
    finally:
        w.close_run(run)
    return checkpoint_bytes / best / 1e6


def _timed(run, time):
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def _report(benchmark, label, nbytes, disk):
    best = benchmark.stats.stats.min
    median = benchmark.stats.stats.median
    mb_s = nbytes / best / 1e6
    benchmark.extra_info.update(bytes=nbytes, MB_per_s=round(mb_s, 1), MB_per_s_median=round(nbytes / median / 1e6, 1),
                                disk_MB_per_s=round(disk, 1), ratio_to_disk=round(mb_s / disk, 3))
    print(f"\n{label}: {nbytes / 1e6:.1f} MB in {best * 1e3:.1f} ms (best; median {median * 1e3:.1f} ms) = "
          f"{mb_s:.0f} MB/s; disk write+fsync {disk:.0f} MB/s; ratio {mb_s / disk:.0%} (target >= 50%)")


@pytest.mark.benchmark(group="checkpoint-disk")
def test_disk_sequential_write(benchmark, checkpoint_bytes, bench_dir):
    run = w.disk_write(checkpoint_bytes, directory=bench_dir)
    try:
        assert benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1) == checkpoint_bytes
    finally:
        w.close_run(run)
    best = benchmark.stats.stats.min
    benchmark.extra_info.update(bytes=checkpoint_bytes, MB_per_s=round(checkpoint_bytes / best / 1e6, 1))
    print(f"\ndisk write+fsync: {checkpoint_bytes / 1e6:.1f} MB in {best * 1e3:.1f} ms = "
          f"{checkpoint_bytes / best / 1e6:.0f} MB/s")


@pytest.mark.benchmark(group="checkpoint")
@pytest.mark.parametrize("backend", w.STATE_BACKENDS)
def test_checkpoint(benchmark, n, backend, bench_dir, disk_mb_s):
    run = w.checkpoint_value_state(n, backend=backend, directory=bench_dir)
    try:
        nbytes = benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
        assert run.last.size_bytes == nbytes > n
    finally:
        w.close_run(run)
    benchmark.extra_info["entries"] = n
    _report(benchmark, f"checkpoint {backend} n={n:,}", nbytes, disk_mb_s)


@pytest.mark.benchmark(group="restore")
@pytest.mark.parametrize("backend", w.STATE_BACKENDS)
def test_restore(benchmark, n, backend, bench_dir, disk_mb_s):
    run = w.restore_value_state(n, backend=backend, directory=bench_dir)
    try:
        nbytes = benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    finally:
        w.close_run(run)
    benchmark.extra_info["entries"] = n
    _report(benchmark, f"restore {backend} n={n:,}", nbytes, disk_mb_s)


@pytest.mark.benchmark(group="checkpoint-async-sync-part")
@pytest.mark.parametrize("backend", w.STATE_BACKENDS)
def test_checkpoint_async_synchronous_part(benchmark, n, backend, bench_dir):
    run = w.checkpoint_async_sync_part(n, backend=backend, directory=bench_dir)
    try:
        # setup=drain: the previous checkpoint's background write finishes outside the timed part.
        assert benchmark.pedantic(run, setup=run.drain, rounds=ROUNDS, iterations=1, warmup_rounds=1) == n
        run.drain()
    finally:
        w.close_run(run)
    best, median = benchmark.stats.stats.min, benchmark.stats.stats.median
    benchmark.extra_info.update(entries=n, sync_ms=round(best * 1e3, 2), sync_ms_median=round(median * 1e3, 2))
    print(f"\ncheckpoint_async synchronous part {backend} n={n:,}: {best * 1e3:.1f} ms best, "
          f"{median * 1e3:.1f} ms median" + (" (target < 50 ms at 1M)" if backend == "hashmap" else ""))
