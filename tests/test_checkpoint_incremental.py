"""Incremental checkpoints: deltas on top of a base, chains, retention of shared files, restore and rescale."""
import pytest

import statecore as sc
from statecore import ListStateDescriptor, MapStateDescriptor, ValueStateDescriptor
from statecore.checkpoint import snapshot
from statecore.keygroups import compute_key_group_range_for_operator_index as kg_range

from test_checkpoint import dump, populate


def incremental_backend(name, tmp_path, retained=1):
    storage = sc.FileSystemCheckpointStorage(str(tmp_path / "ckpt"))
    if name == "lmdb":
        b = sc.LMDBStateBackend(db_path=str(tmp_path / "db"), write_buffer_size=64 * 1024, incremental=True,
                                checkpoint_storage=storage)
    else:  # the mechanism is backend-independent; the heap backend exercises it too
        b = sc.HashMapStateBackend(checkpoint_storage=storage)
        b.incremental = True
    b.num_retained = retained
    return b


BACKEND_NAMES = ["hashmap", "lmdb"]


def shared_files(tmp_path):
    d = tmp_path / "ckpt" / "job" / "operator" / "shared"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_delta_is_small_and_restores_exactly(name, tmp_path):
    backend = incremental_backend(name, tmp_path)
    with backend.create_keyed_state_backend() as kb:
        v = kb.get_state(ValueStateDescriptor("v", float))
        for k in range(5000):
            kb.set_current_key(k)
            v.update(float(k))
        full = kb.checkpoint(1)
        assert not full.incremental
        for k in range(0, 5000, 100):  # 1 % of the keys change
            kb.set_current_key(k)
            v.update(-1.0)
        delta = kb.checkpoint(2)
        assert delta.incremental
        assert delta.size_bytes * 10 <= full.size_bytes, (delta.size_bytes, full.size_bytes)
        assert delta.full_size_bytes == full.size_bytes + delta.size_bytes
        expected = {k: (-1.0 if k % 100 == 0 else float(k)) for k in range(5000)}
    with backend.restore_keyed_state_backend([delta.location]) as kb2:
        v2 = kb2.get_state(ValueStateDescriptor("v", float))
        got = {}
        for k in kb2.get_keys("v"):
            kb2.set_current_key(k)
            got[k] = v2.value()
        assert got == expected


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_deletes_and_clears_do_not_come_back(name, tmp_path):
    backend = incremental_backend(name, tmp_path, retained=3)
    with backend.create_keyed_state_backend() as kb:
        populate(kb, range(200))
        kb.checkpoint(1)
        m = kb.get_state(MapStateDescriptor("m", str, int))
        lst = kb.get_state(ListStateDescriptor("l"))
        v = kb.get_state(ValueStateDescriptor("v", float))
        for k in range(0, 200, 7):
            kb.set_current_key(k)
            m.remove("u0")
            lst.clear()
            v.update(None)
        kb.set_current_key(3)
        m.clear()
        m.put("fresh", 1)
        kb.checkpoint(2)
        populate(kb, range(150, 260), seed=9)  # new keys and overwrites
        cp3 = kb.checkpoint(3)
        assert cp3.incremental and len(cp3.metadata["files"]) == 3
        expected = dump(kb)
    with backend.restore_keyed_state_backend([cp3]) as kb2:
        assert dump(kb2) == expected


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_async_incremental_checkpoints_are_ordered_cuts(name, tmp_path):
    backend = incremental_backend(name, tmp_path, retained=5)
    with backend.create_keyed_state_backend() as kb:
        v = kb.get_state(ValueStateDescriptor("v", float))
        futures, expected = [], []
        for cid in range(1, 6):
            for k in range(cid * 10):
                kb.set_current_key(k)
                v.update(cid * 1000.0 + k)
            expected.append(dump(kb))
            futures.append(kb.checkpoint_async(cid))
        cps = [f.result(timeout=60) for f in futures]
    assert [c.incremental for c in cps] == [False, True, True, True, True]
    for cp, exp in zip(cps, expected):
        with backend.restore_keyed_state_backend([cp]) as kb2:
            assert dump(kb2) == exp


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_chain_is_rebased_and_unreferenced_files_deleted(name, tmp_path, monkeypatch):
    monkeypatch.setattr(snapshot, "MAX_DELTAS", 2)
    backend = incremental_backend(name, tmp_path, retained=1)
    with backend.create_keyed_state_backend() as kb:
        v = kb.get_state(ValueStateDescriptor("v", float))
        kinds = []
        for cid in range(1, 9):
            kb.set_current_key(cid)
            v.update(float(cid))
            cp = kb.checkpoint(cid)
            kinds.append(cp.incremental)
            referenced = {f["path"].split("/")[-1] for f in cp.metadata["files"]}
            assert set(shared_files(tmp_path)) == referenced  # nothing unreferenced is left behind
        assert kinds == [False, True, True, False, True, True, False, True]
        expected = dump(kb)
    with backend.restore_keyed_state_backend([cp]) as kb2:
        assert dump(kb2) == expected


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_rescale_from_incremental_checkpoints(name, tmp_path):
    backend = incremental_backend(name, tmp_path)
    olds, expected = [], {}
    for i in range(2):
        kgr = kg_range(128, 2, i)
        kb = backend.create_keyed_state_backend(key_group_range=kgr)
        populate(kb, [k for k in range(300) if sc.assign_to_key_group(k, 128) in kgr])
        kb.checkpoint(1)
        populate(kb, [k for k in range(300, 400) if sc.assign_to_key_group(k, 128) in kgr], seed=3)
        olds.append(kb.checkpoint(2))
        expected.update(dump(kb))
        kb.close()
    assert all(c.incremental for c in olds)
    got = {}
    for i in range(3):
        with backend.restore_keyed_state_backend(olds, key_group_range=kg_range(128, 3, i)) as kb:
            got.update(dump(kb))
    assert got == expected


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_failed_checkpoint_forces_a_full_one(name, tmp_path, monkeypatch):
    backend = incremental_backend(name, tmp_path, retained=2)
    storage = backend.checkpoint_storage
    with backend.create_keyed_state_backend() as kb:
        v = kb.get_state(ValueStateDescriptor("v", float))
        kb.set_current_key(1)
        v.update(1.0)
        kb.checkpoint(1)
        real = type(storage).write_shared_file

        def failing(self, *a, **k):
            raise sc.CheckpointError("injected: storage unavailable")
        monkeypatch.setattr(type(storage), "write_shared_file", failing)
        kb.set_current_key(2)
        v.update(2.0)
        with pytest.raises(sc.CheckpointError, match="injected"):
            kb.checkpoint(2)
        monkeypatch.setattr(type(storage), "write_shared_file", real)
        kb.set_current_key(3)
        v.update(3.0)
        cp3 = kb.checkpoint(3)
        assert not cp3.incremental  # the chain broke: rebased with a full checkpoint
        expected = dump(kb)
    with backend.restore_keyed_state_backend([cp3]) as kb2:
        assert dump(kb2) == expected
