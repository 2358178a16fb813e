# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""State storage: the StateTable interface and the heap backend's C hash-table implementation.

A :class:`StateTable` stores one state's entries under composite keys (see
_tables.pxd for the contract of every method).  :class:`HeapStateTable` keeps
them in a C hash table (csrc/sc_table.c; nested tables for MapState); the LMDB
tier (statecore/_lmdb.pyx) implements the same interface over its write buffers
and LMDB.  The module also holds the snapshot entry points that work on any
table (``snapshot_table`` with the heap's two-thread split, ``consistent_copy``).
"""
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.stdint cimport int64_t, uint8_t, uint32_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

from statecore._csrc cimport (SC_OK, sc_buf, sc_entry, sc_kc_parse, sc_kc_parts, sc_table_hash, sc_table_slot, sc_entry_inner, sc_entry_key, sc_entry_value, sc_status,
                              sc_table, sc_table_append, sc_table_bytes_deep, sc_table_clone, sc_table_count_deep,
                              sc_table_delete, sc_table_delete_entry, sc_table_expire_scan, sc_table_find,
                              sc_table_free, sc_table_get_inner, sc_table_new, sc_table_next, sc_table_prefault,
                              sc_table_prefetch, sc_table_put, sc_table_reserve, sc_ttl_expired)
from statecore._records cimport append_record, as_bytes, read_record, restamp_blob
from statecore._sink cimport LAYOUT_LIST, LAYOUT_MAP, LAYOUT_VALUE, SnapshotSink
from statecore._status cimport check

import threading

from statecore.errors import StateError


# ------------------------------------------------------------------ list records

cdef int next_record(const uint8_t **pp, const uint8_t *end, int64_t *ts, const uint8_t **e, size_t *el) except -1:
    """Read one record at *pp; 0 at the end, 1 when read.  Malformed -> StateError."""
    cdef int rc = read_record(pp, end, ts, e, el)
    if rc == -2:
        raise StateError("statecore: corrupt list state (malformed record)")
    return rc

# ------------------------------------------------------------------ the interface and the heap table

cdef class StateTable:
    """Storage of one state's entries (abstract; see HeapStateTable).

    Keys are composite: ``prefix`` is the (state, key, namespace) prefix and,
    for map entries, ``uk`` the serialized user key.  ``h`` is
    ``sc_table_hash(prefix)``, computed once by the caller.  Pointers returned
    by ``get``/``mget`` are valid until the next call on the table.
    """

    cdef int get(self, const uint8_t *k, size_t kl, uint32_t h, const uint8_t **v, size_t *vl,
                 int64_t *ts) except -1:
        raise NotImplementedError

    cdef int put(self, const uint8_t *k, size_t kl, uint32_t h, const uint8_t *v, size_t vl,
                 int64_t ts) except -1:
        raise NotImplementedError

    cdef int remove(self, const uint8_t *k, size_t kl, uint32_t h) except -1:
        raise NotImplementedError

    cdef int touch(self, const uint8_t *k, size_t kl, uint32_t h, int64_t ts) except -1:
        raise NotImplementedError

    cdef int append(self, const uint8_t *k, size_t kl, uint32_t h, const uint8_t *v, size_t vl,
                    int64_t ts) except -1:
        raise NotImplementedError

    cdef int mget(self, const uint8_t *p, size_t pl, uint32_t ph, const uint8_t *uk, size_t ukl,
                  const uint8_t **v, size_t *vl, int64_t *ts) except -1:
        raise NotImplementedError

    cdef int mput(self, const uint8_t *p, size_t pl, uint32_t ph, const uint8_t *uk, size_t ukl,
                  const uint8_t *v, size_t vl, int64_t ts) except -1:
        raise NotImplementedError

    cdef int mremove(self, const uint8_t *p, size_t pl, uint32_t ph, const uint8_t *uk, size_t ukl) except -1:
        raise NotImplementedError

    cdef int mtouch(self, const uint8_t *p, size_t pl, uint32_t ph, const uint8_t *uk, size_t ukl,
                    int64_t ts) except -1:
        raise NotImplementedError

    cdef list mitems(self, const uint8_t *p, size_t pl, uint32_t ph):
        """[(user key bytes, value bytes, ts)] of one map, in storage order."""
        raise NotImplementedError

    cdef int mclear(self, const uint8_t *p, size_t pl, uint32_t ph) except -1:
        raise NotImplementedError

    cdef list key_bytes(self, const uint8_t *ns, size_t nsl):
        """Serialized current keys with an entry in namespace ns."""
        raise NotImplementedError

    cdef size_t count(self):
        raise NotImplementedError

    cdef size_t nbytes(self):
        raise NotImplementedError

    cdef long cleanup(self, size_t n, int64_t ttl, int64_t now, int layout, sc_buf *scratch) except -1:
        """Visit up to n stored entries, drop expired ones; return how many were dropped."""
        raise NotImplementedError

    cdef void release(self) noexcept:
        pass

    cdef long long snapshot(self, SnapshotSink sink) except -1:
        raise NotImplementedError(f"{type(self).__name__} cannot take snapshots yet")

    cdef long long snapshot_split(self, SnapshotSink sink, SnapshotSink second) except -1:
        """snapshot() into two sinks over the same key groups, on two threads where the table can (large
        tables of the LMDB tier: a half of the key groups each); by default all of it into sink."""
        return self.snapshot(sink)

    cdef object consistent_copy(self):
        raise NotImplementedError(f"{type(self).__name__} cannot take snapshots yet")

    cdef int restamp(self, int64_t ts, int layout) except -1:
        raise NotImplementedError(f"{type(self).__name__} cannot migrate TTL yet")

    cdef int reserve(self, size_t n) except -1:
        return 0

    cdef void prefetch(self, uint32_t h) noexcept:
        pass

    cdef int put_batch(self, const uint8_t *keys, size_t kw, size_t kl, const uint32_t *hs, Py_ssize_t m,
                       const uint8_t *vals, size_t vl, int64_t ts) except -1:
        """``put`` of m fixed-width keys/values in order (see _states.pxd); tables may override it."""
        cdef Py_ssize_t j
        for j in range(m):
            self.put(keys + j * kw, kl, hs[j], vals + j * vl, vl, ts)
        return 0

    cdef int get_batch(self, const uint8_t *keys, size_t kw, size_t kl, const uint32_t *hs, Py_ssize_t m,
                       uint8_t *vals, size_t vl, int64_t *tss, uint8_t *found) except -1:
        """``get`` of m fixed-width keys, values copied out (see _states.pxd); tables may override it."""
        cdef Py_ssize_t j
        cdef const uint8_t *v
        cdef size_t n
        for j in range(m):
            if not self.get(keys + j * kw, kl, hs[j], &v, &n, &tss[j]):
                found[j] = 0
            elif n != vl:
                found[j] = 2
            else:
                memcpy(vals + j * vl, v, vl)
                found[j] = 1
        return 0


cdef int heap_snapshot(sc_table *t, SnapshotSink sink, size_t lo, size_t hi, long long *count) noexcept nogil:
    """Pass the entries in slots [lo, hi) of t to sink."""
    cdef size_t pos = lo, ipos
    cdef sc_entry *e
    cdef sc_entry *m
    cdef sc_table *inner
    cdef int rc
    while True:
        e = sc_table_next(t, &pos)
        if e is NULL or pos > hi:  # pos is one past the slot of e
            return 0
        if t.nested:
            inner = sc_entry_inner(e)
            ipos = 0
            while True:
                m = sc_table_next(inner, &ipos)
                if m is NULL:
                    break
                rc = sink.add(sc_entry_key(e), e.klen, sc_entry_key(m), m.klen, sc_entry_value(m), m.vlen, m.ts)
                if rc:
                    return rc
                count[0] += 1
        else:
            rc = sink.add(sc_entry_key(e), e.klen, NULL, 0, sc_entry_value(e), e.vlen, e.ts)
            if rc:
                return rc
            count[0] += 1


cdef size_t heap_record_bytes(sc_table *t) noexcept nogil:
    """About the snapshot bytes of a flat table's entries (0 for nested tables: unknown without a walk)."""
    cdef size_t slots = (t.mask + 1) * sizeof(sc_entry)
    if t.nested or t.bytes < slots + sizeof(sc_table):
        return 0
    # Inline entries are at most SC_INLINE_BYTES of key + value; blocks are counted in t.bytes.
    return t.count * (24 + 2 + 8) + (t.bytes - slots - sizeof(sc_table))


cdef class HeapStateTable(StateTable):
    """The heap backend's storage: one C hash table per state (nested for MapState).

    ``t`` is the table; ``cursor`` the incremental-cleanup position (round robin over slots).
    """

    def __cinit__(self, bint nested):
        self.t = sc_table_new(16, nested)
        if self.t is NULL:
            raise MemoryError()

    def __dealloc__(self):
        sc_table_free(self.t)
        self.t = NULL

    cdef void release(self) noexcept:
        sc_table_free(self.t)
        self.t = NULL

    cdef int get(self, const uint8_t *k, size_t kl, uint32_t h, const uint8_t **v, size_t *vl,
                 int64_t *ts) except -1:
        cdef sc_entry *e = sc_table_find(self.t, k, kl, h)
        if e is NULL:
            return 0
        v[0] = sc_entry_value(e)
        vl[0] = e.vlen
        ts[0] = e.ts
        return 1

    cdef int put(self, const uint8_t *k, size_t kl, uint32_t h, const uint8_t *v, size_t vl,
                 int64_t ts) except -1:
        return check(sc_table_put(self.t, k, kl, h, v, vl, ts, NULL))

    cdef int remove(self, const uint8_t *k, size_t kl, uint32_t h) except -1:
        return sc_table_delete(self.t, k, kl, h)

    cdef int touch(self, const uint8_t *k, size_t kl, uint32_t h, int64_t ts) except -1:
        cdef sc_entry *e = sc_table_find(self.t, k, kl, h)
        if e is not NULL:
            e.ts = ts
        return 0

    cdef int append(self, const uint8_t *k, size_t kl, uint32_t h, const uint8_t *v, size_t vl,
                    int64_t ts) except -1:
        return check(sc_table_append(self.t, k, kl, h, v, vl, ts))

    cdef sc_table *inner(self, const uint8_t *p, size_t pl, uint32_t ph, int create) except? NULL:
        cdef sc_status st = SC_OK
        cdef sc_table *t = sc_table_get_inner(self.t, p, pl, ph, create, &st)
        check(st)
        return t

    cdef int mget(self, const uint8_t *p, size_t pl, uint32_t ph, const uint8_t *uk, size_t ukl,
                  const uint8_t **v, size_t *vl, int64_t *ts) except -1:
        cdef sc_table *t = self.inner(p, pl, ph, 0)
        if t is NULL:
            return 0
        cdef sc_entry *e = sc_table_find(t, uk, ukl, sc_table_hash(uk, ukl))
        if e is NULL:
            return 0
        v[0] = sc_entry_value(e)
        vl[0] = e.vlen
        ts[0] = e.ts
        return 1

    cdef int mput(self, const uint8_t *p, size_t pl, uint32_t ph, const uint8_t *uk, size_t ukl,
                  const uint8_t *v, size_t vl, int64_t ts) except -1:
        cdef sc_table *t = self.inner(p, pl, ph, 1)
        cdef sc_status st = sc_table_put(t, uk, ukl, sc_table_hash(uk, ukl), v, vl, ts, NULL)
        if st != SC_OK and t.count == 0:
            sc_table_delete(self.t, p, pl, ph)  # do not leave an empty map behind a failed put
        return check(st)

    cdef int mremove(self, const uint8_t *p, size_t pl, uint32_t ph, const uint8_t *uk, size_t ukl) except -1:
        cdef sc_table *t = self.inner(p, pl, ph, 0)
        if t is NULL:
            return 0
        cdef int removed = sc_table_delete(t, uk, ukl, sc_table_hash(uk, ukl))
        if t.count == 0:
            sc_table_delete(self.t, p, pl, ph)  # an empty map is no map: get_keys must not list it
        return removed

    cdef int mtouch(self, const uint8_t *p, size_t pl, uint32_t ph, const uint8_t *uk, size_t ukl,
                    int64_t ts) except -1:
        cdef sc_table *t = self.inner(p, pl, ph, 0)
        cdef sc_entry *e
        if t is not NULL:
            e = sc_table_find(t, uk, ukl, sc_table_hash(uk, ukl))
            if e is not NULL:
                e.ts = ts
        return 0

    cdef list mitems(self, const uint8_t *p, size_t pl, uint32_t ph):
        cdef sc_table *t = self.inner(p, pl, ph, 0)
        cdef size_t pos = 0
        cdef sc_entry *e
        out = []
        if t is NULL:
            return out
        while True:
            e = sc_table_next(t, &pos)
            if e is NULL:
                return out
            out.append((as_bytes(sc_entry_key(e), e.klen), as_bytes(sc_entry_value(e), e.vlen), e.ts))

    cdef int mclear(self, const uint8_t *p, size_t pl, uint32_t ph) except -1:
        return sc_table_delete(self.t, p, pl, ph)

    cdef list key_bytes(self, const uint8_t *ns, size_t nsl):
        cdef size_t pos = 0
        cdef sc_entry *e
        cdef sc_kc_parts parts
        out = []
        while True:
            e = sc_table_next(self.t, &pos)
            if e is NULL:
                return out
            check(sc_kc_parse(sc_entry_key(e), e.klen, &parts))
            if parts.nslen == nsl and (nsl == 0 or parts.ns[0] == ns[0]) and \
                    as_bytes(parts.ns, parts.nslen) == as_bytes(ns, nsl):
                out.append(as_bytes(parts.key, parts.klen))

    cdef size_t count(self):
        return sc_table_count_deep(self.t)

    cdef size_t nbytes(self):
        return sc_table_bytes_deep(self.t)

    cdef long cleanup(self, size_t n, int64_t ttl, int64_t now, int layout, sc_buf *scratch) except -1:
        cdef size_t i, cap = self.t.mask + 1
        cdef long dropped = 0
        cdef sc_entry *e
        if self.t.count == 0:
            return 0
        if layout == LAYOUT_VALUE:
            return sc_table_expire_scan(self.t, &self.cursor, n, ttl, now)
        for i in range(min(n, cap)):
            e = sc_table_slot(self.t, self.cursor)
            if e is not NULL:
                if layout == LAYOUT_VALUE:
                    if sc_ttl_expired(e.ts, ttl, now):
                        sc_table_delete_entry(self.t, e)
                        dropped += 1
                        continue  # backward shift may have moved an unvisited entry here
                elif layout == LAYOUT_LIST:
                    dropped += self._clean_list(e, ttl, now, scratch)
                else:
                    dropped += self._clean_map(e, ttl, now)
            self.cursor = (self.cursor + 1) & self.t.mask
        return dropped

    cdef long long snapshot(self, SnapshotSink sink) except -1:
        return self.snapshot_part(sink, 0, self.t.mask + 1, 1)

    cdef long long snapshot_part(self, SnapshotSink sink, size_t lo, size_t hi, int parts) except -1:
        """Entries in slots [lo, hi) (one of ``parts`` equal parts) to sink, with the GIL released."""
        cdef long long n = 0
        cdef int rc
        with nogil:
            rc = sink.presize(heap_record_bytes(self.t) // <size_t>parts)
            if rc == 0:
                rc = heap_snapshot(self.t, sink, lo, hi, &n)
        sink.check(rc)
        return n

    cdef void prefetch(self, uint32_t h) noexcept:
        sc_table_prefetch(self.t, h)

    cdef int reserve(self, size_t n) except -1:
        # Sizing the table once avoids rehashing it log2(n) times while a restore inserts.
        return check(sc_table_reserve(self.t, self.t.count + n))

    cdef object consistent_copy(self):
        cdef HeapStateTable c = HeapStateTable.__new__(HeapStateTable, self.t.nested)
        sc_table_free(c.t)
        c.t = sc_table_clone(self.t)
        if c.t is NULL:
            raise MemoryError("statecore: out of memory while copying state for an asynchronous checkpoint")
        return c

    cdef int restamp(self, int64_t ts, int layout) except -1:
        cdef size_t pos = 0, ipos
        cdef sc_entry *e
        cdef sc_entry *m
        while True:
            e = sc_table_next(self.t, &pos)
            if e is NULL:
                return 0
            if self.t.nested:
                ipos = 0
                while True:
                    m = sc_table_next(sc_entry_inner(e), &ipos)
                    if m is NULL:
                        break
                    m.ts = ts
            else:
                e.ts = ts
                if layout == LAYOUT_LIST:
                    restamp_blob(sc_entry_value(e), sc_entry_value(e) + e.vlen, ts)

    cdef long _clean_list(self, sc_entry *e, int64_t ttl, int64_t now, sc_buf *scratch) except -1:
        cdef const uint8_t *p = sc_entry_value(e)
        cdef const uint8_t *end = p + e.vlen
        cdef const uint8_t *el = NULL
        cdef size_t ell = 0
        cdef int64_t ts = 0
        cdef long dropped = 0
        scratch.len = 0
        while next_record(&p, end, &ts, &el, &ell):
            if sc_ttl_expired(ts, ttl, now):
                dropped += 1
            else:
                append_record(scratch, ts, el, ell)
        if dropped:
            if scratch.len == 0:
                sc_table_delete_entry(self.t, e)
            else:
                # The kept records are never longer than the blob: rewrite it in place
                # (a put could grow the table under a key pointer that aliases the slot).
                memcpy(sc_entry_value(e), scratch.data, scratch.len)
                e.vlen = <uint32_t>scratch.len
        return dropped

    cdef long _clean_map(self, sc_entry *e, int64_t ttl, int64_t now) except -1:
        cdef sc_table *t = sc_entry_inner(e)
        cdef size_t pos = 0
        cdef sc_entry *m
        cdef long dropped = 0
        while True:
            m = sc_table_next(t, &pos)
            if m is NULL:
                break
            if sc_ttl_expired(m.ts, ttl, now):
                sc_table_delete_entry(t, m)
                dropped += 1
                pos -= 1  # the backward shift may have moved an unvisited entry into this slot
        if t.count == 0:
            sc_table_delete_entry(self.t, e)
        return dropped



# ------------------------------------------------------------------ snapshot entry points

#: Tables with at least this many entries are serialized by two threads (see snapshot_table).
PARALLEL_SNAPSHOT_ENTRIES = 1 << 16


def snapshot_table(StateTable table, SnapshotSink sink, SnapshotSink second=None):
    """Pass every entry of ``table`` to ``sink``; returns the count.

    Heap tables are serialized with the GIL released.  With ``second`` (a sink
    over the same key groups), a large heap table is split into two halves of
    its slot array and the second half is serialized into ``second`` by a helper
    thread at the same time: the table is only read, and each thread owns its
    sink.  The caller must not change the table meanwhile (checkpoint holds the
    backend; an asynchronous checkpoint serializes a private copy).  Other
    tables split as their ``snapshot_split`` does (the LMDB tier: by key group).
    """
    cdef HeapStateTable heap
    cdef size_t mid
    if second is None:
        return table.snapshot(sink)
    if not isinstance(table, HeapStateTable):
        return table.snapshot_split(sink, second)
    if (<HeapStateTable>table).t.count < PARALLEL_SNAPSHOT_ENTRIES:
        return table.snapshot(sink)
    heap = <HeapStateTable>table
    mid = (heap.t.mask + 1) // 2
    other = {}

    def second_half():
        try:
            other["n"] = heap.snapshot_part(second, mid, heap.t.mask + 1, 2)
        except BaseException as exc:  # re-raised in the caller's thread below
            other["error"] = exc

    helper = threading.Thread(target=second_half, name="statecore-snapshot", daemon=True)
    helper.start()
    try:
        n = heap.snapshot_part(sink, 0, mid, 2)
    finally:
        helper.join()
    if "error" in other:
        raise other["error"]
    return n + other["n"]


def reserve_entries(StateTable table, size_t n):
    """Hint that about n entries are about to be restored into ``table``."""
    table.reserve(n)


def prefault_tables(tables):
    """Fault in the slot arrays of the heap tables among ``tables`` (presized by reserve_entries), with
    the GIL released: restore runs it on a thread while it verifies the files' checksums, so the
    kernel zeroes the new arrays' pages in parallel instead of on the first insert into each page.
    Contents do not change; other tables are skipped.  No other thread may use the tables meanwhile."""
    cdef list heap = [t for t in tables if type(t) is HeapStateTable]
    cdef Py_ssize_t i, n = len(heap)
    cdef sc_table **ts = <sc_table **>malloc(max(n, 1) * sizeof(sc_table *))
    if ts is NULL:
        raise MemoryError()
    try:
        for i in range(n):
            ts[i] = (<HeapStateTable>heap[i]).t
        with nogil:
            for i in range(n):
                sc_table_prefault(ts[i])
    finally:
        free(ts)


def table_entries(StateTable table):
    """Entries stored in ``table`` (as counted by num_state_entries)."""
    return table.count()


def consistent_copy(StateTable table):
    """A copy of ``table`` as of now, to snapshot later from another thread (NotImplementedError if unsupported)."""
    return table.consistent_copy()


