# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The LMDB spill tier's storage: C write buffers (memtables) in front of LMDB.

LMDB is used through its C API: LMDB 0.9.36 is vendored in csrc/lmdb/ (py-lmdb
3.0.0's copy with py-lmdb's patches, the same code and file format as py-lmdb's
default engine), built as a static library and wrapped by statecore._mdb, which
mirrors the subset of py-lmdb this module used before (``lmdb.open``,
``Environment``/``Transaction``/``Cursor``, the exception classes; imported here
as ``lmdb``).  Why: through py-lmdb every record cost a C call that released and
re-took the GIL, plus two bytes objects and a tuple; the per-record paths now
run in C on pointers into LMDB's map instead: point reads (``lmdb_lookup``: the
record is found and parsed in place, only the value is copied out), the
checkpoint scan (``scan_live``: a C cursor), flushes and so restores (keys and
records encoded into one C arena, applied by one GIL-free call, MDB_APPEND while
the keys land past LMDB's last key) and incremental TTL cleanup (a C cursor).
The hot path in front of LMDB (write buffer lookups and writes, the read cache)
is pure C (csrc/sc_table.c).

Design (RocksDB's memtables + block cache in front of sorted storage):

* :class:`LMDBStore` is one per keyed backend: one LMDB environment
  (``writemap=False``; ``sync`` off by default, working state is scratch), one
  *active* C ``sc_table`` write buffer shared by all states, and up to
  ``max_write_buffer_number - 1`` *immutable* buffers waiting to be flushed.
  A buffer entry is keyed by the full composite key (csrc/sc_keycodec.h); its
  value is the value bytes alone; its ``ts`` holds the TTL timestamp in the low
  56 bits (sign-extended: +-2**55 ms) and the flag byte (tombstone / put / list
  append-delta, plus a "list state" bit) in the top 8, so a 16-byte key + an
  8-byte value (24 bytes) is stored inline in the slot (csrc/sc_table.h).
* When the active buffer (its bytes plus the map-prefix index's estimated
  bytes) exceeds ``write_buffer_size`` it becomes immutable and a background
  thread flushes it to LMDB, sorted by key, tombstones as deletes, in write
  transactions of at most ``txn_entries`` entries (without MDB_WRITEMAP LMDB
  keeps every dirty page of a transaction in malloc'd memory).  The GIL is
  released while LMDB writes (a transaction's writes, its commit).  The caller stalls (``stalls`` metric)
  only when all ``max_write_buffer_number`` buffers are full.  Buffers are
  retired (freed) by the caller's thread only: the flush thread never frees or
  moves memory the caller may point into; it only flips an entry's flag byte
  (drop-at-flush) under the GIL.
* ``MapFullError`` in the flush thread: the transaction is aborted, the flush
  thread asks the caller's thread (at its next operation, or while it stalls)
  to double the map with no transaction open, then retries: users never see it.
* Other flush failures (a full disk, an I/O error, MDB_PANIC) are not sticky:
  the buffer is kept with its progress and retried (resuming after its
  committed transactions); the caller gets one ``LMDBFlushError`` naming the
  directory and what to do, reads keep working, writes are refused only when
  the buffers are full.  ``LMDBStore.flush`` documents the rules and limits.
* Reads: active buffer, immutable buffers newest first, the bounded read
  cache (``cache_entries``: composite key -> LMDB record, invalidated by every
  buffer write of that key), then LMDB through one long-lived read
  transaction, renewed whenever a flushed buffer is retired (until then the
  immutable buffer holds everything the old snapshot lacks).
* TTL drop-at-flush (Flink's compaction-filter cleanup): a state whose TTL
  config has ``cleanup_in_background`` gives its table the TTL; the flush
  drops that state's expired entries (list: expired elements) that are the
  newest version of their key, counting them in ``ttl_expired``.
* LMDB record: key = the composite key when it is at most 480 bytes, else its
  first 400 bytes + sha256(full key) (LMDB keys are at most 511 bytes); value
  = ``flags | BE64 ts | [varint len | full key when hashed] | value``.  A
  hashed record's full key is checked on every read.
* ListState.add is a merge operator: an append to a list that is not in the
  active buffer stores an append-delta (only the new records) in the buffer;
  a flush writes a delta as its own LMDB record under ``lmdb key | BE64 seq``
  (flag V_DELTA).  Reads concatenate base + LMDB deltas + buffer deltas; a
  list put/clear deletes the deltas.  The stored list is never rewritten by add.
* ``get_keys`` streams (:class:`LMDBKeyScan`): the state's buffered keys of
  the namespace (keys only, sorted) merged with an LMDB cursor of its own read
  transaction, read in chunks; values are never copied.  Map resizes and
  environment reopens detach live scans (the rest of their keys is spooled to
  a temporary file), so a scan never blocks the store.
* A map (state, key, namespace) is one contiguous key range: ``mitems`` merges
  an LMDB cursor range with each buffer's entries of that prefix (indexed per
  prefix while they are in a buffer), newer tiers and tombstones winning.
* Entry counts (``num_state_entries``) are exact: every write checks whether
  the key exists (buffers, then LMDB; LMDB only once a buffer was ever frozen:
  until then it is empty and every read skips it too).  A key filter (2 bits
  per key, ~``write_buffer_size / 8`` bytes, set by the flush for every base
  record it writes, never cleared) answers "LMDB has no record of this key"
  without a lookup, so a write of a new key costs no LMDB access while the
  filter is not saturated (reads do not consult it: most read keys exist, and
  for those the filter's cache miss would come on top of the lookup); a false positive (a
  set bit pair: another key, or a key deleted since) only costs the lookup, so
  counts stay exact.  Past ~``write_buffer_size / 2`` distinct flushed keys the
  filter fills up and writes degrade to the lookup they always did.
* ValueState batch ops (``put_batch``/``get_batch``) run a C loop over the
  active buffer (a live entry of the same size is overwritten in place); keys
  it does not hold take the single-key path (other buffers, cache, LMDB).
* Incremental TTL cleanup visits ``size`` LMDB records per state access, read
  ahead ``CLEANUP_CHUNK`` at a time in one cursor pass (dropped when the read
  transaction is renewed); unexpired records are skipped from their raw
  timestamp without touching the buffers.
* Asynchronous checkpoints (``consistent_copy``): the cut is an :class:`LMDBCut`, one per store per
  checkpoint (reused while nothing was written since): ``sc_table_clone`` copies of every buffer (bounded by
  write_buffer_size x max_write_buffer_number) + its own LMDB read transaction (opened with MDB_NOTLS, so
  the checkpoint thread may use it), released when the last state's snapshot is done or fails, or by close.
  LMDB append-deltas from the first sequence number of a buffer whose flush has started but which is not
  retired are skipped (the buffer holds them), in the cut and in live reads alike.  While a cut holds its
  transaction the map is not resized: a flush that fills it waits until the cut is released.
* Checkpoint scans (``scan_live``) walk LMDB with a C cursor without the GIL (``scan_range``); a state of at
  least PARALLEL_SCAN_ENTRIES entries is scanned by two threads, half of the key groups each with a read
  transaction of its own, into two snapshot sinks (``snapshot_split``).
* Restore (``bulk_load``): the first section of each key group goes straight into LMDB, encoded without
  the GIL while a writer thread commits the previous batch (no write buffer, no flush-time sort, memory
  bounded by two batches); incremental deltas are replayed through the write buffers after their base.
* Fork: any use in a forked child raises StateError, and the at-fork hook
  keeps the child from ever closing the inherited environment.
"""
cimport cython
from cpython.bytearray cimport PyByteArray_AS_STRING
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, qsort, realloc
from libc.string cimport memcmp, memcpy, memset
from posix.unistd cimport getpid

from statecore._csrc cimport (SC_OK, SC_PREFETCH, SC_VARINT_MAX, sc_be16_get, sc_be16_put, sc_be64_get, sc_be64_put, sc_buf, sc_buf_free,
                              sc_buf_reserve, sc_entry, sc_entry_key, sc_entry_value, sc_kc_parse, sc_kc_parts,
                              sc_now_ms, sc_table, sc_table_append, sc_table_clone, sc_table_delete,
                              sc_table_delete_entry, sc_table_find, sc_table_free, sc_table_hash, sc_table_new, sc_table_next,
                              sc_table_prefetch, sc_table_put, sc_table_slot, sc_ttl_expired, sc_varint_get, sc_varint_put)
from statecore._records cimport (REC_TOMBSTONE, as_bytes, buf_init, filter_list_blob, read_data_record, record_kind,
                                reserve, restamp_blob, section_record)
from statecore._states cimport SnapshotSink, StateTable, raise_record_problem, section_state
from statecore._status cimport check
from statecore._mdb cimport MDB_OP_DEL, MDB_OP_DEL_SUFFIXED, MDB_OP_PUT, Cursor, MDB_val, Transaction, mdb_op

import errno
import hashlib
import io
import os
import threading
import time
import weakref

from statecore import _mdb as lmdb  # LMDB C API (vendored), named as py-lmdb was

from statecore.errors import CorruptCheckpointError, StateError

cdef enum:
    FLAG_TOMB = 0
    FLAG_PUT = 1
    FLAG_MERGE = 2         # list append-delta: records appended to the older version
    FLAG_KIND = 3          # mask of the three above
    FLAG_LIST = 0x80       # the entry belongs to a list state (its put/tombstone also drops LMDB deltas)
    MAX_DIRECT_KEY = 480   # composite keys up to this length are LMDB keys as they are
    HASHED_HEAD = 400      # longer ones: their first 400 bytes + sha256 (432 bytes)
    V_HASHED = 1           # LMDB value flag: the full composite key follows the timestamp
    V_DELTA = 2            # LMDB value flag: a list append-delta (LMDB key = base key + BE64 seq)
    LAYOUT_VALUE = 0
    LAYOUT_LIST = 1
    LAYOUT_MAP = 2
    MT_PENDING = 0
    MT_FLUSHING = 1
    MT_DONE = 2
    MT_FAILED = 3            # its flush failed: kept (with its progress) until a retry succeeds
    PREFETCH_AHEAD = 16      # batch loops prefetch the slot of the key this many ahead: about the misses a
                             # core keeps in flight (prefetching a whole block at once overflows them)
    CLEANUP_CHUNK = 128      # LMDB records incremental cleanup reads ahead per cursor pass
    SORT_RUN = 8192          # a flush sorts its buffer in runs of this many entries (then merges them)
    PARALLEL_SCAN_ENTRIES = 1 << 16  # a state with this many entries is scanned by two threads (snapshot_split)
    BULK_BATCH_BYTES = 512 << 10     # a restore's bulk load writes LMDB transactions of about this size

cdef uint64_t NO_FLOOR = 0xFFFFFFFFFFFFFFFFULL
RETRY_DELAY = 0.5  # seconds after a failed flush before an ordinary operation retries it in the background

# Negative control for the model-based tests (RELIABILITY.md: every harness ships one): with
# STATECORE_DEBUG_DROP_FLUSH_TOMBSTONES=1 in the environment at import time, a flush skips the LMDB delete of
# a tombstone (a removed value, list or map entry comes back once its buffer is retired).  Never set it
# outside tests/test_model_checkpoint_stateful.py's negative control.
cdef bint _DEBUG_DROP_FLUSH_TOMBSTONES = os.environ.get("STATECORE_DEBUG_DROP_FLUSH_TOMBSTONES") == "1"

# Test hook (never set in production): make flush commits fail, see _debug_flush_faults.
_FAULTS = None


def _debug_flush_faults(after=0, count=1, kind="ENOSPC"):
    """Tests only: the flush commits number ``after`` .. ``after + count - 1`` (0-based, counted from now, in
    every store of this process) fail.  ``kind``: ``"ENOSPC"`` raises lmdb.DiskError instead of committing (as a
    full disk does); ``"EIO"`` raises lmdb.Error(EIO) instead of committing; ``"PANIC"`` raises lmdb.PanicError
    instead of committing and ``"PANIC_COMMITTED"`` commits, then raises lmdb.PanicError (LMDB's meta-page
    write failing before / after it reached the disk: the environment is reopened and the commit resolved by
    its transaction id).  ``_debug_flush_faults(count=0)`` clears it."""
    global _FAULTS
    if kind not in ("ENOSPC", "EIO", "PANIC", "PANIC_COMMITTED"):
        raise ValueError(f"unknown fault kind {kind!r}")
    _FAULTS = [int(after), int(count), kind] if count > 0 else None


cdef object debug_fault():
    """The fault kind for this flush commit, or None (advances the _FAULTS schedule)."""
    global _FAULTS
    f = _FAULTS
    if f is None:
        return None
    if f[0] > 0:
        f[0] -= 1
        return None
    f[1] -= 1
    if f[1] <= 0:
        _FAULTS = None
    return f[2]


# Test hook (never set in production): the crash test's kill points in the flush path, see _set_crash_hook.
cdef object _crash_hook = None
cdef bint _crash_armed = False


def _set_crash_hook(hook):
    """Tests only (tests/crash_writer.py): call ``hook(event)`` in the flush thread at ``"wb.spill"`` (a write
    buffer's flush starts) and ``"lmdb.commit"`` (right before each LMDB write-transaction commit of a flush).
    ``None`` clears it.  Returns the previous hook."""
    global _crash_hook, _crash_armed
    previous, _crash_hook = _crash_hook, hook
    _crash_armed = hook is not None
    return previous

class LMDBFlushError(StateError):
    """A flush of the write buffers to LMDB (or a read of the LMDB environment) failed; the message names the
    directory and what to do.  Not sticky: see ``LMDBStore.flush`` for the retry rules."""


class MapGrowError(StateError):
    """Raised in the flush thread when the caller's thread could not grow the LMDB map."""


_STORES = weakref.WeakSet()
_LEAKED = []  # environments inherited by a forked child: never closed there


def _after_fork_in_child():
    for st in list(_STORES):
        (<LMDBStore>st).forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


cdef object read_failed(str path, object e, str what):
    """The LMDBFlushError for a failed LMDB read transaction begin (``what``: what it was for)."""
    if isinstance(e, lmdb.ReadersFullError):
        fix = "too many LMDB read transactions are open: raise max_readers"
    elif isinstance(e, lmdb.PanicError):
        fix = ("LMDB marked the environment failed (a meta-page write failed: check the disk); it is reopened by "
               "the next operations once no checkpoint holds a read transaction, and until then values only "
               "LMDB holds cannot be read")
    else:
        fix = "check the disk holding it"
    return LMDBFlushError(f"statecore: cannot read the LMDB environment {path!r}{what}: {type(e).__name__}: {e}. "
                          f"To fix: {fix}.")


cdef int lmdb_lookup(Transaction txn, const uint8_t *k, size_t kl, MDB_val *raw) except -1:
    """Look up the LMDB record of composite key k in txn by pointer (no Python object for a direct key): 1 with
    *raw -> the record in the map (valid until txn ends), 0 when there is none.

    Long keys are stored under a hashed key with the full key in the record: verify it.
    """
    cdef int64_t ts
    cdef const uint8_t *fk
    cdef const uint8_t *v
    cdef size_t fkl, vl
    if kl <= MAX_DIRECT_KEY:
        return txn.cget(k, kl, raw)
    lk = lmdb_key(k, kl)
    if not txn.cget(<const uint8_t *>PyBytes_AS_STRING(lk), <size_t>PyBytes_GET_SIZE(lk), raw):
        return 0
    parse_raw(<const uint8_t *>raw.mv_data, raw.mv_size, &ts, &fk, &fkl, &v, &vl)
    if fk is NULL or fkl != kl or memcmp(fk, k, kl) != 0:
        raise StateError("statecore: LMDB hashed-key collision (sha256); the stored record belongs to "
                         "another key")
    return 1


cdef long filter_records(const uint8_t *v, size_t vl, int64_t ttl, int64_t now, sc_buf *out) except -1:
    """Copy the unexpired list records of v into out; return how many were dropped."""
    cdef long long dropped = 0
    cdef int rc = filter_list_blob(v, v + vl, ttl, now, out, &dropped)
    if rc == -1:
        raise MemoryError("statecore: out of memory")
    if rc == -2:
        raise StateError("statecore: corrupt list state (malformed record)")
    return <long>dropped


# A buffer entry's flag lives in the top byte of its ts (TTL timestamps are ms: +-2**55 ms is a million
# years), so its value is the value alone: a 16-byte composite key + an 8-byte value stays inline.
cdef uint64_t TS_MASK = 0x00FFFFFFFFFFFFFFULL
cdef int64_t TS_MIN = -(1LL << 55)
cdef int64_t TS_MAX = (1LL << 55) - 1


cdef inline int64_t pack_ts(int flag, int64_t ts) noexcept:
    return <int64_t>((<uint64_t>(<uint8_t>flag) << 56) | (<uint64_t>ts & TS_MASK))


cdef inline uint8_t eflag(sc_entry *e) noexcept:
    """A buffer entry's flag byte."""
    return <uint8_t>((<uint64_t>e.ts) >> 56)


cdef inline int64_t ets(sc_entry *e) noexcept:
    """A buffer entry's timestamp (the low 56 bits, sign-extended)."""
    return (<int64_t>((<uint64_t>e.ts) << 8)) >> 8


cdef inline void set_flag(sc_entry *e, int flag) noexcept:
    e.ts = pack_ts(flag, ets(e))


cdef inline void set_ets(sc_entry *e, int64_t ts) noexcept:
    e.ts = pack_ts(eflag(e), ts)


cdef inline int kind(sc_entry *e) noexcept:
    return eflag(e) & FLAG_KIND


cdef inline const uint8_t *bval(sc_entry *e) noexcept:
    """The value bytes of a buffer entry."""
    return sc_entry_value(e)


cdef inline size_t bvlen(sc_entry *e) noexcept:
    return e.vlen


cdef inline int cmp_mem(const uint8_t *a, size_t al, const uint8_t *b, size_t bl) noexcept nogil:
    """LMDB's default key order (memcmp, then the shorter key first)."""
    cdef size_t m = al if al < bl else bl
    cdef int r = memcmp(a, b, m)
    if r:
        return r
    return (al > bl) - (al < bl)


cdef int cmp_entry(const void *a, const void *b) noexcept nogil:
    cdef sc_entry *ea = (<sc_entry **>a)[0]
    cdef sc_entry *eb = (<sc_entry **>b)[0]
    return cmp_mem(sc_entry_key(ea), ea.klen, sc_entry_key(eb), eb.klen)


cdef struct srec:          # a flush's sort record: the key's first 16 bytes (big-endian, zero-padded) + entry
    uint64_t k0
    uint64_t k1
    sc_entry *e


cdef inline uint64_t be_word(const uint8_t *k, size_t kl, size_t off) noexcept nogil:
    cdef uint8_t w[8]
    cdef size_t n
    if kl >= off + 8:
        return sc_be64_get(k + off)
    memset(w, 0, 8)
    if kl > off:
        n = kl - off
        memcpy(w, k + off, n)
    return sc_be64_get(w)


cdef inline int cmp_words(uint64_t a0, uint64_t a1, uint64_t b0, uint64_t b1) noexcept nogil:
    """Order of two keys by their first 16 bytes (be_word): 0 when those are equal (the full keys decide)."""
    if a0 != b0:
        return -1 if a0 < b0 else 1
    if a1 != b1:
        return -1 if a1 < b1 else 1
    return 0


cdef int cmp_srec(const void *a, const void *b) noexcept nogil:
    cdef const srec *ra = <const srec *>a
    cdef const srec *rb = <const srec *>b
    cdef int r = cmp_words(ra.k0, ra.k1, rb.k0, rb.k1)
    return r if r else cmp_entry(&ra.e, &rb.e)


cdef int sort_entries(sc_entry **arr, size_t n, const volatile int *stop) noexcept nogil:
    """Sort arr by key (cmp_entry order).  The keys' first 16 bytes are copied next to their entry pointers
    (no cache miss per comparison), then: qsort of SORT_RUN-record runs, bottom-up merge passes, checking *stop
    between runs and within merges (close() must not wait for the whole sort of a large buffer that will never
    be written).  0 when sorted; 1 when stopped (arr left as it was)."""
    cdef size_t i, lo, mid, hi, a, b, o, width
    cdef srec *recs
    cdef srec *src
    cdef srec *dst
    cdef srec *t
    cdef sc_entry *e
    if n <= 1:
        return 0
    recs = <srec *>malloc(2 * n * sizeof(srec))
    if recs is NULL:
        qsort(arr, n, sizeof(sc_entry *), cmp_entry)
        return 0
    for i in range(n):
        e = arr[i]
        recs[i].k0 = be_word(sc_entry_key(e), e.klen, 0)
        recs[i].k1 = be_word(sc_entry_key(e), e.klen, 8)
        recs[i].e = e
    src = recs
    dst = recs + n
    i = 0
    while i < n:
        if stop[0]:
            free(recs)
            return 1
        qsort(src + i, min(<size_t>SORT_RUN, n - i), sizeof(srec), cmp_srec)
        i += SORT_RUN
    width = SORT_RUN
    while width < n:
        lo = 0
        while lo < n:
            if stop[0]:
                free(recs)
                return 1
            mid = min(lo + width, n)
            hi = min(lo + 2 * width, n)
            a = lo
            b = mid
            o = lo
            while a < mid and b < hi:
                if cmp_srec(&src[b], &src[a]) < 0:
                    dst[o] = src[b]
                    b += 1
                else:
                    dst[o] = src[a]
                    a += 1
                o += 1
                if (o & 0xFFFF) == 0 and stop[0]:
                    free(recs)
                    return 1
            if a < mid:
                memcpy(dst + o, src + a, (mid - a) * sizeof(srec))
            if b < hi:
                memcpy(dst + o, src + b, (hi - b) * sizeof(srec))
            lo = hi
        t = src
        src = dst
        dst = t
        width *= 2
    for i in range(n):
        arr[i] = src[i].e
    free(recs)
    return 0


cdef bytes lmdb_key(const uint8_t *k, size_t kl):
    """The LMDB key of composite key k (hashed when longer than MAX_DIRECT_KEY)."""
    if kl <= MAX_DIRECT_KEY:
        return as_bytes(k, kl)
    full = as_bytes(k, kl)
    return full[:HASHED_HEAD] + hashlib.sha256(full).digest()


cdef int parse_raw(const uint8_t *p, size_t n, int64_t *ts, const uint8_t **fk, size_t *fkl, const uint8_t **v,
                   size_t *vl) except -1:
    """Split an LMDB value; *fk is NULL when the LMDB key is the composite key."""
    cdef int rc = split_raw(p, n, ts, fk, fkl, v, vl)
    if rc == -1:
        raise StateError("statecore: corrupt LMDB record (truncated)")
    if rc == -2:
        raise StateError("statecore: corrupt LMDB record (bad key length)")
    return 0


cdef int split_raw(const uint8_t *p, size_t n, int64_t *ts, const uint8_t **fk, size_t *fkl, const uint8_t **v,
                   size_t *vl) noexcept nogil:
    """parse_raw without the GIL: 0, or -1 truncated, -2 a bad key length."""
    cdef const uint8_t *end = p + n
    cdef uint64_t m = 0
    cdef size_t used
    if n < 9:
        return -1
    ts[0] = <int64_t>sc_be64_get(p + 1)
    if p[0] & V_HASHED:
        used = sc_varint_get(p + 9, end, &m)
        if used == 0 or m > <uint64_t>(end - p - 9 - used):
            return -2
        fk[0] = p + 9 + used
        fkl[0] = m
        p = p + 9 + used + m
    else:
        fk[0] = NULL
        fkl[0] = 0
        p += 9
    v[0] = p
    vl[0] = <size_t>(end - p)
    return 0


cdef inline int parse_record(bytes raw, int64_t *ts, const uint8_t **fk, size_t *fkl, const uint8_t **v,
                             size_t *vl) except -1:
    return parse_raw(<const uint8_t *>PyBytes_AS_STRING(raw), <size_t>PyBytes_GET_SIZE(raw), ts, fk, fkl, v, vl)


cdef bytes record_full_key(bytes lkey, bytes raw):
    """The composite key of an LMDB record (of the base list for an append-delta)."""
    cdef int64_t ts
    cdef const uint8_t *fk
    cdef const uint8_t *v
    cdef size_t fkl, vl
    parse_record(raw, &ts, &fk, &fkl, &v, &vl)
    if fk is not NULL:
        return as_bytes(fk, fkl)
    if (<const uint8_t *>PyBytes_AS_STRING(raw))[0] & V_DELTA:
        return lkey[:len(lkey) - 8]
    return lkey


cdef int append_list_base(const MDB_val *raw, sc_buf *out, int64_t *ts) except -1:
    """Append the list blob of an LMDB record (no append-deltas) to out; 1."""
    cdef const uint8_t *fk
    cdef const uint8_t *v
    cdef size_t fkl, vl
    parse_raw(<const uint8_t *>raw.mv_data, raw.mv_size, ts, &fk, &fkl, &v, &vl)
    reserve(out, vl)
    memcpy(out.data + out.len, v, vl)
    out.len += vl
    return 1


cdef int arena_key(sc_buf *a, const uint8_t *k, size_t kl, const uint8_t *suffix8, mdb_op *op) except -1:
    """Append the LMDB key of composite key k (+ the 8 bytes at suffix8 unless NULL) to arena a; op.koff/klen."""
    cdef size_t n = kl if kl <= MAX_DIRECT_KEY else HASHED_HEAD + 32
    reserve(a, n + 8)
    op.koff = a.len
    if kl <= MAX_DIRECT_KEY:
        memcpy(a.data + a.len, k, kl)
    else:
        lk = lmdb_key(k, kl)
        memcpy(a.data + a.len, PyBytes_AS_STRING(lk), n)
    a.len += n
    if suffix8 is not NULL:
        memcpy(a.data + a.len, suffix8, 8)
        a.len += 8
        n += 8
    op.klen = n
    return 0


cdef int arena_record(sc_buf *a, const uint8_t *k, size_t kl, const uint8_t *v, size_t vl, int64_t ts,
                      uint8_t flags, mdb_op *op) except -1:
    """Append the LMDB value of (k, v, ts, flags) to arena a and set op.voff/vlen.

    Layout: flags (| V_HASHED) | BE64 ts | [varint len | full key, when k is longer than MAX_DIRECT_KEY] | value.
    """
    cdef bint hashed = kl > MAX_DIRECT_KEY
    cdef uint8_t vint[SC_VARINT_MAX]
    cdef size_t nv = sc_varint_put(vint, kl) if hashed else 0
    cdef size_t n = 9 + (nv + kl if hashed else 0) + vl
    cdef uint8_t *p
    reserve(a, n)
    p = a.data + a.len
    op.voff = a.len
    op.vlen = n
    p[0] = flags | (V_HASHED if hashed else 0)
    sc_be64_put(p + 1, <uint64_t>ts)
    p += 9
    if hashed:
        memcpy(p, vint, nv)
        p += nv
        memcpy(p, k, kl)
        p += kl
    if vl:
        memcpy(p, v, vl)
    a.len += n
    return 0


cdef int llist_deltas(object txn, const uint8_t *k, size_t kl, sc_buf *out, int64_t *ts, uint64_t floor) except -1:
    """Append the LMDB list of k (base + append-deltas below sequence ``floor``, in order) to out; 1 when a base
    exists.  Deltas from ``floor`` on belong to a buffer that is still buffered (and holds them)."""
    cdef int64_t dts
    cdef const uint8_t *fk
    cdef const uint8_t *v
    cdef size_t fkl, vl
    cdef int found = 0
    cdef bytes lkey
    lk = lmdb_key(k, kl)
    cur = txn.cursor()
    if not cur.set_range(lk):
        return 0
    for lkey, raw in cur:
        if not lkey.startswith(lk) or (len(lkey) != len(lk) and len(lkey) != len(lk) + 8):
            break
        if len(lkey) != len(lk) and sc_be64_get(<const uint8_t *>PyBytes_AS_STRING(lkey) + len(lk)) >= floor:
            continue
        parse_record(raw, &dts, &fk, &fkl, &v, &vl)
        if fk is not NULL and (fkl != kl or memcmp(fk, k, kl) != 0):
            if len(lkey) == len(lk):
                raise StateError("statecore: LMDB hashed-key collision (sha256); the stored record belongs "
                                 "to another key")
            continue
        if len(lkey) == len(lk):
            found = 1
            ts[0] = dts
        elif not found:
            break  # deltas without a base: not a list of k
        reserve(out, vl)
        memcpy(out.data + out.len, v, vl)
        out.len += vl
    return found


cdef list range_items_in(object txn, bytes p):
    """[(full key, raw record)] of every LMDB record (in txn) whose composite key starts with p."""
    cdef bytes head = p[:HASHED_HEAD]
    out = []
    cur = txn.cursor()
    if not cur.set_range(head):
        return out
    for lkey, raw in cur:
        if not lkey.startswith(head):
            break
        fk = record_full_key(lkey, raw) if (<bytes>raw)[0] & V_HASHED else lkey
        if fk.startswith(p):
            out.append((fk, raw))
    return out


cdef list map_items_in(Transaction txn, bytes p):
    """[(user key part, value, ts)] of every LMDB record (in txn) whose composite key starts with map prefix p,
    sorted by composite key (one C cursor pass over the range, records parsed in place in the map)."""
    cdef int64_t ts
    cdef const uint8_t *fk
    cdef const uint8_t *v
    cdef const uint8_t *kp
    cdef const uint8_t *lk
    cdef size_t fkl, vl, kl, lkl
    cdef bytes head = p[:HASHED_HEAD]
    cdef const uint8_t *pp = <const uint8_t *>PyBytes_AS_STRING(p)
    cdef const uint8_t *hp = <const uint8_t *>PyBytes_AS_STRING(head)
    cdef size_t pl = <size_t>PyBytes_GET_SIZE(p)
    cdef size_t hl = <size_t>PyBytes_GET_SIZE(head)
    cdef bint hashed = False
    cdef list out = []
    cdef Cursor cur = txn.ccursor()
    cdef int ok = cur.cset_range(hp, hl)
    while ok:
        lk = <const uint8_t *>cur.key_.mv_data
        lkl = cur.key_.mv_size
        if lkl < hl or memcmp(lk, hp, hl) != 0:
            break
        parse_raw(<const uint8_t *>cur.val_.mv_data, cur.val_.mv_size, &ts, &fk, &fkl, &v, &vl)
        if fk is NULL:
            kp = lk
            kl = lkl
        else:
            kp = fk
            kl = fkl
            hashed = True  # LMDB orders it by its hashed key
        if kl >= pl and memcmp(kp, pp, pl) == 0:
            out.append((as_bytes(kp + pl, kl - pl), as_bytes(v, vl), ts))
        ok = cur.cnext()
    cur.kill()
    if hashed:
        out.sort(key=_first)
    return out


def _first(t):
    return t[0]


cdef inline void kf_add(uint8_t *kf, uint64_t mask, uint32_t h) noexcept nogil:
    """Set the key filter's two bits of composite key hash h (sc_table_hash)."""
    cdef uint64_t a = h & mask
    cdef uint64_t b = ((<uint64_t>h * 0x9E3779B97F4A7C15ULL) >> 29) & mask
    kf[a >> 3] |= <uint8_t>(1 << (a & 7))
    kf[b >> 3] |= <uint8_t>(1 << (b & 7))


cdef inline void kf_prefetch(const uint8_t *kf, uint64_t mask, uint32_t h) noexcept nogil:
    """Start loading the key filter's bytes for h (a write checks them after probing the buffers:
    the filter's cache miss then overlaps the buffers' instead of adding to them)."""
    SC_PREFETCH(&kf[(h & mask) >> 3])
    SC_PREFETCH(&kf[(((<uint64_t>h * 0x9E3779B97F4A7C15ULL) >> 29) & mask) >> 3])


cdef inline bint kf_maybe(const uint8_t *kf, uint64_t mask, uint32_t h) noexcept nogil:
    """0: no flush ever wrote a base record of a key with hash h, so LMDB has none (no lookup needed)."""
    cdef uint64_t a = h & mask
    cdef uint64_t b = ((<uint64_t>h * 0x9E3779B97F4A7C15ULL) >> 29) & mask
    return (kf[a >> 3] >> (a & 7)) & 1 and (kf[b >> 3] >> (b & 7)) & 1


cdef size_t map_prefix_len(const uint8_t *k, size_t kl) except? 0:
    """Length of the (state, key, namespace) prefix of a map entry's composite key."""
    cdef sc_kc_parts parts
    check(sc_kc_parse(k, kl, &parts))
    return <size_t>(parts.user_key - k)


@cython.final
cdef class Memtable:
    """One write buffer: a C table plus its map-prefix index."""
    cdef sc_table *t
    cdef sc_table *pidx       # map prefix -> its keys with an entry in this buffer: (varint length | user key
                              # part) records appended when the key enters the buffer (C; see LMDBStore.bput)
    cdef int state            # MT_PENDING / MT_FLUSHING / MT_DONE / MT_FAILED (only for immutable buffers)
    cdef bint started         # its flush started (LMDB may hold some of it): seq_lo is set
    cdef uint64_t seq_lo      # the first append-delta sequence number its flush used (set when it starts)
    cdef sc_entry **arr       # its entries sorted by key (built by the first flush attempt, kept for retries)
    cdef size_t narr
    cdef size_t done          # arr[:done] is committed to LMDB (a retry resumes there)
    cdef int64_t fail_tid     # a commit raised MDB_PANIC: that transaction's id (committed iff it is <= the
    cdef size_t fail_end      # environment's last txnid after the reopen), and the arr index it ended at

    def __cinit__(self):
        self.t = sc_table_new(16, 0)
        self.pidx = sc_table_new(16, 0)
        if self.t is NULL or self.pidx is NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.arr)
        self.arr = NULL
        sc_table_free(self.t)
        self.t = NULL
        sc_table_free(self.pidx)
        self.pidx = NULL

    cdef void release(self) noexcept:
        free(self.arr)
        self.arr = NULL
        self.narr = 0
        sc_table_free(self.t)
        self.t = NULL
        sc_table_free(self.pidx)
        self.pidx = NULL

    cdef inline size_t size(self) noexcept:
        return (self.t.bytes if self.t is not NULL else 0) + (self.pidx.bytes if self.pidx is not NULL else 0)


@cython.final
cdef class LMDBStore:
    """One per keyed backend: the LMDB environment, the write buffers, the read cache, the flush thread."""
    cdef Memtable act           # the active write buffer
    cdef sc_table *buf          # act.t (hot path)
    cdef list imm               # immutable buffers, oldest first
    cdef Py_ssize_t nimm
    cdef sc_buf scratch
    cdef sc_buf fscratch        # the flush thread's scratch
    cdef sc_buf farena          # the flush thread's LMDB keys and records of one write transaction
    cdef mdb_op *fops           # ... and its operations
    cdef size_t fops_cap
    cdef sc_table *cache        # read cache: composite key -> LMDB record value part (ts = record ts)
    cdef size_t cache_cap
    cdef size_t cache_bytes
    cdef size_t ccursor
    cdef readonly object env
    cdef Transaction rtxn       # the long-lived read transaction (None: none open)
    cdef readonly str path
    cdef readonly size_t write_buffer_size
    cdef readonly int max_write_buffer_number
    cdef readonly size_t txn_entries  # buffer entries per LMDB write transaction of a flush
    cdef long pid
    cdef bint is_forked
    cdef readonly bint closed
    cdef object clock           # None: the C coarse wall clock; else a ManualClock or a callable
    cdef bint manual_clock
    cdef dict ttl_tables        # state id -> LMDBStateTable whose expired entries a flush drops
    # flush thread
    cdef object cv
    cdef object worker
    cdef int signal             # set by the flush thread (a buffer is done, a grow request, an error)
    cdef bint grow_req
    cdef object error
    cdef bint closing
    cdef int stop_sort          # set by close(): a flush's sort (nogil) stops at its next block
    cdef uint64_t seq           # append-delta sequence (LMDB key suffix)
    cdef readonly long long ndeltas
    cdef readonly long long flushes
    cdef readonly long long stalls
    cdef readonly long long cache_hits
    cdef readonly long long cache_misses
    cdef readonly long long map_resizes
    cdef readonly long long flush_expired
    cdef public long long epoch  # bumped whenever the active buffer is replaced (its slots reset)
    cdef readonly bint spilled   # a buffer was ever frozen: LMDB may hold records (until then reads skip it)
    cdef long long rgen          # bumped whenever the read transaction ends (cached LMDB reads go stale)
    cdef readonly unsigned long long wgen  # bumped by every write (a cached checkpoint cut is reusable until then)
    cdef readonly int ncuts      # checkpoint cuts holding an LMDB read transaction (no map resize meanwhile)
    cdef list cuts               # weak references to those cuts, oldest first
    cdef object last_cut         # weak reference to the newest cut (shared by every state of one checkpoint)
    cdef unsigned long long last_cut_wgen
    cdef long long cut_serial
    cdef readonly long long cut_grow_waits  # map resizes deferred until a checkpoint released its transaction
    # flush failures (see flush_failed)
    cdef bint sync
    cdef int max_readers
    cdef size_t map_size        # the current map size (a reopen keeps it)
    cdef object last_error      # the newest flush failure
    cdef object deferred        # a failure met by a write's own flush (it was applied): raised at the next operation
    cdef object grow_error      # set_mapsize failed: the flush thread gives up (that flush fails)
    cdef double retry_at        # monotonic time after which an ordinary operation retries a failed flush
    cdef bint episode           # a flush failed and none succeeded since: background retries fail silently
    cdef int waiting            # callers waiting for a flush (stall, flush()): its failure is reported to them
    cdef long long fexpired     # drop-at-flush list records dropped in the open flush transaction (counted at commit)
    cdef readonly bint env_failed  # LMDB reported MDB_PANIC: the environment is reopened before the next transaction
    cdef readonly long long flush_failures
    cdef readonly long long flush_retries
    cdef readonly long long env_reopens
    cdef list scans             # weak references to get_keys scans holding an LMDB read transaction
    cdef uint8_t *kf            # LMDB key filter: 2 bits per base record a flush wrote (see kf_maybe)
    cdef uint64_t kfmask        # its bit count - 1
    cdef readonly long long kf_skips  # LMDB lookups the key filter saved
    cdef readonly long long bulk_records   # restored records written straight to LMDB (bulk_load)
    cdef readonly long long bulk_refused   # restored sections bulk_load left to the ordered replay (load_section)
    cdef object __weakref__

    def __cinit__(self, *args, **kwargs):
        buf_init(&self.scratch)
        buf_init(&self.fscratch)
        buf_init(&self.farena)

    def __init__(self, str path, size_t write_buffer_size=64 << 20, bint sync=False, size_t map_size=256 << 20,
                 int max_readers=1024, size_t dirty_budget=32 << 20, int max_write_buffer_number=2,
                 size_t cache_entries=0, size_t cache_bytes=0, clock=None):
        cdef uint64_t kfbits
        from statecore.ttl import ManualClock
        self.path = path
        # a random-key entry may dirty a leaf and a branch page (2 x 4 KiB), held in malloc'd memory until commit
        self.txn_entries = max(<size_t>256, dirty_budget // 8192)
        self.write_buffer_size = max(write_buffer_size, <size_t>1)
        kfbits = <uint64_t>1 << 15  # ~write_buffer_size / 8 bytes (calloc: pages are touched as bits get set)
        while kfbits < self.write_buffer_size and kfbits < (<uint64_t>1 << 32):
            kfbits <<= 1
        self.kf = <uint8_t *>calloc(kfbits >> 3, 1)
        if self.kf is NULL:
            raise MemoryError()
        self.kfmask = kfbits - 1
        self.max_write_buffer_number = max(max_write_buffer_number, 1)
        self.act = Memtable()
        self.buf = self.act.t
        self.imm = []
        self.cache_cap = cache_entries
        self.cache_bytes = cache_bytes
        if cache_entries:
            self.cache = sc_table_new(16, 0)
            if self.cache is NULL:
                raise MemoryError()
        self.clock = clock
        self.manual_clock = type(clock) is ManualClock
        self.ttl_tables = {}
        self.cuts = []
        self.scans = []
        self.cv = threading.Condition(threading.Lock())
        self.pid = getpid()
        self.sync = sync
        self.max_readers = max_readers
        self.map_size = map_size
        self.env = self.open_env()
        _STORES.add(self)

    cdef object open_env(self):
        return lmdb.open(self.path, map_size=self.map_size, subdir=True, sync=self.sync, metasync=self.sync,
                         writemap=False, max_readers=self.max_readers, max_dbs=0, max_spare_txns=1, lock=True,
                         readahead=False, meminit=False)

    def __dealloc__(self):
        sc_table_free(self.cache)
        self.cache = NULL
        sc_buf_free(&self.scratch)
        sc_buf_free(&self.fscratch)
        sc_buf_free(&self.farena)
        free(self.fops)
        self.fops = NULL
        free(self.kf)
        self.kf = NULL

    cdef void forked(self) noexcept:
        self.is_forked = True
        if self.env is not None:
            _LEAKED.append((self.env, self.rtxn))

    cdef inline int guard(self) except -1:
        if self.is_forked or self.closed:
            self.guard_fail()
        if self.signal:
            self.service()
        return 0

    cdef int guard_fail(self) except -1:
        if self.is_forked:  # set by the at-fork hook (no getpid() syscall per operation)
            raise StateError(
                f"this LMDB state backend was opened in process {self.pid} and is used after fork() in "
                f"process {getpid()}: LMDB environments must not cross fork. Create the backend in the child "
                f"(or use the 'spawn' start method).")
        from statecore.errors import BackendClosedError
        raise BackendClosedError("this keyed state backend is closed; create or restore a new one")

    cdef int64_t now(self) except? -1:
        if self.clock is None:
            return sc_now_ms()
        if self.manual_clock:
            return self.clock.now_ms
        return self.clock()

    def close(self, remove_dir=False):
        """Stop the flush thread and close the environment (never in a forked child).  Idempotent.

        Nothing is flushed: the working DB is scratch (checkpoints are the durable copy).  A flush in progress
        stops at its next sort block (``sort_entries``) or write transaction, pending buffers are dropped."""
        cdef Memtable m
        if self.closed:
            return
        self.closed = True
        if self.is_forked or getpid() != self.pid:
            self.is_forked = True
            return
        with self.cv:
            self.closing = True
            self.stop_sort = 1  # a flush sorting its buffer stops within a block: close() need not wait for it
            self.cv.notify_all()
            w = self.worker
        if w is not None:
            w.join()
        for r in self.cuts:  # pending asynchronous checkpoints: stop them, end their transactions
            c = r()
            if c is not None:
                (<LMDBCut>c).kill()
        self.cuts = []
        for r in self.scans:  # get_keys iterators: end their transactions
            c = r()
            if c is not None:
                (<LMDBKeyScan>c).kill()
        self.scans = []
        for m in self.imm:
            m.release()
        self.imm = []
        self.nimm = 0
        self.act.release()
        self.buf = NULL
        sc_table_free(self.cache)
        self.cache = NULL
        self.ttl_tables = {}
        if self.rtxn is not None:
            self.rtxn.abort()
            self.rtxn = None
        if self.env is not None:
            self.env.close()

    # -- caller-thread service: retire flushed buffers, grow the map, report and retry failed flushes

    cdef int service(self) except -1:
        cdef Memtable m
        with self.cv:
            self.signal = 0
            grow = self.grow_req
            err = self.error
            self.error = None
        if grow:
            with self.cv:
                # a checkpoint cut holds a read transaction: the flush thread waits until it is released
                # (the release signals us); set_mapsize needs every transaction of the process closed
                grow = self.ncuts == 0
                self.cut_grow_waits += not grow
        if grow:
            self.grow_map()
        while self.nimm and (<Memtable>self.imm[0]).state == MT_DONE:
            self.end_read()  # the next read sees what the buffer held
            m = self.imm.pop(0)
            self.nimm -= 1
            m.release()
        if self.has_failed():
            if err is None and self.deferred is None and time.monotonic() >= self.retry_at:
                self.retry()
            else:
                with self.cv:
                    self.signal = 1  # look again at the next operation
        if err is not None:
            self.deferred = None  # older news
            raise self.flush_failed(err) from err
        if self.deferred is not None:
            e = self.deferred
            self.deferred = None
            raise e
        return 0

    cdef int grow_map(self) except -1:
        """Double the map: caller's thread, the flush thread waiting in request_grow, no transaction open in this
        process.  A failure is handed to the flush thread (that flush fails and is retried later)."""
        cdef size_t size = self.map_size * 2
        self.detach_scans()
        self.end_read()
        try:
            self.env.set_mapsize(size)
        except BaseException as e:
            # LMDB unmapped the old map before mapping the new one: reopen the environment before any use
            self.env_failed = True
            with self.cv:
                self.grow_error = MapGrowError(f"growing the LMDB map to {size} bytes failed: {e!r}")
                self.grow_req = False
                self.cv.notify_all()
            return 0
        self.map_size = size
        self.map_resizes += 1
        with self.cv:
            self.grow_req = False
            self.cv.notify_all()
        return 0

    cdef int detach_scans(self) except -1:
        """get_keys scans end their read transactions (spooling what they have not yielded yet)."""
        for r in self.scans:
            c = r()
            if c is not None:
                (<LMDBKeyScan>c).detach()
        self.scans = []
        return 0

    cdef bint has_failed(self) noexcept:
        """An immutable buffer waits for the retry of its failed flush."""
        cdef Memtable m
        for m in self.imm:
            if m.state == MT_FAILED:
                return True
        return False

    cdef bint has_pending(self) noexcept:
        cdef Memtable m
        for m in self.imm:
            if m.state == MT_PENDING:
                return True
        return False

    cdef int retry(self) except -1:
        """Hand the failed buffers back to the flush thread (caller's thread), reopening a failed environment
        first.  0 when the reopen must wait for a checkpoint cut's read transaction (its release signals)."""
        cdef Memtable m
        self.retry_at = time.monotonic() + RETRY_DELAY  # a failing reopen is not retried at every operation
        if self.env_failed and not self.reopen():
            return 0
        with self.cv:
            for m in self.imm:
                if m.state == MT_FAILED:
                    m.state = MT_PENDING
                    self.flush_retries += 1
            if self.worker is None and self.has_pending():
                self.start_worker()
            self.cv.notify_all()
        return 1

    cdef bint reopen(self) except -1:
        """Close and reopen an environment LMDB marked failed (MDB_PANIC: a meta-page write failed, or a map
        resize failed).  The commit whose meta write raised is resolved by its transaction id: LMDB's meta
        page is its commit point, so the reopened environment either has that transaction or not.  False
        (nothing done) while a checkpoint cut holds a read transaction or the flush thread runs."""
        cdef Memtable m
        with self.cv:
            if self.ncuts or self.worker is not None:
                return False
        self.detach_scans()
        self.end_read()
        try:
            self.env.close()
        except lmdb.Error:
            pass
        try:
            self.env = self.open_env()
            last = self.env.info()["last_txnid"]
        except lmdb.Error as e:
            raise LMDBFlushError(f"statecore: reopening the LMDB environment {self.path!r} after a fatal LMDB "
                                 f"error failed: {e!r}. Check the disk holding it; the buffered writes stay "
                                 f"in memory and the reopen is retried by the next operations.") from e
        for m in self.imm:
            if m.fail_tid:
                if last >= m.fail_tid:
                    m.done = m.fail_end  # that commit reached the disk: resume after it
                m.fail_tid = 0
        self.env_failed = False
        self.env_reopens += 1
        return True

    cdef object flush_failed(self, err):
        """The LMDBFlushError reporting flush failure err: names the directory and what to do."""
        text = str(err)
        if isinstance(err, MapGrowError):
            fix = ("the LMDB map could not grow: free disk space and virtual address space, or open the backend "
                   "with a larger map_size")
        elif isinstance(err, lmdb.DiskError) or "No space left" in text or \
                getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
            fix = ("the file system holding it is full (or over quota): free disk space there, or move db_path "
                   "to a larger disk")
        elif isinstance(err, lmdb.PanicError):
            fix = ("LMDB could not write its meta page (its commit point; an I/O error?): check the disk; the "
                   "environment is reopened before the retry")
        elif isinstance(err, (MemoryError, lmdb.MemoryError)):
            fix = "out of memory: free memory, or lower memory_budget / write_buffer_size"
        elif isinstance(err, lmdb.ReadonlyError) or getattr(err, "errno", None) in (errno.EACCES, errno.EROFS):
            fix = "the directory is not writable: fix its permissions or mount"
        else:
            fix = "check the disk holding it (an I/O error?) and that the directory is writable"
        return LMDBFlushError(
            f"statecore: flushing a write buffer to LMDB in {self.path!r} failed: {type(err).__name__}: {text}. "
            f"To fix: {fix}. Nothing is lost: the buffered writes stay in memory (and readable) and the flush is "
            f"retried by later operations (at once by flush() or when the write buffers are full); until it "
            f"succeeds, a write that needs room in the full write buffers raises this error and is not applied.")

    cdef int wait_until_below(self, Py_ssize_t nmax) except -1:
        """Block until at most nmax immutable buffers remain (serving grow requests meanwhile).  A failed flush
        is retried at once; when it fails again, its LMDBFlushError is raised."""
        with self.cv:
            self.waiting += 1
        try:
            while True:
                self.service()
                if self.nimm <= nmax:
                    return 0
                if self.has_failed():
                    self.retry()  # 0: the reopen waits for a checkpoint cut (its release signals)
                with self.cv:
                    if self.worker is None and self.has_pending():
                        self.start_worker()
                    while not self.signal:
                        self.cv.wait()
        finally:
            with self.cv:
                self.waiting -= 1

    cdef void start_worker(self):
        # called with self.cv held
        t = threading.Thread(target=self.run_worker, name="statecore-lmdb-flush", daemon=True)
        self.worker = t
        t.start()

    def run_worker(self):
        """The flush thread: flush pending immutable buffers oldest first; exit when idle.  It never flushes a
        buffer while an older one waits for the retry of its failed flush (the older one would overwrite
        newer values when retried)."""
        cdef Memtable m
        cdef Py_ssize_t i
        cdef int st
        while True:
            with self.cv:
                m = None
                while True:
                    if self.closing or self.env_failed:
                        self.worker = None
                        self.signal = 1  # a caller may wait for this thread to end (reopen)
                        self.cv.notify_all()
                        return
                    blocked = False
                    for i in range(len(self.imm)):
                        st = (<Memtable>self.imm[i]).state
                        if st == MT_PENDING:
                            m = <Memtable>self.imm[i]
                            break
                        if st == MT_FAILED:
                            blocked = True
                            break
                    if m is not None:
                        break
                    if blocked or not self.cv.wait(1.0):
                        self.worker = None
                        self.signal = 1
                        self.cv.notify_all()
                        return
                m.state = MT_FLUSHING
                if not m.started:
                    m.started = True
                    m.seq_lo = self.seq
            try:
                self.flush_memtable(m)
            except BaseException as ex:
                with self.cv:
                    if not self.closing:
                        m.state = MT_FAILED
                        self.flush_failures += 1
                        self.last_error = ex
                        self.retry_at = time.monotonic() + RETRY_DELAY
                        if isinstance(ex, lmdb.PanicError):
                            self.env_failed = True  # LMDB refuses every new transaction until a reopen
                        if not self.episode or self.waiting:
                            self.error = ex  # reported: the first failure, or one a caller waits for
                        self.episode = True
                    self.signal = 1
                    self.worker = None
                    self.cv.notify_all()
                return
            with self.cv:
                m.state = MT_DONE
                self.episode = False
                self.flushes += 1
                self.signal = 1
                self.cv.notify_all()

    cdef int request_grow(self) except -1:
        with self.cv:
            self.grow_req = True
            self.signal = 1
            self.cv.notify_all()
            while self.grow_req and not self.closing:
                self.cv.wait()
            if self.closing:
                raise StateError("statecore: backend closed during a flush")
            err = self.grow_error
            self.grow_error = None
        if err is not None:
            raise err
        return 0

    # -- LMDB ------------------------------------------------------------

    cdef Transaction txn(self):
        if self.rtxn is None:
            if self.env_failed:
                self.reopen()  # False: it waits (a checkpoint cut); begin then raises PanicError below
            try:
                self.rtxn = self.env.begin(buffers=False)
            except lmdb.Error as e:
                if isinstance(e, lmdb.PanicError):
                    self.env_failed = True
                raise read_failed(self.path, e, "") from e
        return self.rtxn

    cdef inline void end_read(self):
        self.rgen += 1
        if self.rtxn is not None:
            self.rtxn.abort()
            self.rtxn = None

    cdef inline int lget(self, const uint8_t *k, size_t kl, MDB_val *raw) except -1:
        """The raw LMDB record of composite key k (1, *raw points into the map until the read transaction is
        renewed: at the next operation at the earliest), or 0."""
        cdef Transaction t = self.rtxn
        if t is None:
            t = self.txn()
        return lmdb_lookup(t, k, kl, raw)

    cdef int llist(self, const uint8_t *k, size_t kl, sc_buf *out, int64_t *ts) except -1:
        """Append the LMDB list of k (base + append-deltas in order) to out; 1 when a base exists."""
        if not self.spilled:
            return 0
        cdef MDB_val raw
        if self.ndeltas == 0:
            return self.lget(k, kl, &raw) and append_list_base(&raw, out, ts)
        return llist_deltas(self.txn(), k, kl, out, ts, self.delta_floor())

    cdef uint64_t delta_floor(self) noexcept:
        """LMDB append-deltas from this sequence number on were written by a buffer that is still buffered
        (its flush started, it is not retired yet; a failed flush waiting for its retry counts as started):
        reads take them from the buffer, not from LMDB."""
        cdef Memtable m
        for m in self.imm:
            if m.started:
                return m.seq_lo
        return NO_FLOOR

    cdef list range_items(self, bytes p):
        """[(full key, raw record)] of every LMDB record whose composite key starts with p."""
        if not self.spilled:
            return []
        return range_items_in(self.txn(), p)

    cdef list map_items(self, bytes p):
        """[(user key part, value, ts)] of the LMDB records whose composite key starts with map prefix p."""
        if not self.spilled:
            return []
        return map_items_in(self.txn(), p)

    # -- checkpoint cuts ----------------------------------------------------

    cdef LMDBCut cut(self):
        """The consistent cut of now: reused while nothing was written since the last one (so every state of
        one checkpoint shares one cut: one copy of the buffers, one read transaction)."""
        cdef LMDBCut c = None
        self.guard()
        if self.last_cut is not None and self.last_cut_wgen == self.wgen:
            c = self.last_cut()
            if c is not None and not c.retired:
                return c
        c = LMDBCut(self)
        self.cuts = [r for r in self.cuts if r() is not None and not (<LMDBCut>r()).retired]
        self.cuts.append(weakref.ref(c))
        self.last_cut = weakref.ref(c)
        self.last_cut_wgen = self.wgen
        return c

    # -- buffers -----------------------------------------------------------

    cdef sc_entry *bfind(self, const uint8_t *k, size_t kl, uint32_t h) noexcept:
        """The newest buffered version of k (active, then immutable newest first), or NULL."""
        cdef sc_entry *e = sc_table_find(self.buf, k, kl, h)
        cdef Py_ssize_t i
        if e is not NULL or self.nimm == 0:
            return e
        for i in range(self.nimm - 1, -1, -1):
            e = sc_table_find((<Memtable>self.imm[i]).t, k, kl, h)
            if e is not NULL:
                return e
        return NULL

    cdef bint newer_version(self, Memtable m, const uint8_t *k, size_t kl, uint32_t h) noexcept:
        """True when a buffer newer than m holds k."""
        cdef Py_ssize_t i
        if sc_table_find(self.buf, k, kl, h) is not NULL:
            return True
        for i in range(len(self.imm) - 1, -1, -1):
            if self.imm[i] is m:
                return False
            if sc_table_find((<Memtable>self.imm[i]).t, k, kl, h) is not NULL:
                return True
        return False

    def flush(self):
        """Flush every buffer to LMDB now (waits for the flush thread) and retire them.

        Flush failures (a full disk, an I/O error, a map that cannot grow) are not sticky.  The flush thread
        aborts the failing LMDB write transaction and keeps the buffer (nothing is dropped) together with how
        far it got: a retry resumes after the transactions already committed, so no append-delta is written
        twice.  The failure is raised as ``LMDBFlushError`` (a ``StateError`` naming the directory and what to
        do) at the caller's next operation, which is then not applied; while the flush keeps failing, reads
        work (buffers first, then LMDB), and so do writes until the write buffers are full.  A retry starts at
        once when the caller needs room (a write finds every buffer full, or ``flush()``), raising again if it
        fails (that write is not applied), and otherwise in the background at an operation at least
        RETRY_DELAY seconds after the failure (failures of background retries are not raised again; the next
        one that succeeds ends the episode).  Newer buffers are never flushed before an older failed one.

        When LMDB marks the environment failed (MDB_PANIC: its meta-page write, the commit point, failed, or a
        map resize failed) every new LMDB transaction is refused, so the environment is closed and reopened
        before the retry (and before any read that needs LMDB); whether the commit that raised reached the
        disk is decided by comparing its transaction id with the reopened environment's last one.  The reopen
        waits while a checkpoint cut holds an LMDB read transaction (until that checkpoint finishes): until
        then, values that only LMDB holds cannot be read (``LMDBFlushError``) and the retry does not start.
        What stays failed: an error that persists (a disk that stays full, corruption LMDB reports on every
        write) fails every retry, and a reopen that fails (the directory is gone) is retried, not worked
        around.  ``touch`` (the TTL refresh of a read) still copies entries into a full active buffer, so
        reads keep working but are not bounded by the buffer size while a flush fails.  A redone transaction does
        not count its drop-at-flush expirations (``flush_expired``) twice.
        Nothing written is lost unless the process exits, and the working directory is scratch in any case
        (checkpoints are the durable copy).
        """
        self.guard()
        self.freeze(False)
        self.wait_until_below(0)

    cdef int freeze(self, bint stall) except -1:
        """Make the active buffer immutable and hand it to the flush thread (stalling when all are full)."""
        cdef Memtable old
        if self.buf.count == 0:
            return 0
        if self.max_write_buffer_number > 1 and self.nimm >= self.max_write_buffer_number - 1:
            self.stalls += stall  # all buffers are full: the caller waits (RocksDB's write stall)
            self.wait_until_below(self.max_write_buffer_number - 2)
        elif self.max_write_buffer_number == 1 and self.nimm:
            self.stalls += stall  # one buffer: an earlier flush failed and must succeed first
            self.wait_until_below(0)
        elif self.has_failed():
            self.retry()  # more room is needed: retry the failed flush now (this buffer queues behind it)
        old = self.act
        self.act = Memtable()
        self.buf = self.act.t
        self.epoch += 1
        self.spilled = True
        with self.cv:
            old.state = MT_PENDING
            self.imm.append(old)
            self.nimm += 1
            if self.worker is None:
                self.start_worker()
            self.cv.notify_all()
        if self.max_write_buffer_number == 1:
            self.stalls += stall
            self.wait_until_below(0)  # one buffer: the caller waits for every flush
        return 0

    cdef inline int maybe_flush(self) except -1:
        """After a write: freeze the active buffer when it is full.  A flush failure met here is raised at the
        next operation instead (the write that got here was applied)."""
        if self.buf.bytes + self.act.pidx.bytes > self.write_buffer_size and self.deferred is None:
            try:
                self.freeze(True)
            except LMDBFlushError as e:
                self.deferred = e
                with self.cv:
                    self.signal = 1
        return 0

    cdef inline int admit(self) except -1:
        """Before a write: the active buffer is still full because its flush failed: retry it first, raising
        (the write is not applied) when it fails again.  Keeps the write buffers bounded."""
        if self.buf.bytes + self.act.pidx.bytes > self.write_buffer_size:
            self.freeze(True)
        return 0

    cdef int drop_expired(self, Memtable m, sc_entry *e, object tbl) except -1:
        """Drop-at-flush (flush thread, GIL held): 1 when e is dropped entirely (its flag flipped to a
        tombstone); 2 when a list lost some records (the kept ones are in self.fscratch); else 0."""
        cdef LMDBStateTable t = <LMDBStateTable>tbl
        cdef int64_t now = self.now()
        cdef long dropped
        cdef int kd = kind(e)
        if kd == FLAG_TOMB or kd == FLAG_MERGE:
            return 0
        if self.newer_version(m, sc_entry_key(e), e.klen, e.hash):
            return 0  # not the newest version: the newer one decides
        if t.layout == LAYOUT_LIST or (eflag(e) & FLAG_LIST):
            dropped = filter_records(bval(e), bvlen(e), t.drop_ttl, now, &self.fscratch)
            if dropped == 0:
                return 0
            if self.fscratch.len:
                self.fexpired += dropped  # counted when its transaction commits (a failed one is redone)
                return 2
            self.flush_expired += dropped
        elif not sc_ttl_expired(ets(e), t.drop_ttl, now):
            return 0
        else:
            self.flush_expired += 1
        set_flag(e, (eflag(e) & FLAG_LIST) | FLAG_TOMB)  # in place: the value bytes stay
        t.n -= 1
        return 1

    cdef int flush_memtable(self, Memtable m) except -1:
        """Write m to LMDB (flush thread): sorted, tombstones as deletes, deltas under their own keys.

        Resumable: m.arr (the sorted entries) and m.done (how many are committed) survive a failure, so a
        retry starts with the first transaction that did not commit (an append-delta is never written twice;
        a drop-at-flush tombstone flipped in an aborted transaction is simply written as a delete)."""
        cdef size_t n, i = 0, pos = 0, start, end
        cdef sc_entry *e
        cdef sc_entry **arr
        cdef uint8_t *k
        cdef uint8_t fl
        cdef int kd, dr, stopped
        cdef size_t nops
        cdef mdb_op *ops
        cdef int64_t tid
        cdef uint8_t seqb[8]
        if _crash_armed:
            _crash_hook("wb.spill")
        if m.arr is NULL:
            n = m.t.count
            if n == 0:
                return 0
            arr = <sc_entry **>malloc(n * sizeof(sc_entry *))
            if arr is NULL:
                raise MemoryError()
            while True:
                e = sc_table_next(m.t, &pos)
                if e is NULL:
                    break
                arr[i] = e
                i += 1
            with nogil:
                stopped = sort_entries(arr, n, &self.stop_sort)
            if stopped:
                free(arr)
                raise StateError("statecore: backend closed during a flush")
            m.arr = arr
            m.narr = n
            m.done = 0
        arr = m.arr
        n = m.narr
        ttl_tables = self.ttl_tables
        start = m.done
        while start < n:  # chunks of txn_entries: bounds LMDB's malloc'd dirty pages (no writemap)
            if self.closing:
                raise StateError("statecore: backend closed during a flush")
            end = min(n, start + self.txn_entries)
            self.fexpired = 0
            txn = self.env.begin(write=True)
            try:
                # The transaction's writes are encoded in C into one arena (keys and records, no Python object
                # per entry: only a hashed key takes Python's sha256), then applied in order by one C call
                # with the GIL released (MDB_APPEND while the keys land past LMDB's last key, as a restore's do)
                nops = 0
                self.farena.len = 0
                if self.fops_cap < 2 * (end - start):
                    free(self.fops)
                    self.fops = <mdb_op *>malloc(2 * (end - start) * sizeof(mdb_op))
                    self.fops_cap = 0 if self.fops is NULL else 2 * (end - start)
                    if self.fops is NULL:
                        raise MemoryError()
                ops = self.fops
                for i in range(start, end):
                    e = arr[i]
                    k = sc_entry_key(e)
                    dr = 0
                    if ttl_tables and e.klen >= 4:
                        tbl = ttl_tables.get(sc_be16_get(k + 2))
                        if tbl is not None:
                            dr = self.drop_expired(m, e, tbl)
                    fl = eflag(e)
                    kd = fl & FLAG_KIND
                    if kd == FLAG_MERGE:
                        sc_be64_put(seqb, self.seq)
                        self.seq += 1
                        self.ndeltas += 1
                        arena_key(&self.farena, k, e.klen, seqb, &ops[nops])
                        arena_record(&self.farena, k, e.klen, bval(e), bvlen(e), ets(e), V_DELTA, &ops[nops])
                        ops[nops].kind = MDB_OP_PUT
                        nops += 1
                        continue
                    if (fl & FLAG_LIST) and self.ndeltas:
                        # a put or tombstone of a list replaces its append-deltas too
                        memset(seqb, 0, 8)
                        arena_key(&self.farena, k, e.klen, seqb, &ops[nops])
                        ops[nops].kind = MDB_OP_DEL_SUFFIXED
                        nops += 1
                    if kd == FLAG_PUT:
                        kf_add(self.kf, self.kfmask, e.hash)  # before the record is visible (a superset is fine)
                        arena_key(&self.farena, k, e.klen, NULL, &ops[nops])
                        if dr == 2:
                            arena_record(&self.farena, k, e.klen, self.fscratch.data, self.fscratch.len, ets(e), 0,
                                         &ops[nops])
                        else:
                            arena_record(&self.farena, k, e.klen, bval(e), bvlen(e), ets(e), 0, &ops[nops])
                        ops[nops].kind = MDB_OP_PUT
                        nops += 1
                    elif not _DEBUG_DROP_FLUSH_TOMBSTONES:
                        arena_key(&self.farena, k, e.klen, NULL, &ops[nops])
                        ops[nops].kind = MDB_OP_DEL
                        nops += 1
                (<Transaction>txn).capply(self.farena.data, ops, nops)
                tid = txn.id()
                if _FAULTS is not None:
                    self.inject_fault(txn, m, tid, end)
                if _crash_armed:
                    _crash_hook("lmdb.commit")
                try:
                    txn.commit()
                except lmdb.PanicError:
                    m.fail_tid = tid  # the meta write failed: committed or not, the reopen tells
                    m.fail_end = end
                    raise
            except lmdb.MapFullError:
                txn.abort()
                self.request_grow()  # the caller's thread doubles the map with no transaction open
                continue
            except BaseException:
                txn.abort()
                raise
            self.flush_expired += self.fexpired
            start = end
            m.done = end
        return 0

    cdef int inject_fault(self, object txn, Memtable m, int64_t tid, size_t end) except -1:
        """Tests only (_debug_flush_faults): fail this commit as a full disk / an I/O error / a panic would."""
        kind = debug_fault()
        if kind is None:
            return 0
        if kind == "ENOSPC":
            raise lmdb.DiskError(f"{self.path}: No space left on device (injected)", errno.ENOSPC)
        if kind == "EIO":
            raise lmdb.Error(f"{self.path}: Input/output error (injected)", errno.EIO)
        if kind == "PANIC_COMMITTED":
            txn.commit()  # the meta page reached the disk, but the commit reports a failure
        m.fail_tid = tid
        m.fail_end = end
        raise lmdb.PanicError(f"{self.path}: MDB_PANIC: Update of meta page failed or environment had fatal "
                              f"error (injected)", -30795)

    cdef int bput(self, const uint8_t *k, size_t kl, uint32_t h, int flag, const uint8_t *v, size_t vl,
                  int64_t ts, size_t pl) except -1:
        """Write (flag, v) under k into the active buffer; pl > 0: a map entry with prefix length pl."""
        cdef Memtable a = self.act
        cdef uint8_t empty = 0
        cdef size_t before, n
        self.wgen += 1
        if ts < TS_MIN or ts > TS_MAX:
            raise StateError(f"statecore: timestamp {ts} ms is out of the LMDB tier's range (+-2**55 ms)")
        if self.cache is not NULL and self.cache.count:
            sc_table_delete(self.cache, k, kl, h)
        # v never points into the active buffer (callers copy such values to their own scratch first)
        before = self.buf.count
        check(sc_table_put(self.buf, k, kl, h, v if vl else &empty, vl, pack_ts(flag, ts), NULL))
        if pl and self.buf.count != before:  # a map key new to this buffer: index it under its prefix
            reserve(&self.scratch, SC_VARINT_MAX + kl - pl)
            n = sc_varint_put(self.scratch.data, kl - pl)
            memcpy(self.scratch.data + n, k + pl, kl - pl)
            check(sc_table_append(a.pidx, k, pl, sc_table_hash(k, pl), self.scratch.data, n + kl - pl, 0))
        return 0

    # -- read cache ---------------------------------------------------------

    cdef sc_entry *cache_find(self, const uint8_t *k, size_t kl, uint32_t h) noexcept:
        cdef sc_entry *e = sc_table_find(self.cache, k, kl, h)
        if e is NULL:
            self.cache_misses += 1
        else:
            self.cache_hits += 1
        return e

    cdef sc_entry *cache_add(self, const uint8_t *k, size_t kl, uint32_t h, const uint8_t *v, size_t vl,
                             int64_t ts) except? NULL:
        cdef sc_entry *e
        cdef sc_entry *out = NULL
        while self.cache.count and (self.cache.count >= self.cache_cap or
                                    (self.cache_bytes and self.cache.bytes + kl + vl > self.cache_bytes)):
            e = sc_table_slot(self.cache, self.ccursor & self.cache.mask)
            self.ccursor += 1
            if e is not NULL:
                sc_table_delete_entry(self.cache, e)  # clock-hand eviction over the slots (cheap)
        if self.cache_bytes and kl + vl > self.cache_bytes:
            return NULL
        check(sc_table_put(self.cache, k, kl, h, v, vl, ts, &out))
        return out

    cdef size_t record_bytes_bound(self) except? 0:
        """About how many snapshot bytes the whole store holds, from above (a sink presizes its buffers with
        it, capped at its spill limit): LMDB's leaf and overflow pages plus the buffers' bytes."""
        cdef Memtable m
        cdef size_t n = self.buf.bytes
        for m in self.imm:
            n += m.t.bytes
        if self.spilled:
            st = self.env.stat()
            n += (st["leaf_pages"] + st["overflow_pages"]) * st["psize"]
        return n

    def metrics(self):
        cdef Memtable m
        self.guard()
        info = self.env.info()
        stat = self.env.stat()
        buffered = self.act.size()
        entries = self.buf.count
        for m in self.imm:
            buffered += m.size()
            entries += m.t.count
        return {
            "bytes_in_memory": buffered + self.scratch.cap + (self.cache.bytes if self.cache is not NULL else 0),
            "bytes_on_disk": (info["last_pgno"] + 1) * stat["psize"],
            "flushes": self.flushes,
            "stalls": self.stalls,
            "cache_hits": self.cache_hits,
            "cache_misses": self.cache_misses,
            "cache_entries": self.cache.count if self.cache is not NULL else 0,
            "map_size": info["map_size"],
            "map_resizes": self.map_resizes,
            "restore_bulk_records": self.bulk_records,
            "restore_bulk_refused": self.bulk_refused,
            "buffer_entries": entries,
            "immutable_buffers": self.nimm,
            "flush_expired": self.flush_expired,
            "flush_failures": self.flush_failures,
            "flush_retries": self.flush_retries,
        }


@cython.final
cdef class LMDBStateTable(StateTable):
    """One state's view of an LMDBStore (the StateTable contract of statecore/_states.pxd)."""
    cdef LMDBStore s
    cdef bint nested
    cdef readonly int layout  # LAYOUT_VALUE / LIST / MAP (lists become LIST on their first append too)
    cdef int lbit             # FLAG_LIST for list states, else 0
    cdef readonly int64_t drop_ttl  # > 0: flushes drop this state's expired entries
    cdef int sid          # learnt from the first composite key seen (-1: none yet, so no entries)
    cdef bytes sidb
    cdef public long long n  # live entries (expired-but-not-cleaned included)
    cdef sc_buf kb        # scratch: map composite keys
    cdef sc_buf lb        # scratch: list cleanup
    cdef sc_buf rb        # scratch: resolved lists (base + deltas)
    cdef sc_buf vb        # the last value get returned from LMDB
    cdef size_t bcursor   # cleanup position in the buffer's slots
    cdef long long bepoch
    cdef sc_buf lck       # cleanup position in LMDB: the last visited LMDB key (when lhas; else: the start)
    cdef bint lhas
    cdef Cursor lcur      # cleanup: a cursor of the read transaction of generation lgen, on the next record
    cdef long long lgen
    cdef long lpos        # records of the current chunk visited (a chunk: lcap records, one cursor pass)
    cdef long lcap
    cdef bint lexh        # the chunk reached the state's last record (the cursor has no next one)

    def __cinit__(self, *args, **kwargs):
        buf_init(&self.kb)
        buf_init(&self.lb)
        buf_init(&self.rb)
        buf_init(&self.vb)
        buf_init(&self.lck)
        self.sid = -1

    def __init__(self, LMDBStore store, bint nested, int layout=LAYOUT_VALUE, int64_t drop_ttl=0):
        self.s = store
        self.nested = nested
        self.layout = LAYOUT_MAP if nested else layout
        self.lbit = FLAG_LIST if self.layout == LAYOUT_LIST else 0
        self.drop_ttl = drop_ttl if drop_ttl > 0 else 0

    def __dealloc__(self):
        sc_buf_free(&self.kb)
        sc_buf_free(&self.lb)
        sc_buf_free(&self.rb)
        sc_buf_free(&self.vb)
        sc_buf_free(&self.lck)

    cdef void release(self) noexcept:
        pass

    cdef void prefetch(self, uint32_t h) noexcept:
        """Start loading what a write of a key with hash h probes (a restore's load_section calls it for a
        block of records before inserting them, so their cache misses overlap): its slot in every write buffer
        and its key filter bits."""
        cdef LMDBStore s = self.s
        cdef Memtable m
        if s is None or s.buf is NULL:
            return
        sc_table_prefetch(s.buf, h)
        for m in s.imm:
            if m.t is not NULL:
                sc_table_prefetch(m.t, h)
        if s.spilled and s.kf is not NULL:
            kf_prefetch(s.kf, s.kfmask, h)

    cdef inline int enter(self, const uint8_t *k, size_t kl) except -1:
        self.s.guard()
        if self.sid < 0 and kl >= 4:
            self.sid = sc_be16_get(k + 2)
            self.sidb = as_bytes(k + 2, 2)
            if self.drop_ttl:
                self.s.ttl_tables[self.sid] = self
        return 0

    cdef inline int wenter(self, const uint8_t *k, size_t kl) except -1:
        """enter() for a write: refused (before anything is applied) while its flush fails and the buffers
        are full (LMDBStore.admit)."""
        self.enter(k, kl)
        return self.s.admit()

    cdef int exists(self, const uint8_t *k, size_t kl, uint32_t h) except -1:
        cdef sc_entry *e
        cdef MDB_val raw
        if self.s.spilled:
            kf_prefetch(self.s.kf, self.s.kfmask, h)
        e = self.s.bfind(k, kl, h)
        if e is not NULL:
            return kind(e) != FLAG_TOMB
        if not self.s.spilled:
            return 0
        if self.s.cache is not NULL and sc_table_find(self.s.cache, k, kl, h) is not NULL:
            return 1
        if not kf_maybe(self.s.kf, self.s.kfmask, h):
            self.s.kf_skips += 1
            return 0
        return self.s.lget(k, kl, &raw)

    cdef int resolve_list(self, const uint8_t *k, size_t kl, uint32_t h, const uint8_t **v, size_t *vl,
                          int64_t *ts) except -1:
        """The full list of k: base (newest put in a buffer, else LMDB base + LMDB deltas) + buffer deltas."""
        cdef LMDBStore s = self.s
        cdef Py_ssize_t ntiers = s.nimm + 1, i, j, nd = 0
        cdef sc_entry **deltas
        cdef sc_entry *e
        cdef sc_entry *base = NULL
        cdef int found = 0, kd
        deltas = <sc_entry **>malloc(ntiers * sizeof(sc_entry *))
        if deltas is NULL:
            raise MemoryError()
        try:
            for i in range(ntiers):  # newest first
                e = sc_table_find(s.buf if i == 0 else (<Memtable>s.imm[s.nimm - i]).t, k, kl, h)
                if e is NULL:
                    continue
                kd = kind(e)
                if kd == FLAG_MERGE:
                    deltas[nd] = e
                    nd += 1
                    continue
                base = e
                break
            if nd == 0:
                if base is not NULL:
                    if kind(base) != FLAG_PUT:
                        return 0
                    v[0] = bval(base)
                    vl[0] = bvlen(base)
                    ts[0] = ets(base)
                    return 1
                self.rb.len = 0
                if not s.llist(k, kl, &self.rb, ts):
                    return 0
                v[0] = self.rb.data
                vl[0] = self.rb.len
                return 1
            self.rb.len = 0
            ts[0] = ets(deltas[0])
            if base is NULL:
                found = s.llist(k, kl, &self.rb, ts)
            elif kind(base) == FLAG_PUT:
                reserve(&self.rb, bvlen(base))
                memcpy(self.rb.data, bval(base), bvlen(base))
                self.rb.len = bvlen(base)
                ts[0] = ets(base)
            for j in range(nd - 1, -1, -1):  # oldest delta first
                e = deltas[j]
                reserve(&self.rb, bvlen(e))
                memcpy(self.rb.data + self.rb.len, bval(e), bvlen(e))
                self.rb.len += bvlen(e)
            v[0] = self.rb.data
            vl[0] = self.rb.len
            return 1
        finally:
            free(deltas)

    cdef int do_get(self, const uint8_t *k, size_t kl, uint32_t h, const uint8_t **v, size_t *vl,
                    int64_t *ts) except -1:
        cdef LMDBStore s = self.s
        cdef sc_entry *e
        cdef const uint8_t *fk
        cdef size_t fkl
        cdef MDB_val raw
        if self.lbit:
            return self.resolve_list(k, kl, h, v, vl, ts)
        e = sc_table_find(s.buf, k, kl, h)
        if e is NULL and s.nimm:
            e = s.bfind(k, kl, h)
        if e is not NULL:
            if kind(e) != FLAG_PUT:
                return 0
            v[0] = bval(e)
            vl[0] = bvlen(e)
            ts[0] = ets(e)
            return 1
        if s.cache is not NULL:
            e = s.cache_find(k, kl, h)
            if e is not NULL:
                v[0] = sc_entry_value(e)
                vl[0] = e.vlen
                ts[0] = e.ts
                return 1
        if not s.spilled:
            return 0
        # No key-filter check here: reads are mostly of keys that exist, and for those the filter's
        # cache miss (~200 ns on 1M spilled keys, measured) comes on top of the LMDB lookup.
        if not s.lget(k, kl, &raw):
            return 0
        # parsed in place in the map; the value is copied to this table's own buffer (no Python object): the
        # contract keeps it valid until the next call on this table, and a call on another table of the
        # store may renew the read transaction
        parse_raw(<const uint8_t *>raw.mv_data, raw.mv_size, ts, &fk, &fkl, v, vl)
        if s.cache is not NULL:
            e = s.cache_add(k, kl, h, v[0], vl[0], ts[0])
            if e is not NULL:
                v[0] = sc_entry_value(e)
                return 1
        self.vb.len = 0
        reserve(&self.vb, vl[0])
        memcpy(self.vb.data, v[0], vl[0])
        self.vb.len = vl[0]
        v[0] = self.vb.data
        return 1

    cdef int do_put(self, const uint8_t *k, size_t kl, uint32_t h, const uint8_t *v, size_t vl, int64_t ts,
                    size_t pl) except -1:
        if not self.exists(k, kl, h):
            self.n += 1
        self.s.bput(k, kl, h, FLAG_PUT | self.lbit, v, vl, ts, pl)
        return self.s.maybe_flush()

    cdef int do_remove(self, const uint8_t *k, size_t kl, uint32_t h, size_t pl) except -1:
        if not self.exists(k, kl, h):
            return 0
        self.s.bput(k, kl, h, FLAG_TOMB | self.lbit, NULL, 0, 0, pl)
        self.n -= 1
        self.s.maybe_flush()
        return 1

    cdef int do_touch(self, const uint8_t *k, size_t kl, uint32_t h, int64_t ts, size_t pl) except -1:
        cdef sc_entry *e = sc_table_find(self.s.buf, k, kl, h)
        cdef const uint8_t *v
        cdef size_t vl
        cdef int64_t old
        if e is not NULL:
            if kind(e) == FLAG_PUT:
                set_ets(e, ts)
                self.s.wgen += 1
            return 0
        if self.do_get(k, kl, h, &v, &vl, &old):  # in an immutable buffer, the cache or LMDB: copy it
            self.lb.len = 0
            reserve(&self.lb, vl)
            memcpy(self.lb.data, v, vl)
            self.s.bput(k, kl, h, FLAG_PUT | self.lbit, self.lb.data, vl, ts, pl)
            self.s.maybe_flush()
        return 0

    # -- StateTable ------------------------------------------------------

    cdef int get(self, const uint8_t *k, size_t kl, uint32_t h, const uint8_t **v, size_t *vl,
                 int64_t *ts) except -1:
        self.enter(k, kl)
        return self.do_get(k, kl, h, v, vl, ts)

    cdef int put(self, const uint8_t *k, size_t kl, uint32_t h, const uint8_t *v, size_t vl,
                 int64_t ts) except -1:
        self.wenter(k, kl)
        return self.do_put(k, kl, h, v, vl, ts, 0)

    cdef int remove(self, const uint8_t *k, size_t kl, uint32_t h) except -1:
        self.wenter(k, kl)
        return self.do_remove(k, kl, h, 0)

    cdef int touch(self, const uint8_t *k, size_t kl, uint32_t h, int64_t ts) except -1:
        self.enter(k, kl)
        return self.do_touch(k, kl, h, ts, 0)

    cdef int put_batch(self, const uint8_t *keys, size_t kw, size_t kl, const uint32_t *hs, Py_ssize_t m,
                       const uint8_t *vals, size_t vl, int64_t ts) except -1:
        """A C loop over the active buffer: a live entry of the same size is overwritten in place (as
        sc_table_put would), anything else (new keys, tombstones, older tiers) takes the put path."""
        cdef LMDBStore s = self.s
        cdef Py_ssize_t j
        cdef sc_entry *e
        cdef const uint8_t *k
        if m <= 0:
            return 0
        self.wenter(keys, kl)
        s.wgen += 1
        for j in range(min(m, PREFETCH_AHEAD)):
            sc_table_prefetch(s.buf, hs[j])
        for j in range(m):
            if j + PREFETCH_AHEAD < m:
                sc_table_prefetch(s.buf, hs[j + PREFETCH_AHEAD])
            k = keys + j * kw
            e = sc_table_find(s.buf, k, kl, hs[j])
            if e is not NULL and e.vlen == vl and kind(e) == FLAG_PUT and not self.lbit:
                # in the active buffer, so not in the read cache (a buffer write evicts it, reads stop there)
                memcpy(<uint8_t *>bval(e), vals + j * vl, vl)
                set_ets(e, ts)
            else:
                self.do_put(k, kl, hs[j], vals + j * vl, vl, ts, 0)
        return 0

    cdef int get_batch(self, const uint8_t *keys, size_t kw, size_t kl, const uint32_t *hs, Py_ssize_t m,
                       uint8_t *vals, size_t vl, int64_t *tss, uint8_t *found) except -1:
        """A C loop over the active buffer; misses fall back to the other tiers (do_get)."""
        cdef LMDBStore s = self.s
        cdef Py_ssize_t j
        cdef sc_entry *e
        cdef const uint8_t *k
        cdef const uint8_t *v
        cdef size_t n
        if m <= 0:
            return 0
        self.enter(keys, kl)
        for j in range(min(m, PREFETCH_AHEAD)):
            sc_table_prefetch(s.buf, hs[j])
        for j in range(m):
            if j + PREFETCH_AHEAD < m:
                sc_table_prefetch(s.buf, hs[j + PREFETCH_AHEAD])
            k = keys + j * kw
            e = NULL if self.lbit else sc_table_find(s.buf, k, kl, hs[j])
            if e is not NULL:
                if kind(e) != FLAG_PUT:
                    found[j] = 0
                elif e.vlen != vl:
                    found[j] = 2
                else:
                    memcpy(vals + j * vl, bval(e), vl)
                    tss[j] = ets(e)
                    found[j] = 1
                continue
            if not self.do_get(k, kl, hs[j], &v, &n, &tss[j]):
                found[j] = 0
            elif n != vl:
                found[j] = 2
            else:
                memcpy(vals + j * vl, v, vl)
                found[j] = 1
        return 0

    cdef int append(self, const uint8_t *k, size_t kl, uint32_t h, const uint8_t *v, size_t vl,
                    int64_t ts) except -1:
        """Merge operator: append in place in the active buffer, else store an append-delta."""
        cdef sc_entry *e
        cdef int kd
        self.wenter(k, kl)
        if not self.lbit:
            self.lbit = FLAG_LIST
            self.layout = LAYOUT_LIST
        e = sc_table_find(self.s.buf, k, kl, h)
        if e is not NULL:
            kd = kind(e)
            if kd == FLAG_TOMB:
                self.s.bput(k, kl, h, FLAG_PUT | FLAG_LIST, v, vl, ts, 0)
                self.n += 1
            else:  # a put or a delta: append in place (keeps the entry's ts)
                check(sc_table_append(self.s.buf, k, kl, h, v, vl, e.ts))  # keeps its ts and flag
                self.s.wgen += 1
        elif self.exists(k, kl, h):
            self.s.bput(k, kl, h, FLAG_MERGE | FLAG_LIST, v, vl, ts, 0)  # the stored list is not read
        else:
            self.s.bput(k, kl, h, FLAG_PUT | FLAG_LIST, v, vl, ts, 0)
            self.n += 1
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
        self.wenter(p, pl)
        self.mkey(p, pl, uk, ukl)
        return self.do_put(self.kb.data, self.kb.len, sc_table_hash(self.kb.data, self.kb.len), v, vl, ts, pl)

    cdef int mremove(self, const uint8_t *p, size_t pl, uint32_t ph, const uint8_t *uk, size_t ukl) except -1:
        self.wenter(p, pl)
        self.mkey(p, pl, uk, ukl)
        return self.do_remove(self.kb.data, self.kb.len, sc_table_hash(self.kb.data, self.kb.len), pl)

    cdef int mtouch(self, const uint8_t *p, size_t pl, uint32_t ph, const uint8_t *uk, size_t ukl,
                    int64_t ts) except -1:
        self.enter(p, pl)
        self.mkey(p, pl, uk, ukl)
        return self.do_touch(self.kb.data, self.kb.len, sc_table_hash(self.kb.data, self.kb.len), ts, pl)

    cdef list tiers(self):
        """The buffers, oldest first (the active one last)."""
        return self.s.imm + [self.s.act] if self.s.nimm else [self.s.act]

    cdef dict live_map(self, bytes prefix):
        """{full key: (value bytes, ts)} of one map, newer tiers over older ones."""
        cdef int64_t ts
        cdef const uint8_t *fk
        cdef const uint8_t *v
        cdef size_t fkl, vl
        cdef sc_entry *e
        cdef sc_entry *ie
        cdef bytes key
        cdef Memtable m
        cdef const uint8_t *pp = <const uint8_t *>PyBytes_AS_STRING(prefix)
        cdef size_t pl = <size_t>PyBytes_GET_SIZE(prefix)
        cdef uint32_t ph = sc_table_hash(pp, pl)
        cdef const uint8_t *r
        cdef const uint8_t *end
        cdef uint64_t ul
        cdef size_t used
        cdef uint8_t *kp
        res = {}
        for key, raw in self.s.range_items(prefix):
            parse_record(raw, &ts, &fk, &fkl, &v, &vl)
            res[key] = (as_bytes(v, vl), ts)
        for m in self.tiers():
            ie = sc_table_find(m.pidx, pp, pl, ph)
            if ie is NULL:
                continue
            r = sc_entry_value(ie)
            end = r + ie.vlen
            while r < end:  # (varint length | user key part) records: this buffer's keys of the map
                used = sc_varint_get(r, end, &ul)
                if used == 0 or ul > <uint64_t>(end - r - used):
                    raise StateError("statecore: corrupt map prefix index")
                key = PyBytes_FromStringAndSize(NULL, pl + ul)
                kp = <uint8_t *>PyBytes_AS_STRING(key)
                memcpy(kp, pp, pl)
                memcpy(kp + pl, r + used, ul)
                r += used + ul
                e = sc_table_find(m.t, kp, pl + ul, sc_table_hash(kp, pl + ul))
                if e is NULL:
                    continue
                if kind(e) == FLAG_PUT:
                    res[key] = (as_bytes(bval(e), bvlen(e)), ets(e))
                else:
                    res.pop(key, None)
        return res

    cdef list mitems(self, const uint8_t *p, size_t pl, uint32_t ph):
        cdef Memtable m
        cdef uint32_t hp = sc_table_hash(p, pl)
        self.enter(p, pl)
        for m in self.tiers():
            if sc_table_find(m.pidx, p, pl, hp) is not NULL:
                break
        else:  # no buffer holds an entry of this map: it is LMDB's range, already in order
            return self.s.map_items(as_bytes(p, pl))
        res = self.live_map(as_bytes(p, pl))
        return [(k[pl:], res[k][0], res[k][1]) for k in sorted(res)]

    cdef int mclear(self, const uint8_t *p, size_t pl, uint32_t ph) except -1:
        cdef bytes key
        self.wenter(p, pl)
        res = self.live_map(as_bytes(p, pl))
        for key in res:
            self.s.bput(<const uint8_t *>PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key),
                        sc_table_hash(<const uint8_t *>PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key)),
                        FLAG_TOMB, NULL, 0, 0, pl)
        self.n -= len(res)
        self.s.maybe_flush()
        return 1 if res else 0

    cdef list key_bytes(self, const uint8_t *ns, size_t nsl):
        """Every key of the scan below (the StateTable contract; get_keys streams key_scan instead)."""
        return list(self.key_scan(as_bytes(ns, nsl)))

    def key_scan(self, bytes ns):
        """An iterator over the serialized keys with an entry in this state under namespace ``ns`` (serialized),
        as of now: see LMDBKeyScan."""
        self.s.guard()
        return LMDBKeyScan(self.s, self.sid, self.sidb, ns)

    cdef size_t count(self):
        return <size_t>self.n if self.n > 0 else 0

    cdef size_t nbytes(self):
        return self.kb.cap + self.lb.cap + self.rb.cap

    # -- incremental TTL cleanup -----------------------------------------

    cdef long expire_one(self, const uint8_t *k, size_t kl, uint32_t h, const uint8_t *v, size_t vl, int64_t ts,
                         int64_t ttl, int64_t now, int layout) except -1:
        """Apply TTL cleanup to one live entry (its current, resolved version); return how many were dropped."""
        cdef long dropped
        if layout == LAYOUT_LIST:
            dropped = filter_records(v, vl, ttl, now, &self.lb)
            if dropped:
                if self.lb.len == 0:
                    self.s.bput(k, kl, h, FLAG_TOMB | self.lbit, NULL, 0, 0, 0)
                    self.n -= 1
                else:
                    self.s.bput(k, kl, h, FLAG_PUT | self.lbit, self.lb.data, self.lb.len, ts, 0)
            return dropped
        if sc_ttl_expired(ts, ttl, now):
            self.s.bput(k, kl, h, FLAG_TOMB, NULL, 0, 0, map_prefix_len(k, kl) if layout == LAYOUT_MAP else 0)
            self.n -= 1
            return 1
        return 0

    cdef long cleanup(self, size_t n, int64_t ttl, int64_t now, int layout, sc_buf *scratch) except -1:
        cdef size_t i
        cdef long dropped = 0
        cdef sc_entry *e
        cdef int64_t ts
        cdef const uint8_t *fk
        cdef const uint8_t *v
        cdef size_t fkl, vl
        cdef bytes key
        cdef uint32_t h
        cdef sc_table *buf
        cdef Cursor cur
        cdef uint8_t s0, s1
        cdef uint8_t head[4]
        cdef int ok, found
        cdef const uint8_t *lk
        cdef const uint8_t *lastk
        cdef const uint8_t *raw
        cdef const uint8_t *kp
        cdef size_t lkl, lastkl, rawl, kl
        cdef long visited
        self.s.guard()
        if self.sid < 0 or self.n <= 0 or n == 0:
            return 0
        # 1. active buffer slots, round robin (entries of this state only)
        if self.bepoch != self.s.epoch:
            self.bepoch = self.s.epoch
            self.bcursor = 0
        buf = self.s.buf
        for i in range(min(n, buf.mask + 1)):
            e = sc_table_slot(buf, self.bcursor & buf.mask)
            self.bcursor = (self.bcursor + 1) & buf.mask
            if e is NULL or e.klen < 4 or sc_be16_get(sc_entry_key(e) + 2) != self.sid:
                continue
            if kind(e) == FLAG_TOMB:
                continue
            if layout == LAYOUT_LIST:
                # resolve the whole list (a delta needs its older versions), filter, rewrite the entry
                key = as_bytes(sc_entry_key(e), e.klen)
                h = e.hash
                if self.resolve_list(<const uint8_t *>PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key), h,
                                     &v, &vl, &ts):
                    dropped += self.expire_one(<const uint8_t *>PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key), h,
                                               v, vl, ts, ttl, now, layout)
                buf = self.s.buf  # a rewrite may have frozen the buffer
                if self.bepoch != self.s.epoch:
                    break
            elif sc_ttl_expired(ets(e), ttl, now):
                set_flag(e, (eflag(e) & FLAG_LIST) | FLAG_TOMB)  # in place
                self.s.wgen += 1
                self.n -= 1
                dropped += 1
        # 2. LMDB records of this state, round robin across key groups: n per call, read ahead in chunks
        #    (one cursor pass per CLEANUP_CHUNK records; a chunk is dropped when the read transaction ends)
        if not self.s.spilled:
            self.s.maybe_flush()
            return dropped
        # (C cursor, records parsed in place in the map: the read transaction stays open for the whole pass).
        # A chunk is CLEANUP_CHUNK (or n) records of one cursor pass; a new one starts after the last visited
        # key, or at the state's first record after the last one was reached (wrap around).
        if self.lcur is None or self.lgen != self.s.rgen or self.lpos >= self.lcap or self.lexh:
            self.lcur = None
            cur = self.s.txn().ccursor()
            s0 = <uint8_t>(self.sid >> 8)
            s1 = <uint8_t>(self.sid & 0xFF)
            if self.lhas:
                reserve(&self.lck, 1)
                self.lck.data[self.lck.len] = 0  # the first key after the last visited one
                ok = cur.cset_range(self.lck.data, self.lck.len + 1)
            else:
                head[0] = 0
                head[1] = 0
                head[2] = s0
                head[3] = s1
                ok = cur.cset_range(head, 4)
            self.lcur = cur
            self.lgen = self.s.rgen
            self.lpos = 0
            self.lcap = max(<long>n, <long>CLEANUP_CHUNK)
            self.lexh = not sid_settle(cur, ok, s0, s1)
        cur = self.lcur
        s0 = <uint8_t>(self.sid >> 8)
        s1 = <uint8_t>(self.sid & 0xFF)
        lastk = NULL
        lastkl = 0
        visited = 0
        while <size_t>visited < n and self.lpos < self.lcap and not self.lexh:
            lk = <const uint8_t *>cur.key_.mv_data
            lkl = cur.key_.mv_size
            raw = <const uint8_t *>cur.val_.mv_data
            rawl = cur.val_.mv_size
            lastk = lk
            lastkl = lkl
            visited += 1
            self.lpos += 1
            # process the record (the cursor stays on it meanwhile: nothing here ends the read transaction)
            if rawl and raw[0] & V_DELTA:
                pass  # visited with its base
            else:
                parse_raw(raw, rawl, &ts, &fk, &fkl, &v, &vl)
                if layout == LAYOUT_LIST or sc_ttl_expired(ts, ttl, now):
                    kp = lk if fk is NULL else fk
                    kl = lkl if fk is NULL else fkl
                    h = sc_table_hash(kp, kl)
                    if self.s.bfind(kp, kl, h) is NULL:  # else: a buffer holds a newer version
                        if layout == LAYOUT_LIST and self.s.ndeltas:
                            found = self.resolve_list(kp, kl, h, &v, &vl, &ts)
                        else:
                            found = 1
                        if found:
                            dropped += self.expire_one(kp, kl, h, v, vl, ts, ttl, now, layout)
            if self.lpos < self.lcap:  # the chunk goes on: move to the state's next record (if any)
                self.lexh = not sid_settle(cur, cur.cnext(), s0, s1)
        if lastk is not NULL:
            self.lck.len = 0
            reserve(&self.lck, lastkl)
            memcpy(self.lck.data, lastk, lastkl)
            self.lck.len = lastkl
            self.lhas = True
        if self.lexh:
            self.lhas = False  # wrap around next time
        self.s.maybe_flush()
        return dropped

    # -- checkpoints -------------------------------------------------------

    cdef long long each_live(self, SnapshotSink sink, list out) except -1:
        """Pass every live entry (newest version; lists resolved) to sink, or append it to out."""
        cdef sc_table **tabs
        cdef Py_ssize_t ntabs = 0
        cdef Memtable m
        self.s.guard()
        if self.sid < 0:
            return 0
        tabs = <sc_table **>malloc((self.s.nimm + 1) * sizeof(sc_table *))
        if tabs is NULL:
            raise MemoryError()
        try:
            for m in self.tiers():  # oldest first, as LMDBStore.bfind searches them newest first
                if m.t is not NULL and m.t.count:  # an empty one shadows nothing: no probe per LMDB record
                    tabs[ntabs] = m.t
                    ntabs += 1
            if sink is not None:
                sink.check(sink.presize(self.s.record_bytes_bound()))
            return scan_live(self.s.txn() if self.s.spilled else None, tabs, ntabs, self.sid, self.lbit,
                             self.s.ndeltas, resolve_live, self, NULL, sink, out)
        finally:
            free(tabs)

    cdef long long snapshot(self, SnapshotSink sink) except -1:
        return self.each_live(sink, None)

    cdef long long snapshot_split(self, SnapshotSink sink, SnapshotSink second) except -1:
        """A large state's LMDB records are scanned by two threads, the lower half of the key groups into sink
        and the upper half into second, each with a read transaction of its own (the caller's checkpoint holds
        the backend, so a flush committing between their beginnings only adds records that a buffer still
        shadows); the buffered entries then go to sink.  A state that needs its lists' append-deltas resolved
        (a Python call per record) or is small takes the one-thread scan."""
        cdef sc_table **tabs
        cdef Py_ssize_t ntabs = 0
        cdef Memtable m
        cdef long long n
        cdef int mid
        cdef size_t bound
        cdef _ScanHalf upper
        self.s.guard()
        if self.sid < 0 or not self.s.spilled or (self.lbit and self.s.ndeltas) or self.n < PARALLEL_SCAN_ENTRIES \
                or sink.kg_end <= sink.kg_start or second.kg_start != sink.kg_start or second.kg_end != sink.kg_end:
            return self.snapshot(sink)
        mid = (sink.kg_start + sink.kg_end) // 2
        bound = self.s.record_bytes_bound() // 2
        sink.check(sink.presize(bound))
        second.check(second.presize(bound))
        tabs = <sc_table **>malloc((self.s.nimm + 1) * sizeof(sc_table *))
        if tabs is NULL:
            raise MemoryError()
        upper = _ScanHalf()
        try:
            for m in self.tiers():
                if m.t is not NULL and m.t.count:
                    tabs[ntabs] = m.t
                    ntabs += 1
            upper.start(self, self.s.env.begin(buffers=False), mid + 1, sink.kg_end, tabs, ntabs, second)
            n = scan_lmdb(self.s.txn(), sink.kg_start, mid, tabs, ntabs, self.sid, self.lbit, self.s.ndeltas,
                          resolve_live, self, NULL, sink, None)
            n += upper.finish()
            return n + scan_buffers(tabs, ntabs, self.sid, resolve_live, self, sink, None)
        finally:
            upper.join()
            free(tabs)

    cdef object consistent_copy(self):
        """This state's view of the store's cut (one cut shared by every state of one checkpoint)."""
        cdef LMDBCut c = self.s.cut()
        cdef LMDBCutTable t = LMDBCutTable.__new__(LMDBCutTable)
        t.c = c
        t.sid = self.sid
        t.sidb = self.sidb
        t.lbit = self.lbit
        t.n = self.n
        c.users += 1
        return t

    cdef int restamp(self, int64_t ts, int layout) except -1:
        cdef list entries = []
        cdef bytes k, v
        cdef const uint8_t *kp
        self.each_live(None, entries)
        for k, v, _ in entries:
            kp = <const uint8_t *>PyBytes_AS_STRING(k)
            if layout == LAYOUT_LIST:
                restamp_blob(<uint8_t *>PyBytes_AS_STRING(v), <uint8_t *>PyBytes_AS_STRING(v) + PyBytes_GET_SIZE(v), ts)
            self.s.bput(kp, PyBytes_GET_SIZE(k), sc_table_hash(kp, PyBytes_GET_SIZE(k)), FLAG_PUT | self.lbit,
                        <const uint8_t *>PyBytes_AS_STRING(v), PyBytes_GET_SIZE(v), ts,
                        map_prefix_len(kp, PyBytes_GET_SIZE(k)) if self.layout == LAYOUT_MAP else 0)
            self.s.maybe_flush()
        return 0


# ---------------------------------------------------------------- streamed get_keys

cdef enum:
    SCAN_CHUNK = 256     # LMDB records a key scan reads per cursor pass


cdef inline uint32_t ld32(const uint8_t *p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return v


cdef inline void rec_lk(const uint8_t *r, const uint8_t **p, size_t *n) noexcept nogil:
    """The LMDB key of a key-scan buffer record: u8 live | u32 fkl | u32 lkl (0: the full key) | fk | [lk]."""
    cdef uint32_t fkl = ld32(r + 1)
    cdef uint32_t lkl = ld32(r + 5)
    if lkl == 0:
        p[0] = r + 9
        n[0] = fkl
    else:
        p[0] = r + 9 + fkl
        n[0] = lkl


cdef int cmp_rec(const void *a, const void *b) noexcept nogil:
    cdef const uint8_t *ka
    cdef const uint8_t *kb
    cdef size_t kal, kbl
    rec_lk((<const uint8_t **>a)[0], &ka, &kal)
    rec_lk((<const uint8_t **>b)[0], &kb, &kbl)
    return cmp_mem(ka, kal, kb, kbl)


@cython.final
cdef class LMDBKeyScan:
    """``get_keys`` on the LMDB tier, streamed: the keys of one state under one namespace, as of its creation.

    The cut is small: the state's buffered entries of that namespace (newest version per key, tombstones
    included), keys only, copied into one C buffer and sorted by LMDB key (bounded by the write buffers), plus
    an LMDB read transaction of its own (MVCC keeps its view fixed whatever is flushed later).  Iteration
    merges the two in LMDB-key order, reading LMDB with a cursor SCAN_CHUNK records at a time (values are
    not copied: the transaction yields buffers and only the flag byte, or the full key of a hashed record,
    is read), the buffer version winning; a list's append-delta records fold into their base.  A key is
    yielded once: map entries of one (key, namespace) are adjacent in LMDB order, except under prefixes of
    400+ bytes, which are deduplicated within their (contiguous) group of LMDB keys sharing 400 bytes.

    Its read transaction never blocks the store: a map resize, an environment reopen (LMDBStore.detach_scans)
    first writes the keys this scan has not yielded yet to an unlinked temporary file in the working
    directory (in memory if that fails) and ends the transaction; ``close`` ends it (the scan then raises
    BackendClosedError).  Not thread-safe (one keyed backend, one thread).
    """
    cdef LMDBStore s
    cdef bytes sidb
    cdef bytes ns
    cdef object txn             # own read transaction (buffers=True); None: LMDB empty at creation, or detached
    cdef object cur
    cdef bint lmdb_done
    cdef bint seek
    cdef bytes target           # next cursor position when seek
    cdef list lq                # LMDB look-ahead: [(LMDB key (a delta's: its base's), full composite key)]
    cdef Py_ssize_t lpos
    cdef bytes last_lk
    cdef sc_buf bb              # buffer records (see rec_lk)
    cdef const uint8_t **brec   # sorted by LMDB key
    cdef size_t bn, bi
    cdef bytes last_prefix      # output dedup
    cdef bytes group_head
    cdef set seen_long
    cdef object spool           # detached: a file of u32 length + key records still to yield
    cdef list spooled           # detached, the file failed: the keys still to yield (from spos)
    cdef Py_ssize_t spos
    cdef bint killed
    cdef bint finished
    cdef object __weakref__

    def __cinit__(self, *args, **kwargs):
        buf_init(&self.bb)

    def __init__(self, LMDBStore s, int sid, bytes sidb, bytes ns):
        self.s = s
        self.ns = ns
        self.sidb = sidb
        self.lq = []
        if sid < 0:
            self.finished = True  # no entry was ever written
            return
        self.snapshot_buffers(sid)
        if s.spilled:
            if s.env_failed:
                s.reopen()
            try:
                self.txn = s.env.begin(buffers=True)
            except lmdb.Error as e:
                if isinstance(e, lmdb.PanicError):
                    s.env_failed = True
                raise read_failed(s.path, e, " for get_keys") from e
            self.cur = self.txn.cursor()
            self.seek = True
            self.target = b"\x00\x00" + sidb
            s.scans = [r for r in s.scans if r() is not None]
            s.scans.append(weakref.ref(self))
        else:
            self.lmdb_done = True

    def __dealloc__(self):
        self.end_txn()
        if self.spool is not None:
            try:
                self.spool.close()
            except BaseException:
                pass
            self.spool = None
        free(self.brec)
        self.brec = NULL
        sc_buf_free(&self.bb)

    cdef void end_txn(self) noexcept:
        self.cur = None
        if self.txn is not None:
            try:
                self.txn.abort()
            except BaseException:
                pass
            self.txn = None
        self.lmdb_done = True

    cdef int snapshot_buffers(self, int sid) except -1:
        cdef LMDBStore s = self.s
        cdef Memtable m
        cdef size_t pos, off, n = 0
        cdef sc_entry *e
        cdef sc_kc_parts parts
        cdef const uint8_t *k
        cdef const uint8_t *nsp = <const uint8_t *>PyBytes_AS_STRING(self.ns)
        cdef size_t nsl = <size_t>PyBytes_GET_SIZE(self.ns)
        cdef uint32_t fkl, lkl
        cdef uint8_t *w
        cdef bytes lk
        for m in s.imm + [s.act]:
            if m.t is NULL:
                continue
            pos = 0
            while True:
                e = sc_table_next(m.t, &pos)
                if e is NULL:
                    break
                k = sc_entry_key(e)
                if e.klen < 4 or sc_be16_get(k + 2) != sid or s.bfind(k, e.klen, e.hash) != e:
                    continue  # another state, or not the newest version of its key
                check(sc_kc_parse(k, e.klen, &parts))
                if parts.nslen != nsl or (nsl and memcmp(parts.ns, nsp, nsl) != 0):
                    continue
                fkl = <uint32_t>e.klen
                lkl = 0
                lk = None
                if e.klen > MAX_DIRECT_KEY:
                    lk = lmdb_key(k, e.klen)
                    lkl = <uint32_t>PyBytes_GET_SIZE(lk)
                reserve(&self.bb, 9 + fkl + lkl)
                w = self.bb.data + self.bb.len
                w[0] = kind(e) != FLAG_TOMB
                memcpy(w + 1, &fkl, 4)
                memcpy(w + 5, &lkl, 4)
                memcpy(w + 9, k, fkl)
                if lkl:
                    memcpy(w + 9 + fkl, PyBytes_AS_STRING(lk), lkl)
                self.bb.len += 9 + fkl + lkl
                n += 1
        if n == 0:
            return 0
        self.brec = <const uint8_t **>malloc(n * sizeof(uint8_t *))
        if self.brec is NULL:
            raise MemoryError()
        off = 0
        for pos in range(n):
            self.brec[pos] = self.bb.data + off
            off += 9 + ld32(self.bb.data + off + 1) + ld32(self.bb.data + off + 5)
        with nogil:
            qsort(self.brec, n, sizeof(uint8_t *), cmp_rec)
        self.bn = n
        return 0

    cdef int refill(self) except -1:
        """Read up to SCAN_CHUNK of this state's LMDB records (of the namespace) into lq."""
        cdef const uint8_t *nsp = <const uint8_t *>PyBytes_AS_STRING(self.ns)
        cdef size_t nsl = <size_t>PyBytes_GET_SIZE(self.ns)
        cdef bytes sidb = self.sidb
        self.lq = []
        self.lpos = 0
        try:
            self.read_chunk(nsp, nsl, sidb)
        except lmdb.Error as e:
            raise read_failed(self.s.path, e, " for get_keys") from e
        return 0

    cdef int read_chunk(self, const uint8_t *nsp, size_t nsl, bytes sidb) except -1:
        cdef long kgi
        cdef sc_kc_parts parts
        cdef bytes lkey, mapped, fk
        cdef int flags
        cur = self.cur
        while len(self.lq) < SCAN_CHUNK and not self.lmdb_done:
            if self.seek:
                self.seek = False
                if not cur.set_range(self.target):
                    self.end_txn()
                    break
            elif not cur.next():
                self.end_txn()
                break
            lkey = bytes(cur.key())
            if lkey[2:4] != sidb:  # another state: jump to this one's range in the next key group
                if lkey[2:4] < sidb:
                    self.target = lkey[:2] + sidb
                else:
                    kgi = (lkey[0] << 8 | lkey[1]) + 1  # not int.from_bytes (see above)
                    if kgi > 0xFFFF:
                        self.end_txn()
                        break
                    self.target = kgi.to_bytes(2, "big") + sidb
                self.seek = True
                continue
            val = cur.value()
            flags = val[0]
            if flags & (V_HASHED | V_DELTA):
                mapped = lkey[:len(lkey) - 8] if flags & V_DELTA else lkey
                if mapped == self.last_lk:
                    continue  # an append-delta of the list just read
                fk = record_full_key(lkey, bytes(val)) if flags & V_HASHED else mapped
            else:
                mapped = fk = lkey
            val = None
            self.last_lk = mapped
            check(sc_kc_parse(<const uint8_t *>PyBytes_AS_STRING(fk), PyBytes_GET_SIZE(fk), &parts))
            if parts.nslen == nsl and (nsl == 0 or memcmp(parts.ns, nsp, nsl) == 0):
                self.lq.append((mapped, fk))
        return 0

    cdef object next_key(self):
        """The next serialized key of the merge, or None at the end."""
        cdef const uint8_t *r
        cdef const uint8_t *blk
        cdef size_t blkl
        cdef int c
        cdef bytes lk, fk
        while True:
            if self.lpos >= len(self.lq) and not self.lmdb_done:
                self.refill()
            lhead = self.lq[self.lpos] if self.lpos < len(self.lq) else None
            r = self.brec[self.bi] if self.bi < self.bn else NULL
            if lhead is None and r is NULL:
                return None
            if r is not NULL:
                rec_lk(r, &blk, &blkl)
                if lhead is None:
                    c = -1
                else:
                    lk = lhead[0]
                    c = cmp_mem(blk, blkl, <const uint8_t *>PyBytes_AS_STRING(lk), PyBytes_GET_SIZE(lk))
            else:
                c = 1
            if c <= 0:  # the buffered version (it wins over LMDB's)
                self.bi += 1
                if c == 0:
                    self.lpos += 1
                if not r[0]:
                    continue  # a tombstone
                fk = as_bytes(r + 9, ld32(r + 1))
                lk = fk if blkl == <size_t>PyBytes_GET_SIZE(fk) else as_bytes(blk, blkl)
            else:
                self.lpos += 1
                lk, fk = lhead
            key = self.emit(lk, fk)
            if key is not None:
                return key

    cdef object emit(self, bytes lk, bytes fk):
        """fk's serialized key unless already yielded (see the class docstring), else None."""
        cdef sc_kc_parts parts
        cdef const uint8_t *p = <const uint8_t *>PyBytes_AS_STRING(fk)
        check(sc_kc_parse(p, PyBytes_GET_SIZE(fk), &parts))
        prefix = fk[:<Py_ssize_t>(parts.user_key - p)]
        if prefix == self.last_prefix:
            return None
        self.last_prefix = prefix
        if PyBytes_GET_SIZE(prefix) >= HASHED_HEAD:
            head = lk[:HASHED_HEAD]
            if head != self.group_head:
                self.group_head = head
                self.seen_long = set()
            if prefix in self.seen_long:
                return None
            self.seen_long.add(prefix)
        return as_bytes(parts.key, parts.klen)

    def __iter__(self):
        return self

    def __next__(self):
        s = self.s
        if self.killed or s.closed or s.is_forked:
            s.guard()
            from statecore.errors import BackendClosedError
            raise BackendClosedError("the keyed state backend was closed during get_keys")
        if self.spool is not None or self.spooled is not None:
            return self.unspool()
        if not self.finished:
            key = self.next_key()
            if key is not None:
                return key
            self.finish()
        raise StopIteration

    cdef void finish(self) noexcept:
        self.finished = True
        self.end_txn()
        free(self.brec)
        self.brec = NULL
        self.bn = self.bi = 0
        sc_buf_free(&self.bb)
        buf_init(&self.bb)
        self.lq = []
        self.seen_long = None

    cdef int detach(self) except -1:
        """End the read transaction (a map resize or reopen needs it): the keys not yielded yet go to a spool
        file in the working directory (in memory if the file fails)."""
        import tempfile
        if self.txn is None or self.finished:
            return 0
        try:
            f = tempfile.TemporaryFile(dir=os.path.dirname(self.s.path), prefix="keyscan-", buffering=0)
        except OSError:
            f = None
        good = 0
        pending = []
        while True:
            key = self.next_key()
            if key is not None:
                pending.append(key)
            if pending and (key is None or len(pending) >= 1024) and f is not None:
                blob = b"".join(len(k).to_bytes(4, "little") + k for k in pending)
                try:
                    mv = memoryview(blob)
                    while mv:
                        mv = mv[f.write(mv):]
                    good += len(blob)
                    pending = []
                except OSError:  # the disk is full: keep the rest in memory (keys only)
                    f.seek(0)
                    done = f.read(good)
                    f.close()
                    f = None
                    pending = unspool_blob(done) + pending
            if key is None:
                break
        self.finish()
        if f is not None:
            f.seek(0)
            self.spool = io.BufferedReader(f)
        else:
            self.spooled = pending
            self.spos = 0
        return 0

    cdef object unspool(self):
        if self.spooled is not None:
            if self.spos < len(self.spooled):
                self.spos += 1
                return self.spooled[self.spos - 1]
            self.spooled = None
            raise StopIteration
        n = self.spool.read(4)
        if len(n) == 4:
            return self.spool.read(int.from_bytes(n, "little"))
        self.spool.close()
        self.spool = None
        raise StopIteration

    cdef void kill(self) noexcept:
        """LMDBStore.close(): end the transaction; the scan raises BackendClosedError."""
        self.killed = True
        self.finish()
        if self.spool is not None:
            try:
                self.spool.close()
            except BaseException:
                pass
            self.spool = None
        self.spooled = None


cdef list unspool_blob(bytes blob):
    out = []
    cdef Py_ssize_t i = 0, n
    while i + 4 <= len(blob):
        n = int.from_bytes(blob[i:i + 4], "little")
        out.append(blob[i + 4:i + 4 + n])
        i += 4 + n
    return out


# ---------------------------------------------------------------- asynchronous checkpoints

@cython.final
cdef class LMDBCut:
    """A consistent cut of an LMDBStore for ``checkpoint_async``, taken synchronously, read later from the
    checkpoint thread: copies of every write buffer (sc_table_clone; bounded by write_buffer_size x
    max_write_buffer_number, with no Python objects) + an LMDB read transaction opened at cut time.

    LMDB MVCC keeps the transaction's view fixed whatever is flushed later; the copies keep the buffered
    data fixed.  statecore._mdb opens environments with MDB_NOTLS, so a read transaction may be used from another
    thread when uses do not overlap (``lock``).  While any cut holds its transaction the store does not
    resize the map: a flush that fills the map waits until the cut is released (then the caller's thread
    resizes).  The cut is released when the last state's view is done (its snapshot, or ``count`` after a
    delta), when the snapshot fails, when an older cut is found alive by a newer one (checkpoints of a
    backend run one at a time, so it is stale), when collected, or by ``LMDBStore.close`` (``kill``).
    """
    cdef LMDBStore s
    cdef sc_table **tabs      # buffer copies, oldest first (the active buffer last)
    cdef Py_ssize_t ntabs
    cdef Transaction txn      # None: LMDB was empty at cut time
    cdef object lock          # held around every use of txn / tabs
    cdef bint cancel          # set by close(): a running snapshot stops at its next record
    cdef readonly bint retired  # no new state view may join (released, or being released)
    cdef bint holds_txn       # counted in s.ncuts
    cdef uint64_t floor       # LMDB append-deltas from this sequence on are in a buffer copy
    cdef long long ndeltas
    cdef long long no         # creation order within the store
    cdef int users            # state views not done yet
    cdef sc_buf rb            # resolved lists (base + deltas) of the running scan
    cdef size_t bytes_bound   # the store's record_bytes_bound() at cut time (the snapshot sink's presize)
    cdef object __weakref__

    def __cinit__(self, *args, **kwargs):
        buf_init(&self.rb)

    def __init__(self, LMDBStore s):
        cdef Memtable m
        cdef Py_ssize_t i
        self.bytes_bound = s.record_bytes_bound()
        self.s = s
        self.lock = threading.RLock()
        s.cut_serial += 1
        self.no = s.cut_serial
        self.tabs = <sc_table **>malloc((s.nimm + 1) * sizeof(sc_table *))
        if self.tabs is NULL:
            raise MemoryError()
        for m in s.imm + [s.act]:
            if m.t is NULL or m.t.count == 0:
                continue
            self.tabs[self.ntabs] = sc_table_clone(m.t)
            if self.tabs[self.ntabs] is NULL:
                self.free_tabs()
                raise MemoryError("statecore: out of memory while copying the write buffers for an "
                                  "asynchronous checkpoint")
            self.ntabs += 1
        self.ndeltas = s.ndeltas
        if s.spilled:
            if s.env_failed:
                s.reopen()
            try:
                self.txn = s.env.begin(buffers=False)
            except lmdb.Error as e:
                if isinstance(e, lmdb.PanicError):
                    s.env_failed = True
                self.free_tabs()
                raise read_failed(s.path, e, " for a checkpoint") from e
            with s.cv:
                s.ncuts += 1
                self.holds_txn = True
        # after the transaction began: every delta it sees below the floor was flushed by a retired buffer
        self.floor = s.delta_floor()

    def __dealloc__(self):
        try:
            self.release()
        except BaseException:
            pass
        self.free_tabs()
        sc_buf_free(&self.rb)

    cdef void free_tabs(self) noexcept:
        cdef Py_ssize_t i
        if self.tabs is not NULL:
            for i in range(self.ntabs):
                sc_table_free(self.tabs[i])
            free(self.tabs)
            self.tabs = NULL
        self.ntabs = 0

    cdef int release(self) except -1:
        """End the transaction and free the copies (any thread; idempotent)."""
        cdef LMDBStore s = self.s
        self.retired = True
        if s is None:
            return 0
        with self.lock:
            txn = self.txn
            held = self.holds_txn
            self.txn = None
            self.holds_txn = False
            self.free_tabs()
            if txn is not None:
                txn.abort()
        if held:
            with s.cv:
                s.ncuts -= 1
                if s.grow_req or s.env_failed:
                    s.signal = 1  # the caller's thread resizes the map / reopens the environment at its next
                                  # operation (or stall)
                s.cv.notify_all()
        return 0

    def kill(self):
        """LMDBStore.close(): stop a running snapshot, release everything."""
        self.cancel = True
        self.release()

    cdef int enter(self) except -1:
        """Called with lock held, before reading."""
        if self.cancel or self.s.closed:
            from statecore.errors import BackendClosedError
            raise BackendClosedError("the keyed state backend was closed before this asynchronous checkpoint "
                                     "was read; its cut is gone")
        if self.tabs is NULL and self.retired:
            raise StateError("statecore: this checkpoint cut was already released")
        return 0

    cdef int release_older(self) except -1:
        """Checkpoints of one backend run one at a time (in the order taken): older cuts still alive are stale
        (their checkpoint failed before reading them) and only block map resizes."""
        cdef LMDBCut o
        for r in list(self.s.cuts):
            o = r()
            if o is not None and o is not self and o.no < self.no and not o.retired:
                o.release()
        return 0

    cdef sc_entry *bfind(self, const uint8_t *k, size_t kl, uint32_t h) noexcept:
        cdef Py_ssize_t i
        cdef sc_entry *e
        for i in range(self.ntabs - 1, -1, -1):
            e = sc_table_find(self.tabs[i], k, kl, h)
            if e is not NULL:
                return e
        return NULL

    cdef int lget(self, const uint8_t *k, size_t kl, MDB_val *raw) except -1:
        """As LMDBStore.lget, in the cut's transaction (call with lock held; *raw is valid until the cut is
        released)."""
        if self.txn is None:
            return 0
        return lmdb_lookup(self.txn, k, kl, raw)

    cdef int llist(self, const uint8_t *k, size_t kl, sc_buf *out, int64_t *ts) except -1:
        cdef MDB_val raw
        if self.txn is None:
            return 0
        if self.ndeltas == 0:
            return self.lget(k, kl, &raw) and append_list_base(&raw, out, ts)
        return llist_deltas(self.txn, k, kl, out, ts, self.floor)

    cdef int resolve_list(self, const uint8_t *k, size_t kl, uint32_t h, sc_buf *rb, int64_t *ts) except -1:
        """The full list of k at the cut into rb (base + deltas, oldest first); 0 when there is none."""
        cdef Py_ssize_t i, j, nd = 0
        cdef sc_entry *e
        cdef sc_entry *base = NULL
        cdef sc_entry **deltas = <sc_entry **>malloc((self.ntabs + 1) * sizeof(sc_entry *))
        if deltas is NULL:
            raise MemoryError()
        try:
            for i in range(self.ntabs - 1, -1, -1):  # newest first
                e = sc_table_find(self.tabs[i], k, kl, h)
                if e is NULL:
                    continue
                if kind(e) == FLAG_MERGE:
                    deltas[nd] = e
                    nd += 1
                    continue
                base = e
                break
            rb.len = 0
            if nd:
                ts[0] = ets(deltas[0])
            if base is NULL:
                if not self.llist(k, kl, rb, ts) and nd == 0:
                    return 0
            elif kind(base) == FLAG_PUT:
                reserve(rb, bvlen(base))
                memcpy(rb.data, bval(base), bvlen(base))
                rb.len = bvlen(base)
                ts[0] = ets(base)
            elif nd == 0:
                return 0
            for j in range(nd - 1, -1, -1):  # oldest delta first
                e = deltas[j]
                reserve(rb, bvlen(e))
                memcpy(rb.data + rb.len, bval(e), bvlen(e))
                rb.len += bvlen(e)
            return 1
        finally:
            free(deltas)

    cdef long long each_live(self, int sid, int lbit, SnapshotSink sink) except -1:
        """LMDBStateTable.each_live at the cut (into sink); call with lock held."""
        sink.check(sink.presize(self.bytes_bound))
        return scan_live(self.txn, self.tabs, self.ntabs, sid, lbit, self.ndeltas, resolve_cut, self, &self.cancel,
                         sink, None)


ctypedef int (*resolve_fn)(object ctx, const uint8_t *k, size_t kl, uint32_t h, const uint8_t **v, size_t *vl,
                           int64_t *ts) except -1


cdef int resolve_live(object ctx, const uint8_t *k, size_t kl, uint32_t h, const uint8_t **v, size_t *vl,
                      int64_t *ts) except -1:
    return (<LMDBStateTable>ctx).resolve_list(k, kl, h, v, vl, ts)


cdef int resolve_cut(object ctx, const uint8_t *k, size_t kl, uint32_t h, const uint8_t **v, size_t *vl,
                     int64_t *ts) except -1:
    cdef LMDBCut c = <LMDBCut>ctx
    if not c.resolve_list(k, kl, h, &c.rb, ts):
        return 0
    v[0] = c.rb.data
    vl[0] = c.rb.len
    return 1


cdef inline sc_entry *tabs_find(sc_table **tabs, Py_ssize_t ntabs, const uint8_t *k, size_t kl,
                                uint32_t h) noexcept nogil:
    """The newest version of k in tabs (oldest first), or NULL."""
    cdef Py_ssize_t i
    cdef sc_entry *e
    for i in range(ntabs - 1, -1, -1):
        e = sc_table_find(tabs[i], k, kl, h)
        if e is not NULL:
            return e
    return NULL


cdef inline int emit(SnapshotSink sink, list out, const uint8_t *k, size_t kl, const uint8_t *v, size_t vl,
                     int64_t ts) except -1:
    if sink is not None:
        sink.check(sink.add(k, kl, NULL, 0, v, vl, ts))
    else:
        out.append((as_bytes(k, kl), as_bytes(v, vl), ts))
    return 0


cdef enum:
    SCAN_DONE = 0          # scan_range: past the key-group range (or LMDB's end)
    SCAN_RECORD = 1        # the cursor is on a live record the caller must handle (list deltas, no sink)
    SCAN_CURSOR = -1       # LMDB failed (Cursor.raise_err)
    SCAN_CORRUPT = -2      # a malformed LMDB record
    SCAN_CANCELLED = -3    # *cancel was set
    SCAN_SINK = -4         # sink.add failed (its code in *sink_rc)


cdef inline int settled(const uint8_t *lk, size_t lkl, uint8_t s0, uint8_t s1, int *next_kg) noexcept nogil:
    """1 when LMDB key lk is a record of state (s0, s1); else 0 and *next_kg = the key group whose range of the
    state comes next in LMDB order (lk's own, or the next one when lk sorts after the state's range in it)."""
    cdef int kgi
    if lkl >= 4 and lk[2] == s0 and lk[3] == s1:
        return 1
    kgi = (lk[0] << 8 | lk[1]) if lkl >= 2 else (lk[0] if lkl == 1 else 0)
    if lkl > 2 and (lk[2] > s0 or (lk[2] == s0 and lkl > 3 and lk[3] > s1)):
        kgi += 1
    next_kg[0] = kgi
    return 0


cdef int sid_settle(Cursor cur, int ok, uint8_t s0, uint8_t s1) except -1:
    """From the cursor's record (ok: it has one) on, the first record of state (s0, s1) in LMDB order, seeking
    over other states' records to the state's range in the next candidate key group: 1 when the cursor is on
    one, 0 when there is none left."""
    cdef int kgi = 0
    cdef uint8_t target[4]
    while ok:
        if settled(<const uint8_t *>cur.key_.mv_data, cur.key_.mv_size, s0, s1, &kgi):
            return 1
        if kgi > 0xFFFF:
            return 0
        target[0] = <uint8_t>(kgi >> 8)
        target[1] = <uint8_t>(kgi & 0xFF)
        target[2] = s0
        target[3] = s1
        ok = cur.cset_range(target, 4)
    return 0


cdef int scan_range(Cursor cur, int ok, int kg_end, uint8_t s0, uint8_t s1, sc_table **tabs, Py_ssize_t ntabs,
                    bint per_record, const bint *cancel, SnapshotSink sink, long long *n,
                    int *sink_rc) noexcept nogil:
    """The LMDB records of state (s0, s1) from the cursor's (ok: positioned) up to key group kg_end that no
    buffer shadows (tabs), to sink, without the GIL: seeks over other states' records to the state's range in
    the next key group, parses records in place in the map (no object per record).  With per_record each such
    record is left to the caller (SCAN_RECORD, the cursor on it).  Returns a SCAN_* code."""
    cdef const uint8_t *lk
    cdef const uint8_t *raw
    cdef const uint8_t *fk
    cdef const uint8_t *v
    cdef const uint8_t *kp
    cdef size_t lkl, fkl, vl, kl
    cdef int64_t ts
    cdef int kgi = 0, rc
    cdef uint8_t target[4]
    while ok > 0:
        if cancel is not NULL and cancel[0]:
            return SCAN_CANCELLED
        lk = <const uint8_t *>cur.key_.mv_data
        lkl = cur.key_.mv_size
        if not settled(lk, lkl, s0, s1, &kgi):
            if kgi > kg_end or kgi > 0xFFFF:
                return SCAN_DONE
            target[0] = <uint8_t>(kgi >> 8)
            target[1] = <uint8_t>(kgi & 0xFF)
            target[2] = s0
            target[3] = s1
            ok = cur.cset_range_nogil(target, 4)
            continue
        if (lk[0] << 8 | lk[1]) > kg_end:
            return SCAN_DONE
        raw = <const uint8_t *>cur.val_.mv_data
        if cur.val_.mv_size and raw[0] & V_DELTA:
            ok = cur.cnext_nogil()
            continue
        if split_raw(raw, cur.val_.mv_size, &ts, &fk, &fkl, &v, &vl):
            return SCAN_CORRUPT
        kp = lk if fk is NULL else fk  # the composite key: the LMDB key, or the full key of a hashed one
        kl = lkl if fk is NULL else fkl
        if ntabs == 0 or tabs_find(tabs, ntabs, kp, kl, sc_table_hash(kp, kl)) is NULL:
            if per_record:
                return SCAN_RECORD
            rc = sink.add(kp, kl, NULL, 0, v, vl, ts)
            if rc:
                sink_rc[0] = rc
                return SCAN_SINK
            n[0] += 1
        ok = cur.cnext_nogil()
    return SCAN_CURSOR if ok < 0 else SCAN_DONE


cdef long long scan_lmdb(Transaction txn, int kg_start, int kg_end, sc_table **tabs, Py_ssize_t ntabs, int sid,
                         int lbit, long long ndeltas, resolve_fn resolve, object ctx, const bint *cancel,
                         SnapshotSink sink, list out) except -1:
    """The LMDB part of scan_live over key groups [kg_start, kg_end]: scan_range with the GIL released, the
    records it leaves (lists with append-deltas to resolve, or no sink) handled here."""
    cdef long long n = 0
    cdef int64_t ts
    cdef const uint8_t *fk
    cdef const uint8_t *v
    cdef const uint8_t *kp
    cdef size_t fkl, vl, kl
    cdef uint32_t h
    cdef uint8_t target[4]
    cdef uint8_t s0 = <uint8_t>(sid >> 8)
    cdef uint8_t s1 = <uint8_t>(sid & 0xFF)
    cdef bint per_record = (lbit and ndeltas) or sink is None
    cdef int ok, rc, sink_rc = 0
    cdef Cursor cur = txn.ccursor()
    try:
        target[0] = <uint8_t>(kg_start >> 8)
        target[1] = <uint8_t>(kg_start & 0xFF)
        target[2] = s0
        target[3] = s1
        ok = cur.cset_range(target, 4)
        while True:
            with nogil:
                rc = scan_range(cur, ok, kg_end, s0, s1, tabs, ntabs, per_record, cancel, sink, &n, &sink_rc)
            if rc == SCAN_DONE:
                return n
            if rc == SCAN_CURSOR:
                cur.raise_err()
            if rc == SCAN_CANCELLED:
                raise_cut_closed()
            if rc == SCAN_SINK:
                sink.check(sink_rc)
            parse_raw(<const uint8_t *>cur.val_.mv_data, cur.val_.mv_size, &ts, &fk, &fkl, &v, &vl)
            if rc == SCAN_RECORD:
                kp = <const uint8_t *>cur.key_.mv_data if fk is NULL else fk
                kl = cur.key_.mv_size if fk is NULL else fkl
                h = sc_table_hash(kp, kl)
                if not (lbit and ndeltas) or resolve(ctx, kp, kl, h, &v, &vl, &ts):
                    emit(sink, out, kp, kl, v, vl, ts)
                    n += 1
                ok = cur.cnext()
    finally:
        cur.kill()


cdef long long scan_buffers(sc_table **tabs, Py_ssize_t ntabs, int sid, resolve_fn resolve, object ctx,
                            SnapshotSink sink, list out) except -1:
    """The buffered part of scan_live: the newest buffered version of each key of state sid (tabs, oldest
    first), tombstones left out, append-deltas resolved."""
    cdef long long n = 0
    cdef int64_t ts
    cdef const uint8_t *v
    cdef size_t pos, vl
    cdef sc_entry *e
    cdef Py_ssize_t i
    for i in range(ntabs):
        pos = 0
        while True:
            e = sc_table_next(tabs[i], &pos)
            if e is NULL:
                break
            if e.klen < 4 or sc_be16_get(sc_entry_key(e) + 2) != sid:
                continue
            if tabs_find(tabs, ntabs, sc_entry_key(e), e.klen, e.hash) != e or kind(e) == FLAG_TOMB:
                continue
            if kind(e) == FLAG_MERGE:
                if resolve(ctx, sc_entry_key(e), e.klen, e.hash, &v, &vl, &ts):
                    emit(sink, out, sc_entry_key(e), e.klen, v, vl, ts)
                    n += 1
            else:
                emit(sink, out, sc_entry_key(e), e.klen, bval(e), bvlen(e), ets(e))
                n += 1
    return n


cdef long long scan_live(Transaction txn, sc_table **tabs, Py_ssize_t ntabs, int sid, int lbit, long long ndeltas,
                         resolve_fn resolve, object ctx, const bint *cancel, SnapshotSink sink, list out) except -1:
    """Every live entry of state sid (newest version; lists resolved) to sink (or appended to out): the LMDB
    records of txn not shadowed by a buffer (tabs, oldest first), then the buffered entries.  The checkpoint
    scan of LMDBStateTable (live) and LMDBCut (a cut) alike.

    LMDB is walked with a C cursor across key groups without the GIL (scan_range), records parsed in place in
    the map: no Python object per record.  *cancel (when not NULL) is checked at every record."""
    cdef long long n = 0
    if txn is not None:
        n = scan_lmdb(txn, 0, 0xFFFF, tabs, ntabs, sid, lbit, ndeltas, resolve, ctx, cancel, sink, out)
    return n + scan_buffers(tabs, ntabs, sid, resolve, ctx, sink, out)


@cython.final
cdef class _ScanHalf:
    """LMDBStateTable.snapshot_split's second thread: scan_lmdb over key groups [lo, hi] into its own sink,
    with its own read transaction (aborted when done)."""
    cdef LMDBStateTable table
    cdef Transaction txn
    cdef int lo
    cdef int hi
    cdef sc_table **tabs
    cdef Py_ssize_t ntabs
    cdef SnapshotSink sink
    cdef long long n
    cdef object error
    cdef object thread

    cdef int start(self, LMDBStateTable table, Transaction txn, int lo, int hi, sc_table **tabs, Py_ssize_t ntabs,
                   SnapshotSink sink) except -1:
        self.table = table
        self.txn = txn
        self.lo = lo
        self.hi = hi
        self.tabs = tabs
        self.ntabs = ntabs
        self.sink = sink
        self.thread = threading.Thread(target=self.run, name="statecore-snapshot", daemon=True)
        self.thread.start()
        return 0

    def run(self):
        cdef LMDBStateTable t = self.table
        try:
            self.n = scan_lmdb(self.txn, self.lo, self.hi, self.tabs, self.ntabs, t.sid, t.lbit, t.s.ndeltas,
                               resolve_live, t, NULL, self.sink, None)
        except BaseException as e:  # re-raised by finish() in the caller's thread
            self.error = e
        finally:
            self.txn.abort()

    cdef long long finish(self) except -1:
        """Wait for the scan; its count, or its exception."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        err, self.error = self.error, None
        if err is not None:
            raise err
        return self.n

    cdef int join(self) except -1:
        """Wait for the thread (the caller is failing: its own error is the one raised)."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        return 0


cdef int raise_cut_closed() except -1:
    from statecore.errors import BackendClosedError
    raise BackendClosedError("the keyed state backend was closed before this asynchronous checkpoint was read; "
                             "its cut is gone")


@cython.final
cdef class LMDBCutTable(StateTable):
    """One state's view of an LMDBCut: what ``consistent_copy`` returns (snapshot, and get / mitems / count
    for incremental deltas), read from the checkpoint thread."""
    cdef LMDBCut c
    cdef int sid
    cdef bytes sidb
    cdef int lbit
    cdef long long n
    cdef bint done
    cdef dict mindex          # map prefix -> full keys with an entry in a buffer copy (built on first use)
    cdef sc_buf rb

    def __cinit__(self, *args, **kwargs):
        buf_init(&self.rb)

    def __dealloc__(self):
        sc_buf_free(&self.rb)
        if not self.done and self.c is not None:
            try:
                self.finish()
            except BaseException:
                pass

    cdef int finish(self) except -1:
        """This view is done: the last one releases the cut."""
        if self.done:
            return 0
        self.done = True
        self.mindex = None
        self.c.users -= 1
        if self.c.users <= 0:
            self.c.retired = True  # before anything can release the GIL: no new view joins it
            self.c.release()
        return 0

    cdef void release(self) noexcept:
        try:
            self.finish()
        except BaseException:
            pass

    cdef size_t count(self):
        self.release()  # called once per state after a delta (snapshot_delta, then table_entries)
        return <size_t>self.n if self.n > 0 else 0

    cdef long long snapshot(self, SnapshotSink sink) except -1:
        cdef long long n = 0
        try:
            with self.c.lock:
                self.c.enter()
                self.c.release_older()
                n = self.c.each_live(self.sid, self.lbit, sink) if self.sid >= 0 else 0
        except BaseException:
            self.c.release()  # the checkpoint fails: release the transaction now
            raise
        finally:
            self.finish()
        return n

    cdef int get(self, const uint8_t *k, size_t kl, uint32_t h, const uint8_t **v, size_t *vl,
                 int64_t *ts) except -1:
        cdef sc_entry *e
        cdef const uint8_t *fk
        cdef size_t fkl
        cdef MDB_val raw
        try:
            with self.c.lock:
                self.c.enter()
                self.c.release_older()
                if self.lbit:
                    if not self.c.resolve_list(k, kl, h, &self.rb, ts):
                        return 0
                    v[0] = self.rb.data
                    vl[0] = self.rb.len
                    return 1
                e = self.c.bfind(k, kl, h)
                if e is not NULL:
                    if kind(e) != FLAG_PUT:
                        return 0
                    v[0] = bval(e)
                    vl[0] = bvlen(e)
                    ts[0] = ets(e)
                    return 1
                if not self.c.lget(k, kl, &raw):
                    return 0
                parse_raw(<const uint8_t *>raw.mv_data, raw.mv_size, ts, &fk, &fkl, v, vl)
                # copied out: the caller reads it after the lock is released (a close may end the cut)
                reserve(&self.rb, vl[0])
                memcpy(self.rb.data, v[0], vl[0])
                self.rb.len = vl[0]
                v[0] = self.rb.data
                return 1
        except BaseException:
            self.c.release()
            raise

    cdef list mitems(self, const uint8_t *p, size_t pl, uint32_t ph):
        cdef int64_t ts
        cdef const uint8_t *fk
        cdef const uint8_t *v
        cdef size_t fkl, vl, pos
        cdef sc_entry *e
        cdef bytes key
        cdef Py_ssize_t i
        try:
            with self.c.lock:
                self.c.enter()
                self.c.release_older()
                if self.mindex is None:
                    self.mindex = {}
                    for i in range(self.c.ntabs):
                        pos = 0
                        while True:
                            e = sc_table_next(self.c.tabs[i], &pos)
                            if e is NULL:
                                break
                            if e.klen >= 4 and sc_be16_get(sc_entry_key(e) + 2) == self.sid:
                                key = as_bytes(sc_entry_key(e), e.klen)
                                self.mindex.setdefault(key[:map_prefix_len(sc_entry_key(e), e.klen)],
                                                       set()).add(key)
                prefix = as_bytes(p, pl)
                res = {}
                if self.c.txn is not None:
                    for key, raw in range_items_in(self.c.txn, prefix):
                        parse_record(raw, &ts, &fk, &fkl, &v, &vl)
                        res[key] = (as_bytes(v, vl), ts)
                for key in self.mindex.get(prefix, ()):
                    e = self.c.bfind(<const uint8_t *>PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key),
                                     sc_table_hash(<const uint8_t *>PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key)))
                    if e is not NULL and kind(e) == FLAG_PUT:
                        res[key] = (as_bytes(bval(e), bvlen(e)), ets(e))
                    else:
                        res.pop(key, None)
                return [(k[pl:], res[k][0], res[k][1]) for k in sorted(res)]
        except BaseException:
            self.c.release()
            raise


# ---------------------------------------------------------------- restore: bulk load into LMDB

cdef struct krec:          # a bulk load's sort record: the LMDB key's first 16 bytes (be_word), the key, its put
    uint64_t k0
    uint64_t k1
    const uint8_t *k
    size_t kl
    mdb_op op
    uint32_t h             # the key filter hash of the put (0: not taken yet), moved with it


cdef int cmp_krec(const void *a, const void *b) noexcept nogil:
    cdef const krec *ra = <const krec *>a
    cdef const krec *rb = <const krec *>b
    cdef int r = cmp_words(ra.k0, ra.k1, rb.k0, rb.k1)
    return r if r else cmp_mem(ra.k, ra.kl, rb.k, rb.kl)


cdef enum:
    ENC_DONE = 0           # encode_records: the section's end
    ENC_NEW_STATE = 1      # the record at *pp belongs to another state (the caller looks it up)
    ENC_TOMBSTONE = 2      # a delta's tombstone at *pp: the rest of the section is left to load_section
    ENC_LONG_KEY = 3       # the record at *pp has a hashed LMDB key (sha256 through hashlib: the GIL)
    ENC_FULL = 4           # the batch reached its size (at a record boundary)
    ENC_NOMEM = -100
    SECTION_SORT_BYTES = 64 << 20  # an unsorted section is sorted in memory up to this size, else replayed


cdef struct bbatch:        # one write transaction's puts: LMDB keys and records in arena, their ops, key hashes
    sc_buf arena
    mdb_op *ops
    uint32_t *hs
    size_t n
    size_t cap


cdef int batch_room(bbatch *b) noexcept nogil:
    """Room for one more op in b: 0, or ENC_NOMEM (b unchanged)."""
    cdef size_t cap
    cdef void *p
    if b.n < b.cap:
        return 0
    cap = 4096 if b.cap == 0 else 2 * b.cap
    p = realloc(b.ops, cap * sizeof(mdb_op))
    if p is NULL:
        return ENC_NOMEM
    b.ops = <mdb_op *>p
    p = realloc(b.hs, cap * sizeof(uint32_t))
    if p is NULL:
        return ENC_NOMEM
    b.hs = <uint32_t *>p
    b.cap = cap
    return 0


cdef void batch_free(bbatch *b) noexcept nogil:
    free(b.ops)
    free(b.hs)
    sc_buf_free(&b.arena)
    b.ops = NULL
    b.hs = NULL
    b.n = b.cap = 0


cdef int encode_records(const uint8_t **pp, const uint8_t *end, int kg, int src_sid, uint16_t sid, int layout,
                        bbatch *b, size_t stop_at, long long *count, const uint8_t **bad) noexcept nogil:
    """Append the puts of the records at *pp (state src_sid of the file, sid of the restoring backend) to b
    until the section ends, b's arena reaches stop_at bytes, or something needs the caller (ENC_* codes; a
    problem code of section_record / record_kind with *bad the record's key).  No GIL: the checkpoint's bytes
    are verified and only read."""
    cdef const uint8_t *rec
    cdef const uint8_t *k = NULL
    cdef const uint8_t *v = NULL
    cdef uint8_t *lk
    cdef size_t kl = 0, vl = 0, n
    cdef int64_t ts = 0
    cdef int rc
    cdef sc_kc_parts parts
    while pp[0] < end:
        rec = pp[0]
        rc = section_record(pp, end, &k, &kl, &v, &vl, &ts, kg)
        if rc:
            bad[0] = k
            return rc
        if sc_be16_get(k + 2) != src_sid:
            pp[0] = rec
            return ENC_NEW_STATE
        rc = record_kind(k, kl, v, vl, ts, layout == LAYOUT_LIST, layout == LAYOUT_MAP, &parts)
        if rc < 0:
            bad[0] = k
            return rc
        if rc == REC_TOMBSTONE:
            pp[0] = rec
            return ENC_TOMBSTONE
        if kl > MAX_DIRECT_KEY:
            pp[0] = rec
            return ENC_LONG_KEY
        n = kl + 9 + vl  # the LMDB key, then the record: flags | BE64 ts | value (arena_record's layout)
        if batch_room(b) or sc_buf_reserve(&b.arena, n) != SC_OK:
            return ENC_NOMEM
        lk = b.arena.data + b.arena.len
        memcpy(lk, k, kl)
        sc_be16_put(lk + 2, sid)  # the restoring backend's state id
        b.hs[b.n] = 0  # hashed by batch_filter_bits (here the load would stall on the stores just made)
        b.ops[b.n].kind = MDB_OP_PUT
        b.ops[b.n].koff = b.arena.len
        b.ops[b.n].klen = kl
        b.ops[b.n].voff = b.arena.len + kl
        b.ops[b.n].vlen = 9 + vl
        lk[kl] = 0
        sc_be64_put(lk + kl + 1, <uint64_t>ts)
        if vl:
            memcpy(lk + kl + 9, v, vl)
        b.arena.len += n
        b.n += 1
        count[0] += 1
        if b.arena.len >= stop_at and pp[0] < end:
            return ENC_FULL
    return ENC_DONE


cdef bint ascending(const uint8_t *arena, const mdb_op *ops, size_t n, const sc_buf *after) noexcept nogil:
    """The puts' keys are strictly ascending, and above ``after`` unless it is empty."""
    cdef size_t i
    if n and after.len and cmp_mem(after.data, after.len, arena + ops[0].koff, ops[0].klen) >= 0:
        return False
    for i in range(1, n):
        if cmp_mem(arena + ops[i - 1].koff, ops[i - 1].klen, arena + ops[i].koff, ops[i].klen) >= 0:
            return False
    return True


cdef int sort_puts(const uint8_t *arena, mdb_op *ops, uint32_t *hs, size_t n, krec **recs, size_t *rcap) noexcept nogil:
    """Put one section's puts in LMDB key order (a checkpoint of this tier already is: checked first, in one
    pass): 1, or 0 when two of them have the same key (a section only an ordered replay may load), or
    ENC_NOMEM."""
    cdef size_t i
    cdef int r = -1
    cdef krec *rs
    for i in range(1, n):
        r = cmp_mem(arena + ops[i - 1].koff, ops[i - 1].klen, arena + ops[i].koff, ops[i].klen)
        if r >= 0:
            break
    if r < 0 or n < 2:
        return 1
    if r == 0:
        return 0
    if rcap[0] < n:
        free(recs[0])
        recs[0] = <krec *>malloc(n * sizeof(krec))
        rcap[0] = 0 if recs[0] is NULL else n
        if recs[0] is NULL:
            return ENC_NOMEM
    rs = recs[0]
    for i in range(n):
        rs[i].k = arena + ops[i].koff
        rs[i].kl = ops[i].klen
        rs[i].k0 = be_word(rs[i].k, rs[i].kl, 0)
        rs[i].k1 = be_word(rs[i].k, rs[i].kl, 8)
        rs[i].op = ops[i]
        rs[i].h = hs[i]
    qsort(rs, n, sizeof(krec), cmp_krec)
    for i in range(n):
        ops[i] = rs[i].op
        hs[i] = rs[i].h  # a hashed key's filter hash (taken from its full key) stays with its put
        if i and cmp_mem(rs[i - 1].k, rs[i - 1].kl, rs[i].k, rs[i].kl) == 0:
            return 0
    return 1


cdef void batch_filter_bits(LMDBStore s, bbatch *b) noexcept nogil:
    """Set the key filter bits of b's keys (before their records are visible: a superset is fine).  A key's
    hash is taken here unless encoding set it (0: its LMDB key is its composite key)."""
    cdef size_t i
    for i in range(b.n):
        if b.hs[i] == 0:
            b.hs[i] = sc_table_hash(b.arena.data + b.ops[i].koff, b.ops[i].klen)
    for i in range(min(b.n, <size_t>PREFETCH_AHEAD)):
        kf_prefetch(s.kf, s.kfmask, b.hs[i])
    for i in range(b.n):
        if i + PREFETCH_AHEAD < b.n:
            kf_prefetch(s.kf, s.kfmask, b.hs[i + PREFETCH_AHEAD])
        kf_add(s.kf, s.kfmask, b.hs[i])


cdef int write_batch(LMDBStore s, const bbatch *b) except -1:
    """b's puts in one LMDB write transaction (MDB_APPEND while they land past the last key).  Any thread;
    the GIL is released while LMDB works."""
    txn = s.env.begin(write=True)
    try:
        (<Transaction>txn).capply(b.arena.data, b.ops, b.n)
        txn.commit()
    except BaseException:
        txn.abort()
        raise
    return 0


@cython.final
cdef class BulkWriter:
    """Writes bulk_load's batches on a thread of its own while the next batch is encoded (two cores: LMDB's
    B-tree appends and the page-cache writes of its commits overlap with parsing and encoding).  One thread
    for the whole load (a restore writes a hundred batches and more)."""
    cdef LMDBStore s
    cdef bbatch *b
    cdef object thread
    cdef object go
    cdef object done
    cdef bint busy
    cdef bint stop
    cdef object error

    cdef int submit(self, LMDBStore s, bbatch *b) except -1:
        """Write b on the thread (the previous batch must be finished)."""
        if self.thread is None:
            self.go = threading.Event()
            self.done = threading.Event()
            self.thread = threading.Thread(target=self.run, name="statecore-restore-write", daemon=True)
            self.thread.start()
        self.s = s
        self.b = b
        self.error = None
        self.busy = True
        self.done.clear()
        self.go.set()
        return 0

    def run(self):
        while True:
            self.go.wait()
            self.go.clear()
            if self.stop:
                return
            try:
                write_batch(self.s, self.b)
            except BaseException as e:  # re-raised (or handled: a full map) by finish() in the caller's thread
                self.error = e
            self.done.set()

    cdef int finish(self) except -1:
        """Wait for the batch; a full map is doubled and the batch written again here, other errors raised."""
        if not self.busy:
            return 0
        self.done.wait()
        self.busy = False
        err, self.error = self.error, None
        if err is not None:
            if not isinstance(err, lmdb.MapFullError):
                raise err
            commit_batch(self.s, self.b)
        return 0

    cdef int close(self) except -1:
        """Wait for the batch being written (its error is dropped: the caller is failing or finished), end
        the thread."""
        if self.thread is None:
            return 0
        if self.busy:
            self.done.wait()
            self.busy = False
        self.stop = True
        self.go.set()
        self.thread.join()
        self.thread = None
        return 0


cdef int commit_batch(LMDBStore s, const bbatch *b) except -1:
    """write_batch in this thread, doubling the map (no transaction open) and retrying while it is full."""
    while True:
        try:
            return write_batch(s, b)
        except lmdb.MapFullError:
            s.grow_map()
            err = s.grow_error
            if err is not None:
                s.grow_error = None
                raise err


def bulk_load(LMDBStore s, list sections):
    """A restore's fast path: load key-group sections of verified data files straight into LMDB.

    ``sections``: ``(data, offset, length, key group, sidmap, where)`` items (load_section's arguments),
    best in key-group order.  The caller's rule: the store's write buffers are empty (nothing is loaded
    otherwise: every item comes back) and each item is the first section of its key group in this restore, so
    no buffered or LMDB version of its keys exists.  The records are validated exactly as load_section does
    (``CorruptCheckpointError`` naming ``where``), relabelled with the restoring backend's state ids, put in
    LMDB key order per section (a checkpoint of this tier already is) and written as LMDB records in write
    transactions of about 512 KiB (MDB_APPEND while the keys land past LMDB's last key): no
    write buffer insert, no flush-time sort (Flink's RocksDB restore also writes straight into the database,
    through a write batch).  Encoding runs without the GIL while a thread writes the previous batch.  Entry
    counts and the key filter are kept as writes keep them.  Memory: two batches, whatever the state's size,
    when sections are in key order (a section larger than a batch then streams); a section out of order is
    sorted in memory up to SECTION_SORT_BYTES and replayed through the write buffers beyond.  What is not
    written here (a section holding a tombstone, as incremental deltas do, or a repeated key; the rest of a
    section that leaves key order after a part of it was written) is returned as load_section items (a
    section's tail when a part was written), in their order, to be replayed after.
    """
    cdef const uint8_t[::1] data
    cdef const uint8_t *p
    cdef const uint8_t *end
    cdef const uint8_t *bad = NULL
    cdef const uint8_t *q
    cdef const uint8_t *k = NULL
    cdef const uint8_t *v = NULL
    cdef size_t kl = 0, vl = 0
    cdef int64_t ts = 0
    cdef const uint8_t *start
    cdef const uint8_t *chunk
    cdef size_t stop_at
    cdef sc_buf lastkey
    cdef uint8_t head[4]
    cdef bbatch batches[2]
    cdef bbatch *b
    cdef BulkWriter writer = BulkWriter()
    cdef size_t sec_n, sec_len, rcap = 0, limit
    cdef Py_ssize_t off, length
    cdef int kg, layout = 0, src_sid, rc, cur = 0
    cdef uint16_t sid = 0
    cdef long long run_n = 0, loaded = 0
    cdef krec *recs = NULL
    cdef LMDBStateTable table = None
    refused = []
    s.guard()
    if s.buf.count or s.nimm:
        return list(sections)
    # small write transactions: a batch is still in cache when the writer thread reads it, and so are LMDB's
    # recycled dirty pages; commits are cheap (no sync).  1M entries, measured: 16 MiB batches 170 ms, 4 MiB
    # 120 ms, 2 MiB 102 ms, 512 KiB 94 ms (all under the dirty budget's bound, txn_entries x 1 KiB)
    limit = min(<size_t>BULK_BATCH_BYTES, max(<size_t>1 << 16, s.txn_entries * 1024))
    memset(batches, 0, sizeof(batches))
    buf_init(&lastkey)
    b = &batches[0]
    try:
        for item in sections:
            data, off, length, kg, sidmap, where = item
            if off < 0 or length < 0 or off + length > data.shape[0]:
                raise CorruptCheckpointError(f"{where}: key group {kg} section [{off}, +{length}) is outside the file")
            if length == 0:
                continue
            start = &data[off]
            p = start
            end = p + length
            sec_n = b.n
            sec_len = b.arena.len
            chunk = p          # the section's first record not handed to the writer yet
            lastkey.len = 0    # the last key of the section handed to the writer (empty: none yet)
            stop_at = limit
            runs = []          # [(table, records)] of the part not handed over, counted when it is
            src_sid = -1
            rc = ENC_NEW_STATE
            while True:
                if rc == ENC_NEW_STATE:  # the record at p starts a run of another state
                    if src_sid >= 0:
                        runs.append((table, run_n))
                    q = p
                    rc = section_record(&q, end, &k, &kl, &v, &vl, &ts, kg)
                    if rc:
                        raise_record_problem(rc, kg, where, k)
                    sid, tbl, layout = section_state(sidmap, k, where)
                    table = <LMDBStateTable?>tbl
                    src_sid = sc_be16_get(k + 2)
                    run_n = 0
                    head[0] = k[0]
                    head[1] = k[1]
                    sc_be16_put(head + 2, sid)
                    table.enter(head, 4)
                elif rc == ENC_LONG_KEY:
                    encode_long_key(&p, end, sid, b)
                    run_n += 1
                with nogil:
                    rc = encode_records(&p, end, kg, src_sid, sid, layout, b, stop_at, &run_n, &bad)
                if rc == ENC_FULL:
                    if ascending(b.arena.data, b.ops + sec_n, b.n - sec_n, &lastkey):
                        # in key order so far (a checkpoint of this tier): this part goes to the writer now,
                        # so a key group larger than a batch streams through bounded memory
                        runs.append((table, run_n))
                        run_n = 0
                        count_runs(s, runs, b.n - sec_n)
                        loaded += b.n - sec_n
                        runs = []
                        lastkey.len = 0
                        reserve(&lastkey, b.ops[b.n - 1].klen)
                        memcpy(lastkey.data, b.arena.data + b.ops[b.n - 1].koff, b.ops[b.n - 1].klen)
                        lastkey.len = b.ops[b.n - 1].klen
                        hand_off(s, writer, b)
                        cur ^= 1
                        b = &batches[cur]
                        b.n = 0
                        b.arena.len = 0
                        sec_n = 0
                        sec_len = 0
                        chunk = p
                        continue
                    if lastkey.len == 0 and stop_at < sec_len + SECTION_SORT_BYTES:
                        stop_at = sec_len + SECTION_SORT_BYTES  # out of order: sorted in memory at its end
                        continue
                    break  # out of order after a part was written, or too large to sort: replayed from chunk
                if rc == ENC_DONE or rc == ENC_TOMBSTONE:
                    break
                if rc == ENC_NOMEM:
                    raise MemoryError()
                if rc < 0:
                    raise_record_problem(rc, kg, where, bad)
            if rc == ENC_DONE:
                if lastkey.len:  # a part was written: the rest must follow it in key order
                    rc = ascending(b.arena.data, b.ops + sec_n, b.n - sec_n, &lastkey)
                else:
                    with nogil:
                        rc = sort_puts(b.arena.data, b.ops + sec_n, b.hs + sec_n, b.n - sec_n, &recs, &rcap)
                    if rc == ENC_NOMEM:
                        raise MemoryError()
            else:
                rc = 0
            if rc == 0:
                # a tombstone (an incremental delta), a repeated key, or keys out of order after a part was
                # written: nothing more of this section is written here; load_section replays it from chunk
                b.n = sec_n
                b.arena.len = sec_len
                refused.append(item if chunk == start else
                               (data, off + (chunk - start), length - (chunk - start), kg, sidmap, where))
                s.bulk_refused += 1
                continue
            runs.append((table, run_n))
            count_runs(s, runs, b.n - sec_n)
            loaded += b.n - sec_n
            if b.arena.len >= limit:
                hand_off(s, writer, b)
                cur ^= 1
                b = &batches[cur]
                b.n = 0
                b.arena.len = 0
        writer.finish()
        if b.n:
            with nogil:
                batch_filter_bits(s, b)
            s.spilled = True
            commit_batch(s, b)
            b.n = 0
    finally:
        try:
            writer.close()
        finally:
            free(recs)
            sc_buf_free(&lastkey)
            batch_free(&batches[0])
            batch_free(&batches[1])
            if loaded:
                s.end_read()  # reads see the new records
                s.wgen += 1
    return refused


cdef int count_runs(LMDBStore s, list runs, size_t n) except -1:
    """Count records handed to LMDB: each state's entries, the store's bulk_records."""
    for tbl, records in runs:
        (<LMDBStateTable>tbl).n += records
    s.bulk_records += n
    return 0


cdef int hand_off(LMDBStore s, BulkWriter writer, bbatch *b) except -1:
    """Start writing batch b on the writer thread (after the previous batch is written).  Its key filter bits
    are set here: LMDB's side is the longer one (measured: the caller waited for the writer ~60 ms of a 1M-entry
    restore)."""
    with nogil:
        batch_filter_bits(s, b)
    s.spilled = True
    writer.finish()
    writer.submit(s, b)
    return 0


cdef int encode_long_key(const uint8_t **pp, const uint8_t *end, uint16_t sid, bbatch *b) except -1:
    """The record at *pp (already validated by encode_records) with a hashed LMDB key: first 400 bytes of the
    composite key + its sha256, the full key in the record (arena_key / arena_record)."""
    cdef const uint8_t *k = NULL
    cdef const uint8_t *v = NULL
    cdef size_t kl = 0, vl = 0
    cdef int64_t ts = 0
    read_data_record(pp, end, &k, &kl, &v, &vl, &ts)
    full = bytearray(k[:kl])
    sc_be16_put(<uint8_t *>PyByteArray_AS_STRING(full) + 2, sid)
    if batch_room(b):
        raise MemoryError()
    arena_key(&b.arena, <const uint8_t *>PyByteArray_AS_STRING(full), kl, NULL, &b.ops[b.n])
    arena_record(&b.arena, <const uint8_t *>PyByteArray_AS_STRING(full), kl, v, vl, ts, 0, &b.ops[b.n])
    b.ops[b.n].kind = MDB_OP_PUT
    b.hs[b.n] = sc_table_hash(<const uint8_t *>PyByteArray_AS_STRING(full), kl)
    b.n += 1
    return 0
