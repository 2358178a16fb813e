"""Checkpoints, savepoints and restore (with rescaling) on every backend and storage."""
import random

import pytest

import statecore as sc
from statecore import (AggregatingStateDescriptor, CorruptCheckpointError, KeyGroupRange, ListStateDescriptor,
                       MapStateDescriptor, ReducingStateDescriptor, StateMigrationError, ValueStateDescriptor)
from statecore.keygroups import compute_key_group_range_for_operator_index as kg_range

from backends import BACKENDS

NAMESPACES = [None, "w1", 7]
TTL_MS = 1000


class Avg:
    def create_accumulator(self):
        return (0, 0)

    def add(self, v, acc):
        return (acc[0] + v, acc[1] + 1)

    def get_result(self, acc):
        return acc[0] / acc[1]

    def merge(self, a, b):
        return (a[0] + b[0], a[1] + b[1])


def descriptors(ttl=False):
    ds = [ValueStateDescriptor("v", float), ListStateDescriptor("l"), MapStateDescriptor("m", str, int),
          ReducingStateDescriptor("r", lambda a, b: a + b, int), AggregatingStateDescriptor("a", Avg())]
    if ttl:
        cfg = sc.StateTtlConfig.new_builder(TTL_MS).disable_cleanup_in_background().build()
        for d in ds:
            d.enable_time_to_live(cfg)
    return ds


def populate(kb, keys, ttl=False, seed=0):
    rng = random.Random(seed)
    states = {d.name: kb.get_state(d) for d in descriptors(ttl)}
    for k in keys:
        kb.set_current_key(k)
        for ns in NAMESPACES:
            for s in states.values():
                s.set_current_namespace(ns)
            if rng.random() < 0.8:
                states["v"].update(rng.random())
            states["l"].add_all([rng.randrange(100) for _ in range(rng.randrange(4))])
            for i in range(rng.randrange(4)):
                states["m"].put(f"u{i}", rng.randrange(1000))
            states["r"].add(rng.randrange(10))
            states["a"].add(rng.randrange(10))
    return states


def dump(kb, ttl=False):
    """Canonical content of every state: {(name, ns, key): value}."""
    out = {}
    states = {d.name: kb.get_state(d) for d in descriptors(ttl)}
    for name, s in states.items():
        for ns in NAMESPACES:
            for k in list(kb.get_keys(name, ns)):
                kb.set_current_key(k)
                s.set_current_namespace(ns)
                if name == "v":
                    val = s.value()
                elif name == "m":
                    val = sorted(s.items())
                else:
                    val = s.get()
                if val not in (None, []):
                    out[(name, repr(ns), repr(k))] = val
    return out


STORAGES = {
    "jobmanager": lambda tmp: sc.JobManagerCheckpointStorage(max_state_size=64 * 1024 * 1024),
    "file": lambda tmp: sc.FileSystemCheckpointStorage(str(tmp / "ckpt")),
    "memory": lambda tmp: sc.FileSystemCheckpointStorage(f"memory://statecore-test/{tmp.name}"),
}


def make(backend_name, tmp_path, storage):
    backend = BACKENDS[backend_name](tmp_path)
    backend.checkpoint_storage = STORAGES[storage](tmp_path)
    return backend


@pytest.mark.parametrize("storage", sorted(STORAGES))
def test_round_trip_every_state_type(backend_name, tmp_path, storage):
    backend = make(backend_name, tmp_path, storage)
    keys = list(range(60)) + ["a", "β", ("t", 1), b"raw", 2 ** 70]
    with backend.create_keyed_state_backend(max_parallelism=128, job_id="j", operator_id="op") as kb:
        populate(kb, keys)
        expected = dump(kb)
        entries = kb.num_state_entries()
        completed = kb.checkpoint(1)
    assert completed.checkpoint_id == 1 and completed.format == "native" and not completed.incremental
    assert completed.size_bytes > 0 and completed.key_group_range == KeyGroupRange(0, 127)
    assert sc.load_checkpoint(completed.location) == completed
    with backend.restore_keyed_state_backend([completed.location], max_parallelism=128) as kb2:
        assert dump(kb2) == expected
        assert kb2.num_state_entries() == entries


def test_restore_for_every_backend_from_savepoint(backend_name, tmp_path):
    """A canonical savepoint restores into every backend type."""
    src = make(backend_name, tmp_path, "file")
    with src.create_keyed_state_backend() as kb:
        populate(kb, range(40))
        expected = dump(kb)
        sp = kb.savepoint(str(tmp_path / "sp"))
    assert sp.format == "canonical"
    for other in BACKENDS:
        target = BACKENDS[other](tmp_path / f"into-{other}")
        with target.restore_keyed_state_backend([str(tmp_path / "sp")]) as kb2:
            assert dump(kb2) == expected, other


def _rescale(backend, checkpoints, new_parallelism, max_parallelism=128):
    out = []
    for i in range(new_parallelism):
        kgr = kg_range(max_parallelism, new_parallelism, i)
        out.append(backend.restore_keyed_state_backend(checkpoints, max_parallelism=max_parallelism,
                                                       key_group_range=kgr, operator_id="op"))
    return out


def _checkpoint_all(kbs, cid):
    return [kb.checkpoint(cid) for kb in kbs]


def _union_dump(kbs):
    total = {}
    for kb in kbs:
        d = dump(kb)
        assert not set(d) & set(total), "a key was restored into two instances"
        total.update(d)
    return total


def _owned_only(kb):
    for name in ("v", "l", "m", "r", "a"):
        for ns in NAMESPACES:
            for k in kb.get_keys(name, ns):
                assert sc.assign_to_key_group(k, kb.max_parallelism) in kb.key_group_range


def test_rescale_chain(backend_name, tmp_path):
    """1 -> 2 -> 3 -> 2 -> 1 keeps exactly the original state."""
    backend = make(backend_name, tmp_path, "file")
    kb = backend.create_keyed_state_backend(operator_id="op")
    populate(kb, range(300))
    expected = dump(kb)
    cps = _checkpoint_all([kb], 1)
    kb.close()
    for cid, p in enumerate([2, 3, 2, 1], start=2):
        kbs = _rescale(backend, cps, p)
        for x in kbs:
            _owned_only(x)
        assert _union_dump(kbs) == expected
        cps = _checkpoint_all(kbs, cid)
        for x in kbs:
            x.close()


@pytest.mark.slow
@pytest.mark.parametrize("old,new", [(4, 2), (2, 4), (15, 77), (77, 15)])
def test_rescale_matrix(backend_name, tmp_path, old, new):
    """Flink StateBackendTestBase-style rescaling at max_parallelism 128."""
    backend = make(backend_name, tmp_path, "file")
    keys = list(range(500))
    olds = []
    for i in range(old):
        kgr = kg_range(128, old, i)
        kb = backend.create_keyed_state_backend(key_group_range=kgr, operator_id="op")
        populate(kb, [k for k in keys if sc.assign_to_key_group(k, 128) in kgr])
        olds.append(kb)
    cps = _checkpoint_all(olds, 1)
    expected = _union_dump(olds)
    assert len({k for _, _, k in expected}) == len(keys)
    for kb in olds:
        kb.close()
    news = _rescale(backend, cps, new)
    for kb in news:
        _owned_only(kb)
    assert _union_dump(news) == expected
    for kb in news:
        kb.close()


def test_max_parallelism_mismatch_refused(backend_name, tmp_path):
    backend = make(backend_name, tmp_path, "file")
    with backend.create_keyed_state_backend(max_parallelism=128) as kb:
        populate(kb, range(5))
        cp = kb.checkpoint(1)
    with pytest.raises(StateMigrationError, match="max_parallelism"):
        backend.restore_keyed_state_backend([cp], max_parallelism=256)


def test_state_type_or_serializer_change_refused(backend_name, tmp_path):
    backend = make(backend_name, tmp_path, "file")
    with backend.create_keyed_state_backend() as kb:
        kb.set_current_key(1)
        kb.get_state(ValueStateDescriptor("v", float)).update(1.5)
        cp = kb.checkpoint(1)
    with backend.restore_keyed_state_backend([cp]) as kb2:
        with pytest.raises(StateMigrationError, match="'v'"):
            kb2.get_state(ListStateDescriptor("v"))
        with pytest.raises(StateMigrationError, match="serializer"):
            kb2.get_state(ValueStateDescriptor("v", int))
        kb2.set_current_key(1)
        assert kb2.get_state(ValueStateDescriptor("v", float)).value() == 1.5


def test_ttl_switched_on_and_off_at_restore(backend_name, tmp_path):
    """Flink 2.2: enabling TTL stamps restored entries with the restore time; disabling drops timestamps."""
    backend = make(backend_name, tmp_path, "file")
    clock = sc.ManualClock(0)
    with backend.create_keyed_state_backend(clock=clock) as kb:
        kb.set_current_key("k")
        kb.get_state(ValueStateDescriptor("plain")).update("x")
        d = ValueStateDescriptor("ttl")
        d.enable_time_to_live(sc.StateTtlConfig.new_builder(100).build())
        kb.get_state(d).update("y")
        cp = kb.checkpoint(1)
    clock.set(1000)  # "ttl" entry written at 0 is expired by now
    with backend.restore_keyed_state_backend([cp], clock=clock) as kb2:
        kb2.set_current_key("k")
        on = ValueStateDescriptor("plain")
        on.enable_time_to_live(sc.StateTtlConfig.new_builder(100).build())
        s_on = kb2.get_state(on)
        clock.set(1099)
        assert s_on.value() == "x"          # stamped 1000 at restore, alive until 1100
        s_off = kb2.get_state(ValueStateDescriptor("ttl"))
        assert s_off.value() == "y"         # TTL off: never expires
        clock.set(1100)
        assert s_on.value() is None


def test_async_checkpoint_is_a_consistent_cut(backend_name, tmp_path):
    backend = make(backend_name, tmp_path, "file")
    with backend.create_keyed_state_backend() as kb:
        populate(kb, range(100))
        expected = dump(kb)
        fut = kb.checkpoint_async(7)
        populate(kb, range(100, 150), seed=1)  # after the cut: not in checkpoint 7
        kb.set_current_key(0)
        kb.get_state(ValueStateDescriptor("v", float)).update(-1.0)
        cp = fut.result(timeout=60)
    with backend.restore_keyed_state_backend([cp]) as kb2:
        assert dump(kb2) == expected


def test_cleanup_full_snapshot_leaves_expired_out(backend_name, tmp_path):
    backend = make(backend_name, tmp_path, "file")
    clock = sc.ManualClock(0)
    cfg = sc.StateTtlConfig.new_builder(100).cleanup_full_snapshot().disable_cleanup_in_background().build()
    with backend.create_keyed_state_backend(clock=clock) as kb:
        d = ValueStateDescriptor("v")
        d.enable_time_to_live(cfg)
        ld = ListStateDescriptor("l")
        ld.enable_time_to_live(cfg)
        v, lst = kb.get_state(d), kb.get_state(ld)
        for k in range(10):
            kb.set_current_key(k)
            v.update(k)
            lst.add(k)
        clock.set(50)
        for k in range(5):
            kb.set_current_key(k)
            v.update(k * 10)
            lst.add(k * 10)
        clock.set(120)  # entries written at 0 expired; those written at 50 alive
        cp = kb.checkpoint(1)
    assert sum(s["entries"] for s in cp.metadata["states"]) == 10
    with backend.restore_keyed_state_backend([cp], clock=clock) as kb2:
        assert kb2.num_state_entries() == 10
        lst2 = kb2.get_state(ld)
        kb2.set_current_key(3)
        assert lst2.get() == [30]


def test_jobmanager_size_limit(tmp_path):
    backend = sc.MemoryStateBackend(max_state_size=10_000)
    with backend.create_keyed_state_backend() as kb:
        kb.set_current_key(1)
        s = kb.get_state(ValueStateDescriptor("v"))
        s.update("small")
        ok = kb.checkpoint(1)
        for k in range(2000):
            kb.set_current_key(k)
            s.update("x" * 20)
        with pytest.raises(sc.CheckpointSizeExceededError):
            kb.checkpoint(2)
    assert sc.load_checkpoint(ok.location).checkpoint_id == 1


def test_corrupt_data_file_refused_before_any_state(tmp_path):
    backend = sc.FsStateBackend(str(tmp_path / "c"))
    with backend.create_keyed_state_backend() as kb:
        populate(kb, range(20))
        cp = kb.checkpoint(1)
    data_path = tmp_path / "c" / "job" / "operator"
    files = [p for p in data_path.rglob("*data.sckd")]
    assert len(files) == 1
    original = files[0].read_bytes()
    rng = random.Random(5)
    mutants = [original[:n] for n in (0, 1, len(original) // 2, len(original) - 1)]
    mutants += [original + b"x"]
    for _ in range(30):
        b = bytearray(original)
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
        mutants.append(bytes(b))
    for m in mutants:
        files[0].write_bytes(m)
        with pytest.raises(CorruptCheckpointError, match="data.sckd"):
            backend.restore_keyed_state_backend([cp])
    files[0].unlink()
    with pytest.raises(CorruptCheckpointError):
        backend.restore_keyed_state_backend([cp])


@pytest.mark.parametrize("corrupt", [False, True])
def test_large_heap_restore_prefaults_tables_while_verifying(tmp_path, corrupt):
    """A restore presizes big tables (mmap'd slot arrays, >= 2 MiB) and faults them in on a thread while
    the files verify: every value comes back unchanged; a corrupt file still raises, after the thread
    is joined, and leaves nothing open."""
    import numpy as np
    n = 60_000
    backend = sc.FsStateBackend(str(tmp_path / "c"))
    with backend.create_keyed_state_backend() as kb:
        st = kb.get_state(ValueStateDescriptor("v", sc.Float64()))
        keys = np.arange(n, dtype=np.int64)
        st.update_batch(keys, keys * 0.5)
        cp = kb.checkpoint(1)
    if corrupt:
        f = next((tmp_path / "c").rglob("*data.sckd"))
        b = bytearray(f.read_bytes())
        b[len(b) // 2] ^= 0x40
        f.write_bytes(bytes(b))
        with pytest.raises(CorruptCheckpointError, match="data.sckd"):
            backend.restore_keyed_state_backend([cp])
        return
    with backend.restore_keyed_state_backend([cp]) as kb:
        st = kb.get_state(ValueStateDescriptor("v", sc.Float64()))
        assert kb.num_state_entries() == n
        np.testing.assert_array_equal(st.value_batch(keys), keys * 0.5)
