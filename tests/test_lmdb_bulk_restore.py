"""The LMDB tier's restore fast path (statecore._lmdb.bulk_load): the first section of each key group is
written straight into LMDB, the rest (incremental deltas) replayed through the write buffers.

Whatever path a section takes, the restored backend must hold exactly the checkpointed state, count its
entries exactly (the key filter and per-state counts are kept), and behave like any other backend afterwards
(writes, removes, flushes, further checkpoints)."""
import numpy as np
import pytest

import statecore as sc
from statecore import ListStateDescriptor, MapStateDescriptor, ValueStateDescriptor
from statecore._lmdb import bulk_load
from statecore._states import load_section
from statecore.checkpoint import storage as stg
from statecore.keygroups import compute_key_group_range_for_operator_index as kg_range

from test_checkpoint import dump, populate


def lmdb_backend(tmp_path, name="db", **kw):
    kw.setdefault("write_buffer_size", 4096)
    b = sc.LMDBStateBackend(db_path=str(tmp_path / name), **kw)
    b.checkpoint_storage = sc.FileSystemCheckpointStorage(str(tmp_path / "chk"))
    return b


def bulk_metrics(kb):
    m = kb.metrics()
    return m["restore_bulk_records"], m["restore_bulk_refused"]


@pytest.mark.parametrize("source", ["hashmap", "lmdb"])
def test_every_state_type_restores_through_the_bulk_path(tmp_path, source):
    """A heap checkpoint (records in hash order: sorted per section) and an LMDB one (already in key order)."""
    src = sc.HashMapStateBackend() if source == "hashmap" else lmdb_backend(tmp_path, "src")
    src.checkpoint_storage = sc.FileSystemCheckpointStorage(str(tmp_path / "chk"))
    keys = list(range(300)) + ["a", "β", ("t", 1), b"raw", 2 ** 70]
    with src.create_keyed_state_backend(max_parallelism=128) as kb:
        populate(kb, keys)
        expected, entries = dump(kb), kb.num_state_entries()
        completed = kb.checkpoint(1)
    with lmdb_backend(tmp_path).restore_keyed_state_backend([completed.location], max_parallelism=128) as kb2:
        records, refused = bulk_metrics(kb2)
        assert records == entries and refused == 0
        assert kb2.metrics()["buffer_entries"] == 0  # all of it went to LMDB
        assert dump(kb2) == expected
        assert kb2.num_state_entries() == entries


def test_restored_keys_count_and_remove_exactly(tmp_path):
    """Writes and removes after a bulk restore see the restored keys (key filter bits were set)."""
    b = lmdb_backend(tmp_path, write_buffer_size=1 << 20)
    with b.create_keyed_state_backend() as kb:
        st = kb.get_state(ValueStateDescriptor("v", sc.Float64()))
        st.update_batch(np.arange(20_000, dtype=np.int64), np.arange(20_000, dtype=np.float64))
        completed = kb.checkpoint(1)
    with b.restore_keyed_state_backend([completed.location]) as kb2:
        st = kb2.get_state(ValueStateDescriptor("v", sc.Float64()))
        assert kb2.num_state_entries() == 20_000
        for k in range(0, 20_000, 7):  # overwrite restored keys: not new entries
            kb2.set_current_key(k)
            st.update(-1.0)
        assert kb2.num_state_entries() == 20_000
        for k in range(0, 20_000, 2):
            kb2.set_current_key(k)
            st.clear()
        kb2.flush()
        assert kb2.num_state_entries() == 10_000
        vals = st.value_batch(np.arange(20_000, dtype=np.int64))
        assert np.isnan(vals[::2]).all() and not np.isnan(vals[1::2]).any()
        assert vals[7] == -1.0 and vals[9] == 9.0
        kb2.set_current_key(20_001)  # a new key is still new
        st.update(1.0)
        assert kb2.num_state_entries() == 10_001


def test_many_transactions_and_map_growth(tmp_path):
    """More than one write transaction of records (a small memory budget) into a map that must grow."""
    src = lmdb_backend(tmp_path, "src", write_buffer_size=1 << 20)
    with src.create_keyed_state_backend() as kb:
        st = kb.get_state(ValueStateDescriptor("v", sc.Float64()))
        n = 60_000
        st.update_batch(np.arange(n, dtype=np.int64), np.random.default_rng(3).random(n))
        expected = st.value_batch(np.arange(n, dtype=np.int64))
        completed = kb.checkpoint(1)
    b = lmdb_backend(tmp_path, memory_budget=2 << 20, map_size=64 * 1024)
    with b.restore_keyed_state_backend([completed.location]) as kb2:
        m = kb2.metrics()
        # sections of an LMDB-tier checkpoint are LMDB's records in key order, then the write buffer's: with
        # 256 KiB batches a section's sorted head may go to LMDB before its tail, which is then replayed
        assert m["map_resizes"] >= 3 and 0.9 * n < m["restore_bulk_records"] <= n
        assert kb2.num_state_entries() == n
        st = kb2.get_state(ValueStateDescriptor("v", sc.Float64()))
        assert (st.value_batch(np.arange(n, dtype=np.int64)) == expected).all()


@pytest.mark.parametrize("source", ["hashmap", "lmdb"])
def test_long_keys_are_hashed_lmdb_keys(tmp_path, source):
    """Composite keys over 480 bytes become hashed LMDB keys; the bulk path writes them the same way, and
    their key filter hashes stay with them when a (heap) section is sorted (CI found removes skipped)."""
    b = lmdb_backend(tmp_path)
    src = b if source == "lmdb" else sc.HashMapStateBackend(checkpoint_storage=b.checkpoint_storage)
    keys = ["k" * 600 + str(i) for i in range(50)] + ["short"]
    with src.create_keyed_state_backend() as kb:
        v = kb.get_state(ValueStateDescriptor("v", str))
        m = kb.get_state(MapStateDescriptor("m", str, int))
        for k in keys:
            kb.set_current_key(k)
            v.update(k[-3:])
            m.put("u" * 500, len(k))
        completed = kb.checkpoint(1)
    with b.restore_keyed_state_backend([completed.location]) as kb2:
        assert bulk_metrics(kb2) == (2 * len(keys), 0)
        v = kb2.get_state(ValueStateDescriptor("v", str))
        m = kb2.get_state(MapStateDescriptor("m", str, int))
        for k in keys:
            kb2.set_current_key(k)
            assert v.value() == k[-3:] and dict(m.items()) == {"u" * 500: len(k)}
        for k in keys:
            kb2.set_current_key(k)
            v.clear()
            m.clear()
        assert kb2.num_state_entries() == 0


def test_incremental_deltas_are_replayed_after_their_base(tmp_path):
    """Base sections go through the bulk path; delta sections (tombstones) are replayed in order on top."""
    b = lmdb_backend(tmp_path, incremental=True)
    with b.create_keyed_state_backend() as kb:
        states = populate(kb, range(200))
        kb.checkpoint(1)
        for k in range(0, 200, 3):  # rewrite lists and maps (tombstone + entries), drop values
            kb.set_current_key(k)
            states["l"].update([k])
            states["m"].clear()
            states["m"].put("new", k)
            states["v"].clear()
        expected = dump(kb)
        completed = kb.checkpoint(2)
    assert completed.incremental
    with b.restore_keyed_state_backend([completed.location]) as kb2:
        records, refused = bulk_metrics(kb2)
        assert records > 0 and refused == 0  # each key group's first section is its base
        assert dump(kb2) == expected


def test_rescaled_restore_from_several_instances(tmp_path):
    """Key groups from two old instances, restored into three new ones: every key group's first section bulk."""
    b = lmdb_backend(tmp_path)
    locations, expected = [], {}
    for i in range(2):
        with b.create_keyed_state_backend(key_group_range=kg_range(128, 2, i)) as kb:
            mine = kg_range(128, 2, i)
            populate(kb, [k for k in range(400) if mine.start <= sc.assign_to_key_group(k, 128) <= mine.end])
            expected.update(dump(kb))
            locations.append(kb.checkpoint(1).location)
    got = {}
    for i in range(3):
        with b.restore_keyed_state_backend(locations, key_group_range=kg_range(128, 3, i)) as kb2:
            assert bulk_metrics(kb2)[1] == 0
            d = dump(kb2)
            assert not set(d) & set(got)
            got.update(d)
    assert got == expected


def _sections(location):
    """(data, metadata states, [(kg, off, length, count)]) of a checkpoint's keyed data file."""
    completed = sc.load_checkpoint(location)
    f = completed.metadata["files"][0]
    data = stg.read_mapped(completed.location, f["path"], expected_len=f["length"])
    return data, completed.metadata["states"], f["key_groups"]


def test_section_with_a_duplicate_key_is_left_to_the_replay(tmp_path):
    """bulk_load refuses (writes nothing of) a section holding one key twice; load_section then applies it."""
    b = lmdb_backend(tmp_path)
    with b.create_keyed_state_backend() as kb:
        st = kb.get_state(ValueStateDescriptor("v", sc.Float64()))
        st.update_batch(np.arange(500, dtype=np.int64), np.ones(500))
        completed = kb.checkpoint(1)
    data, states, sections = _sections(completed.location)
    kg, off, length, count = max(sections, key=lambda s: s[3])
    section = bytes(data[off:off + length])
    first_record_len = len(section) - len(_skip_one_record(section))
    doubled = bytearray(section + section[:first_record_len])  # its first record once more
    with b.create_keyed_state_backend() as kb2:
        sidmap = {st["sid"]: kb2._restore_state(st) for st in states}
        item = (doubled, 0, len(doubled), kg, sidmap, "crafted")
        other = max((s for s in sections if s[0] != kg), key=lambda s: s[3])
        good = (bytearray(data), other[1], other[2], other[0], sidmap, "crafted")
        assert bulk_load(kb2._store, [item, good]) == [item]
        assert kb2.num_state_entries() == other[3]  # only the good section
        assert bulk_metrics(kb2) == (other[3], 1)


def _varint(b, i):
    shift = n = 0
    while True:
        n |= (b[i] & 0x7F) << shift
        i += 1
        if b[i - 1] < 0x80:
            return n, i
        shift += 7


def _skip_one_record(b):
    """b after its first record (varint len | key | varint len | value | BE64 ts)."""
    kl, i = _varint(b, 0)
    vl, i = _varint(b, i + kl)
    return b[i + vl + 8:]


def test_section_with_a_bad_record_raises_and_names_the_file(tmp_path):
    b = lmdb_backend(tmp_path)
    with b.create_keyed_state_backend() as kb:
        kb.set_current_key(1)
        kb.get_state(ListStateDescriptor("l")).add(1)
        completed = kb.checkpoint(1)
    data, states, sections = _sections(completed.location)
    kg, off, length, _ = sections[0]
    with b.create_keyed_state_backend() as kb2:
        sidmap = {st["sid"]: kb2._restore_state(st) for st in states}
        truncated = bytearray(data[off:off + length - 3])
        with pytest.raises(sc.CorruptCheckpointError, match="crafted-file"):
            bulk_load(kb2._store, [(truncated, 0, len(truncated), kg, sidmap, "crafted-file")])
        wrong_kg = (bytearray(data), off, length, (kg + 1) % 128, sidmap, "crafted-file")
        with pytest.raises(sc.CorruptCheckpointError, match="is filed under"):
            bulk_load(kb2._store, [wrong_kg])
        assert kb2.num_state_entries() == 0


def test_nothing_is_bulk_loaded_into_a_store_with_buffered_writes(tmp_path):
    """The caller's rule is checked: a store whose write buffer holds entries gets every section back."""
    b = lmdb_backend(tmp_path, write_buffer_size=1 << 20)
    with b.create_keyed_state_backend() as kb:
        kb.set_current_key(1)
        kb.get_state(ValueStateDescriptor("v", float)).update(1.0)
        completed = kb.checkpoint(1)
    data, states, sections = _sections(completed.location)
    with b.create_keyed_state_backend() as kb2:
        sidmap = {st["sid"]: kb2._restore_state(st) for st in states}
        kb2.set_current_key("x")
        kb2.get_state(ValueStateDescriptor("w", float)).update(2.0)
        items = [(bytearray(data), off, length, kg, sidmap, "f") for kg, off, length, _ in sections]
        assert bulk_load(kb2._store, items) == items


def _one_key_group_checkpoint(tmp_path, source, n):
    """A checkpoint with max_parallelism=1: one key group, one section of n value records (~40 B each)."""
    src = sc.HashMapStateBackend() if source == "hashmap" else lmdb_backend(tmp_path, "src", write_buffer_size=1 << 20)
    src.checkpoint_storage = sc.FileSystemCheckpointStorage(str(tmp_path / "chk"))
    with src.create_keyed_state_backend(max_parallelism=1) as kb:
        st = kb.get_state(ValueStateDescriptor("v", sc.Float64()))
        st.update_batch(np.arange(n, dtype=np.int64), np.arange(n, dtype=np.float64))
        if source == "lmdb":
            kb.flush()  # the section is then LMDB's records alone, in key order (no buffered tail)
        return kb.checkpoint(1)


@pytest.mark.parametrize("source", ["hashmap", "lmdb"])
def test_a_section_larger_than_a_batch(tmp_path, source):
    """In key order (LMDB tier) it streams in batches; out of order (heap) it is sorted in memory."""
    n = 40_000  # ~1.5 MB in one section, three 512 KiB batches
    completed = _one_key_group_checkpoint(tmp_path, source, n)
    with lmdb_backend(tmp_path).restore_keyed_state_backend([completed.location], max_parallelism=1) as kb2:
        assert bulk_metrics(kb2) == (n, 0)
        assert kb2.metrics()["buffer_entries"] == 0
        assert kb2.num_state_entries() == n
        st = kb2.get_state(ValueStateDescriptor("v", sc.Float64()))
        assert np.array_equal(st.value_batch(np.arange(n, dtype=np.int64)), np.arange(n, dtype=np.float64))


def test_a_section_leaving_key_order_after_a_written_part_is_replayed_from_there(tmp_path):
    """A (crafted) section in key order for more than a batch, then a record out of order: what was handed to
    LMDB stays, the tail from the first record not handed over comes back for load_section."""
    n = 40_000
    completed = _one_key_group_checkpoint(tmp_path, "lmdb", n)
    data, states, sections = _sections(completed.location)
    (kg, off, length, count), = sections
    section = bytes(data[off:off + length])
    first = section[:len(section) - len(_skip_one_record(section))]
    crafted = bytearray(section + first)  # key 0's record again, after the largest key: out of order
    b = lmdb_backend(tmp_path)
    with b.create_keyed_state_backend(max_parallelism=1) as kb2:
        sidmap = {st["sid"]: kb2._restore_state(st) for st in states}
        item = (crafted, 0, len(crafted), kg, sidmap, "crafted")
        (tail,) = bulk_load(kb2._store, [item])
        written, _ = bulk_metrics(kb2)
        assert 0 < written < n and tail[1] > 0 and tail[1] + tail[2] == len(crafted)
        assert tail[3:] == (kg, sidmap, "crafted")
        load_section(kb2, *tail)
        assert kb2.num_state_entries() == n  # key 0 twice: one entry
        st = kb2.get_state(ValueStateDescriptor("v", sc.Float64()))
        assert np.array_equal(st.value_batch(np.arange(n, dtype=np.int64)), np.arange(n, dtype=np.float64))
