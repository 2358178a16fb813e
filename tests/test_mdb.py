"""statecore._mdb: the vendored LMDB's wrapper mirrors the py-lmdb subset the LMDB tier uses.

Where py-lmdb is installed (it is a dependency, for the bench baseline), the same operations run on both
and must give the same results, exception classes and messages (each on its own environment: LMDB forbids
opening one environment twice in a process).
"""
import threading

import pytest

from statecore import _mdb

OPEN_KW = dict(map_size=1 << 20, subdir=True, sync=False, metasync=False, writemap=False, max_readers=4,
               max_dbs=0, max_spare_txns=1, lock=True, readahead=False, meminit=False)


def _scenario(mod, path):
    """A transcript of operations and their results (exception class names and messages included)."""
    out = []

    def rec(label, fn):
        try:
            out.append((label, fn()))
        except Exception as e:  # noqa: BLE001
            out.append((label, type(e).__name__, str(e)))

    env = mod.open(path, **OPEN_KW)
    out.append(("info", {k: v for k, v in env.info().items() if k in ("map_size", "max_readers")}))
    t = env.begin(write=True)
    c = t.cursor()
    rec("putmulti", lambda: c.putmulti([(b"k%03d" % i, b"v%d" % i) for i in range(50)]))
    rec("putmulti-nooverwrite", lambda: c.putmulti([(b"k000", b"x"), (b"k999", b"y")], overwrite=False))
    rec("put-exists", lambda: t.put(b"k001", b"x", overwrite=False))
    rec("put", lambda: t.put(b"k002", b"two"))
    rec("put-empty-key", lambda: t.put(b"", b"x"))
    rec("delete", lambda: t.delete(b"k003"))
    rec("delete-missing", lambda: t.delete(b"nope"))
    rec("get-in-write", lambda: t.get(b"k002"))
    rec("nested-write", lambda: env.begin(write=True))
    rec("mapsize-with-writer", lambda: env.set_mapsize(2 << 20))
    t.commit()
    rec("use-after-commit", lambda: t.get(b"k002"))
    rec("cursor-after-commit", lambda: c.key())
    r = env.begin()
    rec("get", lambda: r.get(b"k002"))
    rec("get-default", lambda: r.get(b"zzz", 7))
    cur = r.cursor()
    rec("set_range", lambda: (cur.set_range(b"k04"), cur.key(), cur.value()))
    rec("iternext", lambda: [k for k, _ in cur.iternext()][:3])
    rec("after-iter", lambda: (cur.key(), cur.value()))
    rec("set_range-past", lambda: cur.set_range(b"zz"))
    rec("set_range-empty", lambda: (cur.set_range(b""), cur.key()))
    rec("next", lambda: (cur.next(), cur.key()))
    rec("iter-all", lambda: len(list(cur)))
    rec("put-readonly", lambda: r.put(b"a", b"b"))
    r.abort()
    rec("abort-twice", lambda: r.abort())
    w = env.begin(write=True)
    wc = w.cursor()
    wc.set_range(b"k010")
    rec("cursor-delete", lambda: [(wc.delete(), wc.key()) for _ in range(3)])
    w.commit()
    rec("entries", lambda: env.stat()["entries"])
    readers = []

    def take():  # reader slots: an ended read transaction keeps its slot until its object dies
        while len(readers) < 10:
            readers.append(env.begin())
    rec("readers-full", take)
    out.append(("readers", len(readers)))
    del r, cur
    rec("readers-after-del", take)
    out.append(("readers", len(readers)))
    env.set_mapsize(4 << 20)
    rec("txn-after-resize", lambda: readers[0].get(b"k002"))
    rec("map-size", lambda: env.info()["map_size"])
    big = env.begin(write=True)

    def fill():
        for i in range(100000):
            big.put(b"f%08d" % i, b"x" * 200)
    rec("map-full", fill)
    big.abort()
    rec("reopen-same", lambda: mod.open(path, **OPEN_KW))
    env.close()
    env.close()
    rec("use-after-close", lambda: env.begin())
    env2 = mod.open(path, **OPEN_KW)
    rec("reopened", lambda: env2.begin().get(b"k002"))
    env2.close()
    return out


def test_transcript_matches_py_lmdb(tmp_path):
    lmdb = pytest.importorskip("lmdb")
    mine = _scenario(_mdb, str(tmp_path / "mdb"))
    theirs = _scenario(lmdb, str(tmp_path / "pylmdb"))
    norm = [tuple(str(x).replace(str(tmp_path / "pylmdb"), "P") for x in row) for row in theirs]
    got = [tuple(str(x).replace(str(tmp_path / "mdb"), "P") for x in row) for row in mine]
    assert got == norm


def test_exception_classes_carry_code_and_reason(tmp_path):
    env = _mdb.open(str(tmp_path / "e"), **OPEN_KW)
    try:
        ts = [env.begin() for _ in range(4)]
        with pytest.raises(_mdb.ReadersFullError) as ei:
            env.begin()
        e = ei.value
        assert isinstance(e, _mdb.Error) and e.what == "mdb_txn_begin" and e.code == -30790
        assert "MDB_READERS_FULL" in e.reason and "max_readers" in str(e)
        for t in ts:
            t.abort()
        assert issubclass(_mdb.DiskError, _mdb.Error) and _mdb.MemoryError is not MemoryError
        assert _mdb.version() == (0, 9, 36)
    finally:
        env.close()


def test_read_txn_usable_from_another_thread_and_spare_reuse(tmp_path):
    """MDB_NOTLS: a read transaction begun on one thread is used on another (the checkpoint thread)."""
    env = _mdb.open(str(tmp_path / "t"), **OPEN_KW)
    try:
        w = env.begin(write=True)
        w.put(b"a", b"1")
        w.commit()
        r = env.begin()
        got = []
        th = threading.Thread(target=lambda: got.append(r.get(b"a")))
        th.start()
        th.join()
        assert got == [b"1"]
        r.abort()
        del r  # reset at abort, cached as the spare when the object dies: the next read begin renews it
        before = env.info()["num_readers"]
        r2 = env.begin(buffers=True)
        v = r2.get(b"a")
        assert isinstance(v, memoryview) and bytes(v) == b"1"
        assert env.info()["num_readers"] == before
        r2.abort()
    finally:
        env.close()
