"""LMDB spill tier (issue 4): spilled point reads, writes with flushes, a MapState workload.

Side by side in one run: statecore's LMDB tier, raw py-lmdb ``txn.get`` on the same keys, and
rocksdict (bench-only; raw mode, 64 MiB memtables, block cache, bloom filter, as Quix Streams
configures it; skipped when not installed), plus the heap backend where it applies.

    STATECORE_BENCH_N=1000000 pytest bench/test_bench_lmdb.py --benchmark-only
"""
import random

import pytest

import statecore
from statecore import MapStateDescriptor, ValueStateDescriptor
from statecore.serializers import Int64


def _rocksdict(path):
    rd = pytest.importorskip("rocksdict")
    opts = rd.Options(raw_mode=True)
    opts.create_if_missing(True)
    opts.set_write_buffer_size(64 << 20)
    opts.set_max_write_buffer_number(3)
    table = rd.BlockBasedOptions()
    table.set_block_cache(rd.Cache(64 << 20))
    table.set_bloom_filter(10, False)
    opts.set_block_based_table_factory(table)
    return rd.Rdict(str(path), options=opts)


def _lmdb_kb(tmp_path):
    return statecore.LMDBStateBackend(db_path=str(tmp_path / "db")).create_keyed_state_backend()


@pytest.mark.benchmark(group="lmdb-point-read-spilled")
@pytest.mark.parametrize("impl", ["statecore-lmdb", "py-lmdb", "rocksdict"])
def test_point_reads_spilled(benchmark, n, impl, tmp_path):
    keys = list(range(n))
    random.Random(1).shuffle(keys)
    if impl == "statecore-lmdb":
        kb = _lmdb_kb(tmp_path)
        s = kb.get_state(ValueStateDescriptor("v", Int64()))
        for i in range(n):
            kb.set_current_key(i)
            s.update(i)
        kb.flush()  # every key spilled

        def run():
            sk, value = kb.set_current_key, s.value
            for k in keys:
                sk(k)
                value()
            return len(keys)
    elif impl == "py-lmdb":
        import lmdb
        env = lmdb.open(str(tmp_path / "raw"), map_size=1 << 32, writemap=False, sync=False)
        bkeys = [k.to_bytes(8, "big") for k in keys]
        with env.begin(write=True) as txn:
            for k in sorted(bkeys):
                txn.put(k, k)
        txn = env.begin()

        def run():
            get = txn.get
            for k in bkeys:
                get(k)
            return len(bkeys)
    else:
        db = _rocksdict(tmp_path / "rd")
        bkeys = [k.to_bytes(8, "big") for k in keys]
        for k in bkeys:
            db[k] = k
        db.flush()

        def run():
            get = db.get
            for k in bkeys:
                get(k)
            return len(bkeys)
    benchmark.extra_info["keys"] = n
    assert benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1) == n


@pytest.mark.benchmark(group="lmdb-writes")
@pytest.mark.parametrize("impl", ["statecore-lmdb", "statecore-heap", "rocksdict"])
def test_writes(benchmark, n, impl, tmp_path):
    counter = iter(range(1000))

    def setup():
        d = tmp_path / f"r{next(counter)}"
        if impl == "statecore-lmdb":
            kb = _lmdb_kb(d)
        elif impl == "statecore-heap":
            kb = statecore.HashMapStateBackend().create_keyed_state_backend()
        else:
            db = _rocksdict(d)

            def run_rd():
                for i in range(n):
                    db[i.to_bytes(8, "big")] = i.to_bytes(8, "big")
                db.flush()
                return n
            return (run_rd,), {}
        s = kb.get_state(ValueStateDescriptor("v", Int64()))

        def run_kb():
            sk, update = kb.set_current_key, s.update
            for i in range(n):
                sk(i)
                update(i)
            if impl == "statecore-lmdb":
                kb.flush()
            kb.close()
            return n
        return (run_kb,), {}

    benchmark.extra_info["keys"] = n
    assert benchmark.pedantic(lambda f: f(), setup=setup, rounds=3, iterations=1) == n


@pytest.mark.benchmark(group="lmdb-map-workload")
@pytest.mark.parametrize("impl", ["statecore-heap", "statecore-lmdb"])
def test_map_workload(benchmark, n, impl, tmp_path):
    nkeys, nuser = max(1, n // 100), 100  # 10k keys x 100 user keys at n = 1M

    if impl == "statecore-lmdb":
        kb = _lmdb_kb(tmp_path)
    else:
        kb = statecore.HashMapStateBackend().create_keyed_state_backend()
    m = kb.get_state(MapStateDescriptor("m", Int64(), Int64()))

    def run():
        for k in range(nkeys):
            kb.set_current_key(k)
            for u in range(nuser):
                m.put(u, u)
        total = 0
        for k in range(nkeys):
            kb.set_current_key(k)
            total += m.get(k % nuser)
            total += len(m.items())
        return nkeys

    benchmark.extra_info["entries"] = nkeys * nuser
    assert benchmark.pedantic(run, rounds=2, iterations=1) == nkeys
    kb.close()
