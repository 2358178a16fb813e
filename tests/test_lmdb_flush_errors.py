"""LMDB tier: failed flushes (disk full, I/O error, MDB_PANIC) are reported, not sticky, and lose nothing.

Faults are injected in-process with ``statecore._lmdb._debug_flush_faults`` (a flush commit raises the error
LMDB would raise; ``PANIC_COMMITTED`` commits first, as a meta-page write that reached the disk but reported
failure).  Real ENOSPC (tmpfs) and strace variants are in tests/test_reliability_disk.py.

Every scenario checks against a dict model: values (including removes: tombstones), lists (appends to
lists that are in LMDB become append-deltas, which a redone transaction would duplicate) and maps; reads,
``get_keys``, a flush, and a checkpoint restored into the heap backend.
"""
import time

import pytest

import statecore as sc
from statecore import _lmdb
from statecore._lmdb import LMDBFlushError

MIB = 1 << 20


@pytest.fixture(autouse=True)
def _no_faults_left():
    _lmdb._debug_flush_faults(count=0)
    yield
    _lmdb._debug_flush_faults(count=0)


class Harness:
    """A keyed LMDB backend with small buffers (64 KiB) and 256-entry flush transactions, plus its model."""

    def __init__(self, tmp_path, mwbn=2):
        self.backend = sc.LMDBStateBackend(
            db_path=str(tmp_path / "db"), write_buffer_size=64 << 10, max_write_buffer_number=mwbn,
            memory_budget=2 * MIB,  # flush transactions of 256 entries: a buffer takes several commits
            checkpoint_storage=sc.FileSystemCheckpointStorage(str(tmp_path / "ckpt")))
        self.kb = self.backend.create_keyed_state_backend(max_parallelism=128)
        self.v = self.kb.get_state(sc.ValueStateDescriptor("v"))
        self.l = self.kb.get_state(sc.ListStateDescriptor("l"))
        self.m = self.kb.get_state(sc.MapStateDescriptor("m"))
        self.mv, self.ml, self.mm = {}, {}, {}
        self.refused = 0
        self.errors = []

    def op(self, i):
        """One write; returns False when it raised LMDBFlushError (then it must not have been applied)."""
        kb = self.kb
        r = i % 10
        try:
            if r < 5:
                k = i % 1500
                kb.set_current_key(k)
                self.v.update(f"v{i}")
                self.mv[k] = f"v{i}"
            elif r == 5:
                k = (i * 7) % 1500
                kb.set_current_key(k)
                self.v.clear()
                self.mv.pop(k, None)
            elif r < 8:
                k = -(i % 211)
                kb.set_current_key(k)
                self.l.add(i)
                self.ml.setdefault(k, []).append(i)
            elif r == 8:
                k = f"m{i % 97}"
                kb.set_current_key(k)
                self.m.put(i % 13, i)
                self.mm.setdefault(k, {})[i % 13] = i
            else:
                k = f"m{i % 97}"
                kb.set_current_key(k)
                self.m.remove(i % 13)
                if k in self.mm:
                    self.mm[k].pop(i % 13, None)
                    if not self.mm[k]:
                        del self.mm[k]
            return True
        except LMDBFlushError as e:
            self.refused += 1
            self.errors.append(e)
            return False

    def wrong(self, kb=None):
        """Differences from the model (reads and get_keys) in kb (default: the live backend)."""
        kb = kb or self.kb
        v = kb.get_state(sc.ValueStateDescriptor("v"))
        lst = kb.get_state(sc.ListStateDescriptor("l"))
        m = kb.get_state(sc.MapStateDescriptor("m"))
        bad = []
        for k in range(1500):
            kb.set_current_key(k)
            if v.value() != self.mv.get(k):
                bad.append(("v", k, v.value(), self.mv.get(k)))
        for k in range(-210, 1):
            kb.set_current_key(k)
            if (lst.get() or []) != self.ml.get(k, []):
                bad.append(("l", k, lst.get(), self.ml.get(k)))
        for j in range(97):
            k = f"m{j}"
            kb.set_current_key(k)
            if dict(m.items()) != self.mm.get(k, {}):
                bad.append(("m", k, dict(m.items()), self.mm.get(k)))
        for name, model in (("v", self.mv), ("l", self.ml), ("m", self.mm)):
            if sorted(map(str, kb.get_keys(name))) != sorted(map(str, model)):
                bad.append(("get_keys", name))
        return bad

    def restored_wrong(self, cid):
        c = self.kb.checkpoint(cid)
        kb2 = sc.HashMapStateBackend().restore_keyed_state_backend([c.location], max_parallelism=128)
        try:
            return self.wrong(kb2)
        finally:
            kb2.close()


@pytest.mark.parametrize("mwbn", [1, 2, 3])
@pytest.mark.parametrize("kind", ["ENOSPC", "EIO", "PANIC", "PANIC_COMMITTED"])
def test_failed_flush_is_reported_once_retried_and_loses_nothing(tmp_path, kind, mwbn):
    h = Harness(tmp_path, mwbn)
    i = 0
    for i in range(4000):  # LMDB gets lists, maps and values (later list adds become append-deltas)
        assert h.op(i)
    h.kb.flush()
    store = h.kb._store
    # the 3rd flush commit from now fails: the buffer being flushed has 2 transactions in LMDB already
    _lmdb._debug_flush_faults(after=2, count=1, kind=kind)
    for i in range(4000, 12000):
        h.op(i)
    assert h.refused == 1, [str(e)[:200] for e in h.errors]  # reported once, at the operation after it
    err = str(h.errors[0])
    assert h.kb.db_dir in err and "Nothing is lost" in err, err
    if kind == "ENOSPC":
        assert "free disk space" in err, err
    assert store.flush_failures == 1 and store.flush_retries >= 1
    assert store.env_reopens == (1 if kind.startswith("PANIC") else 0)
    assert h.wrong() == []
    h.kb.flush()
    assert h.kb.metrics()["immutable_buffers"] == 0
    assert h.wrong() == []
    assert h.restored_wrong(1) == []
    for i in range(12000, 14000):  # later writes and flushes work
        assert h.op(i)
    h.kb.flush()
    assert h.wrong() == [] and h.restored_wrong(2) == []
    h.kb.close()


@pytest.mark.parametrize("mwbn", [1, 2])
def test_persistent_failure_refuses_writes_bounded_and_reads_work(tmp_path, mwbn):
    """The disk stays full: once the buffers are full every write is refused (raised, not applied) and memory
    stays bounded; reads and checkpoints work; after the fault clears, flush() succeeds."""
    h = Harness(tmp_path, mwbn)
    for i in range(3000):
        assert h.op(i)
    h.kb.flush()
    _lmdb._debug_flush_faults(count=10 ** 9, kind="ENOSPC")
    results = [h.op(i) for i in range(3000, 9000)]
    tail = results[-300:]
    assert not any(tail), "writes into full buffers whose flush fails must be refused"
    assert h.kb.metrics()["bytes_in_memory"] < (mwbn + 1) * (64 << 10) * 2 + (1 << 20), h.kb.metrics()
    assert h.wrong() == []                      # reads (buffers, then LMDB) work during the failure
    assert h.restored_wrong(1) == []            # so does a checkpoint
    with pytest.raises(LMDBFlushError, match="free disk space"):
        h.kb.flush()                            # an explicit flush retries at once and reports
    _lmdb._debug_flush_faults(count=0)          # space freed
    h.kb.flush()
    assert h.kb.metrics()["immutable_buffers"] == 0 and h.wrong() == []
    for i in range(9000, 11000):
        assert h.op(i)
    h.kb.flush()
    assert h.wrong() == [] and h.restored_wrong(2) == []
    h.kb.close()


def test_background_retry_after_the_delay_without_flush(tmp_path):
    """No explicit flush and no full buffers: an ordinary operation RETRY_DELAY after the failure retries it."""
    h = Harness(tmp_path, mwbn=3)
    for i in range(2000):
        assert h.op(i)
    h.kb.flush()
    _lmdb._debug_flush_faults(count=1, kind="ENOSPC")
    i = 2000
    while h.refused == 0 and i < 20000:
        h.op(i)
        i += 1
    assert h.refused == 1
    store = h.kb._store
    assert store.flush_failures == 1
    deadline = time.monotonic() + 10
    while h.kb.metrics()["immutable_buffers"] and time.monotonic() < deadline:
        h.kb.set_current_key(0)
        h.v.value()  # reads only
        time.sleep(0.05)
    assert h.kb.metrics()["immutable_buffers"] == 0 and store.flush_retries >= 1
    assert h.wrong() == []
    h.kb.close()


def test_panic_waits_for_a_checkpoint_cut_then_reopens(tmp_path):
    """MDB_PANIC needs the environment reopened, which waits while an asynchronous checkpoint's cut holds an
    LMDB read transaction; the checkpoint still completes and restores to the model at its cut."""
    h = Harness(tmp_path, mwbn=2)
    for i in range(3000):
        assert h.op(i)
    h.kb.flush()
    _lmdb._debug_flush_faults(count=1, kind="PANIC")
    i = 3000
    while h.refused == 0 and i < 20000:
        h.op(i)
        i += 1
    store = h.kb._store
    assert h.refused == 1 and store.env_failed
    want = (dict(h.mv), {k: list(v) for k, v in h.ml.items()}, {k: dict(v) for k, v in h.mm.items()})
    fut = h.kb.checkpoint_async(1)
    c = fut.result(60)
    h.kb.flush()  # reopens (the cut is released), retries, succeeds
    assert not store.env_failed and store.env_reopens == 1
    assert h.wrong() == []
    kb2 = sc.HashMapStateBackend().restore_keyed_state_backend([c.location], max_parallelism=128)
    try:
        live = (h.mv, h.ml, h.mm)
        h.mv, h.ml, h.mm = want
        assert h.wrong(kb2) == []
        h.mv, h.ml, h.mm = live
    finally:
        kb2.close()
    h.kb.close()
