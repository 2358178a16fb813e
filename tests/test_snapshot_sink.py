"""Snapshot data files: parallel heap serialization, spilled runs on the LMDB tier, streamed writes.

The sink partitions records by key group (statecore/_sink.pyx).  A large heap table is serialized
by two threads into two sinks whose sections are merged per key group; the LMDB tier's sink spills
runs to a temp file past its limit.  Both must give exactly the state back on restore, including
incremental deltas, whose tombstones must keep preceding the entries that follow them.
"""
import os

import numpy as np
import pytest

import statecore as sc
from statecore._sink import DATA_MAGIC, SnapshotSink, file_chunks
from statecore._tables import PARALLEL_SNAPSHOT_ENTRIES
from statecore.checkpoint import snapshot

from test_checkpoint import dump, populate


def _value_state(kb, n, ttl=None):
    desc = sc.ValueStateDescriptor("v", sc.Float64())
    if ttl is not None:
        desc.enable_time_to_live(ttl)
    st = kb.get_state(desc)
    keys = np.arange(n, dtype=np.int64)
    st.update_batch(keys, keys.astype(np.float64) * 0.5)
    return st


def test_parallel_heap_serialization_restores_exactly(tmp_path):
    n = PARALLEL_SNAPSHOT_ENTRIES + 5000
    backend = sc.HashMapStateBackend(sc.FileSystemCheckpointStorage(str(tmp_path / "c")))
    with backend.create_keyed_state_backend(max_parallelism=128) as kb:
        _value_state(kb, n)
        cut = snapshot._Cut(kb, copy=False).serialize(cleanup_expired=True)
        assert len(cut.sinks) == 2 and all(s.records > 0 for s in cut.sinks), "both halves were used"
        assert sum(s.records for s in cut.sinks) == n
        cp = kb.checkpoint(1)
    assert cp.metadata["states"][0]["entries"] == n
    assert sum(sec[3] for sec in cp.metadata["files"][0]["key_groups"]) == n
    for kgr in (sc.KeyGroupRange(0, 127), sc.KeyGroupRange(0, 40), sc.KeyGroupRange(41, 127)):
        with backend.restore_keyed_state_backend([cp], max_parallelism=128, key_group_range=kgr) as kb2:
            st = kb2.get_state(sc.ValueStateDescriptor("v", sc.Float64()))
            keys = np.array(sorted(kb2.get_keys("v")), dtype=np.int64)
            mine = [k for k in range(n) if sc.assign_to_key_group(k, 128) in kgr]
            assert keys.tolist() == mine
            assert st.value_batch(keys).tolist() == (keys * 0.5).tolist()


def test_file_chunks_merge_sections_and_seal():
    a, b = SnapshotSink(0, 3), SnapshotSink(0, 3)
    chunks, sections, length = file_chunks([a, b])
    assert chunks == [DATA_MAGIC] and sections == [] and length == len(DATA_MAGIC)
    with pytest.raises(ValueError, match="one key-group range"):
        file_chunks([SnapshotSink(0, 3), SnapshotSink(0, 4)])


@pytest.mark.parametrize("incremental", [False, True])
def test_lmdb_checkpoint_spills_runs_and_restores_exactly(tmp_path, incremental):
    """1 MiB spill limit (memory_budget 4 MiB) with several MiB of state: many runs, exact restore."""
    storage = sc.FileSystemCheckpointStorage(str(tmp_path / "c"))
    backend = sc.LMDBStateBackend(str(tmp_path / "db"), memory_budget=4 << 20, write_buffer_size=1 << 20,
                                  checkpoint_storage=storage, incremental=incremental)
    with backend.create_keyed_state_backend(job_id="j", operator_id="op") as kb:
        populate(kb, range(3000), seed=1)
        big = kb.get_state(sc.ValueStateDescriptor("big", sc.Bytes()))
        for k in range(6000):
            kb.set_current_key(k)
            big.update(os.urandom(600))
        expected = dump(kb)
        expected_big = {}
        for k in range(6000):
            kb.set_current_key(k)
            expected_big[k] = big.value()
        if not incremental:  # (a cut of its own would take the incremental chain's dirty set)
            cut = snapshot._Cut(kb, copy=False).serialize(cleanup_expired=True)
            assert cut.sinks[0].runs_spilled >= 3, cut.sinks[0].runs_spilled
        cp = kb.checkpoint(1)
        if incremental:
            # A delta over spilled runs: clears and rewrites must come back in order.
            states = populate(kb, range(0, 3000, 7), seed=2)
            for k in range(0, 3000, 11):
                kb.set_current_key(k)
                states["m"].clear()
                states["l"].clear()
            for k in range(0, 6000, 5):
                kb.set_current_key(k)
                big.update(os.urandom(700))
                expected_big[k] = big.value()
            expected = dump(kb)
            cp = kb.checkpoint(2)
            assert cp.incremental
    with backend.restore_keyed_state_backend([cp.location], job_id="j", operator_id="op") as kb2:
        assert dump(kb2) == expected
        big2 = kb2.get_state(sc.ValueStateDescriptor("big", sc.Bytes()))
        for k, v in expected_big.items():
            kb2.set_current_key(k)
            assert big2.value() == v


def test_restore_from_memory_and_spooled_storage_matches(tmp_path):
    """read_mapped: memory:// is read directly; local files are mapped (S3 spooling: test_checkpoint_s3)."""
    for uri in (f"memory://sink-{os.getpid()}", str(tmp_path / "local")):
        backend = sc.HashMapStateBackend(sc.FileSystemCheckpointStorage(uri))
        with backend.create_keyed_state_backend() as kb:
            populate(kb, range(200), seed=3)
            expected = dump(kb)
            cp = kb.checkpoint(1)
        with backend.restore_keyed_state_backend([cp.location]) as kb2:
            assert dump(kb2) == expected
