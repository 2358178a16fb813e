"""Benchmark workloads, defined once: used by bench/ (pytest-benchmark) and ``statecore bench``.

Every workload is a function ``setup(n, seed) -> run`` where ``run()`` performs
the measured work once and returns the number of operations it did.  Keys
arrive in random order, and the measured pass visits them in a *different*
random order than the one they were inserted in: records do not arrive in key
order, and visiting a dict in insertion order would walk its entry array
sequentially and flatter it.
"""
import numpy as np

import statecore as sc


def random_keys(n, seed=1):
    """(insert order, access order): two independent permutations of range(n) as Python lists.

    Each list holds its own int objects, allocated in its own order, as a stream's records carry keys
    freshly decoded in arrival order.  Sharing the objects (access = a shuffle of insert's ints) made
    every access dereference an int scattered over 32 MB, a cache miss that only statecore's side
    paid: the raw baselines (py-lmdb, rocksdict) read bytes keys built in access order.
    """
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    insert = perm.tolist()
    rng.shuffle(perm)
    access = perm.tolist()
    return insert, access


def _value_state(ttl=False, backend=None):
    backend = backend or sc.HashMapStateBackend()
    kb = backend.create_keyed_state_backend(max_parallelism=128)
    desc = sc.ValueStateDescriptor("v", float, default=0.0)
    if ttl:
        desc.enable_time_to_live(sc.StateTtlConfig.new_builder(sc.Time.days(1)).build())
    return kb, kb.get_state(desc)


def record_rmw_dict(n, seed=1):
    """Per-record read-modify-write on a bare dict: ``d[k] = d.get(k, 0.0) + 1.0``."""
    insert, access = random_keys(n, seed)
    d = {}
    get = d.get
    for k in insert:
        d[k] = get(k, 0.0) + 1.0

    def run():
        for k in access:
            d[k] = get(k, 0.0) + 1.0
        return n
    return run


def record_rmw_state(n, seed=1, ttl=False, backend=None):
    """Per-record ``set_current_key(k); s.update(s.value() + 1.0)`` on a ValueState."""
    insert, access = random_keys(n, seed)
    kb, st = _value_state(ttl, backend)
    set_key, value, update = kb.set_current_key, st.value, st.update
    for k in insert:
        set_key(k)
        update(value() + 1.0)

    def run():
        for k in access:
            set_key(k)
            update(value() + 1.0)
        return n
    run.keyed_backend = kb
    return run


def batch_dict(n, seed=1):
    """The dict loop equivalent of value_batch + update_batch over int64 keys."""
    insert, access = random_keys(n, seed)
    d = dict.fromkeys(insert, 0.0)
    keys = np.array(access, dtype=np.int64)
    vals = np.random.default_rng(seed).random(n)

    def run():
        get = d.get
        out = np.fromiter((get(k, np.nan) for k in keys.tolist()), dtype=np.float64, count=n)
        for k, v in zip(keys.tolist(), (out + vals).tolist()):
            d[k] = v
        return 2 * n
    return run


def batch_state(n, seed=1, ttl=False, backend=None):
    """``value_batch`` then ``update_batch`` over n int64 keys (float64 values), loop in C."""
    insert, access = random_keys(n, seed)
    kb, st = _value_state(ttl, backend)
    st.update_batch(np.array(insert, dtype=np.int64), np.zeros(n))
    keys = np.array(access, dtype=np.int64)
    vals = np.random.default_rng(seed).random(n)

    def run():
        out = st.value_batch(keys)
        st.update_batch(keys, out + vals)
        return 2 * n
    run.keyed_backend = kb
    return run


def bytes_per_entry(n, seed=1):
    """Memory per entry of n int -> float entries: (statecore ValueState, bare dict).

    statecore's figure is its own accounting of C memory (tables, entries,
    blocks); the dict's is ``sys.getsizeof`` of the dict plus its key and value
    objects (ints >= 256 and floats are separate objects).
    """
    import sys
    insert, _ = random_keys(n, seed)
    kb, st = _value_state()
    st.update_batch(np.array(insert, dtype=np.int64), np.arange(n, dtype=np.float64) + 0.5)
    sc_bytes = kb.metrics()["bytes_in_memory"] / n
    kb.close()
    d = {k: k + 0.5 for k in insert}
    dict_bytes = (sys.getsizeof(d) + sum(sys.getsizeof(k) + sys.getsizeof(v) for k, v in d.items())) / n
    return sc_bytes, dict_bytes


# --------------------------------------------------------------------------------------------------
# Stores compared side by side: statecore's backends and the baselines a user would pick instead.
#
# Baselines take the same int keys as statecore and encode them (``int.to_bytes``) and their values
# (``struct``) inside the timed loop, as an application using them would.  Each raw store lives in a
# temporary directory removed on close.
# --------------------------------------------------------------------------------------------------
import os
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

BACKENDS = {
    "dict": "bare Python dict (the reference for the ratio column)",
    "hashmap": "statecore HashMapStateBackend (heap tier, C hash table)",
    "lmdb": "statecore LMDBStateBackend (C write buffer spilled to LMDB)",
    "py-lmdb": "raw py-lmdb: txn.get/put on the same keys, one write transaction per pass",
    "rocksdict": "raw rocksdict (RocksDB), when installed: raw mode, 64 MiB memtables, block cache, bloom filter",
}
STATE_BACKENDS = ("hashmap", "lmdb")


class Unavailable(Exception):
    """This (workload, backend) pair does not run here; ``str(exc)`` is the note shown for it."""


def state_backend(name, **lmdb_options):
    """A statecore ``StateBackend`` by short name (``hashmap`` or ``lmdb``)."""
    if name == "hashmap":
        return sc.HashMapStateBackend()
    if name == "lmdb":
        return sc.LMDBStateBackend(**lmdb_options)
    raise ValueError(f"not a statecore backend: {name!r} (choose from {', '.join(STATE_BACKENDS)})")


def close_run(run):
    """Release what a ``run`` holds: its ``close()`` if it has one, else its ``keyed_backend``."""
    close = getattr(run, "close", None)
    if close is not None:
        close()
    elif getattr(run, "keyed_backend", None) is not None:
        run.keyed_backend.close()


def _closing(run, *closers):
    def close():
        for c in closers:
            c()
    run.close = close
    return run


def open_py_lmdb(path=None, map_size=1 << 32):
    """(env, close) of a raw py-lmdb environment (``sync=False``, as statecore's scratch DB)."""
    import lmdb
    path = path or tempfile.mkdtemp(prefix="statecore-bench-pylmdb-")
    env = lmdb.open(os.fspath(path), map_size=map_size, sync=False, metasync=False, writemap=False)

    def close():
        env.close()
        shutil.rmtree(path, ignore_errors=True)
    return env, close


def open_rocksdict(path=None):
    """(db, close) of a raw rocksdict DB configured as Quix Streams does; ``Unavailable`` when not installed."""
    try:
        import rocksdict as rd
    except ImportError:
        raise Unavailable("rocksdict is not installed (pip install rocksdict)") from None
    path = path or tempfile.mkdtemp(prefix="statecore-bench-rocksdict-")
    opts = rd.Options(raw_mode=True)
    opts.create_if_missing(True)
    opts.set_write_buffer_size(64 << 20)
    opts.set_max_write_buffer_number(3)
    table = rd.BlockBasedOptions()
    table.set_block_cache(rd.Cache(64 << 20))
    table.set_bloom_filter(10, False)
    opts.set_block_based_table_factory(table)
    db = rd.Rdict(os.fspath(path), options=opts)

    def close():
        db.close()
        shutil.rmtree(path, ignore_errors=True)
    return db, close


_F64 = struct.Struct("<d")
_F64_MS = struct.Struct("<dq")  # value, last-write time in ms (TTL by hand)
TTL_MS = 24 * 3600 * 1000


def _now_ms():
    return time.time_ns() // 1_000_000


# --------------------------------------------------------------------------------------------------
# value-rmw / value-rmw-ttl: per record, set the key, read the value, write value + 1
# --------------------------------------------------------------------------------------------------
def record_rmw_dict_ttl(n, seed=1):
    """TTL by hand on a dict: ``(value, last_write_ms)`` tuples, expired values read as the default."""
    insert, access = random_keys(n, seed)
    d = {}
    get, now = d.get, _now_ms
    for k in insert:
        d[k] = (1.0, now())

    def run():
        for k in access:
            e = get(k)
            t = now()
            d[k] = ((e[0] if e is not None and t - e[1] < TTL_MS else 0.0) + 1.0, t)
        return n
    return run


def record_rmw_py_lmdb(n, seed=1, ttl=False):
    """``txn.get`` + ``txn.put`` per record in one write transaction per pass (TTL: a timestamp in the value)."""
    insert, access = random_keys(n, seed)
    env, close = open_py_lmdb()
    with env.begin(write=True) as txn:
        for k in insert:
            txn.put(k.to_bytes(8, "big"), _F64_MS.pack(0.0, _now_ms()) if ttl else _F64.pack(0.0))

    def run():
        with env.begin(write=True) as txn:
            get, put = txn.get, txn.put
            if ttl:
                pack, unpack, now = _F64_MS.pack, _F64_MS.unpack, _now_ms
                for k in access:
                    bk = k.to_bytes(8, "big")
                    b = get(bk)
                    t = now()
                    v = 0.0
                    if b is not None:
                        v, ts = unpack(b)
                        if t - ts >= TTL_MS:
                            v = 0.0
                    put(bk, pack(v + 1.0, t))
            else:
                pack, unpack = _F64.pack, _F64.unpack
                for k in access:
                    bk = k.to_bytes(8, "big")
                    b = get(bk)
                    put(bk, pack((unpack(b)[0] if b is not None else 0.0) + 1.0))
        return n
    return _closing(run, close)


def record_rmw_rocksdict(n, seed=1, ttl=False):
    """``db.get`` + ``db[k] = v`` per record (TTL: a timestamp in the value)."""
    insert, access = random_keys(n, seed)
    db, close = open_rocksdict()
    for k in insert:
        db[k.to_bytes(8, "big")] = _F64_MS.pack(0.0, _now_ms()) if ttl else _F64.pack(0.0)

    def run():
        get = db.get
        if ttl:
            pack, unpack, now = _F64_MS.pack, _F64_MS.unpack, _now_ms
            for k in access:
                bk = k.to_bytes(8, "big")
                b = get(bk)
                t = now()
                v = 0.0
                if b is not None:
                    v, ts = unpack(b)
                    if t - ts >= TTL_MS:
                        v = 0.0
                db[bk] = pack(v + 1.0, t)
        else:
            pack, unpack = _F64.pack, _F64.unpack
            for k in access:
                bk = k.to_bytes(8, "big")
                b = get(bk)
                db[bk] = pack((unpack(b)[0] if b is not None else 0.0) + 1.0)
        return n
    return _closing(run, close)


# --------------------------------------------------------------------------------------------------
# batch: value_batch + update_batch over n int64 keys (float64 values)
# --------------------------------------------------------------------------------------------------
def batch_py_lmdb(n, seed=1):
    """``cursor.getmulti`` + ``cursor.putmulti`` over the same keys (py-lmdb's batch calls)."""
    insert, access = random_keys(n, seed)
    env, close = open_py_lmdb()
    with env.begin(write=True) as txn:
        for k in insert:
            txn.put(k.to_bytes(8, "big"), _F64.pack(0.0))
    keys = np.array(access, dtype=np.int64)
    vals = np.random.default_rng(seed).random(n)

    def run():
        bkeys = keys.astype(">i8").tobytes()
        klist = [bkeys[i:i + 8] for i in range(0, 8 * n, 8)]
        with env.begin(write=True) as txn:
            cur = txn.cursor()
            found = dict(cur.getmulti(klist))
            old = np.fromiter((_F64.unpack(found[k])[0] if k in found else np.nan for k in klist),
                              dtype=np.float64, count=n)
            new = (old + vals).tolist()
            cur.putmulti(zip(klist, map(_F64.pack, new)))
        return 2 * n
    return _closing(run, close)


def batch_rocksdict(n, seed=1):
    """Multi-get (``db.get(list)``) + a ``WriteBatch`` over the same keys."""
    insert, access = random_keys(n, seed)
    db, close = open_rocksdict()
    import rocksdict as rd
    for k in insert:
        db[k.to_bytes(8, "big")] = _F64.pack(0.0)
    keys = np.array(access, dtype=np.int64)
    vals = np.random.default_rng(seed).random(n)

    def run():
        bkeys = keys.astype(">i8").tobytes()
        klist = [bkeys[i:i + 8] for i in range(0, 8 * n, 8)]
        old = np.fromiter((_F64.unpack(b)[0] if b is not None else np.nan for b in db.get(klist)),
                          dtype=np.float64, count=n)
        wb = rd.WriteBatch(raw_mode=True)
        for k, v in zip(klist, (old + vals).tolist()):
            wb.put(k, _F64.pack(v))
        db.write(wb)
        return 2 * n
    return _closing(run, close)


# --------------------------------------------------------------------------------------------------
# map: n keys x 100 user keys; per pass: put every entry, get every entry, iterate every key's map
# --------------------------------------------------------------------------------------------------
MAP_USER_KEYS = 100


def map_state(n, seed=1, backend=None, user_keys=MAP_USER_KEYS):
    """MapState[int64 -> float64]: ``put`` then ``get`` every (key, user key), then ``items()`` per key."""
    insert, access = random_keys(n, seed)
    backend = backend or sc.HashMapStateBackend()
    kb = backend.create_keyed_state_backend(max_parallelism=128)
    m = kb.get_state(sc.MapStateDescriptor("m", sc.Int64(), sc.Float64()))
    ukeys = list(range(user_keys))
    set_key, put, get, items = kb.set_current_key, m.put, m.get, m.items
    for k in insert:
        set_key(k)
        for u in ukeys:
            put(u, 0.0)

    def run():
        for k in access:
            set_key(k)
            for u in ukeys:
                put(u, 1.0)
        for k in access:
            set_key(k)
            for u in ukeys:
                get(u)
        seen = 0
        for k in access:
            set_key(k)
            for _ in items():
                seen += 1
        assert seen == n * user_keys, seen
        return 3 * n * user_keys
    run.keyed_backend = kb
    return run


def map_dict(n, seed=1, user_keys=MAP_USER_KEYS):
    """A dict of dicts: the per-key inner dict looked up once per key and record batch."""
    insert, access = random_keys(n, seed)
    ukeys = list(range(user_keys))
    d = {k: dict.fromkeys(ukeys, 0.0) for k in insert}

    def run():
        for k in access:
            inner = d[k]
            for u in ukeys:
                inner[u] = 1.0
        for k in access:
            inner = d.get(k)
            for u in ukeys:
                inner.get(u)
        seen = 0
        for k in access:
            for _ in d[k].items():
                seen += 1
        return 3 * n * user_keys
    return run


def _map_prefixed(ukeys):
    return [u.to_bytes(8, "big") for u in ukeys]


def map_py_lmdb(n, seed=1, user_keys=MAP_USER_KEYS):
    """Composite keys ``key(8 B) + user key(8 B)``; iteration is a cursor range scan over the key prefix."""
    insert, access = random_keys(n, seed)
    env, close = open_py_lmdb()
    usuffix = _map_prefixed(range(user_keys))
    zero = _F64.pack(0.0)
    with env.begin(write=True) as txn:
        for k in insert:
            p = k.to_bytes(8, "big")
            for s in usuffix:
                txn.put(p + s, zero)

    def run():
        pack, unpack = _F64.pack, _F64.unpack
        with env.begin(write=True) as txn:
            put = txn.put
            for k in access:
                p = k.to_bytes(8, "big")
                for s in usuffix:
                    put(p + s, pack(1.0))
        with env.begin() as txn:
            get = txn.get
            for k in access:
                p = k.to_bytes(8, "big")
                for s in usuffix:
                    unpack(get(p + s))
            cur = txn.cursor()
            seen = 0
            for k in access:
                p = k.to_bytes(8, "big")
                if cur.set_range(p):
                    for key, val in cur:
                        if key[:8] != p:
                            break
                        unpack(val)
                        seen += 1
        assert seen == n * user_keys, seen
        return 3 * n * user_keys
    return _closing(run, close)


def map_rocksdict(n, seed=1, user_keys=MAP_USER_KEYS):
    """Composite keys as for py-lmdb; iteration is an iterator ``seek`` to the key prefix."""
    insert, access = random_keys(n, seed)
    db, close = open_rocksdict()
    usuffix = _map_prefixed(range(user_keys))
    zero = _F64.pack(0.0)
    for k in insert:
        p = k.to_bytes(8, "big")
        for s in usuffix:
            db[p + s] = zero

    def run():
        pack, unpack, get = _F64.pack, _F64.unpack, db.get
        for k in access:
            p = k.to_bytes(8, "big")
            for s in usuffix:
                db[p + s] = pack(1.0)
        for k in access:
            p = k.to_bytes(8, "big")
            for s in usuffix:
                unpack(get(p + s))
        seen = 0
        for k in access:
            p = k.to_bytes(8, "big")
            it = db.iter()
            it.seek(p)
            while it.valid() and it.key()[:8] == p:
                unpack(it.value())
                seen += 1
                it.next()
        assert seen == n * user_keys, seen
        return 3 * n * user_keys
    return _closing(run, close)


# --------------------------------------------------------------------------------------------------
# list: per pass, 4 appends per key (records interleaved across keys), then read and clear every key
# (a window buffer: append per record, read when the window fires, clear)
# --------------------------------------------------------------------------------------------------
LIST_APPENDS = 4


def list_state(n, seed=1, backend=None, appends=LIST_APPENDS):
    """ListState[float64]: ``add`` x appends per key, then ``get`` + ``clear`` per key."""
    insert, access = random_keys(n, seed)
    backend = backend or sc.HashMapStateBackend()
    kb = backend.create_keyed_state_backend(max_parallelism=128)
    ls = kb.get_state(sc.ListStateDescriptor("l", sc.Float64()))
    set_key, add, get, clear = kb.set_current_key, ls.add, ls.get, ls.clear

    def run():
        for a in range(appends):
            v = float(a)
            for k in access:
                set_key(k)
                add(v)
        for k in access:
            set_key(k)
            got = get()
            clear()
        assert len(got) == appends
        return n * (appends + 2)
    run.keyed_backend = kb
    return run


def list_dict(n, seed=1, appends=LIST_APPENDS):
    """A dict of lists: append per record, ``pop`` to read and clear."""
    insert, access = random_keys(n, seed)
    d = {}

    def run():
        get = d.get
        for a in range(appends):
            v = float(a)
            for k in access:
                lst = get(k)
                if lst is None:
                    d[k] = [v]
                else:
                    lst.append(v)
        pop = d.pop
        for k in access:
            got = pop(k)
        assert len(got) == appends
        return n * (appends + 2)
    return run


def _list_raw(n, seed, get, put, delete, begin, appends):
    insert, access = random_keys(n, seed)

    def run():
        pack = _F64.pack
        with begin() as txn:
            g, p, dl = get(txn), put(txn), delete(txn)
            for a in range(appends):
                v = pack(float(a))
                for k in access:
                    bk = k.to_bytes(8, "big")
                    old = g(bk)
                    p(bk, v if old is None else old + v)
            for k in access:
                bk = k.to_bytes(8, "big")
                got = memoryview(g(bk)).cast("d").tolist()
                dl(bk)
        assert len(got) == appends
        return n * (appends + 2)
    return run


def list_py_lmdb(n, seed=1, appends=LIST_APPENDS):
    """Append = ``get`` + ``put(old + packed value)``; read = ``get`` + decode; clear = ``delete``."""
    env, close = open_py_lmdb()
    run = _list_raw(n, seed, lambda t: t.get, lambda t: t.put, lambda t: t.delete,
                    lambda: env.begin(write=True), appends)
    return _closing(run, close)


def list_rocksdict(n, seed=1, appends=LIST_APPENDS):
    """As for py-lmdb, with ``db.get`` / ``db[k] = v`` / ``del db[k]``."""
    db, close = open_rocksdict()

    class _NoTxn:
        def __enter__(self):
            return db

        def __exit__(self, *exc):
            return False

    def _put(t):
        def put(k, v):
            t[k] = v
        return put

    def _delete(t):
        def delete(k):
            del t[k]
        return delete

    run = _list_raw(n, seed, lambda t: t.get, _put, _delete, _NoTxn, appends)
    return _closing(run, close)


# --------------------------------------------------------------------------------------------------
# spill: a working set ~10x the LMDB tier's memory budget; per record read-modify-write of a
# 200-character string value (every read of a cold key goes to LMDB)
# --------------------------------------------------------------------------------------------------
SPILL_PAYLOAD = 200
SPILL_BUDGET_FRACTION = 10
SPILL_MIN_BUDGET = 256 << 10


def spill_budget(n):
    """The LMDB tier's ``memory_budget`` for n keys: a tenth of the working set (at least 256 KiB)."""
    return max(SPILL_MIN_BUDGET, n * (SPILL_PAYLOAD + 16) // SPILL_BUDGET_FRACTION)


def _payload(k):
    return "p" * (SPILL_PAYLOAD - 8) + f"{k:08d}"[-8:]


def spill_lmdb(n, seed=1):
    """LMDB tier with ``memory_budget=spill_budget(n)``; all keys written and flushed before the pass."""
    insert, access = random_keys(n, seed)
    kb = sc.LMDBStateBackend(memory_budget=spill_budget(n)).create_keyed_state_backend(max_parallelism=128)
    v = kb.get_state(sc.ValueStateDescriptor("v", sc.Str()))
    set_key, value, update = kb.set_current_key, v.value, v.update
    for k in insert:
        set_key(k)
        update(_payload(k))
    kb.flush()

    def run():
        for k in access:
            set_key(k)
            update(value())
        return n
    run.keyed_backend = kb
    return run


def spill_py_lmdb(n, seed=1):
    """The same strings in raw py-lmdb: ``get`` + decode + encode + ``put`` per record."""
    insert, access = random_keys(n, seed)
    env, close = open_py_lmdb()
    with env.begin(write=True) as txn:
        for k in insert:
            txn.put(k.to_bytes(8, "big"), _payload(k).encode())

    def run():
        with env.begin(write=True) as txn:
            get, put = txn.get, txn.put
            for k in access:
                bk = k.to_bytes(8, "big")
                put(bk, get(bk).decode().encode())
        return n
    return _closing(run, close)


def spill_rocksdict(n, seed=1):
    """The same strings in raw rocksdict."""
    insert, access = random_keys(n, seed)
    db, close = open_rocksdict()
    for k in insert:
        db[k.to_bytes(8, "big")] = _payload(k).encode()
    db.flush()

    def run():
        get = db.get
        for k in access:
            bk = k.to_bytes(8, "big")
            db[bk] = get(bk).decode().encode()
        return n
    return _closing(run, close)


# --------------------------------------------------------------------------------------------------
# LMDB-tier micro-benchmarks of bench/test_bench_lmdb.py (setup(n, seed, impl) -> run)
# --------------------------------------------------------------------------------------------------
def spilled_point_reads(n, seed=1, impl="statecore-lmdb"):
    """Point reads of n int64 keys, every one spilled to disk: statecore-lmdb, py-lmdb or rocksdict."""
    insert, access = random_keys(n, seed)
    if impl == "statecore-lmdb":
        kb = sc.LMDBStateBackend().create_keyed_state_backend()
        s = kb.get_state(sc.ValueStateDescriptor("v", sc.Int64()))
        for k in insert:
            kb.set_current_key(k)
            s.update(k)
        kb.flush()  # every key spilled

        def run():
            sk, value = kb.set_current_key, s.value
            for k in access:
                sk(k)
                value()
            return n
        run.keyed_backend = kb
        return run
    bkeys = [k.to_bytes(8, "big") for k in access]
    if impl == "py-lmdb":
        env, close = open_py_lmdb()
        with env.begin(write=True) as txn:
            for k in sorted(bkeys):
                txn.put(k, k)
        txn = env.begin()

        def run():
            get = txn.get
            for k in bkeys:
                get(k)
            return n

        def close_all():
            txn.abort()
            close()
        return _closing(run, close_all)
    if impl == "rocksdict":
        db, close = open_rocksdict()
        for k in bkeys:
            db[k] = k
        db.flush()

        def run():
            get = db.get
            for k in bkeys:
                get(k)
            return n
        return _closing(run, close)
    raise ValueError(f"unknown impl {impl!r}")


def fresh_writes(n, seed=1, impl="statecore-lmdb"):
    """Write n int64 keys into a fresh store, then flush and close it (statecore-lmdb, statecore-heap, rocksdict).

    Call it once per measured pass (the store is consumed): the returned ``run`` includes the final
    flush and close.
    """
    if impl == "rocksdict":
        db, close = open_rocksdict()

        def run():
            for i in range(n):
                db[i.to_bytes(8, "big")] = i.to_bytes(8, "big")
            db.flush()
            close()
            return n
        return run
    kb = (sc.LMDBStateBackend() if impl == "statecore-lmdb" else sc.HashMapStateBackend()).create_keyed_state_backend()
    s = kb.get_state(sc.ValueStateDescriptor("v", sc.Int64()))

    def run():
        sk, update = kb.set_current_key, s.update
        for i in range(n):
            sk(i)
            update(i)
        if impl == "statecore-lmdb":
            kb.flush()
        kb.close()
        return n
    return run


# --------------------------------------------------------------------------------------------------
# The registry used by ``statecore bench``: workload name -> Workload.  A new workload (e.g. checkpoint
# and restore) is one more ``register(Workload(...))`` with an ``impls`` entry per backend it runs on.
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """One benchmark workload: ``impls[backend](n, seed) -> run``; ``run()`` returns its operation count.

    ``size(keys)`` maps ``--keys`` to the n passed to the setups; ``unit`` names one operation
    (``"op"``; a throughput workload may count bytes); ``skip_notes[backend]`` says why a backend
    without an impl is skipped (the default note says it does not apply).
    """
    name: str
    description: str
    impls: dict
    size: Callable[[int], int] = lambda keys: keys
    unit: str = "op"
    skip_notes: dict = field(default_factory=dict)

    def setup(self, backend, n, seed=1):
        """The ``run`` for ``backend`` at size n; ``Unavailable`` when the pair does not run here."""
        impl = self.impls.get(backend)
        if impl is None:
            raise Unavailable(self.skip_notes.get(backend, f"{self.name} does not apply to {backend}"))
        return impl(n, seed)


WORKLOADS: dict = {}


def register(workload):
    """Add (or replace) a workload in the registry ``statecore bench`` runs."""
    WORKLOADS[workload.name] = workload
    return workload


def _on_state_backends(fn, lmdb_options=None, **kw):
    opts = {"lmdb": lmdb_options or {}}
    return {name: (lambda n, seed=1, _b=name: fn(n, seed, backend=state_backend(_b, **opts.get(_b, {})), **kw))
            for name in STATE_BACKENDS}


#: The batch workload measures buffered batch ops: the LMDB tier's write buffer holds 1M keys (~140 MiB).
BATCH_LMDB_OPTIONS = {"write_buffer_size": 256 << 20}


register(Workload(
    "value-rmw", "ValueState read-modify-write per record: set_current_key(k); s.update(s.value() + 1)",
    {"dict": record_rmw_dict, **_on_state_backends(record_rmw_state),
     "py-lmdb": record_rmw_py_lmdb, "rocksdict": record_rmw_rocksdict}))
register(Workload(
    "value-rmw-ttl", "value-rmw with a 1-day TTL (baselines keep a last-write timestamp and check it on read)",
    {"dict": record_rmw_dict_ttl, **_on_state_backends(record_rmw_state, ttl=True),
     "py-lmdb": lambda n, seed=1: record_rmw_py_lmdb(n, seed, ttl=True),
     "rocksdict": lambda n, seed=1: record_rmw_rocksdict(n, seed, ttl=True)}))
register(Workload(
    "batch", "value_batch + update_batch over NumPy int64 keys / float64 values (2 ops per key)",
    {"dict": batch_dict, **_on_state_backends(batch_state, lmdb_options=BATCH_LMDB_OPTIONS),
     "py-lmdb": batch_py_lmdb, "rocksdict": batch_rocksdict}))
register(Workload(
    "map", f"MapState put + get of every (key, user key), then items() per key; keys/10 keys x "
           f"{MAP_USER_KEYS} user keys",
    {"dict": map_dict, **_on_state_backends(map_state), "py-lmdb": map_py_lmdb, "rocksdict": map_rocksdict},
    size=lambda keys: max(1, keys // 10)))
register(Workload(
    "list", f"ListState: {LIST_APPENDS} appends per key, then get + clear per key",
    {"dict": list_dict, **_on_state_backends(list_state), "py-lmdb": list_py_lmdb, "rocksdict": list_rocksdict}))
register(Workload(
    "spill", f"working set {SPILL_BUDGET_FRACTION}x the LMDB tier's memory budget: read-modify-write of "
             f"{SPILL_PAYLOAD}-char strings",
    {"lmdb": spill_lmdb, "py-lmdb": spill_py_lmdb, "rocksdict": spill_rocksdict},
    skip_notes={b: "in-memory backend: no spill tier"
                for b in ("dict", "hashmap")}))


# --------------------------------------------------------------------------------------------------
# Checkpoint and restore (issue 5).  Throughput workloads: ``run()`` returns the BYTES it moved
# (unit "byte"), so ops/s reads as bytes/s.  Each run holds its working state and a checkpoint
# directory on local disk (``directory``, default a fresh temporary directory removed on close).
#
# They are not in ``WORKLOADS``: ``statecore bench`` compares every workload against a dict baseline
# (ratio_to_dict) and its tests expect each registered workload to run on the dict row, which has no
# checkpoint.  bench/test_bench_checkpoint.py runs them, with the disk's own write bandwidth measured
# in the same run (``disk_write``) for the ratio.
# --------------------------------------------------------------------------------------------------
def _checkpoint_dir(directory):
    if directory is None:
        path = tempfile.mkdtemp(prefix="statecore-bench-ckpt-")
        return path, lambda: shutil.rmtree(path, ignore_errors=True)
    os.makedirs(directory, exist_ok=True)
    path = tempfile.mkdtemp(prefix="ckpt-", dir=directory)
    return path, lambda: shutil.rmtree(path, ignore_errors=True)


def _filled_value_state(n, seed, backend_name, root, incremental=False):
    """A keyed backend (checkpoint storage on local disk under ``root``) with n int64 -> float64 ValueState entries."""
    opts = {"db_path": os.path.join(root, "db")} if backend_name == "lmdb" else {}
    backend = state_backend(backend_name, **opts)
    backend.checkpoint_storage = sc.FileSystemCheckpointStorage(os.path.join(root, "chk"))
    backend.incremental = incremental  # the LMDB tier's option; the mechanism works on the heap too
    kb = backend.create_keyed_state_backend(max_parallelism=128)
    st = kb.get_state(sc.ValueStateDescriptor("v", sc.Float64()))
    insert, _ = random_keys(n, seed)
    st.update_batch(np.array(insert, dtype=np.int64), np.random.default_rng(seed).random(n))
    if backend_name == "lmdb":
        kb.flush()  # a checkpoint of the LMDB tier reads what is in LMDB, not a write buffer being filled
    return backend, kb


def checkpoint_value_state(n, seed=1, backend="hashmap", directory=None):
    """``kb.checkpoint(id)`` of n ValueState entries to local disk: durable (fsynced) when it returns.

    ``run()`` returns the bytes the checkpoint wrote; ``run.last`` is its CompletedCheckpoint.
    Retention (1) deletes the previous checkpoint inside the call, as in production.
    """
    root, rm = _checkpoint_dir(directory)
    _, kb = _filled_value_state(n, seed, backend, root)
    ids = iter(range(1, 1 << 62))

    def run():
        run.last = kb.checkpoint(next(ids))
        return run.last.size_bytes
    run.last = None
    return _closing(run, kb.close, rm)


def restore_value_state(n, seed=1, backend="hashmap", directory=None):
    """``restore_keyed_state_backend`` of a checkpoint of n ValueState entries (verify + load), then close.

    ``run()`` returns the checkpoint's size in bytes (what restore read and verified).
    """
    root, rm = _checkpoint_dir(directory)
    sb, kb = _filled_value_state(n, seed, backend, root)
    completed = kb.checkpoint(1)
    kb.close()

    def run():
        restored = sb.restore_keyed_state_backend([completed.location], max_parallelism=128)
        try:
            got = restored.num_state_entries()
        finally:
            restored.close()
        assert got == n, (got, n)
        return completed.size_bytes
    run.completed = completed
    return _closing(run, rm)


def incremental_checkpoint_value_state(n, seed=1, backend="hashmap", directory=None):
    """An incremental checkpoint after 1 % of n ValueState entries changed (on top of a full base).

    ``run()`` updates 1 % of the keys with ``update_batch`` and takes the checkpoint; it returns the
    bytes that checkpoint wrote (the delta).  ``run.full_bytes`` is the size of the full base.
    """
    root, rm = _checkpoint_dir(directory)
    _, kb = _filled_value_state(n, seed, backend, root, incremental=True)
    st = kb.get_state(sc.ValueStateDescriptor("v", sc.Float64()))
    full = kb.checkpoint(1)
    ids = iter(range(2, 1 << 62))
    changed = max(1, n // 100)
    rng = np.random.default_rng(seed + 1)

    def run():
        keys = rng.choice(n, changed, replace=False).astype(np.int64)
        st.update_batch(keys, rng.random(changed))
        run.last = kb.checkpoint(next(ids))
        return run.last.size_bytes
    run.full_bytes = full.size_bytes
    run.last = None
    return _closing(run, kb.close, rm)


def checkpoint_async_sync_part(n, seed=1, backend="hashmap", directory=None):
    """The synchronous part of ``checkpoint_async``: ``run()`` returns when the call returns (the cut is taken).

    The background write is NOT part of ``run()``: call ``run.drain()`` (untimed, e.g. as
    pytest-benchmark's ``setup``) to wait for the pending checkpoint before the next pass.
    ``run()`` returns n (entries in the cut).
    """
    root, rm = _checkpoint_dir(directory)
    _, kb = _filled_value_state(n, seed, backend, root)
    ids = iter(range(1, 1 << 62))
    pending = []

    def drain():
        while pending:
            pending.pop().result()

    def run():
        drain()
        pending.append(kb.checkpoint_async(next(ids)))
        return n

    def close():
        drain()
        kb.close()
        rm()
    run.drain = drain
    run.close = close
    return run


def disk_write(nbytes, directory=None, chunk=1 << 20):
    """This disk's sequential write bandwidth: write ``nbytes`` to a new file in ``directory`` and fsync it.

    ``run()`` returns nbytes.  Each pass writes a fresh file (unlinked after the pass) from one
    random buffer, in ``chunk``-sized writes, then fsyncs it and its directory, as a checkpoint does.
    """
    root, rm = _checkpoint_dir(directory)
    buf = memoryview(np.random.default_rng(1).bytes(min(chunk, max(1, nbytes))))
    passes = iter(range(1 << 62))

    def run():
        path = os.path.join(root, f"seq-{next(passes)}.bin")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            left = nbytes
            while left > 0:
                left -= os.write(fd, buf[:min(left, len(buf))])
            os.fsync(fd)
        finally:
            os.close(fd)
        dfd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        os.unlink(path)
        return nbytes
    return _closing(run, rm)


CHECKPOINT_WORKLOADS = {
    "checkpoint": ("checkpoint(id) of n ValueState entries to local files, durable on return (bytes written)",
                   checkpoint_value_state),
    "restore": ("restore_keyed_state_backend of that checkpoint: verify every file, then load (bytes read)",
                restore_value_state),
    "checkpoint-async-sync-part": ("time until checkpoint_async(id) returns (the consistent cut), n entries",
                                   checkpoint_async_sync_part),
}


def _on_statecore(fn):
    return {b: (lambda n, seed=1, _b=b: fn(n, seed, backend=_b)) for b in STATE_BACKENDS}


#: Checkpoint workloads in ``statecore bench``: throughput in bytes/s; only statecore's backends checkpoint.
_NO_CHECKPOINTS = {b: "a baseline without checkpoints" for b in ("dict", "py-lmdb", "rocksdict")}
register(Workload("checkpoint", CHECKPOINT_WORKLOADS["checkpoint"][0], _on_statecore(checkpoint_value_state),
                  unit="B", skip_notes=_NO_CHECKPOINTS))
register(Workload("restore", CHECKPOINT_WORKLOADS["restore"][0], _on_statecore(restore_value_state),
                  unit="B", skip_notes=_NO_CHECKPOINTS))
register(Workload("incremental-checkpoint",
                  "incremental checkpoint after 1 % of the keys changed (bytes the delta wrote)",
                  _on_statecore(incremental_checkpoint_value_state), unit="B", skip_notes=_NO_CHECKPOINTS))
