# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""LMDB's C API for statecore's LMDB tier: a thin wrapper over the vendored LMDB (csrc/lmdb/).

It mirrors exactly the subset of py-lmdb (``import lmdb``) that statecore/_lmdb.pyx and
statecore/backends/lmdb.py use, with py-lmdb's semantics (py-lmdb 3.0.0, lmdb/cpython.c, whose LMDB 0.9.36
and patches csrc/lmdb/ vendors): ``open``/:class:`Environment` (``begin``, ``set_mapsize``, ``info``,
``stat``, ``close``), :class:`Transaction` (``get``, ``put``, ``delete``, ``cursor``, ``commit``, ``abort``,
``id``), :class:`Cursor` (``set_range``, ``iternext``/iteration, ``key``, ``value``, ``item``, ``first``,
``next``, ``putmulti``, ``delete``) and the exception classes (:class:`Error` and its subclasses, one per
LMDB error code, carrying ``what``, ``code`` and ``reason`` and the message ``"what: mdb_strerror(code)"``).

What is kept from py-lmdb: environments are opened with MDB_NOTLS (a read transaction may be used from
another thread: the checkpoint thread reads through its cut's transaction), never MDB_WRITEMAP unless asked;
an environment cannot be opened twice in one process ("already open in this process"); an ended read
transaction is reset at once but keeps its reader slot until its object dies, when it becomes the spare
(``max_spare_txns``) that the next read ``begin`` renews;
closing an environment, or ``set_mapsize``, ends every transaction and cursor still open on it (later use
raises ``Error("Attempt to operate on closed/deleted/dropped object.")``); ``set_mapsize`` is refused while
a write transaction is active; a second write transaction on the thread that holds one raises instead of
deadlocking; cursors re-read their position after a write through their transaction.

What differs: reads (``get``, cursor moves) keep the GIL (py-lmdb releases it around each call: a few
hundred ns per call; the map is memory, a page fault is the only I/O); the GIL is released around the calls
that write or do I/O (write ``begin``, which may wait for LMDB's writer lock; ``commit``; ``put``/``delete``
in a write transaction; ``putmulti``, once per batch instead of once per record; environment open and
close).  ``set_mapsize`` runs with the GIL held, as in py-lmdb: LMDB requires that no transaction of the
process uses the map while it is remapped, and holding the GIL is what keeps other threads from beginning
one.  Only the main (unnamed) database: no ``db=``/``parent=`` arguments.

C-level entry points (see _mdb.pxd) give statecore's hot paths pointers into the map (``MDB_val``) instead
of Python objects: ``Transaction.cget``, ``Cursor.cset_range``/``cnext``/``cfirst`` (the record is then in
``Cursor.key_``/``Cursor.val_``).
"""
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.ref cimport PyObject
from cpython.tuple cimport PyTuple_CheckExact, PyTuple_GET_ITEM, PyTuple_GET_SIZE
from libc.errno cimport EACCES, EAGAIN, EBUSY, EINVAL, ENOMEM, ENOSPC
from libc.stdint cimport uint8_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp
from posix.unistd cimport getpid, usleep

import os


cdef extern from "Python.h":
    object PyMemoryView_FromMemory(char *mem, Py_ssize_t size, int flags)
    int PyBUF_READ
    unsigned long PyThread_get_thread_ident() nogil


cdef extern from "lmdb.h" nogil:
    ctypedef struct MDB_stat:
        unsigned int ms_psize
        unsigned int ms_depth
        size_t ms_branch_pages
        size_t ms_leaf_pages
        size_t ms_overflow_pages
        size_t ms_entries
    ctypedef struct MDB_envinfo:
        void *me_mapaddr
        size_t me_mapsize
        size_t me_last_pgno
        size_t me_last_txnid
        unsigned int me_maxreaders
        unsigned int me_numreaders
    ctypedef enum MDB_cursor_op:
        MDB_FIRST
        MDB_GET_CURRENT
        MDB_NEXT
        MDB_SET_RANGE
    enum:
        MDB_VERSION_MAJOR
        MDB_VERSION_MINOR
        MDB_VERSION_PATCH
        MDB_SUCCESS
        MDB_KEYEXIST
        MDB_NOTFOUND
        MDB_PAGE_NOTFOUND
        MDB_CORRUPTED
        MDB_PANIC
        MDB_VERSION_MISMATCH
        MDB_INVALID
        MDB_MAP_FULL
        MDB_DBS_FULL
        MDB_READERS_FULL
        MDB_TLS_FULL
        MDB_TXN_FULL
        MDB_CURSOR_FULL
        MDB_PAGE_FULL
        MDB_MAP_RESIZED
        MDB_INCOMPATIBLE
        MDB_BAD_RSLOT
        MDB_BAD_TXN
        MDB_BAD_VALSIZE
        MDB_BAD_DBI
        MDB_NOSUBDIR
        MDB_RDONLY
        MDB_NOMETASYNC
        MDB_NOSYNC
        MDB_MAPASYNC
        MDB_NOTLS
        MDB_NOLOCK
        MDB_NORDAHEAD
        MDB_WRITEMAP
        MDB_NOMEMINIT
        MDB_NOOVERWRITE
        MDB_NODUPDATA
        MDB_APPEND
    char *mdb_strerror(int err)
    int mdb_env_create(MDB_env **env)
    int mdb_env_open(MDB_env *env, const char *path, unsigned int flags, unsigned int mode)
    void mdb_env_close(MDB_env *env)
    int mdb_env_set_mapsize(MDB_env *env, size_t size)
    int mdb_env_set_maxreaders(MDB_env *env, unsigned int readers)
    int mdb_env_set_maxdbs(MDB_env *env, MDB_dbi dbs)
    int mdb_env_info(MDB_env *env, MDB_envinfo *info)
    int mdb_env_stat(MDB_env *env, MDB_stat *st)
    int mdb_txn_begin(MDB_env *env, MDB_txn *parent, unsigned int flags, MDB_txn **txn)
    int mdb_txn_commit(MDB_txn *txn)
    void mdb_txn_abort(MDB_txn *txn)
    void mdb_txn_reset(MDB_txn *txn)
    int mdb_txn_renew(MDB_txn *txn)
    size_t mdb_txn_id(MDB_txn *txn)
    int mdb_dbi_open(MDB_txn *txn, const char *name, unsigned int flags, MDB_dbi *dbi)
    int mdb_get(MDB_txn *txn, MDB_dbi dbi, MDB_val *key, MDB_val *data)
    int mdb_put(MDB_txn *txn, MDB_dbi dbi, MDB_val *key, MDB_val *data, unsigned int flags)
    int mdb_del(MDB_txn *txn, MDB_dbi dbi, MDB_val *key, MDB_val *data)
    int mdb_cursor_open(MDB_txn *txn, MDB_dbi dbi, MDB_cursor **cursor)
    void mdb_cursor_close(MDB_cursor *cursor)
    int mdb_cursor_get(MDB_cursor *cursor, MDB_val *key, MDB_val *data, MDB_cursor_op op)
    int mdb_cursor_put(MDB_cursor *cursor, MDB_val *key, MDB_val *data, unsigned int flags)
    int mdb_cursor_del(MDB_cursor *cursor, unsigned int flags)


# -- exceptions (py-lmdb's classes and messages) ---------------------------------------------------------------

class Error(Exception):
    """An LMDB error: ``what`` (the call or path), ``code`` (LMDB's or errno's code, 0: none) and ``reason``
    (``mdb_strerror(code)``)."""


_ERROR_NAMES = (
    (MDB_KEYEXIST, "KeyExistsError"), (MDB_NOTFOUND, "NotFoundError"), (MDB_PAGE_NOTFOUND, "PageNotFoundError"),
    (MDB_CORRUPTED, "CorruptedError"), (MDB_PANIC, "PanicError"), (MDB_VERSION_MISMATCH, "VersionMismatchError"),
    (MDB_INVALID, "InvalidError"), (MDB_MAP_FULL, "MapFullError"), (MDB_DBS_FULL, "DbsFullError"),
    (MDB_READERS_FULL, "ReadersFullError"), (MDB_TLS_FULL, "TlsFullError"), (MDB_TXN_FULL, "TxnFullError"),
    (MDB_CURSOR_FULL, "CursorFullError"), (MDB_PAGE_FULL, "PageFullError"), (MDB_MAP_RESIZED, "MapResizedError"),
    (MDB_INCOMPATIBLE, "IncompatibleError"), (MDB_BAD_RSLOT, "BadRslotError"), (MDB_BAD_DBI, "BadDbiError"),
    (MDB_BAD_TXN, "BadTxnError"), (MDB_BAD_VALSIZE, "BadValsizeError"), (EACCES, "ReadonlyError"),
    (EINVAL, "InvalidParameterError"), (EAGAIN, "LockError"), (ENOMEM, "MemoryError"), (ENOSPC, "DiskError"),
)
_BY_CODE = {}
for _code, _name in _ERROR_NAMES:
    _cls = type(_name, (Error,), {"__module__": __name__, "__doc__": f"LMDB error code {_code}."})
    globals()[_name] = _cls
    _BY_CODE[_code] = _cls
del _code, _name, _cls

_HINTS = {
    MDB_MAP_FULL: "Please use a larger Environment(map_size=) parameter",
    MDB_DBS_FULL: "Please use a larger Environment(max_dbs=) parameter",
    MDB_READERS_FULL: "Please use a larger Environment(max_readers=) parameter",
    MDB_TXN_FULL: "Please do less work within your transaction",
}


cdef object make_error(str what, int rc):
    """The exception py-lmdb raises for ``what`` and code rc: "what: reason (hint)", or ``what`` for rc 0."""
    cls = _BY_CODE.get(rc, Error) if rc else Error
    reason = (<bytes>mdb_strerror(rc)).decode("utf-8", "replace")
    hint = _HINTS.get(rc)
    if not rc:
        msg = what
    elif hint is not None:
        msg = f"{what}: {reason} ({hint})"
    else:
        msg = f"{what}: {reason}"
    e = cls(msg)
    e.what = what
    e.code = rc
    e.reason = reason
    return e


cdef int fail(str what, int rc) except -1:
    raise make_error(what, rc)


cdef int fail_invalid() except -1:
    raise make_error("Attempt to operate on closed/deleted/dropped object.", 0)


cdef inline object as_key(object o):
    """A bytes object with o's bytes (o: bytes or any buffer; py-lmdb takes buffers, refuses str)."""
    if PyBytes_CheckExact(o):
        return o
    return memoryview(o).tobytes()


cdef inline object from_val(MDB_val *v, bint buffers):
    if v.mv_size == 0:
        return PyMemoryView_FromMemory(<char *>b"", 0, PyBUF_READ) if buffers else b""
    if buffers:
        return PyMemoryView_FromMemory(<char *>v.mv_data, <Py_ssize_t>v.mv_size, PyBUF_READ)
    return PyBytes_FromStringAndSize(<const char *>v.mv_data, <Py_ssize_t>v.mv_size)


def version():
    """The vendored LMDB's version, (major, minor, patch)."""
    return (MDB_VERSION_MAJOR, MDB_VERSION_MINOR, MDB_VERSION_PATCH)


_OPEN = set()  # (st_dev, st_ino) of the data files of the environments open in this process


cdef object data_file_key(bytes fspath, bint subdir):
    try:
        st = os.stat(os.path.join(fspath, b"data.mdb") if subdir else fspath)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


# -- Environment -------------------------------------------------------------------------------------------------

def open(path, **kwargs):
    """``Environment(path, **kwargs)``, as ``lmdb.open``."""
    return Environment(path, **kwargs)


@cython.no_gc_clear
cdef class Environment:
    """An LMDB environment (``lmdb.Environment``): MDB_NOTLS always."""

    def __cinit__(self):
        self.env = NULL
        self.spare = NULL
        self.txn_head = NULL
        self.valid = False
        self.pid = getpid()

    def __init__(self, path, map_size=10485760, subdir=True, readonly=False, metasync=True, sync=True,
                 map_async=False, mode=0o755, create=True, readahead=True, writemap=False, meminit=True,
                 max_readers=126, max_dbs=0, max_spare_txns=1, lock=True):
        cdef MDB_env *env = NULL
        cdef MDB_txn *txn = NULL
        cdef unsigned int flags = MDB_NOTLS
        cdef unsigned int fmode = (<unsigned int>mode) & ~0o111  # data and lock files: no +x
        cdef size_t msize = map_size
        cdef unsigned int nreaders = max_readers
        cdef MDB_dbi ndbs = max_dbs
        cdef const char *cpath
        cdef int rc
        if self.env is not NULL:
            raise Error("Environment already open")
        fspath = os.fsencode(path)
        if create and subdir and not readonly:
            try:
                os.mkdir(fspath, mode)
            except FileExistsError:
                pass
        key = data_file_key(fspath, subdir)
        if key is not None and key in _OPEN:
            raise make_error(f"The environment '{os.fsdecode(fspath)}' is already open in this process.", 0)
        if not subdir:
            flags |= MDB_NOSUBDIR
        if readonly:
            flags |= MDB_RDONLY
        if not metasync:
            flags |= MDB_NOMETASYNC
        if not sync:
            flags |= MDB_NOSYNC
        if map_async:
            flags |= MDB_MAPASYNC
        if not readahead:
            flags |= MDB_NORDAHEAD
        if writemap:
            flags |= MDB_WRITEMAP
        if not meminit:
            flags |= MDB_NOMEMINIT
        if not lock:
            flags |= MDB_NOLOCK
        rc = mdb_env_create(&env)
        if rc:
            fail("mdb_env_create", rc)
        self.env = env  # closed by close()/__dealloc__ from here on
        rc = mdb_env_set_mapsize(env, msize)
        if rc:
            fail("mdb_env_set_mapsize", rc)
        rc = mdb_env_set_maxreaders(env, nreaders)
        if rc:
            fail("mdb_env_set_maxreaders", rc)
        rc = mdb_env_set_maxdbs(env, ndbs)
        if rc:
            fail("mdb_env_set_maxdbs", rc)
        cpath = PyBytes_AS_STRING(fspath)
        with nogil:
            rc = mdb_env_open(env, cpath, flags, fmode)
        if rc:
            fail(os.fsdecode(fspath), rc)
        rc = mdb_txn_begin(env, NULL, MDB_RDONLY, &txn)
        if rc:
            fail("mdb_txn_begin", rc)
        rc = mdb_dbi_open(txn, NULL, 0, &self.dbi)
        mdb_txn_abort(txn)
        if rc:
            fail("mdb_dbi_open", rc)
        self.readonly = readonly
        self.max_spare = max_spare_txns
        self.path_ = path
        self.keys = data_file_key(fspath, subdir)
        if self.keys is not None:
            _OPEN.add(self.keys)
        self.valid = True

    def __dealloc__(self):
        if self.env is NULL:
            return
        if getpid() != self.pid:
            return  # inherited by a forked child: LMDB forbids using (or closing) it there
        self.invalidate_txns()
        if self.spare is not NULL:
            mdb_txn_abort(self.spare)
            self.spare = NULL
        if self.keys is not None:
            _OPEN.discard(self.keys)
        mdb_env_close(self.env)
        self.env = NULL

    cdef int check_valid(self) except -1:
        if not self.valid:
            fail_invalid()
        return 0

    cdef int invalidate_txns(self) except -1:
        """End (abort) every transaction still open on the environment, and their cursors."""
        cdef Transaction t
        while self.txn_head is not NULL:
            t = <Transaction>self.txn_head
            t.kill()  # unlinks it
        return 0

    def path(self):
        return self.path_

    def begin(self, write=False, buffers=False):
        """A transaction: read-only unless ``write``; ``buffers``: get/key/value return read-only memoryviews
        into the map (valid until the transaction ends) instead of bytes copies."""
        return new_txn(self, write, buffers)

    def set_mapsize(self, map_size):
        """Resize the map.  Ends every transaction open on the environment first (py-lmdb does the same);
        refused while a write transaction is active.  A failure leaves the environment unusable."""
        cdef size_t size = map_size
        cdef int rc
        self.check_valid()
        if self.write_tid or self.active:
            fail("Cannot set_mapsize while a write transaction is active", 0)
        self.invalidate_txns()
        if self.spare is not NULL:
            mdb_txn_abort(self.spare)  # it references the old map
            self.spare = NULL
        rc = mdb_env_set_mapsize(self.env, size)  # GIL held: no thread can begin a transaction meanwhile
        if rc:
            self.valid = False
            fail("mdb_env_set_mapsize", rc)

    def info(self):
        cdef MDB_envinfo info
        cdef int rc
        self.check_valid()
        rc = mdb_env_info(self.env, &info)
        if rc:
            fail("mdb_env_info", rc)
        return {"map_addr": <size_t>info.me_mapaddr, "map_size": info.me_mapsize, "last_pgno": info.me_last_pgno,
                "last_txnid": info.me_last_txnid, "max_readers": info.me_maxreaders,
                "num_readers": info.me_numreaders}

    def stat(self):
        cdef MDB_stat st
        cdef int rc
        self.check_valid()
        rc = mdb_env_stat(self.env, &st)
        if rc:
            fail("mdb_env_stat", rc)
        return {"psize": st.ms_psize, "depth": st.ms_depth, "branch_pages": st.ms_branch_pages,
                "leaf_pages": st.ms_leaf_pages, "overflow_pages": st.ms_overflow_pages, "entries": st.ms_entries}

    def close(self):
        """End every transaction and cursor still open, then close the environment.  Idempotent.  In a
        forked child it only marks the object closed (the parent's environment is never touched)."""
        cdef MDB_env *env = self.env
        self.valid = False
        if env is NULL:
            return
        if getpid() != self.pid:
            return
        while self.active:  # a write call of another thread is in LMDB without the GIL
            with nogil:
                usleep(1000)
        self.invalidate_txns()
        if self.spare is not NULL:
            mdb_txn_abort(self.spare)
            self.spare = NULL
        if self.keys is not None:
            _OPEN.discard(self.keys)
            self.keys = None
        self.env = NULL
        with nogil:
            mdb_env_close(env)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


cdef Transaction new_txn(Environment env, bint write, bint buffers):
    cdef MDB_txn *txn = NULL
    cdef MDB_env *e
    cdef unsigned long tid
    cdef int rc
    cdef Transaction t
    env.check_valid()
    e = env.env
    if write:
        if env.readonly:
            fail("Cannot start write transaction with read-only environment.", EACCES)
        tid = PyThread_get_thread_ident()
        if env.write_tid == tid:
            fail("Attempt to start a write transaction while another write transaction is active on the same "
                 "thread. This would deadlock.", EBUSY)
        env.active += 1
        with nogil:
            rc = mdb_txn_begin(e, NULL, 0, &txn)  # may wait for another thread's write transaction
        env.active -= 1
        if rc:
            fail("mdb_txn_begin", rc)
        env.write_tid = tid
    elif env.spare is not NULL:
        txn = env.spare
        env.spare = NULL
        rc = mdb_txn_renew(txn)
        if rc:
            mdb_txn_abort(txn)
            fail("mdb_txn_renew", rc)
    else:
        rc = mdb_txn_begin(e, NULL, MDB_RDONLY, &txn)
        if rc:
            fail("mdb_txn_begin", rc)
    t = Transaction.__new__(Transaction)
    t.txn = txn
    t.env = env
    t.dbi = env.dbi
    t.write = write
    t.buffers = buffers
    t.valid = True
    t.next_ = env.txn_head
    if env.txn_head is not NULL:
        (<Transaction>env.txn_head).prev_ = <PyObject *>t
    env.txn_head = <PyObject *>t
    return t


# -- Transaction -------------------------------------------------------------------------------------------------

@cython.no_gc_clear
cdef class Transaction:
    """An LMDB transaction (``lmdb.Transaction``), on the main database.  Ended by commit/abort, by its
    environment's close or set_mapsize, or when it is garbage (abort)."""

    def __cinit__(self):
        self.txn = NULL
        self.cur_head = NULL
        self.prev_ = NULL
        self.next_ = NULL
        self.valid = False

    def __init__(self, *args, **kwargs):
        raise TypeError("use Environment.begin()")

    def __dealloc__(self):
        if self.txn is not NULL and self.env is not None and getpid() == self.env.pid:
            self.finish(True)

    cdef int check_valid(self) except -1:
        if not self.valid:
            fail_invalid()
        return 0

    cdef int kill_cursors(self) noexcept:
        cdef Cursor c
        while self.cur_head is not NULL:
            c = <Cursor>self.cur_head
            c.kill()
        return 0

    cdef int unlink(self) noexcept:
        cdef Environment env = self.env
        if self.prev_ is not NULL:
            (<Transaction>self.prev_).next_ = self.next_
        elif env is not None and env.txn_head == <PyObject *>self:
            env.txn_head = self.next_
        if self.next_ is not NULL:
            (<Transaction>self.next_).prev_ = self.prev_
        self.prev_ = NULL
        self.next_ = NULL
        return 0

    cdef int finish(self, bint spare_ok) noexcept:
        """Abort (a read transaction: reset and kept as the environment's spare when spare_ok and there is
        room), close its cursors, unlink it.  Never raises.  spare_ok: from __dealloc__ (py-lmdb caches a
        read transaction as the spare when its object dies, not at abort)."""
        cdef MDB_txn *txn = self.txn
        cdef Environment env = self.env
        self.valid = False
        self.kill_cursors()
        self.unlink()
        self.txn = NULL
        if txn is NULL:
            return 0
        if self.write:
            mdb_txn_abort(txn)
            env.write_tid = 0
        elif spare_ok and env.valid and env.spare is NULL and env.max_spare > 0:
            if not self.reset_:
                mdb_txn_reset(txn)
            env.spare = txn
        else:
            mdb_txn_abort(txn)
        return 0

    cdef int kill(self) noexcept:
        return self.finish(False)

    cdef int end(self, bint commit) except -1:
        cdef MDB_txn *txn = self.txn
        cdef Environment env = self.env
        cdef int rc = 0
        if not self.valid:
            if commit:
                fail_invalid()
            return 0
        if not self.write or not commit:
            if self.write:  # a write abort frees the dirty pages: without the GIL
                self.valid = False
                self.kill_cursors()
                self.unlink()
                self.txn = NULL
                env.active += 1
                with nogil:
                    mdb_txn_abort(txn)
                env.active -= 1
                env.write_tid = 0
                return 0
            # a read-only commit is an abort.  As py-lmdb: the transaction is reset and keeps its reader
            # slot (and stays linked: a close or resize aborts it) until the object dies, when it becomes
            # the environment's spare
            self.valid = False
            self.kill_cursors()
            mdb_txn_reset(txn)
            self.reset_ = True
            return 0
        self.valid = False
        self.kill_cursors()
        self.unlink()
        self.txn = NULL
        env.active += 1
        with nogil:
            rc = mdb_txn_commit(txn)
        env.active -= 1
        env.write_tid = 0
        if rc:
            fail("mdb_txn_commit", rc)
        return 0

    def commit(self):
        self.end(True)

    def abort(self):
        self.end(False)

    def id(self):
        self.check_valid()
        return mdb_txn_id(self.txn)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.end(exc_type is None)

    cdef int cget(self, const uint8_t *k, size_t kl, MDB_val *out) except -1:
        cdef MDB_val key
        cdef int rc
        if not self.valid:
            fail_invalid()
        key.mv_size = kl
        key.mv_data = <void *>k
        rc = mdb_get(self.txn, self.dbi, &key, out)
        if rc == 0:
            return 1
        if rc == MDB_NOTFOUND:
            return 0
        fail("mdb_get", rc)

    cdef int cput(self, const uint8_t *k, size_t kl, const uint8_t *v, size_t vl, unsigned int flags) except -1:
        cdef MDB_val key, val
        cdef int rc
        self.check_valid()
        key.mv_size = kl
        key.mv_data = <void *>k
        val.mv_size = vl
        val.mv_data = <void *>v
        self.env.active += 1
        with nogil:
            rc = mdb_put(self.txn, self.dbi, &key, &val, flags)
        self.env.active -= 1
        self.mutations += 1
        if rc == 0:
            return 1
        if rc == MDB_KEYEXIST:
            return 0
        fail("mdb_put", rc)

    def get(self, key, default=None):
        """The value of key (bytes, or a memoryview with buffers=True), or default."""
        cdef MDB_val val
        k = as_key(key)
        if not self.cget(<const uint8_t *>PyBytes_AS_STRING(k), <size_t>PyBytes_GET_SIZE(k), &val):
            return default
        return from_val(&val, self.buffers)

    def put(self, key, value, dupdata=True, overwrite=True, append=False):
        """Store value under key; False when overwrite=False and the key exists."""
        cdef unsigned int flags = 0
        k = as_key(key)
        v = as_key(value)
        if not dupdata:
            flags |= MDB_NODUPDATA
        if not overwrite:
            flags |= MDB_NOOVERWRITE
        if append:
            flags |= MDB_APPEND
        return bool(self.cput(<const uint8_t *>PyBytes_AS_STRING(k), <size_t>PyBytes_GET_SIZE(k),
                              <const uint8_t *>PyBytes_AS_STRING(v), <size_t>PyBytes_GET_SIZE(v), flags))

    def delete(self, key, value=b""):
        """Delete key; False when it does not exist."""
        cdef MDB_val mk, mv
        cdef MDB_val *pv = NULL
        cdef int rc
        self.check_valid()
        k = as_key(key)
        v = as_key(value)
        mk.mv_size = <size_t>PyBytes_GET_SIZE(k)
        mk.mv_data = PyBytes_AS_STRING(k)
        if PyBytes_GET_SIZE(v):
            mv.mv_size = <size_t>PyBytes_GET_SIZE(v)
            mv.mv_data = PyBytes_AS_STRING(v)
            pv = &mv
        if self.write:
            self.env.active += 1
            with nogil:
                rc = mdb_del(self.txn, self.dbi, &mk, pv)
            self.env.active -= 1
        else:
            rc = mdb_del(self.txn, self.dbi, &mk, pv)  # EACCES: read-only
        self.mutations += 1
        if rc == 0:
            return True
        if rc == MDB_NOTFOUND:
            return False
        fail("mdb_del", rc)

    cdef int capply(self, const uint8_t *arena, const mdb_op *ops, size_t n) except -1:
        cdef MDB_cursor *cur = NULL
        cdef size_t failed = 0
        cdef int rc
        cdef int what = 0
        self.check_valid()
        if n == 0:
            return 0
        rc = mdb_cursor_open(self.txn, self.dbi, &cur)
        if rc:
            fail("mdb_cursor_open", rc)
        self.env.active += 1
        with nogil:
            rc = apply_ops(self.txn, self.dbi, cur, arena, ops, n, &failed, &what)
            mdb_cursor_close(cur)
        self.env.active -= 1
        self.mutations += 1
        if rc:
            fail(f"{('mdb_cursor_put', 'mdb_del', 'mdb_cursor_del', 'mdb_cursor_get')[what]}() operation #{failed}",
                 rc)
        return 0

    cdef Cursor ccursor(self):
        cdef MDB_cursor *cur = NULL
        cdef int rc
        cdef Cursor c
        self.check_valid()
        rc = mdb_cursor_open(self.txn, self.dbi, &cur)
        if rc:
            fail("mdb_cursor_open", rc)
        c = Cursor.__new__(Cursor)
        c.cur = cur
        c.txn = self
        c.valid = True
        c.last_mutation = self.mutations
        c.next_ = self.cur_head
        if self.cur_head is not NULL:
            (<Cursor>self.cur_head).prev_ = <PyObject *>c
        self.cur_head = <PyObject *>c
        return c

    def cursor(self):
        return self.ccursor()


cdef int apply_ops(MDB_txn *txn, MDB_dbi dbi, MDB_cursor *cur, const uint8_t *arena, const mdb_op *ops, size_t n,
                   size_t *failed, int *what) noexcept nogil:
    """Transaction.capply's loop (no GIL): 0, or the LMDB code of the first failure (ops[*failed], *what: the
    call that failed, 0 put / 1 del / 2 cursor del / 3 cursor get)."""
    cdef MDB_val k, v, ck, cv
    cdef unsigned int flags = MDB_APPEND  # keys arrive sorted: while they land past the last key, append
    cdef size_t i, pl
    cdef int rc = 0
    for i in range(n):
        k.mv_data = <void *>(arena + ops[i].koff)
        k.mv_size = ops[i].klen
        if ops[i].kind == MDB_OP_PUT:
            v.mv_data = <void *>(arena + ops[i].voff)
            v.mv_size = ops[i].vlen
            what[0] = 0
            rc = mdb_cursor_put(cur, &k, &v, flags)
            if rc == MDB_KEYEXIST and flags:  # not past the last key: plain puts from here on
                flags = 0
                rc = mdb_cursor_put(cur, &k, &v, 0)
        elif ops[i].kind == MDB_OP_DEL:
            what[0] = 1
            rc = mdb_del(txn, dbi, &k, NULL)
            if rc == MDB_NOTFOUND:
                rc = 0
        else:  # the keys of length klen starting with the first klen - 8 bytes (a list's append-deltas)
            pl = ops[i].klen - 8
            ck = k
            what[0] = 3
            rc = mdb_cursor_get(cur, &ck, &cv, MDB_SET_RANGE)
            while rc == 0 and ck.mv_size == ops[i].klen and memcmp(ck.mv_data, k.mv_data, pl) == 0:
                what[0] = 2
                rc = mdb_cursor_del(cur, 0)
                if rc:
                    break
                what[0] = 3
                rc = mdb_cursor_get(cur, &ck, &cv, MDB_GET_CURRENT)
                if rc == EINVAL:
                    rc = MDB_NOTFOUND  # as py-lmdb: the cursor is unpositioned, the walk ends
            if rc == MDB_NOTFOUND:
                rc = 0
        if rc:
            failed[0] = i
            return rc
    return 0


# -- Cursor ------------------------------------------------------------------------------------------------------

@cython.no_gc_clear
cdef class Cursor:
    """An LMDB cursor (``lmdb.Cursor``) of a transaction; closed when the transaction ends."""

    def __cinit__(self):
        self.cur = NULL
        self.prev_ = NULL
        self.next_ = NULL
        self.valid = False
        self.positioned = False
        self.key_.mv_size = 0
        self.key_.mv_data = NULL
        self.val_.mv_size = 0
        self.val_.mv_data = NULL

    def __init__(self, *args, **kwargs):
        raise TypeError("use Transaction.cursor()")

    def __dealloc__(self):
        if self.cur is not NULL and self.txn is not None and self.txn.env is not None \
                and getpid() == self.txn.env.pid:
            self.kill()

    cdef int check_valid(self) except -1:
        if not self.valid:
            fail_invalid()
        return 0

    cdef int kill(self) noexcept:
        cdef Transaction t = self.txn
        self.valid = False
        self.positioned = False
        if self.cur is not NULL:
            mdb_cursor_close(self.cur)
            self.cur = NULL
        if self.prev_ is not NULL:
            (<Cursor>self.prev_).next_ = self.next_
        elif t is not None and t.cur_head == <PyObject *>self:
            t.cur_head = self.next_
        if self.next_ is not NULL:
            (<Cursor>self.next_).prev_ = self.prev_
        self.prev_ = NULL
        self.next_ = NULL
        return 0

    cdef int op(self, int op) except -1:
        cdef int rc = mdb_cursor_get(self.cur, &self.key_, &self.val_, <MDB_cursor_op>op)
        self.positioned = rc == 0
        self.last_mutation = self.txn.mutations
        if rc:
            self.key_.mv_size = 0
            self.val_.mv_size = 0
            if rc != MDB_NOTFOUND and not (rc == EINVAL and op == MDB_GET_CURRENT):
                fail("mdb_cursor_get", rc)
        return self.positioned

    cdef int cset_range(self, const uint8_t *k, size_t kl) except -1:
        if not self.valid:
            fail_invalid()
        if kl == 0:
            return self.op(MDB_FIRST)
        self.key_.mv_size = kl
        self.key_.mv_data = <void *>k
        return self.op(MDB_SET_RANGE)

    cdef int cnext(self) except -1:
        if not self.valid:
            fail_invalid()
        return self.op(MDB_NEXT)

    cdef int cfirst(self) except -1:
        if not self.valid:
            fail_invalid()
        return self.op(MDB_FIRST)

    cdef int crefresh(self) except -1:
        if self.last_mutation != self.txn.mutations:
            self.op(MDB_GET_CURRENT)
        return 0

    cdef int op_nogil(self, int op) noexcept nogil:
        """op() without the GIL, for read transactions (no write can move the cursor meanwhile)."""
        cdef int rc
        if not self.valid:
            self.err = 0
            return -1
        rc = mdb_cursor_get(self.cur, &self.key_, &self.val_, <MDB_cursor_op>op)
        self.positioned = rc == 0
        if rc == 0:
            return 1
        self.key_.mv_size = 0
        self.val_.mv_size = 0
        if rc == MDB_NOTFOUND:
            return 0
        self.err = rc
        return -1

    cdef int cset_range_nogil(self, const uint8_t *k, size_t kl) noexcept nogil:
        if kl == 0:
            return self.op_nogil(MDB_FIRST)
        self.key_.mv_size = kl
        self.key_.mv_data = <void *>k
        return self.op_nogil(MDB_SET_RANGE)

    cdef int cnext_nogil(self) noexcept nogil:
        return self.op_nogil(MDB_NEXT)

    cdef int raise_err(self) except -1:
        """Raise what the last failed *_nogil call met."""
        if self.err == 0:
            fail_invalid()
        fail("mdb_cursor_get", self.err)

    def set_range(self, key):
        """Position at the first key >= key (the first key for an empty key); False past the end."""
        k = as_key(key)
        return bool(self.cset_range(<const uint8_t *>PyBytes_AS_STRING(k), <size_t>PyBytes_GET_SIZE(k)))

    def first(self):
        return bool(self.cfirst())

    def next(self):
        return bool(self.cnext())

    def key(self):
        self.check_valid()
        self.crefresh()
        return from_val(&self.key_, self.txn.buffers)

    def value(self):
        self.check_valid()
        self.crefresh()
        return from_val(&self.val_, self.txn.buffers)

    def item(self):
        self.check_valid()
        self.crefresh()
        return (from_val(&self.key_, self.txn.buffers), from_val(&self.val_, self.txn.buffers))

    def delete(self, dupdata=False):
        """Delete the current record (the cursor then holds the next one); False when unpositioned."""
        cdef int rc
        cdef unsigned int flags = MDB_NODUPDATA if dupdata else 0
        self.check_valid()
        if not self.positioned:
            return False
        self.txn.env.active += 1
        with nogil:
            rc = mdb_cursor_del(self.cur, flags)
        self.txn.env.active -= 1
        self.txn.mutations += 1
        if rc:
            fail("mdb_cursor_del", rc)
        self.op(MDB_GET_CURRENT)
        return True

    def putmulti(self, items, dupdata=True, overwrite=True, append=False):
        """Store (key, value) 2-tuples in order: (consumed, added); an existing key with overwrite=False is
        consumed, not added.  The GIL is released once for the whole batch."""
        cdef unsigned int flags = 0
        cdef Py_ssize_t n, i, consumed = 0, added = 0
        cdef MDB_val *vals
        cdef int rc = 0
        cdef MDB_cursor *cur
        self.check_valid()
        if not dupdata:
            flags |= MDB_NODUPDATA
        if not overwrite:
            flags |= MDB_NOOVERWRITE
        if append:
            flags |= MDB_APPEND
        seq = tuple(items)  # holds the keys and values while the GIL is released
        n = len(seq)
        if n == 0:
            return (0, 0)
        conv = []
        vals = <MDB_val *>malloc(<size_t>n * 2 * sizeof(MDB_val))
        if vals is NULL:
            raise MemoryError()
        try:
            for i in range(n):
                item = seq[i]
                if not (PyTuple_CheckExact(item) and PyTuple_GET_SIZE(item) == 2):
                    raise TypeError("putmulti() elements must be 2-tuples")
                k = <object>PyTuple_GET_ITEM(item, 0)
                v = <object>PyTuple_GET_ITEM(item, 1)
                if not PyBytes_CheckExact(k):
                    k = as_key(k)
                    conv.append(k)
                if not PyBytes_CheckExact(v):
                    v = as_key(v)
                    conv.append(v)
                vals[2 * i].mv_size = <size_t>PyBytes_GET_SIZE(k)
                vals[2 * i].mv_data = PyBytes_AS_STRING(k)
                vals[2 * i + 1].mv_size = <size_t>PyBytes_GET_SIZE(v)
                vals[2 * i + 1].mv_data = PyBytes_AS_STRING(v)
            cur = self.cur
            self.txn.env.active += 1
            with nogil:
                while consumed < n:
                    rc = mdb_cursor_put(cur, &vals[2 * consumed], &vals[2 * consumed + 1], flags)
                    if rc == 0:
                        added += 1
                    elif rc != MDB_KEYEXIST:
                        break
                    consumed += 1
            self.txn.env.active -= 1
            self.txn.mutations += 1
        finally:
            free(vals)
        if consumed < n:
            fail(f"mdb_cursor_put() element #{consumed}", rc)
        return (consumed, added)

    def iternext(self, keys=True, values=True):
        """Iterate from the current record (the first one when unpositioned) to the end."""
        cdef _Iterator it
        self.check_valid()
        if not self.positioned:
            self.op(MDB_FIRST)
        it = _Iterator.__new__(_Iterator)
        it.cur = self
        it.mode = 2 if keys and values else (0 if keys else 1)
        return it

    def __iter__(self):
        return self.iternext()


@cython.final
cdef class _Iterator:
    cdef Cursor cur
    cdef int mode        # 0 keys, 1 values, 2 (key, value)
    cdef bint started

    def __iter__(self):
        return self

    def __next__(self):
        cdef Cursor c = self.cur
        c.check_valid()
        if not c.positioned:
            raise StopIteration
        if self.started:
            if not c.op(MDB_NEXT):
                raise StopIteration
        self.started = True
        c.crefresh()
        if self.mode == 2:
            return (from_val(&c.key_, c.txn.buffers), from_val(&c.val_, c.txn.buffers))
        if self.mode == 0:
            return from_val(&c.key_, c.txn.buffers)
        return from_val(&c.val_, c.txn.buffers)
