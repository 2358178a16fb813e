# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The LMDB spill tier's storage: a C write buffer (memtable) in front of LMDB.

LMDB is used through the ``lmdb`` Python package (py-lmdb >= 2.3, bundling
LMDB 0.9.x), not through LMDB's C API: py-lmdb ships no headers to link
against, and its ``Transaction.get``/``Cursor`` calls are thin C wrappers.
The hot path (write buffer lookups and writes) is pure C (csrc/sc_table.c).

Design (RocksDB's memtable in front of sorted storage):

* :class:`LMDBStore` is one per keyed backend: one LMDB environment
  (``writemap=False``; ``sync`` off by default, working state is scratch) and
  one shared flat C ``sc_table`` write buffer for all states.  A buffer entry
  is keyed by the full composite key (csrc/sc_keycodec.h); its value is one
  flag byte (1 put, 0 tombstone) followed by the value bytes, its ``ts`` the
  TTL timestamp.
* When the buffer's bytes exceed ``write_buffer_size`` it is flushed to LMDB
  sorted by key, tombstones as deletes, in write transactions of at most
  ``txn_entries`` entries: without MDB_WRITEMAP LMDB keeps every dirty page of
  a transaction in malloc'd memory, and with random keys each entry can dirty
  its own leaf page, so one transaction per 64 MiB buffer could hold hundreds
  of MiB of anonymous memory.  (The working DB is scratch, so a flush need not
  be atomic; the buffer is emptied only once every chunk has committed.)  The flush
  runs synchronously on the caller's path (no background thread yet).  A
  ``MapFullError`` aborts the transaction, doubles the map with no
  transaction open and retries, so users never see it.
* Reads: buffer first, then LMDB through one long-lived read transaction,
  renewed after every flush.
* LMDB record: key = the composite key when it is at most 480 bytes, else its
  first 400 bytes + sha256(full key) (LMDB keys are at most 511 bytes); value
  = ``flags | BE64 ts | [varint len | full key when hashed] | value``.  A
  hashed record's full key is checked on every read.
* A map (state, key, namespace) is one contiguous key range: ``mitems`` merges
  an LMDB cursor range with the buffer's entries of that prefix (indexed per
  prefix while they are in the buffer), tombstones and newer versions winning,
  in serialized-user-key order.
* Lists use the blob interface; ``append`` appends in place when the blob is
  in the buffer and otherwise reads the LMDB blob once, copying it into the
  buffer (follow-up: a merge-operator design storing appended records as
  separate LMDB keys so a spilled list is never rewritten).
* Entry counts (``num_state_entries``) are exact: every write checks whether
  the key exists (buffer, then LMDB).
* Fork: the store remembers the opening pid; any use in another process
  raises StateError, and the at-fork hook keeps the child from ever closing
  the inherited environment (closing would release the parent's reader slots).
"""
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, qsort
from libc.string cimport memcmp, memcpy
from posix.unistd cimport getpid

from statecore._csrc cimport (SC_OK, SC_VARINT_MAX, sc_be16_get, sc_be64_get, sc_be64_put, sc_buf, sc_buf_free,
                              sc_buf_reserve, sc_entry, sc_entry_key, sc_entry_value, sc_kc_parse, sc_kc_parts,
                              sc_table, sc_table_append, sc_table_find, sc_table_free, sc_table_hash, sc_table_new,
                              sc_table_next, sc_table_put, sc_table_slot, sc_ttl_expired, sc_varint_get,
                              sc_varint_put)
from statecore._states cimport StateTable
from statecore._status cimport check

import hashlib
import os
import weakref

import lmdb

from statecore.errors import StateError

cdef enum:
    FLAG_TOMB = 0
    FLAG_PUT = 1
    MAX_DIRECT_KEY = 480   # composite keys up to this length are LMDB keys as they are
    HASHED_HEAD = 400      # longer ones: their first 400 bytes + sha256 (432 bytes)
    V_HASHED = 1           # LMDB value flag: the full composite key follows the timestamp
    LAYOUT_VALUE = 0
    LAYOUT_LIST = 1
    LAYOUT_MAP = 2

_STORES = weakref.WeakSet()
_LEAKED = []  # environments inherited by a forked child: never closed there


def _after_fork_in_child():
    for st in list(_STORES):
        (<LMDBStore>st).forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


cdef inline bytes as_bytes(const uint8_t *p, size_t n):
    return PyBytes_FromStringAndSize(<const char *>p, n)


cdef inline void buf_init(sc_buf *b) noexcept:
    b.data = NULL
    b.len = 0
    b.cap = 0


cdef inline int reserve(sc_buf *b, size_t n) except -1:
    if sc_buf_reserve(b, n) != SC_OK:
        raise MemoryError("statecore: out of memory")
    return 0


cdef int cmp_entry(const void *a, const void *b) noexcept nogil:
    cdef sc_entry *ea = (<sc_entry **>a)[0]
    cdef sc_entry *eb = (<sc_entry **>b)[0]
    cdef size_t m = ea.klen if ea.klen < eb.klen else eb.klen
    cdef int r = memcmp(sc_entry_key(ea), sc_entry_key(eb), m)
    if r:
        return r
    return (ea.klen > eb.klen) - (ea.klen < eb.klen)


cdef bytes lmdb_key(const uint8_t *k, size_t kl):
    """The LMDB key of composite key k (hashed when longer than MAX_DIRECT_KEY)."""
    if kl <= MAX_DIRECT_KEY:
        return as_bytes(k, kl)
    full = as_bytes(k, kl)
    return full[:HASHED_HEAD] + hashlib.sha256(full).digest()


cdef bytes encode_record(const uint8_t *k, size_t kl, const uint8_t *v, size_t vl, int64_t ts):
    """LMDB value: flags | BE64 ts | [varint len | full key] | value."""
    cdef bint hashed = kl > MAX_DIRECT_KEY
    cdef uint8_t vint[SC_VARINT_MAX]
    cdef size_t nv = sc_varint_put(vint, kl) if hashed else 0
    cdef size_t n = 9 + (nv + kl if hashed else 0) + vl
    cdef bytes out = PyBytes_FromStringAndSize(NULL, n)
    cdef uint8_t *p = <uint8_t *>PyBytes_AS_STRING(out)
    p[0] = V_HASHED if hashed else 0
    sc_be64_put(p + 1, <uint64_t>ts)
    p += 9
    if hashed:
        memcpy(p, vint, nv)
        p += nv
        memcpy(p, k, kl)
        p += kl
    if vl:
        memcpy(p, v, vl)
    return out


cdef int parse_record(bytes raw, int64_t *ts, const uint8_t **fk, size_t *fkl, const uint8_t **v,
                      size_t *vl) except -1:
    """Split an LMDB value; *fk is NULL when the LMDB key is the composite key."""
    cdef const uint8_t *p = <const uint8_t *>PyBytes_AS_STRING(raw)
    cdef const uint8_t *end = p + PyBytes_GET_SIZE(raw)
    cdef uint64_t n = 0
    cdef size_t used
    if end - p < 9:
        raise StateError("statecore: corrupt LMDB record (truncated)")
    ts[0] = <int64_t>sc_be64_get(p + 1)
    if p[0] & V_HASHED:
        used = sc_varint_get(p + 9, end, &n)
        if used == 0 or n > <uint64_t>(end - p - 9 - used):
            raise StateError("statecore: corrupt LMDB record (bad key length)")
        fk[0] = p + 9 + used
        fkl[0] = n
        p = p + 9 + used + n
    else:
        fk[0] = NULL
        fkl[0] = 0
        p += 9
    v[0] = p
    vl[0] = end - p
    return 0


cdef bytes record_full_key(bytes lkey, bytes raw):
    """The composite key of an LMDB record."""
    cdef int64_t ts
    cdef const uint8_t *fk
    cdef const uint8_t *v
    cdef size_t fkl, vl
    parse_record(raw, &ts, &fk, &fkl, &v, &vl)
    if fk is NULL:
        return lkey
    return as_bytes(fk, fkl)


cdef size_t map_prefix_len(const uint8_t *k, size_t kl) except? 0:
    """Length of the (state, key, namespace) prefix of a map entry's composite key."""
    cdef sc_kc_parts parts
    check(sc_kc_parse(k, kl, &parts))
    return <size_t>(parts.user_key - k)


@cython.final
cdef class LMDBStore:
    """One per keyed backend: the LMDB environment and the shared write buffer."""
    cdef sc_table *buf
    cdef sc_buf scratch
    cdef readonly object env
    cdef object rtxn
    cdef object rget            # rtxn.get, bound once per read transaction
    cdef readonly str path
    cdef readonly size_t write_buffer_size
    cdef readonly size_t txn_entries  # buffer entries per LMDB write transaction of a flush
    cdef long pid
    cdef bint is_forked
    cdef readonly bint closed
    cdef dict mindex            # map prefix -> set of full keys with an entry in the buffer
    cdef readonly long long flushes
    cdef readonly long long stalls
    cdef readonly long long cache_hits
    cdef readonly long long cache_misses
    cdef readonly long long map_resizes
    cdef public long long epoch  # bumped by every flush (buffer slots are reset)
    cdef object __weakref__

    def __cinit__(self, *args, **kwargs):
        buf_init(&self.scratch)
        self.buf = sc_table_new(16, 0)
        if self.buf is NULL:
            raise MemoryError()

    def __init__(self, str path, size_t write_buffer_size=64 << 20, bint sync=False, size_t map_size=256 << 20,
                 int max_readers=1024, size_t dirty_budget=32 << 20):
        self.path = path
        # a random-key entry may dirty a leaf and a branch page (2 x 4 KiB), held in malloc'd memory until commit
        self.txn_entries = max(256, dirty_budget // 8192)
        self.write_buffer_size = max(write_buffer_size, 1)
        self.mindex = {}
        self.pid = getpid()
        self.env = lmdb.open(path, map_size=map_size, subdir=True, sync=sync, metasync=sync, writemap=False,
                             max_readers=max_readers, max_dbs=0, max_spare_txns=0, lock=True, readahead=False,
                             meminit=False)
        _STORES.add(self)

    def __dealloc__(self):
        sc_table_free(self.buf)
        self.buf = NULL
        sc_buf_free(&self.scratch)

    cdef void forked(self) noexcept:
        self.is_forked = True
        if self.env is not None:
            _LEAKED.append((self.env, self.rtxn))

    cdef inline int guard(self) except -1:
        if self.is_forked:  # set by the at-fork hook (no getpid() syscall per operation)
            raise StateError(
                f"this LMDB state backend was opened in process {self.pid} and is used after fork() in "
                f"process {getpid()}: LMDB environments must not cross fork. Create the backend in the child "
                f"(or use the 'spawn' start method).")
        if self.closed:
            from statecore.errors import BackendClosedError
            raise BackendClosedError("this keyed state backend is closed; create or restore a new one")
        return 0

    def close(self, remove_dir=False):
        """Close the environment (never in a forked child).  Idempotent."""
        if self.closed:
            return
        self.closed = True
        sc_table_free(self.buf)
        self.buf = NULL
        self.mindex = {}
        if self.is_forked or getpid() != self.pid:
            self.is_forked = True
            return
        if self.rtxn is not None:
            self.rtxn.abort()
            self.rtxn = None
        if self.env is not None:
            self.env.close()

    # -- LMDB ------------------------------------------------------------

    cdef object txn(self):
        if self.rtxn is None:
            self.rtxn = self.env.begin(buffers=False)
        return self.rtxn

    cdef inline void end_read(self):
        self.rget = None
        if self.rtxn is not None:
            self.rtxn.abort()
            self.rtxn = None

    cdef object lget(self, const uint8_t *k, size_t kl):
        """The raw LMDB record of composite key k, or None."""
        cdef int64_t ts
        cdef const uint8_t *fk
        cdef const uint8_t *v
        cdef size_t fkl, vl
        if self.rget is None:
            self.rget = self.txn().get
        raw = self.rget(as_bytes(k, kl) if kl <= MAX_DIRECT_KEY else lmdb_key(k, kl))
        if raw is None:
            return None
        if kl > MAX_DIRECT_KEY:
            parse_record(raw, &ts, &fk, &fkl, &v, &vl)
            if fk is NULL or fkl != kl or memcmp(fk, k, kl) != 0:
                raise StateError("statecore: LMDB hashed-key collision (sha256); the stored record belongs to "
                                 "another key")
        return raw

    cdef list range_items(self, bytes p):
        """[(full key, raw record)] of every LMDB record whose composite key starts with p."""
        cdef bytes head = p[:HASHED_HEAD]
        out = []
        cur = self.txn().cursor()
        if not cur.set_range(head):
            return out
        for lkey, raw in cur:
            if not lkey.startswith(head):
                break
            fk = record_full_key(lkey, raw) if (<bytes>raw)[0] & V_HASHED else lkey
            if fk.startswith(p):
                out.append((fk, raw))
        return out

    cdef list sid_scan(self, bytes sidb, bytes start, long limit):
        """[(LMDB key, raw)] of state sidb (2 bytes) from LMDB key ``start`` on, across key groups."""
        cdef long kgi
        out = []
        cur = self.txn().cursor()
        target = start if start is not None else b"\x00\x00" + sidb
        while True:
            if not cur.set_range(target):
                return out
            key = cur.key()
            ks = key[2:4]
            if ks != sidb:
                if ks < sidb:
                    target = key[:2] + sidb
                else:
                    kgi = int.from_bytes(key[:2], "big") + 1
                    if kgi > 0xFFFF:
                        return out
                    target = kgi.to_bytes(2, "big") + sidb
                continue
            head = key[:4]
            while True:
                out.append((key, cur.value()))
                if 0 <= limit <= len(out):
                    return out
                if not cur.next():
                    return out
                key = cur.key()
                if key[:4] != head:
                    break
            target = key

    def flush(self):
        """Write the buffer to LMDB in one transaction (sorted, tombstones as deletes) and empty it."""
        self.guard()
        self.do_flush()

    cdef int do_flush(self) except -1:
        cdef size_t n = self.buf.count, i = 0, pos = 0, start, end
        cdef sc_entry *e
        cdef sc_entry **arr
        cdef uint8_t *k
        cdef sc_table *fresh
        if n == 0:
            return 0
        arr = <sc_entry **>malloc(n * sizeof(sc_entry *))
        if arr is NULL:
            raise MemoryError()
        try:
            while True:
                e = sc_table_next(self.buf, &pos)
                if e is NULL:
                    break
                arr[i] = e
                i += 1
            qsort(arr, n, sizeof(sc_entry *), cmp_entry)
            self.end_read()
            start = 0
            while start < n:  # chunks of txn_entries: bounds LMDB's malloc'd dirty pages (no writemap)
                end = min(n, start + self.txn_entries)
                txn = self.env.begin(write=True)
                try:
                    tput = txn.put
                    tdel = txn.delete
                    for i in range(start, end):
                        e = arr[i]
                        k = sc_entry_key(e)
                        lk = lmdb_key(k, e.klen)
                        if sc_entry_value(e)[0] == FLAG_PUT:
                            tput(lk, encode_record(k, e.klen, sc_entry_value(e) + 1, e.vlen - 1, e.ts))
                        else:
                            tdel(lk)
                    txn.commit()
                    start = end
                except lmdb.MapFullError:
                    txn.abort()
                    self.env.set_mapsize(self.env.info()["map_size"] * 2)  # no transaction is open here
                    self.map_resizes += 1
                except BaseException:
                    txn.abort()
                    raise
        finally:
            free(arr)
        fresh = sc_table_new(16, 0)
        if fresh is NULL:
            raise MemoryError()
        sc_table_free(self.buf)
        self.buf = fresh
        self.mindex = {}
        self.flushes += 1
        self.epoch += 1
        return 0

    cdef inline int maybe_flush(self) except -1:
        if self.buf.bytes > self.write_buffer_size:
            self.do_flush()
        return 0

    # -- write buffer ----------------------------------------------------

    cdef int bput(self, const uint8_t *k, size_t kl, uint32_t h, int flag, const uint8_t *v, size_t vl,
                  int64_t ts, size_t pl) except -1:
        """Write (flag, v) under k into the buffer; pl > 0: a map entry with prefix length pl."""
        reserve(&self.scratch, vl + 1)
        self.scratch.data[0] = <uint8_t>flag
        if vl:
            memcpy(self.scratch.data + 1, v, vl)
        check(sc_table_put(self.buf, k, kl, h, self.scratch.data, vl + 1, ts, NULL))
        if pl:
            p = as_bytes(k, pl)
            s = self.mindex.get(p)
            if s is None:
                self.mindex[p] = s = set()
            s.add(as_bytes(k, kl))
        return 0

    def metrics(self):
        self.guard()
        info = self.env.info()
        stat = self.env.stat()
        return {
            "bytes_in_memory": self.buf.bytes + self.scratch.cap,
            "bytes_on_disk": (info["last_pgno"] + 1) * stat["psize"],
            "flushes": self.flushes,
            "stalls": self.stalls,
            "cache_hits": self.cache_hits,
            "cache_misses": self.cache_misses,
            "map_size": info["map_size"],
            "map_resizes": self.map_resizes,
            "buffer_entries": self.buf.count,
        }


@cython.final
cdef class LMDBStateTable(StateTable):
    """One state's view of an LMDBStore (the StateTable contract of statecore/_states.pxd)."""
    cdef LMDBStore s
    cdef bint nested
    cdef int sid          # learnt from the first composite key seen (-1: none yet, so no entries)
    cdef bytes sidb
    cdef long long n      # live entries (expired-but-not-cleaned included)
    cdef bytes hold       # keeps the LMDB record a returned pointer points into
    cdef sc_buf kb        # scratch: map composite keys
    cdef sc_buf lb        # scratch: list cleanup
    cdef size_t bcursor   # cleanup position in the buffer's slots
    cdef long long bepoch
    cdef bytes lcursor    # cleanup position in LMDB (last visited LMDB key)

    def __cinit__(self, *args, **kwargs):
        buf_init(&self.kb)
        buf_init(&self.lb)
        self.sid = -1

    def __init__(self, LMDBStore store, bint nested):
        self.s = store
        self.nested = nested

    def __dealloc__(self):
        sc_buf_free(&self.kb)
        sc_buf_free(&self.lb)

    cdef void release(self) noexcept:
        self.hold = None

    cdef inline int enter(self, const uint8_t *k, size_t kl) except -1:
        self.s.guard()
        if self.sid < 0 and kl >= 4:
            self.sid = sc_be16_get(k + 2)
            self.sidb = as_bytes(k + 2, 2)
        return 0

    cdef int exists(self, const uint8_t *k, size_t kl, uint32_t h) except -1:
        cdef sc_entry *e = sc_table_find(self.s.buf, k, kl, h)
        if e is not NULL:
            return sc_entry_value(e)[0] == FLAG_PUT
        return self.s.lget(k, kl) is not None

    cdef int do_get(self, const uint8_t *k, size_t kl, uint32_t h, const uint8_t **v, size_t *vl,
                    int64_t *ts) except -1:
        cdef sc_entry *e = sc_table_find(self.s.buf, k, kl, h)
        cdef const uint8_t *fk
        cdef size_t fkl
        if e is not NULL:
            if sc_entry_value(e)[0] != FLAG_PUT:
                return 0
            v[0] = sc_entry_value(e) + 1
            vl[0] = e.vlen - 1
            ts[0] = e.ts
            return 1
        raw = self.s.lget(k, kl)
        if raw is None:
            return 0
        self.hold = raw
        parse_record(raw, ts, &fk, &fkl, v, vl)
        return 1

    cdef int do_put(self, const uint8_t *k, size_t kl, uint32_t h, const uint8_t *v, size_t vl, int64_t ts,
                    size_t pl) except -1:
        if not self.exists(k, kl, h):
            self.n += 1
        self.s.bput(k, kl, h, FLAG_PUT, v, vl, ts, pl)
        return self.s.maybe_flush()

    cdef int do_remove(self, const uint8_t *k, size_t kl, uint32_t h, size_t pl) except -1:
        if not self.exists(k, kl, h):
            return 0
        self.s.bput(k, kl, h, FLAG_TOMB, NULL, 0, 0, pl)
        self.n -= 1
        self.s.maybe_flush()
        return 1

    cdef int do_touch(self, const uint8_t *k, size_t kl, uint32_t h, int64_t ts, size_t pl) except -1:
        cdef sc_entry *e = sc_table_find(self.s.buf, k, kl, h)
        cdef const uint8_t *fk
        cdef const uint8_t *v
        cdef size_t fkl, vl
        cdef int64_t old
        if e is not NULL:
            if sc_entry_value(e)[0] == FLAG_PUT:
                e.ts = ts
            return 0
        raw = self.s.lget(k, kl)
        if raw is not None:
            parse_record(raw, &old, &fk, &fkl, &v, &vl)
            self.s.bput(k, kl, h, FLAG_PUT, v, vl, ts, pl)
            self.s.maybe_flush()
        return 0

    # -- StateTable ------------------------------------------------------

    cdef int get(self, const uint8_t *k, size_t kl, uint32_t h, const uint8_t **v, size_t *vl,
                 int64_t *ts) except -1:
        self.enter(k, kl)
        return self.do_get(k, kl, h, v, vl, ts)

    cdef int put(self, const uint8_t *k, size_t kl, uint32_t h, const uint8_t *v, size_t vl,
                 int64_t ts) except -1:
        self.enter(k, kl)
        return self.do_put(k, kl, h, v, vl, ts, 0)

    cdef int remove(self, const uint8_t *k, size_t kl, uint32_t h) except -1:
        self.enter(k, kl)
        return self.do_remove(k, kl, h, 0)

    cdef int touch(self, const uint8_t *k, size_t kl, uint32_t h, int64_t ts) except -1:
        self.enter(k, kl)
        return self.do_touch(k, kl, h, ts, 0)

    cdef int append(self, const uint8_t *k, size_t kl, uint32_t h, const uint8_t *v, size_t vl,
                    int64_t ts) except -1:
        cdef sc_entry *e
        cdef const uint8_t *fk
        cdef const uint8_t *ov
        cdef size_t fkl, ovl
        cdef int64_t ots
        self.enter(k, kl)
        e = sc_table_find(self.s.buf, k, kl, h)
        if e is not NULL and sc_entry_value(e)[0] == FLAG_PUT:
            check(sc_table_append(self.s.buf, k, kl, h, v, vl, ts))  # in place, keeps the entry's ts
        elif e is not NULL:
            self.s.bput(k, kl, h, FLAG_PUT, v, vl, ts, 0)
            self.n += 1
        else:
            raw = self.s.lget(k, kl)
            if raw is None:
                self.s.bput(k, kl, h, FLAG_PUT, v, vl, ts, 0)
                self.n += 1
            else:  # read-modify-write of the spilled blob (follow-up: merge operator)
                parse_record(raw, &ots, &fk, &fkl, &ov, &ovl)
                self.lb.len = 0
                reserve(&self.lb, ovl + vl)
                memcpy(self.lb.data, ov, ovl)
                if vl:
                    memcpy(self.lb.data + ovl, v, vl)
                self.lb.len = ovl + vl
                self.s.bput(k, kl, h, FLAG_PUT, self.lb.data, self.lb.len, ots, 0)
        return self.s.maybe_flush()

    cdef inline int mkey(self, const uint8_t *p, size_t pl, const uint8_t *uk, size_t ukl) except -1:
        self.kb.len = 0
        reserve(&self.kb, pl + ukl)
        memcpy(self.kb.data, p, pl)
        if ukl:
            memcpy(self.kb.data + pl, uk, ukl)
        self.kb.len = pl + ukl
        return 0

    cdef int mget(self, const uint8_t *p, size_t pl, uint32_t ph, const uint8_t *uk, size_t ukl,
                  const uint8_t **v, size_t *vl, int64_t *ts) except -1:
        self.enter(p, pl)
        self.mkey(p, pl, uk, ukl)
        return self.do_get(self.kb.data, self.kb.len, sc_table_hash(self.kb.data, self.kb.len), v, vl, ts)

    cdef int mput(self, const uint8_t *p, size_t pl, uint32_t ph, const uint8_t *uk, size_t ukl,
                  const uint8_t *v, size_t vl, int64_t ts) except -1:
        self.enter(p, pl)
        self.mkey(p, pl, uk, ukl)
        return self.do_put(self.kb.data, self.kb.len, sc_table_hash(self.kb.data, self.kb.len), v, vl, ts, pl)

    cdef int mremove(self, const uint8_t *p, size_t pl, uint32_t ph, const uint8_t *uk, size_t ukl) except -1:
        self.enter(p, pl)
        self.mkey(p, pl, uk, ukl)
        return self.do_remove(self.kb.data, self.kb.len, sc_table_hash(self.kb.data, self.kb.len), pl)

    cdef int mtouch(self, const uint8_t *p, size_t pl, uint32_t ph, const uint8_t *uk, size_t ukl,
                    int64_t ts) except -1:
        self.enter(p, pl)
        self.mkey(p, pl, uk, ukl)
        return self.do_touch(self.kb.data, self.kb.len, sc_table_hash(self.kb.data, self.kb.len), ts, pl)

    cdef dict live_map(self, bytes prefix):
        """{full key: (value bytes, ts)} of one map, buffer over LMDB."""
        cdef int64_t ts
        cdef const uint8_t *fk
        cdef const uint8_t *v
        cdef size_t fkl, vl
        cdef sc_entry *e
        cdef bytes key
        res = {}
        for key, raw in self.s.range_items(prefix):
            parse_record(raw, &ts, &fk, &fkl, &v, &vl)
            res[key] = (as_bytes(v, vl), ts)
        keys = self.s.mindex.get(prefix)
        if keys:
            for key in keys:
                e = sc_table_find(self.s.buf, <const uint8_t *>PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key),
                                  sc_table_hash(<const uint8_t *>PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key)))
                if e is NULL:
                    continue
                if sc_entry_value(e)[0] == FLAG_PUT:
                    res[key] = (as_bytes(sc_entry_value(e) + 1, e.vlen - 1), e.ts)
                else:
                    res.pop(key, None)
        return res

    cdef list mitems(self, const uint8_t *p, size_t pl, uint32_t ph):
        self.enter(p, pl)
        res = self.live_map(as_bytes(p, pl))
        return [(k[pl:], res[k][0], res[k][1]) for k in sorted(res)]

    cdef int mclear(self, const uint8_t *p, size_t pl, uint32_t ph) except -1:
        cdef bytes key
        self.enter(p, pl)
        res = self.live_map(as_bytes(p, pl))
        for key in res:
            self.s.bput(<const uint8_t *>PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key),
                        sc_table_hash(<const uint8_t *>PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key)),
                        FLAG_TOMB, NULL, 0, 0, pl)
        self.n -= len(res)
        self.s.maybe_flush()
        return 1 if res else 0

    cdef list key_bytes(self, const uint8_t *ns, size_t nsl):
        cdef size_t pos = 0
        cdef sc_entry *e
        cdef sc_kc_parts parts
        cdef bytes fk
        self.s.guard()
        if self.sid < 0:
            return []
        live = set()
        for lkey, raw in self.s.sid_scan(self.sidb, None, -1):
            live.add(record_full_key(lkey, raw) if (<bytes>raw)[0] & V_HASHED else lkey)
        while True:
            e = sc_table_next(self.s.buf, &pos)
            if e is NULL:
                break
            if e.klen >= 4 and sc_be16_get(sc_entry_key(e) + 2) == self.sid:
                fk = as_bytes(sc_entry_key(e), e.klen)
                if sc_entry_value(e)[0] == FLAG_PUT:
                    live.add(fk)
                else:
                    live.discard(fk)
        want = as_bytes(ns, nsl)
        out = {}
        for fk in sorted(live):
            check(sc_kc_parse(<const uint8_t *>PyBytes_AS_STRING(fk), PyBytes_GET_SIZE(fk), &parts))
            if parts.nslen == nsl and as_bytes(parts.ns, parts.nslen) == want:
                out[as_bytes(parts.key, parts.klen)] = None
        return list(out)

    cdef size_t count(self):
        return <size_t>self.n if self.n > 0 else 0

    cdef size_t nbytes(self):
        return self.kb.cap + self.lb.cap

    # -- incremental TTL cleanup -----------------------------------------

    cdef long filter_list(self, const uint8_t *v, size_t vl, int64_t ttl, int64_t now) except -1:
        """Copy the unexpired records of a list blob into self.lb; return how many were dropped."""
        cdef const uint8_t *p = v
        cdef const uint8_t *end = v + vl
        cdef uint64_t n = 0
        cdef size_t used
        cdef int64_t ts
        cdef long dropped = 0
        cdef const uint8_t *rec
        self.lb.len = 0
        reserve(&self.lb, vl)
        while p < end:
            if end - p < 9:
                raise StateError("statecore: corrupt list state (truncated record)")
            rec = p
            ts = <int64_t>sc_be64_get(p)
            used = sc_varint_get(p + 8, end, &n)
            if used == 0 or n > <uint64_t>(end - p - 8 - used):
                raise StateError("statecore: corrupt list state (bad record length)")
            p += 8 + used + n
            if sc_ttl_expired(ts, ttl, now):
                dropped += 1
            else:
                memcpy(self.lb.data + self.lb.len, rec, p - rec)
                self.lb.len += p - rec
        return dropped

    cdef long expire_one(self, const uint8_t *k, size_t kl, uint32_t h, const uint8_t *v, size_t vl, int64_t ts,
                         int64_t ttl, int64_t now, int layout) except -1:
        """Apply TTL cleanup to one live entry (its current version); return how many were dropped."""
        cdef long dropped
        if layout == LAYOUT_LIST:
            dropped = self.filter_list(v, vl, ttl, now)
            if dropped:
                if self.lb.len == 0:
                    self.s.bput(k, kl, h, FLAG_TOMB, NULL, 0, 0, 0)
                    self.n -= 1
                else:
                    self.s.bput(k, kl, h, FLAG_PUT, self.lb.data, self.lb.len, ts, 0)
            return dropped
        if sc_ttl_expired(ts, ttl, now):
            self.s.bput(k, kl, h, FLAG_TOMB, NULL, 0, 0, map_prefix_len(k, kl) if layout == LAYOUT_MAP else 0)
            self.n -= 1
            return 1
        return 0

    cdef long cleanup(self, size_t n, int64_t ttl, int64_t now, int layout, sc_buf *scratch) except -1:
        cdef size_t i, cap
        cdef long dropped = 0
        cdef sc_entry *e
        cdef int64_t ts
        cdef const uint8_t *fk
        cdef const uint8_t *v
        cdef size_t fkl, vl
        cdef bytes key
        cdef uint32_t h
        self.s.guard()
        if self.sid < 0 or self.n <= 0 or n == 0:
            return 0
        # 1. buffer slots, round robin (entries of this state only)
        if self.bepoch != self.s.epoch:
            self.bepoch = self.s.epoch
            self.bcursor = 0
        cap = self.s.buf.mask + 1
        for i in range(min(n, cap)):
            e = sc_table_slot(self.s.buf, self.bcursor)
            self.bcursor = (self.bcursor + 1) & self.s.buf.mask
            if e is NULL or e.klen < 4 or sc_be16_get(sc_entry_key(e) + 2) != self.sid:
                continue
            if sc_entry_value(e)[0] != FLAG_PUT:
                continue
            if layout == LAYOUT_LIST:
                # filter into lb, then rewrite the entry (same key: no slot moves)
                key = as_bytes(sc_entry_key(e), e.klen)
                dropped += self.expire_one(<const uint8_t *>PyBytes_AS_STRING(key), e.klen, e.hash,
                                           sc_entry_value(e) + 1, e.vlen - 1, e.ts, ttl, now, layout)
            elif sc_ttl_expired(e.ts, ttl, now):
                sc_entry_value(e)[0] = FLAG_TOMB  # in place: the key stays, its value is ignored
                self.n -= 1
                dropped += 1
        # 2. LMDB records of this state, round robin across key groups
        start = None if self.lcursor is None else self.lcursor + b"\x00"
        batch = self.s.sid_scan(self.sidb, start, n)
        if len(batch) < <long>n:
            self.lcursor = None  # wrap around next time
        else:
            self.lcursor = batch[len(batch) - 1][0]
        for lkey, raw in batch:
            parse_record(raw, &ts, &fk, &fkl, &v, &vl)
            key = lkey if fk is NULL else as_bytes(fk, fkl)
            h = sc_table_hash(<const uint8_t *>PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key))
            if sc_table_find(self.s.buf, <const uint8_t *>PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key),
                             h) is not NULL:
                continue  # the buffer holds the current version (visited by step 1)
            dropped += self.expire_one(<const uint8_t *>PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key), h, v, vl,
                                       ts, ttl, now, layout)
        self.s.maybe_flush()
        return dropped
