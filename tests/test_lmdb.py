"""Tier-specific tests of the LMDB spill tier (issue 4): flush boundaries, merge of the write
buffer with LMDB, TTL across tiers, long keys, map growth, fork guard, directory lock."""

import os
import subprocess
import sys
import textwrap

import pytest

import statecore
from statecore import (BackendClosedError, ListStateDescriptor, ManualClock, MapStateDescriptor, StateError,
                       StateTtlConfig, Time, ValueStateDescriptor)
from statecore.serializers import Int64, Str

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(statecore.__file__)))  # installed or in-place package


@pytest.fixture
def clock():
    return ManualClock(0)


def make(tmp_path, clock=None, **opts):
    opts.setdefault("write_buffer_size", 4096)
    return statecore.LMDBStateBackend(db_path=str(tmp_path / "db"), **opts).create_keyed_state_backend(
        max_parallelism=128, clock=clock)


def with_ttl(desc, cfg):
    desc.enable_time_to_live(cfg)
    return desc


def ttl(ms, cleanup=None):
    b = StateTtlConfig.new_builder(Time.milliseconds(ms))
    if cleanup:
        b = b.cleanup_incrementally(*cleanup)
    return b.build()


def test_every_write_crosses_flushes(tmp_path):
    kb = make(tmp_path, write_buffer_size=1)  # every operation flushes
    try:
        v = kb.get_state(ValueStateDescriptor("v", Int64()))
        for i in range(300):
            kb.set_current_key(i)
            v.update(i * 2)
        assert kb.metrics()["flushes"] >= 299
        for i in range(300):
            kb.set_current_key(i)
            assert v.value() == i * 2
        for i in range(0, 300, 3):
            kb.set_current_key(i)
            v.clear()
        assert kb.num_state_entries() == 200
        assert sorted(kb.get_keys("v")) == [i for i in range(300) if i % 3]
    finally:
        kb.close()


def test_values_survive_flush_and_overwrite(tmp_path):
    kb = make(tmp_path)
    try:
        v = kb.get_state(ValueStateDescriptor("v", Str()))
        for i in range(2000):
            kb.set_current_key(i)
            v.update(f"a{i}")
        kb.flush()
        assert kb.metrics()["buffer_entries"] == 0
        for i in range(0, 2000, 2):
            kb.set_current_key(i)
            v.update(f"b{i}")  # newer version in the buffer over an LMDB version
        for i in range(2000):
            kb.set_current_key(i)
            assert v.value() == (f"b{i}" if i % 2 == 0 else f"a{i}")
        assert kb.num_state_entries() == 2000
        m = kb.metrics()
        assert m["flushes"] > 10 and m["bytes_on_disk"] > 0 and m["entries"] == 2000
    finally:
        kb.close()


def test_map_iteration_order_and_tombstones_across_tiers(tmp_path):
    kb = make(tmp_path, write_buffer_size=1 << 20)
    try:
        m = kb.get_state(MapStateDescriptor("m", Int64(), Str()))
        kb.set_current_key("k")
        for i in range(50):
            m.put(i, f"old{i}")
        kb.flush()  # 0..49 in LMDB
        for i in range(0, 50, 5):
            m.remove(i)  # tombstones in the buffer
        for i in range(1, 50, 5):
            m.put(i, f"new{i}")  # newer versions in the buffer
        for i in range(50, 60):
            m.put(i, f"buf{i}")  # only in the buffer
        expected = {i: f"old{i}" for i in range(50) if i % 5}
        expected.update({i: f"new{i}" for i in range(1, 50, 5)})
        expected.update({i: f"buf{i}" for i in range(50, 60)})
        items = m.items()
        assert dict(items) == expected
        assert len(items) == len(expected)
        # serialized-key order (Int64 keys of one sign serialize in numeric order)
        assert [k for k, _ in items] == sorted(expected)
        assert kb.num_state_entries() == len(expected)
        kb.flush()
        assert dict(m.items()) == expected
        m.clear()
        assert m.items() == [] and m.is_empty() and kb.num_state_entries() == 0
        kb.flush()
        assert m.items() == []
    finally:
        kb.close()


def test_map_clear_mixes_tiers_and_keeps_other_keys(tmp_path):
    kb = make(tmp_path)
    try:
        m = kb.get_state(MapStateDescriptor("m", Str(), Int64()))
        for key in ("a", "b"):
            kb.set_current_key(key)
            for i in range(100):
                m.put(str(i), i)
        kb.set_current_key("a")
        m.clear()
        assert m.items() == []
        kb.set_current_key("b")
        assert len(m.items()) == 100
        assert list(kb.get_keys("m")) == ["b"]
    finally:
        kb.close()


def test_list_append_across_flushes(tmp_path):
    kb = make(tmp_path, write_buffer_size=512)
    try:
        lst = kb.get_state(ListStateDescriptor("l", Int64()))
        for i in range(200):
            for key in range(5):
                kb.set_current_key(key)
                lst.add(i)
        for key in range(5):
            kb.set_current_key(key)
            assert lst.get() == list(range(200))
        assert kb.num_state_entries() == 5
        assert kb.metrics()["flushes"] > 5
    finally:
        kb.close()


def test_ttl_across_tiers(tmp_path, clock):
    kb = make(tmp_path, clock=clock)
    try:
        v = kb.get_state(with_ttl(ValueStateDescriptor("v", Int64()), ttl(100)))
        m = kb.get_state(with_ttl(MapStateDescriptor("m", Int64(), Int64()), ttl(100)))
        for i in range(300):
            kb.set_current_key(i)
            v.update(i)
            m.put(1, i)
        kb.flush()
        clock.set(50)
        for i in range(300, 310):  # unexpired entries in the buffer
            kb.set_current_key(i)
            v.update(i)
            m.put(1, i)
        clock.set(100)
        for i in range(300):
            kb.set_current_key(i)
            assert v.value() is None and m.get(1) is None and m.items() == []
        for i in range(300, 310):
            kb.set_current_key(i)
            assert v.value() == i and m.get(1) == i
        assert kb.num_state_entries() == 20
    finally:
        kb.close()


@pytest.mark.parametrize("kind", ["value", "list", "map"])
def test_incremental_cleanup_reaches_both_tiers(tmp_path, clock, kind):
    kb = make(tmp_path, clock=clock)
    try:
        cfg = ttl(100, cleanup=(10, False))
        if kind == "value":
            s = kb.get_state(with_ttl(ValueStateDescriptor("s", Int64()), cfg))
            write, read = s.update, s.value
        elif kind == "list":
            s = kb.get_state(with_ttl(ListStateDescriptor("s", Int64()), cfg))
            write, read = s.add, s.get
        else:
            s = kb.get_state(with_ttl(MapStateDescriptor("s", Int64(), Int64()), cfg))
            write, read = (lambda i: s.put(i, i)), (lambda: s.get(-1))
        for i in range(410):  # most spill to LMDB, the last ones stay in the buffer
            kb.set_current_key(i)
            write(i)
        assert kb.metrics()["flushes"] > 0 and kb.metrics()["buffer_entries"] > 0
        clock.set(100)
        kb.set_current_key("fresh")
        write(-1)
        for _ in range(400):
            read()
            if kb.num_state_entries() == 1:
                break
        assert kb.num_state_entries() == 1
        assert kb.metrics()["ttl_expired"] >= 410
        assert read() not in (None, [])
    finally:
        kb.close()


def test_long_keys_and_long_map_user_keys(tmp_path):
    kb = make(tmp_path)
    try:
        v = kb.get_state(ValueStateDescriptor("v", Str()))
        m = kb.get_state(MapStateDescriptor("m", Str(), Int64()))
        keys = ["k" * 1024 + str(i) for i in range(40)]  # 1 KiB keys sharing a long common prefix
        for i, k in enumerate(keys):
            kb.set_current_key(k)
            v.update(str(i))
            for j in range(5):
                m.put("u" * 1024 + str(j), j)
                m.put(str(j), j)
        kb.flush()
        for i, k in enumerate(keys):
            kb.set_current_key(k)
            assert v.value() == str(i)
            assert m.get("u" * 1024 + "3") == 3 and m.get("3") == 3
            assert m.get("u" * 1024 + "9") is None
            items = m.items()
            assert len(items) == 10
            assert [uk for uk, _ in items] == sorted(uk for uk, _ in items)  # Str keys: utf-8 byte order
        assert sorted(kb.get_keys("v")) == sorted(keys)
        assert sorted(kb.get_keys("m")) == sorted(keys)
        kb.set_current_key(keys[0])
        m.remove("u" * 1024 + "0")
        v.clear()
        kb.flush()
        assert v.value() is None and len(m.items()) == 9
        assert kb.num_state_entries() == 39 + 40 * 10 - 1
    finally:
        kb.close()


def test_map_auto_growth_from_tiny_map(tmp_path):
    kb = make(tmp_path, write_buffer_size=256 << 10, map_size=64 << 10)
    try:
        v = kb.get_state(ValueStateDescriptor("v", Str()))
        payload = "x" * 200
        for i in range(20000):
            kb.set_current_key(i)
            v.update(payload + str(i))
        kb.flush()
        m = kb.metrics()
        assert m["map_resizes"] >= 5 and m["map_size"] >= 4 << 20
        for i in range(0, 20000, 97):
            kb.set_current_key(i)
            assert v.value() == payload + str(i)
        assert kb.num_state_entries() == 20000
    finally:
        kb.close()


def test_temp_dir_removed_on_close():
    kb = statecore.LMDBStateBackend(write_buffer_size=4096).create_keyed_state_backend()
    d = kb.db_dir
    assert os.path.isdir(d)
    kb.set_current_key(1)
    kb.get_state(ValueStateDescriptor("v")).update(1)
    kb.close()
    assert not os.path.exists(d)
    with pytest.raises(BackendClosedError):
        kb.get_state(ValueStateDescriptor("v"))


def test_two_keyed_backends_in_one_process_get_separate_dirs(tmp_path):
    backend = statecore.LMDBStateBackend(db_path=str(tmp_path / "db"))
    a = backend.create_keyed_state_backend()
    b = backend.create_keyed_state_backend()
    try:
        assert a.db_dir != b.db_dir
        a.set_current_key(1)
        a.get_state(ValueStateDescriptor("v")).update("a")
        b.set_current_key(1)
        assert b.get_state(ValueStateDescriptor("v")).value() is None
    finally:
        a.close()
        b.close()


def test_stale_directory_is_wiped_foreign_directory_is_refused(tmp_path):
    backend = statecore.LMDBStateBackend(db_path=str(tmp_path / "db"))
    kb = backend.create_keyed_state_backend()
    kb.set_current_key(1)
    kb.get_state(ValueStateDescriptor("v")).update("old")
    kb.flush()
    kb.close()
    kb = backend.create_keyed_state_backend()  # same directory: scratch, wiped
    try:
        kb.set_current_key(1)
        assert kb.get_state(ValueStateDescriptor("v")).value() is None
    finally:
        kb.close()
    foreign = tmp_path / "foreign"
    (foreign / "job-operator-kg0-127").mkdir(parents=True)
    (foreign / "job-operator-kg0-127" / "precious.txt").write_text("keep me")
    with pytest.raises(StateError, match="not created by statecore"):
        statecore.LMDBStateBackend(db_path=str(foreign)).create_keyed_state_backend()
    assert (foreign / "job-operator-kg0-127" / "precious.txt").read_text() == "keep me"


def test_second_process_gets_clear_error(tmp_path):
    kb = make(tmp_path)
    try:
        kb.set_current_key(1)
        kb.get_state(ValueStateDescriptor("v")).update(1)
        code = textwrap.dedent(f"""
            import statecore
            try:
                statecore.LMDBStateBackend(db_path={str(tmp_path / 'db')!r}).create_keyed_state_backend(
                    max_parallelism=128)
            except statecore.StateError as e:
                print("StateError:", e)
            else:
                print("opened")
        """)
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60,
                             cwd=ROOT)  # not the source tree: it has no compiled modules when installed
        assert "StateError:" in out.stdout and "in use by another process" in out.stdout, out.stdout + out.stderr
        kb.set_current_key(1)
        assert kb.get_state(ValueStateDescriptor("v")).value() == 1  # the owner is unaffected
    finally:
        kb.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_guard(tmp_path):
    kb = make(tmp_path)
    try:
        v = kb.get_state(ValueStateDescriptor("v", Int64()))
        kb.set_current_key(1)
        v.update(7)
        kb.flush()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            try:
                os.close(r)
                try:
                    v.value()
                    msg = b"no error"
                except StateError as e:
                    msg = b"ok" if "fork" in str(e) else str(e).encode()
                kb.close()  # must not touch the parent's environment
                os.write(w, msg)
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            msg = f.read()
        os.waitpid(pid, 0)
        assert msg == b"ok"
        assert v.value() == 7  # the parent is unaffected
        v.update(8)
        kb.flush()
        assert v.value() == 8
    finally:
        kb.close()


def test_rocksdb_legacy_name(tmp_path):
    b = statecore.RocksDBStateBackend(str(tmp_path / "chk"), write_buffer_size=4096)
    assert isinstance(b.checkpoint_storage, statecore.FileSystemCheckpointStorage)
    b.set_db_storage_path(str(tmp_path / "work"))
    kb = b.create_keyed_state_backend()
    try:
        assert kb.db_dir.startswith(str(tmp_path / "work"))
        kb.set_current_key("a")
        s = kb.get_state(ValueStateDescriptor("v"))
        s.update(1)
        assert s.value() == 1
    finally:
        kb.close()


def _rss_anon():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc (Linux)")
def test_state_10x_memory_budget_stays_within_budget(tmp_path):
    """>= 200 MiB of state under a 20 MiB budget; peak RssAnon growth (a 20 ms sampler thread over
    /proc/self/status RssAnon: LMDB's mmap pages are file-backed and not counted) <= 1.5x budget."""
    import random
    import threading
    import time

    budget = 20 << 20
    kb = statecore.LMDBStateBackend(db_path=str(tmp_path / "db"), memory_budget=budget).create_keyed_state_backend()
    v = kb.get_state(ValueStateDescriptor("v", Str()))
    n, payload = 1_400_000, "p" * 150  # ~1.4M x (150 B value + key) > 200 MiB of state
    order = list(range(n))
    random.Random(7).shuffle(order)  # random key order: the worst case for LMDB dirty pages
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_anon())
            time.sleep(0.02)

    base = _rss_anon()
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        for i in order:
            kb.set_current_key(i)
            v.update(payload + str(i))
        for i in range(0, n, 7):
            kb.set_current_key(i)
            assert v.value() == payload + str(i)
        assert kb.num_state_entries() == n
        m = kb.metrics()
        assert m["bytes_on_disk"] >= 200 << 20
    finally:
        stop.set()
        t.join()
        kb.close()
    growth = peak[0] - base
    print(f"peak RssAnon growth {growth / 2**20:.1f} MiB (budget {budget / 2**20:.0f} MiB)")
    assert growth <= 1.5 * budget, f"peak RssAnon growth {growth / 2**20:.1f} MiB > 1.5 x {budget / 2**20:.0f} MiB"


# -- background flush, stalls, read cache, drop-at-flush, list merge operator, budget ---------------------


@pytest.mark.parametrize("nbuf", [1, 2, 4])
def test_background_flush_boundaries_every_op_reads_all_tiers(tmp_path, nbuf):
    kb = make(tmp_path, write_buffer_size=256, max_write_buffer_number=nbuf)
    try:
        v = kb.get_state(ValueStateDescriptor("v", Int64()))
        m = kb.get_state(MapStateDescriptor("m", Int64(), Int64()))
        lst = kb.get_state(ListStateDescriptor("l", Int64()))
        seen_immutable = 0
        for i in range(1500):
            kb.set_current_key(i % 300)
            v.update(i)
            m.put(i % 7, i)
            lst.add(i)
            if i % 11 == 0:
                m.remove((i + 3) % 7)
            # read back right away: the newest version may sit in the active, an immutable buffer or LMDB
            assert v.value() == i and m.get(i % 7) == i and lst.get()[-1] == i
            seen_immutable = max(seen_immutable, kb.metrics()["immutable_buffers"])
        assert seen_immutable <= nbuf - 1
        for k in range(300):
            kb.set_current_key(k)
            expect = [i for i in range(1500) if i % 300 == k]
            assert v.value() == expect[-1] and lst.get() == expect
        kb.flush()
        m2 = kb.metrics()
        assert m2["buffer_entries"] == 0 and m2["immutable_buffers"] == 0 and m2["flushes"] > 20
        assert kb.num_state_entries() == 300 + 300 + m_count(kb, m)
    finally:
        kb.close()


def m_count(kb, m):
    total = 0
    for k in kb.get_keys("m"):
        kb.set_current_key(k)
        total += len(m.items())
    return total


def test_stalls_only_when_all_buffers_are_full(tmp_path):
    kb = make(tmp_path, write_buffer_size=1 << 20, max_write_buffer_number=3)
    try:
        v = kb.get_state(ValueStateDescriptor("v", Int64()))
        for i in range(1000):  # far below one buffer: no flush, no stall
            kb.set_current_key(i)
            v.update(i)
        assert kb.metrics()["stalls"] == 0 and kb.metrics()["flushes"] == 0
        kb.flush()  # an explicit flush waits, but is no write stall
        assert kb.metrics()["stalls"] == 0 and kb.metrics()["flushes"] == 1
    finally:
        kb.close()
    kb = make(tmp_path / "one", write_buffer_size=512, max_write_buffer_number=1)
    try:
        v = kb.get_state(ValueStateDescriptor("v", Int64()))
        for i in range(2000):
            kb.set_current_key(i)
            v.update(i)
        m = kb.metrics()
        # one buffer: every full buffer makes the writer wait for its flush
        assert m["flushes"] > 10 and m["stalls"] == m["flushes"] and m["immutable_buffers"] == 0
        for i in range(0, 2000, 7):
            kb.set_current_key(i)
            assert v.value() == i
    finally:
        kb.close()


def test_stalls_with_tiny_buffers_and_many_writes(tmp_path):
    kb = make(tmp_path, write_buffer_size=128, max_write_buffer_number=2)
    try:
        v = kb.get_state(ValueStateDescriptor("v", Str()))
        for i in range(5000):
            kb.set_current_key(i)
            v.update("x" * 50)
        m = kb.metrics()
        assert m["flushes"] > 100
        assert 0 < m["stalls"] <= m["flushes"] + 1  # the writer outruns a flush thread per 128-byte buffer
        assert kb.num_state_entries() == 5000
    finally:
        kb.close()


def test_read_cache_hits_bounded_and_invalidated_by_writes(tmp_path):
    kb = make(tmp_path, write_buffer_size=1 << 20, cache_entries=50)
    try:
        v = kb.get_state(ValueStateDescriptor("v", Int64()))
        m = kb.get_state(MapStateDescriptor("m", Int64(), Str()))
        for i in range(200):
            kb.set_current_key(i)
            v.update(i)
            m.put(1, f"a{i}")
        kb.flush()
        for _ in range(3):
            for i in range(20):
                kb.set_current_key(i)
                assert v.value() == i and m.get(1) == f"a{i}"
        met = kb.metrics()
        assert met["cache_misses"] == 40 and met["cache_hits"] == 80
        for i in range(200):  # more keys than the cache holds
            kb.set_current_key(i)
            assert v.value() == i
        assert kb.metrics()["cache_entries"] <= 50
        kb.set_current_key(5)
        v.update(500)  # newer version in the buffer shadows and evicts the cached one
        m.remove(1)
        assert v.value() == 500 and m.get(1) is None
        kb.flush()
        assert v.value() == 500 and m.get(1) is None  # after the flush: LMDB, then cache
        assert v.value() == 500 and m.get(1) is None
        v.clear()
        kb.flush()
        assert v.value() is None
        assert kb.num_state_entries() == 398
    finally:
        kb.close()


def test_drop_expired_at_flush(tmp_path, clock):
    kb = make(tmp_path, clock=clock, write_buffer_size=1 << 20)
    try:
        bg = StateTtlConfig.new_builder(Time.milliseconds(100)).build()  # background cleanup on (default)
        off = StateTtlConfig.new_builder(Time.milliseconds(100)).disable_cleanup_in_background().build()
        v = kb.get_state(with_ttl(ValueStateDescriptor("v", Int64()), bg))
        lst = kb.get_state(with_ttl(ListStateDescriptor("l", Int64()), bg))
        keep = kb.get_state(with_ttl(ValueStateDescriptor("keep", Int64()), off))
        for i in range(100):
            kb.set_current_key(i)
            v.update(i)
            keep.update(i)
            lst.add(i)
        clock.set(60)
        for i in range(50):
            kb.set_current_key(i)
            lst.add(-i)  # half of these lists keep one fresh element
            lst.add(-i)
        assert kb.num_state_entries() == 300 and kb.metrics()["flushes"] == 0
        clock.set(100)  # v, keep and the first list elements have expired
        for i in range(100, 110):
            kb.set_current_key(i)
            v.update(i)  # fresh entries in the buffer survive the flush
        kb.flush()  # the compaction filter: only what this flush writes (entries already in LMDB need cleanup)
        # v: 100 dropped, keep: not dropped (no background cleanup), lists 50..99 dropped
        assert kb.num_state_entries() == 10 + 100 + 50
        assert kb.metrics()["ttl_expired"] == 100 + 50 + 50  # + the expired first element of lists 0..49
        for i in range(50):
            kb.set_current_key(i)
            assert lst.get() == [-i, -i] and v.value() is None
        for i in range(100, 110):
            kb.set_current_key(i)
            assert v.value() == i
    finally:
        kb.close()


def test_list_append_is_a_merge_operator(tmp_path):
    kb = make(tmp_path, write_buffer_size=1 << 16)
    store = kb._store
    try:
        lst = kb.get_state(ListStateDescriptor("l", Str()))
        kb.set_current_key("big")
        lst.update(["x" * 100] * 2000)  # a 200 KB list, spilled
        kb.flush()
        before = kb.metrics()["bytes_in_memory"]
        for r in range(5):
            for i in range(10):
                lst.add(f"r{r}-{i}")
            # the active buffer holds only the appended records, never the 200 KB list
            assert kb.metrics()["bytes_in_memory"] - before < 50_000
            kb.flush()
        assert store.ndeltas >= 5
        got = lst.get()
        assert got[:2000] == ["x" * 100] * 2000 and got[2000:] == [f"r{r}-{i}" for r in range(5) for i in range(10)]
        assert kb.num_state_entries() == 1
        lst.update(["new"])  # replaces the base and its deltas
        kb.flush()
        assert lst.get() == ["new"]
        lst.add("more")
        kb.flush()
        lst.add("buffered")
        assert lst.get() == ["new", "more", "buffered"]
        lst.clear()
        kb.flush()
        assert lst.get() == [] and kb.num_state_entries() == 0 and list(kb.get_keys("l")) == []
        lst.add("again")
        kb.flush()
        assert lst.get() == ["again"] and list(kb.get_keys("l")) == ["big"]
    finally:
        kb.close()


def test_list_deltas_with_ttl_cleanup_and_snapshot_keys(tmp_path, clock):
    kb = make(tmp_path, clock=clock, write_buffer_size=1 << 16)
    try:
        cfg = ttl(100, cleanup=(50, False))
        lst = kb.get_state(with_ttl(ListStateDescriptor("l", Int64()), cfg))
        for k in range(20):
            kb.set_current_key(k)
            lst.add(0)
        kb.flush()
        clock.set(50)
        for k in range(20):
            kb.set_current_key(k)
            lst.add(50)  # deltas over spilled bases
        kb.flush()
        clock.set(120)  # the bases' records expired, the deltas' not
        for k in range(20):
            kb.set_current_key(k)
            assert lst.get() == [50]
        assert kb.num_state_entries() == 20
        clock.set(200)
        kb.set_current_key(0)
        for _ in range(10):
            lst.get()
        assert kb.num_state_entries() == 0
        assert list(kb.get_keys("l")) == []
    finally:
        kb.close()


def test_memory_budget_bounds_buffers_cache_and_index(tmp_path):
    budget = 4 << 20
    kb = make(tmp_path, write_buffer_size=64 << 20, memory_budget=budget, max_write_buffer_number=3,
              cache_entries=1 << 20)
    try:
        assert kb.write_buffer_size * 3 <= budget // 3
        m = kb.get_state(MapStateDescriptor("m", Int64(), Int64()))
        peak = 0
        for k in range(200):
            kb.set_current_key(k)
            for u in range(200):
                m.put(u, u)
            peak = max(peak, kb.metrics()["bytes_in_memory"])
        for k in range(0, 200, 3):
            kb.set_current_key(k)
            for u in range(0, 200, 5):
                assert m.get(u) == u
            peak = max(peak, kb.metrics()["bytes_in_memory"])
        assert peak < budget
        assert kb.num_state_entries() == 40000
    finally:
        kb.close()


# -- asynchronous checkpoints: the cut (buffer copies + an LMDB read transaction) -------------------------

def _ckpt_backend(tmp_path, **opts):
    opts.setdefault("write_buffer_size", 4096)
    b = statecore.LMDBStateBackend(db_path=str(tmp_path / "db"), **opts)
    b.checkpoint_storage = statecore.FileSystemCheckpointStorage(str(tmp_path / "ckpt"))
    return b


def _hold_checkpoint_thread(kb):
    """Occupy the backend's checkpoint executor: the next checkpoint's background part waits for the event."""
    import threading

    from statecore.checkpoint.snapshot import _chain
    ev = threading.Event()
    _chain(kb).executor.submit(ev.wait, 120)
    return ev


def _fill(kb, keys, tag):
    v = kb.get_state(ValueStateDescriptor("v", Str()))
    lst = kb.get_state(ListStateDescriptor("l", Int64()))
    mp = kb.get_state(MapStateDescriptor("m", Int64(), Str()))
    for i in keys:
        kb.set_current_key(i)
        v.update(f"{tag}-{i}")
        lst.add(i)
        mp.put(i % 7, f"{tag}{i}")
        if i % 5 == 0:
            mp.remove((i + 1) % 7)


def _dump(kb):
    v = kb.get_state(ValueStateDescriptor("v", Str()))
    lst = kb.get_state(ListStateDescriptor("l", Int64()))
    mp = kb.get_state(MapStateDescriptor("m", Int64(), Str()))
    out = {}
    for i in range(400):
        kb.set_current_key(i)
        out[i] = (v.value(), list(lst.get() or []), sorted(mp.items()))
    return out


@pytest.mark.parametrize("incremental", [False, True])
def test_async_checkpoint_cut_survives_later_writes_and_flushes(tmp_path, incremental):
    backend = _ckpt_backend(tmp_path, incremental=incremental)
    kb = backend.create_keyed_state_backend(max_parallelism=128)
    try:
        _fill(kb, range(300), "a")           # spread over LMDB, immutable buffers and the active buffer
        if incremental:
            kb.checkpoint(1)
            _fill(kb, range(0, 300, 3), "b")  # the next one is a delta
        expected = _dump(kb)
        ev = _hold_checkpoint_thread(kb)
        fut = kb.checkpoint_async(2)
        assert kb._store.ncuts == 1           # three states, one cut (one read transaction)
        _fill(kb, range(100, 400), "c")       # after the cut: overwrites, new keys, appends, map removes
        kb.flush()                            # ... flushed to LMDB while the cut is pending
        _fill(kb, range(0, 50), "d")          # ... and in the active buffer
        assert not fut.done()
        ev.set()
        cp = fut.result(timeout=60)
        assert kb._store.ncuts == 0           # the transaction is released when the snapshot is done
        assert cp.incremental == incremental
    finally:
        kb.close()
    with backend.restore_keyed_state_backend([cp], max_parallelism=128) as kb2:
        assert _dump(kb2) == expected


def test_async_checkpoint_list_deltas_of_a_buffer_being_flushed(tmp_path):
    """Cuts taken while buffers of append-deltas are being flushed: a delta already committed to LMDB by a
    buffer that is still buffered is counted once (from the buffer copy; the cut skips LMDB deltas from the
    flushing buffer's first sequence number on)."""
    import itertools
    backend = _ckpt_backend(tmp_path, write_buffer_size=96 << 10, max_write_buffer_number=4)
    kb = backend.create_keyed_state_backend(max_parallelism=128)
    n, ids, pending, bad = 3000, itertools.count(1), [], []

    def check(fut, expected):
        cp = fut.result(timeout=60)
        with backend.restore_keyed_state_backend([cp], max_parallelism=128) as kb2:
            l2 = kb2.get_state(ListStateDescriptor("l", Int64()))
            for i in range(n):
                kb2.set_current_key(i)
                if list(l2.get() or []) != expected[i]:
                    bad.append((cp.checkpoint_id, i))
    try:
        lst = kb.get_state(ListStateDescriptor("l", Int64()))
        exp = {i: [] for i in range(n)}
        for rnd in range(6):
            for i in range(n):
                kb.set_current_key(i)
                lst.add(rnd)
                exp[i].append(rnd)
                if i % 500 == 499:
                    pending.append((kb.checkpoint_async(next(ids)), {k: list(v) for k, v in exp.items()}))
                if i % 500 == 250 and pending:
                    check(*pending.pop())
        while pending:
            check(*pending.pop())
        assert kb.metrics()["flushes"] > 10
        assert not bad, bad[:5]
    finally:
        kb.close()


def test_async_checkpoint_map_resize_waits_for_the_cut(tmp_path):
    import threading
    backend = _ckpt_backend(tmp_path, write_buffer_size=64 << 10, map_size=256 << 10)
    kb = backend.create_keyed_state_backend(max_parallelism=128)
    try:
        v = kb.get_state(ValueStateDescriptor("v", Str()))
        payload = "x" * 200
        for i in range(300):
            kb.set_current_key(i)
            v.update(payload + str(i))
        kb.flush()
        expected = {i: payload + str(i) for i in range(300)}
        ev = _hold_checkpoint_thread(kb)
        fut = kb.checkpoint_async(1)
        resizes = kb.metrics()["map_resizes"]
        timer = threading.Timer(1.0, ev.set)  # the writer below stalls until the cut is released
        timer.start()
        for i in range(300, 8000):  # fills the map several times over while the cut's transaction is open
            kb.set_current_key(i)
            v.update(payload + "new" + str(i))
        for i in range(0, 300, 2):
            kb.set_current_key(i)
            v.update("changed")
        kb.flush()
        cp = fut.result(timeout=60)
        timer.join()
        m = kb.metrics()
        assert m["map_resizes"] > resizes and kb._store.cut_grow_waits > 0
        assert kb._store.ncuts == 0
        kb.set_current_key(7999)
        assert v.value() == payload + "new7999"
    finally:
        kb.close()
    with backend.restore_keyed_state_backend([cp], max_parallelism=128) as kb2:
        v2 = kb2.get_state(ValueStateDescriptor("v", Str()))
        assert kb2.num_state_entries() == 300
        for i in range(300):
            kb2.set_current_key(i)
            assert v2.value() == expected[i]


def test_async_checkpoint_close_while_pending_and_failure_releases(tmp_path, monkeypatch):
    import gc
    backend = _ckpt_backend(tmp_path)
    kb = backend.create_keyed_state_backend(max_parallelism=128)
    _fill(kb, range(200), "a")
    ev = _hold_checkpoint_thread(kb)
    fut = kb.checkpoint_async(1)
    kb.close()  # pending: its transaction is ended before the environment closes
    ev.set()
    with pytest.raises(BackendClosedError):
        fut.result(timeout=60)
    # a checkpoint whose write fails releases its transaction too
    kb = backend.create_keyed_state_backend(max_parallelism=128)
    try:
        _fill(kb, range(200), "a")
        storage = backend.checkpoint_storage

        def broken(*a, **k):
            raise OSError("disk on fire")
        monkeypatch.setattr(type(storage), "create_writer", broken)
        ev = _hold_checkpoint_thread(kb)
        fut = kb.checkpoint_async(1)
        assert kb._store.ncuts == 1
        ev.set()
        with pytest.raises(Exception):
            fut.result(timeout=60)
        gc.collect()
        assert kb._store.ncuts == 0
        monkeypatch.undo()
        assert kb.checkpoint_async(2).result(timeout=60) is not None
        assert kb._store.ncuts == 0
    finally:
        kb.close()


def test_async_checkpoint_synchronous_part_is_small(tmp_path):
    """Measured, not asserted: the synchronous part copies the write buffers (bounded by write_buffer_size x
    max_write_buffer_number) and opens a read transaction; serializing runs on the checkpoint thread."""
    import time

    import numpy as np
    backend = _ckpt_backend(tmp_path, write_buffer_size=8 << 20)
    kb = backend.create_keyed_state_backend(max_parallelism=128)
    try:
        st = kb.get_state(ValueStateDescriptor("v", statecore.Float64()))
        n = 200_000
        st.update_batch(np.arange(n, dtype=np.int64), np.random.default_rng(1).random(n))
        t0 = time.perf_counter()
        fut = kb.checkpoint_async(1)
        sync_ms = (time.perf_counter() - t0) * 1e3
        fut.result(timeout=120)
        t0 = time.perf_counter()
        kb.checkpoint(2)
        full_ms = (time.perf_counter() - t0) * 1e3
        print(f"\nLMDB tier n={n:,}: checkpoint_async synchronous part {sync_ms:.1f} ms "
              f"(buffered: {kb.metrics()['buffer_entries']:,} entries); checkpoint() {full_ms:.1f} ms")
    finally:
        kb.close()


@pytest.mark.parametrize("cut", [False, True])
def test_checkpoint_scan_of_flushed_states_across_key_groups(tmp_path, cut):
    """The checkpoint's LMDB scan (one C iterator per key group of each state) returns exactly each state's
    entries: three states interleaved in every key group, long (hashed) keys, list deltas, buffer shadowing."""
    backend = _ckpt_backend(tmp_path, write_buffer_size=1 << 20)
    kb = backend.create_keyed_state_backend(max_parallelism=128)
    try:
        _fill(kb, range(400), "a")
        lv = kb.get_state(ValueStateDescriptor("long", Str()))
        for i in range(0, 400, 9):
            kb.set_current_key(i)
            lv.update("x" * 600 + str(i))
        kb.flush()                        # all in LMDB
        _fill(kb, range(0, 400, 11), "b")  # list deltas in LMDB after the next flush, overwrites
        kb.flush()
        _fill(kb, range(0, 400, 13), "c")  # shadowing buffer entries
        expected = _dump(kb)
        longs = {}
        for i in range(0, 400, 9):
            kb.set_current_key(i)
            longs[i] = lv.value()
        n = kb.num_state_entries()
        cp = kb.checkpoint_async(1).result(timeout=60) if cut else kb.checkpoint(1)
    finally:
        kb.close()
    with backend.restore_keyed_state_backend([cp], max_parallelism=128) as kb2:
        assert _dump(kb2) == expected
        assert kb2.num_state_entries() == n
        lv2 = kb2.get_state(ValueStateDescriptor("long", Str()))
        for i, val in longs.items():
            kb2.set_current_key(i)
            assert lv2.value() == val


def test_close_does_not_wait_for_a_large_flush(tmp_path):
    """close() flushes nothing: a flush sorting a large buffer stops early, the flush thread ends."""
    import threading

    import numpy as np
    kb = make(tmp_path, write_buffer_size=16 << 20)
    v = kb.get_state(ValueStateDescriptor("v", Int64()))
    keys = np.arange(400_000, dtype=np.int64)
    v.update_batch(keys, keys)
    m = kb.metrics()
    assert m["immutable_buffers"] + m["flushes"] >= 1  # a buffer was frozen: its flush is running
    kb.close()
    assert not [t for t in threading.enumerate() if t.name == "statecore-lmdb-flush"]


def test_map_items_lmdb_only_and_mixed_with_hashed_user_keys(tmp_path):
    """items() of a map held only by LMDB (one ordered range read) and of one mixed with the buffer agree with
    the model, long (hashed) user keys included: ordered by user key."""
    kb = make(tmp_path, write_buffer_size=1 << 20)
    try:
        mp = kb.get_state(MapStateDescriptor("m", Str(), Int64()))
        model = {}
        for i in range(40):
            kb.set_current_key(i % 4)
            uk = ("z" * 500 if i % 3 == 0 else "") + f"u{i:03d}"  # every third user key is hashed in LMDB
            mp.put(uk, i)
            model.setdefault(i % 4, {})[uk] = i
        kb.flush()
        for k in range(4):
            kb.set_current_key(k)
            assert list(mp.items()) == sorted(model[k].items())
        kb.set_current_key(1)
        gone = sorted(model[1])[0]
        mp.put("a-new", -1)
        mp.remove(gone)
        model[1]["a-new"] = -1
        del model[1][gone]
        for k in range(4):
            kb.set_current_key(k)
            assert list(mp.items()) == sorted(model[k].items())
            assert dict(mp.items()) == model[k]
    finally:
        kb.close()


@pytest.mark.parametrize("wbs", [4096, 1 << 20])  # a saturated key filter (false positives) and a sparse one
def test_key_filter_keeps_counts_and_reads_exact(tmp_path, wbs):
    """New-key writes after a flush skip the LMDB lookup when the key filter rules the key out; counts and
    reads stay exact with a filter full of false positives, deleted keys and re-added ones."""
    kb = make(tmp_path, write_buffer_size=wbs)
    try:
        v = kb.get_state(ValueStateDescriptor("v", Int64()))
        mp = kb.get_state(MapStateDescriptor("m", Int64(), Int64()))
        model_v, model_m = {}, {}
        for rnd in range(3):
            for i in range(rnd * 3000, rnd * 3000 + 4000):  # overlaps the previous round: existing + new keys
                kb.set_current_key(i)
                v.update(i)
                model_v[i] = i
                mp.put(i % 5, i)
                model_m[(i, i % 5)] = i
            for i in range(rnd * 3000, rnd * 3000 + 4000, 7):
                kb.set_current_key(i)
                v.clear()
                model_v.pop(i, None)
                mp.remove(i % 5)
                model_m.pop((i, i % 5), None)
            kb.flush()
            assert kb.num_state_entries() == len(model_v) + len(model_m)
        for i in range(-50, 10000, 3):
            kb.set_current_key(i)
            assert v.value() == model_v.get(i)
            assert mp.get(i % 5) == model_m.get((i, i % 5))
        if wbs > 4096:
            assert kb._store.kf_skips > 0
    finally:
        kb.close()
