"""LMDB tier: ``get_keys`` is streamed (statecore/_lmdb.pyx LMDBKeyScan).

Checked against a dict model: random value / list / map operations over keys whose serialized composite keys
are short, 400-480 bytes (direct LMDB keys) and longer (hashed LMDB keys: 400-byte head + sha256), several
namespaces, tiny write buffers (entries spread over the active buffer, immutable buffers and LMDB, with
tombstones and list append-deltas), with flushes at random points; the result is a snapshot of the call
(writes while iterating, map resizes and reopen-detaches included) and yields each key once.
"""
import random

import pytest

import statecore as sc
from statecore import BackendClosedError, StateError


def make(tmp_path, **kw):
    opts = dict(db_path=str(tmp_path / "db"), write_buffer_size=4096, max_write_buffer_number=3,
                checkpoint_storage=sc.FileSystemCheckpointStorage(str(tmp_path / "ckpt")))
    opts.update(kw)
    backend = sc.LMDBStateBackend(**opts)
    return backend, backend.create_keyed_state_backend(max_parallelism=128)


KEYS = ([f"k{i}" for i in range(60)] + [i for i in range(40)]
        + ["L" * 430 + str(i) for i in range(12)]        # composite key 400-480 bytes: direct, prefix >= 400
        + ["H" * 700 + str(i) for i in range(12)]        # hashed LMDB keys
        + ["P" * 396 + str(i) for i in range(6)])        # prefix just under 400 bytes, map entries hashed
NSS = [None, "w1", "w2" * 100]


@pytest.mark.parametrize("seed", range(6))
def test_get_keys_matches_the_model(tmp_path, seed):
    rng = random.Random(seed)
    backend, kb = make(tmp_path, map_size=64 << 10)  # small map: resizes happen too
    v = kb.get_state(sc.ValueStateDescriptor("v"))
    lst = kb.get_state(sc.ListStateDescriptor("l"))
    m = kb.get_state(sc.MapStateDescriptor("m"))
    model = {"v": {}, "l": {}, "m": {}}  # name -> {(key, ns): entries}

    def check():
        for name in model:
            for ns in NSS:
                got = list(kb.get_keys(name, ns))
                want = {k for (k, n), e in model[name].items() if n == ns and e}
                assert len(got) == len(set(map(repr, got))), f"{name}/{ns!r}: a key repeats"
                assert sorted(map(repr, got)) == sorted(map(repr, want)), (name, ns)

    for step in range(2500):
        key, ns = rng.choice(KEYS), rng.choice(NSS)
        kb.set_current_key(key)
        for st in (v, lst, m):
            st.set_current_namespace(ns)
        r = rng.random()
        if r < 0.3:
            v.update(step)
            model["v"][(key, ns)] = True
        elif r < 0.4:
            v.clear()
            model["v"].pop((key, ns), None)
        elif r < 0.6:
            lst.add(step)
            model["l"][(key, ns)] = True
        elif r < 0.65:
            lst.clear()
            model["l"].pop((key, ns), None)
        elif r < 0.85:
            uk = rng.choice(["a", "b", "c" * 300])
            m.put(uk, step)
            model["m"].setdefault((key, ns), set()).add(uk)
        elif r < 0.95:
            uk = rng.choice(["a", "b", "c" * 300])
            m.remove(uk)
            model["m"].setdefault((key, ns), set()).discard(uk)
        elif r < 0.97:
            m.clear()
            model["m"].pop((key, ns), None)
        elif r < 0.98:
            kb.flush()
        if step % 250 == 249:
            check()
    check()
    assert kb.metrics()["map_resizes"] > 0
    kb.close()


def test_keys_are_those_of_the_call_while_writing_resizing_and_flushing(tmp_path):
    backend, kb = make(tmp_path, map_size=32 << 10)
    v = kb.get_state(sc.ValueStateDescriptor("v"))
    for k in range(3000):
        kb.set_current_key(k)
        v.update("x" * 50)
    resizes = kb.metrics()["map_resizes"]
    it = kb.get_keys("v")
    seen = []
    for i, k in enumerate(it):  # Flink's applyToAllKeys: clear each key, add others, while iterating
        seen.append(k)
        kb.set_current_key(k)
        v.clear()
        kb.set_current_key(100000 + i)
        v.update("y" * 200)
        if i % 500 == 0:
            kb.flush()
    assert sorted(seen) == list(range(3000))
    assert kb.metrics()["map_resizes"] > resizes  # the scan was detached (spooled) at least once
    assert sorted(kb.get_keys("v")) == list(range(100000, 103000))
    kb.close()


def test_unconsumed_scans_do_not_block_map_growth_or_close(tmp_path):
    backend, kb = make(tmp_path, map_size=32 << 10)
    v = kb.get_state(sc.ValueStateDescriptor("v"))
    for k in range(500):
        kb.set_current_key(k)
        v.update(k)
    kb.flush()
    idle = [kb.get_keys("v") for _ in range(5)]  # each holds a read transaction
    half = kb.get_keys("v")
    first = [next(half) for _ in range(100)]
    for k in range(500, 20000):  # grows the map several times
        kb.set_current_key(k)
        v.update(k)
    kb.flush()
    assert kb.metrics()["map_resizes"] >= 2
    assert sorted(first + list(half)) == list(range(500))
    assert sorted(idle[0]) == list(range(500))
    pending = kb.get_keys("v")
    next(pending)
    kb.close()
    with pytest.raises(BackendClosedError):
        next(pending)
    with pytest.raises(BackendClosedError):
        kb.get_keys("v")


def test_unknown_and_restored_unclaimed_states(tmp_path):
    backend, kb = make(tmp_path)
    with pytest.raises(StateError, match="no state named"):
        kb.get_keys("nope")
    m = kb.get_state(sc.MapStateDescriptor("m"))
    for k in range(300):
        kb.set_current_key(k)
        m.put("a", 1)
        m.put("b", 2)
    c = kb.checkpoint(1)
    kb.close()
    kb2 = backend.restore_keyed_state_backend([c], max_parallelism=128)
    assert sorted(kb2.get_keys("m")) == list(range(300))  # before get_state claims it
    kb2.get_state(sc.MapStateDescriptor("m"))
    assert sorted(kb2.get_keys("m")) == list(range(300))
    assert list(kb2.get_keys("m", "other")) == []
    kb2.close()


def test_get_keys_during_a_failed_flush(tmp_path):
    """Buffered keys of a buffer whose flush failed (kept for its retry) are listed, once."""
    from statecore import _lmdb
    backend, kb = make(tmp_path, write_buffer_size=8192, max_write_buffer_number=2)
    v = kb.get_state(sc.ValueStateDescriptor("v"))
    for k in range(400):
        kb.set_current_key(k)
        v.update(k)
    kb.flush()
    _lmdb._debug_flush_faults(count=10 ** 6, kind="ENOSPC")
    try:
        written = set(range(400))
        for k in range(400, 2000):
            try:
                kb.set_current_key(k)
                v.update(k)
                written.add(k)
            except StateError:
                pass
        assert sorted(kb.get_keys("v")) == sorted(written)
    finally:
        _lmdb._debug_flush_faults(count=0)
    kb.flush()
    assert sorted(kb.get_keys("v")) == sorted(written)
    kb.close()


def test_long_prefixes_sharing_400_bytes_are_listed_once(tmp_path):
    """Map entries of (key, namespace) prefixes of 400+ bytes that share their first 400 bytes (same key group,
    keys differing late) interleave in LMDB order (hashed user keys sort by sha256): each key once."""
    backend, kb = make(tmp_path)
    m = kb.get_state(sc.MapStateDescriptor("m"))
    by_group = {}
    for i in range(2000):
        k = "L" * 430 + str(i)
        kb.set_current_key(k)
        by_group.setdefault(kb.current_key_group, []).append(k)
    keys = next(g for g in by_group.values() if len(g) >= 3)[:3]
    for k in keys:
        kb.set_current_key(k)
        for j in range(20):
            m.put(f"{j}" * (1 if j % 2 else 200), j)  # direct and hashed LMDB keys
    for flush in (False, True):
        if flush:
            kb.flush()
        got = list(kb.get_keys("m"))
        assert sorted(got) == sorted(keys), (flush, len(got))
    kb.close()
