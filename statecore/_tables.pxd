# cython: language_level=3
"""The storage interface states are written against (implemented in _tables.pyx and _lmdb.pyx).

A ``StateTable`` stores one state's entries under composite keys (see
csrc/sc_keycodec.h).  The heap backend's implementation is HeapStateTable in
_tables.pyx; the LMDB tier provides its own.  Contract of every method:

* ``k``/``p`` is the (state, key, namespace) prefix and ``h``/``ph`` its
  ``sc_table_hash``; ``uk`` is a serialized map user key.
* ``get``/``mget`` return 1 and set ``*v, *vl, *ts`` when found, else 0; the
  pointer stays valid until the next call on the table.
* ``remove``/``mremove`` return 1 when something was removed.
* ``append`` appends bytes to the value (ListState records), creating it.
* ``mitems`` returns ``[(user key bytes, value bytes, ts)]``; ``key_bytes``
  the serialized keys with an entry in a namespace.
* ``cleanup`` visits up to n entries and drops expired ones (returns the count);
  ``layout`` is 0 value, 1 list blob, 2 map.
* ``snapshot`` passes every stored entry to ``sink.add`` (map entries as
  prefix + user key, lists as their record blob) and returns the number of
  entries passed; it must not change the table.  ``consistent_copy`` returns a
  table (or any object whose ``snapshot`` works later, from another thread)
  holding this table's entries as of now, for asynchronous checkpoints.
* ``reserve`` is a hint that about n more (key, namespace) entries are coming (restore);
  ``prefetch`` a hint that the entry of hash ``h`` is about to be written (restore).
* ``restamp`` sets the timestamp of every entry (and list record) to ``ts``
  (TTL switched on or off at restore, as Flink 2.2 migrates).
* ``put_batch``/``get_batch`` (ValueState batch fast path): ``m`` keys of
  length ``kl`` at ``keys + j * kw`` with hashes ``hs[j]``; values of exactly
  ``vl`` bytes at ``vals + j * vl``.  ``put_batch`` is ``put`` of each in order;
  ``get_batch`` copies each found value out and sets ``found[j]`` to 1 (found,
  ``tss[j]`` its ts), 0 (absent) or 2 (stored value not ``vl`` bytes).  The
  defaults loop over ``put``/``get``; TTL rules are the caller's.
"""
from libc.stdint cimport int64_t, uint8_t, uint32_t

from statecore._csrc cimport sc_buf, sc_entry, sc_table
from statecore._sink cimport SnapshotSink


cdef int next_record(const uint8_t **pp, const uint8_t *end, int64_t *ts, const uint8_t **e, size_t *el) except -1


cdef class StateTable:
    cdef int get(self, const uint8_t *k, size_t kl, uint32_t h, const uint8_t **v, size_t *vl,
                 int64_t *ts) except -1
    cdef int put(self, const uint8_t *k, size_t kl, uint32_t h, const uint8_t *v, size_t vl,
                 int64_t ts) except -1
    cdef int remove(self, const uint8_t *k, size_t kl, uint32_t h) except -1
    cdef int touch(self, const uint8_t *k, size_t kl, uint32_t h, int64_t ts) except -1
    cdef int append(self, const uint8_t *k, size_t kl, uint32_t h, const uint8_t *v, size_t vl,
                    int64_t ts) except -1
    cdef int mget(self, const uint8_t *p, size_t pl, uint32_t ph, const uint8_t *uk, size_t ukl,
                  const uint8_t **v, size_t *vl, int64_t *ts) except -1
    cdef int mput(self, const uint8_t *p, size_t pl, uint32_t ph, const uint8_t *uk, size_t ukl,
                  const uint8_t *v, size_t vl, int64_t ts) except -1
    cdef int mremove(self, const uint8_t *p, size_t pl, uint32_t ph, const uint8_t *uk, size_t ukl) except -1
    cdef int mtouch(self, const uint8_t *p, size_t pl, uint32_t ph, const uint8_t *uk, size_t ukl,
                    int64_t ts) except -1
    cdef list mitems(self, const uint8_t *p, size_t pl, uint32_t ph)
    cdef int mclear(self, const uint8_t *p, size_t pl, uint32_t ph) except -1
    cdef list key_bytes(self, const uint8_t *ns, size_t nsl)
    cdef size_t count(self)
    cdef size_t nbytes(self)
    cdef long cleanup(self, size_t n, int64_t ttl, int64_t now, int layout, sc_buf *scratch) except -1
    cdef void release(self) noexcept
    cdef long long snapshot(self, SnapshotSink sink) except -1
    cdef long long snapshot_split(self, SnapshotSink sink, SnapshotSink second) except -1
    cdef object consistent_copy(self)
    cdef int restamp(self, int64_t ts, int layout) except -1
    cdef int reserve(self, size_t n) except -1
    cdef void prefetch(self, uint32_t h) noexcept
    cdef int put_batch(self, const uint8_t *keys, size_t kw, size_t kl, const uint32_t *hs, Py_ssize_t m,
                       const uint8_t *vals, size_t vl, int64_t ts) except -1
    cdef int get_batch(self, const uint8_t *keys, size_t kw, size_t kl, const uint32_t *hs, Py_ssize_t m,
                       uint8_t *vals, size_t vl, int64_t *tss, uint8_t *found) except -1


cdef class HeapStateTable(StateTable):
    cdef sc_table *t
    cdef size_t cursor
    cdef sc_table *inner(self, const uint8_t *p, size_t pl, uint32_t ph, int create) except? NULL
    cdef long long snapshot_part(self, SnapshotSink sink, size_t lo, size_t hi, int parts) except -1
    cdef long _clean_list(self, sc_entry *e, int64_t ttl, int64_t now, sc_buf *scratch) except -1
    cdef long _clean_map(self, sc_entry *e, int64_t ttl, int64_t now) except -1
