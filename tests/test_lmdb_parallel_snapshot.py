"""The LMDB tier's two-thread checkpoint scan (LMDBStateTable.snapshot_split): a state of at least 65,536
entries is scanned by two threads, half of the key groups each, with buffered entries shadowing LMDB records.

The checkpoint must hold exactly the live state, whichever thread read which record."""
import numpy as np
import pytest

import statecore as sc
from statecore import ListStateDescriptor, MapStateDescriptor, ValueStateDescriptor
from statecore.keygroups import compute_key_group_range_for_operator_index as kg_range

N = 80_000  # above PARALLEL_SCAN_ENTRIES (1 << 16), with a tenth removed too


def lmdb_backend(tmp_path, name="db"):
    b = sc.LMDBStateBackend(db_path=str(tmp_path / name), write_buffer_size=1 << 20)
    b.checkpoint_storage = sc.FileSystemCheckpointStorage(str(tmp_path / "chk"))
    return b


def values(kb, keys):
    st = kb.get_state(ValueStateDescriptor("v", sc.Float64()))
    return st.value_batch(np.asarray(keys, dtype=np.int64))


@pytest.mark.parametrize("parallelism", [1, 3])
def test_two_thread_scan_with_buffered_overrides(tmp_path, parallelism):
    """LMDB holds the bulk; the write buffers hold overwrites, removals and new keys that must win."""
    b = lmdb_backend(tmp_path)
    keys = np.arange(N, dtype=np.int64)
    for index in range(parallelism):
        kgr = kg_range(128, parallelism, index)
        with b.create_keyed_state_backend(key_group_range=kgr, operator_id=f"op{index}") as kb:
            mine = np.array([k for k in keys.tolist() if kgr.start <= sc.assign_to_key_group(k, 128) <= kgr.end])
            st = kb.get_state(ValueStateDescriptor("v", sc.Float64()))
            st.update_batch(mine, mine.astype(np.float64))
            kb.flush()  # all in LMDB
            expected = dict(zip(mine.tolist(), mine.astype(np.float64).tolist()))
            for k in mine[::10].tolist():  # buffered overwrites
                kb.set_current_key(k)
                st.update(-1.0)
                expected[k] = -1.0
            for k in mine[5::10].tolist():  # buffered removals of flushed keys
                kb.set_current_key(k)
                st.clear()
                del expected[k]
            assert kb.num_state_entries() == len(expected)
            if parallelism == 1:
                assert len(expected) >= 1 << 16  # the two-thread path
            completed = kb.checkpoint(1)
            with b.restore_keyed_state_backend([completed.location], key_group_range=kgr,
                                               operator_id=f"op{index}") as kb2:
                got = values(kb2, mine)
                want = np.array([expected.get(k, np.nan) for k in mine.tolist()])
                assert np.array_equal(np.isnan(got), np.isnan(want))
                assert np.array_equal(got[~np.isnan(got)], want[~np.isnan(want)])
                assert kb2.num_state_entries() == len(expected)


def test_map_and_list_states_and_other_states_interleaved(tmp_path):
    """Several states share LMDB key groups; a map state and a list state with append-deltas (one-thread
    path) next to two large value states (two-thread path)."""
    b = lmdb_backend(tmp_path)
    keys = np.arange(N, dtype=np.int64)
    with b.create_keyed_state_backend() as kb:
        a = kb.get_state(ValueStateDescriptor("a", sc.Float64()))
        c = kb.get_state(ValueStateDescriptor("c", sc.Float64()))
        m = kb.get_state(MapStateDescriptor("m", int, str))
        lst = kb.get_state(ListStateDescriptor("l", int))
        a.update_batch(keys, keys * 2.0)
        c.update_batch(keys, keys * 3.0)
        for k in range(0, 3000, 3):
            kb.set_current_key(k)
            m.put_all({k: "x", k + 1: "y"})
            lst.add(k)
        kb.flush()
        for k in range(0, 3000, 3):  # list append-deltas in LMDB after the flush
            kb.set_current_key(k)
            lst.add(k + 1)
        kb.flush()
        completed = kb.checkpoint(7)
    with b.restore_keyed_state_backend([completed.location]) as kb2:
        a = kb2.get_state(ValueStateDescriptor("a", sc.Float64()))
        c = kb2.get_state(ValueStateDescriptor("c", sc.Float64()))
        assert np.array_equal(a.value_batch(keys), keys * 2.0)
        assert np.array_equal(c.value_batch(keys), keys * 3.0)
        m = kb2.get_state(MapStateDescriptor("m", int, str))
        lst = kb2.get_state(ListStateDescriptor("l", int))
        for k in range(0, 3000, 3):
            kb2.set_current_key(k)
            assert dict(m.items()) == {k: "x", k + 1: "y"}
            assert list(lst.get()) == [k, k + 1]
        assert kb2.num_state_entries() == 2 * N + 2000 + 1000  # map: an entry per user key


def test_cleanup_full_snapshot_drops_expired_in_both_halves(tmp_path):
    clock = sc.ManualClock(1_000)
    cfg = sc.StateTtlConfig.new_builder(100).cleanup_full_snapshot().disable_cleanup_in_background().build()
    d = ValueStateDescriptor("v", sc.Float64())
    d.enable_time_to_live(cfg)
    b = lmdb_backend(tmp_path)
    keys = np.arange(N, dtype=np.int64)
    with b.create_keyed_state_backend(clock=clock) as kb:
        st = kb.get_state(d)
        st.update_batch(keys[::2], np.ones(N // 2))
        clock.advance(60)
        st.update_batch(keys[1::2], np.ones(N // 2))
        kb.flush()
        clock.advance(60)  # the even keys expired, the odd ones not
        completed = kb.checkpoint(1)
    assert completed.metadata["states"][0]["entries"] == N // 2
