# cython: language_level=3
"""Small shared helpers (inline, compiled into each module that cimports them).

* sc_buf helpers that raise MemoryError;
* the ListState record format shared by every storage tier and snapshots:
  a list value is a blob of records ``BE64 ts | varint n | n element bytes``.
  The C-level readers return -2 for a malformed blob; callers turn that into
  StateError (stored state) or CorruptCheckpointError (checkpoint bytes).
"""
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport INT64_MIN, int64_t, uint8_t, uint64_t
from libc.string cimport memcpy

from statecore._csrc cimport (SC_KC_HEAD, SC_OK, SC_VARINT_MAX, sc_be16_get, sc_kc_parse, sc_kc_parts, sc_be64_get, sc_be64_put, sc_buf, sc_buf_reserve, sc_buf_write,
                              sc_ttl_expired, sc_varint_get, sc_varint_put)


cdef inline void buf_init(sc_buf *b) noexcept:
    b.data = NULL
    b.len = 0
    b.cap = 0


cdef inline int reserve(sc_buf *b, size_t n) except -1:
    if sc_buf_reserve(b, n) != SC_OK:
        raise MemoryError("statecore: out of memory")
    return 0


cdef inline bytes as_bytes(const uint8_t *p, size_t n):
    return PyBytes_FromStringAndSize(<const char *>p, n)


cdef inline int append_record(sc_buf *out, int64_t ts, const uint8_t *p, size_t n) except -1:
    """Append one list record ``BE64 ts | varint n | bytes`` to out."""
    reserve(out, 8 + SC_VARINT_MAX + n)
    sc_be64_put(out.data + out.len, <uint64_t>ts)
    out.len += 8
    out.len += sc_varint_put(out.data + out.len, n)
    if n:
        memcpy(out.data + out.len, p, n)
    out.len += n
    return 0


cdef inline int read_record(const uint8_t **pp, const uint8_t *end, int64_t *ts, const uint8_t **e,
                            size_t *el) noexcept nogil:
    """Read the record at *pp: 1 read (and advance), 0 at the end, -2 malformed."""
    cdef const uint8_t *p = pp[0]
    cdef uint64_t n = 0
    cdef size_t used
    if p == end:
        return 0
    if end - p < 9:
        return -2
    ts[0] = <int64_t>sc_be64_get(p)
    used = sc_varint_get(p + 8, end, &n)
    if used == 0 or n > <uint64_t>(end - p - 8 - used):
        return -2
    e[0] = p + 8 + used
    el[0] = n
    pp[0] = p + 8 + used + n
    return 1


cdef inline int read_data_record(const uint8_t **pp, const uint8_t *end, const uint8_t **k, size_t *kl,
                                 const uint8_t **v, size_t *vl, int64_t *ts) noexcept nogil:
    """Read the keyed data-file record at *pp (docs/checkpoint-format.md: ``varint len | composite key |
    varint len | value | BE64 ts``): 1 read (and advance), -1 malformed key, -2 malformed value.  Bounds only:
    the caller checks the key's contents."""
    cdef const uint8_t *p = pp[0]
    cdef uint64_t n = 0
    cdef size_t used = sc_varint_get(p, end, &n)
    if used == 0 or n > <uint64_t>(end - p - used) or n < SC_KC_HEAD:
        return -1
    k[0] = p + used
    kl[0] = n
    p = k[0] + n
    used = sc_varint_get(p, end, &n)
    if used == 0 or n > <uint64_t>(end - p - used) or <uint64_t>(end - p - used) - n < 8:
        return -2
    v[0] = p + used
    vl[0] = n
    p = v[0] + n
    ts[0] = <int64_t>sc_be64_get(p)
    pp[0] = p + 8
    return 1


cdef inline int filter_list_blob(const uint8_t *p, const uint8_t *end, int64_t ttl, int64_t now, sc_buf *out,
                                 long long *dropped) noexcept nogil:
    """Copy the unexpired records of a list blob to out (replacing its contents); -1 ENOMEM, -2 malformed."""
    cdef const uint8_t *rec
    cdef const uint8_t *el = NULL
    cdef size_t ell = 0
    cdef int64_t ts = 0
    cdef int rc
    out.len = 0
    while True:
        rec = p
        rc = read_record(&p, end, &ts, &el, &ell)
        if rc <= 0:
            return rc
        if sc_ttl_expired(ts, ttl, now):
            dropped[0] += 1
        elif sc_buf_write(out, rec, <size_t>(p - rec)) != SC_OK:
            return -1


cdef inline void restamp_blob(uint8_t *p, const uint8_t *end, int64_t ts) noexcept nogil:
    """Set the timestamp of every record of a list blob (stops at a malformed tail)."""
    cdef const uint8_t *el = NULL
    cdef size_t ell = 0
    cdef int64_t old = 0
    cdef uint8_t *rec
    while True:
        rec = p
        if read_record(<const uint8_t **>&p, end, &old, &el, &ell) <= 0:
            return
        sc_be64_put(rec, <uint64_t>ts)


# -- keyed data-file records (a restore's loaders: _states.load_section, _lmdb.bulk_load) ------------------

cdef enum:
    REC_OK = 0
    REC_TOMBSTONE = 1       # record_kind: a delta's tombstone
    REC_BAD_KEY = -1        # problem codes (_states.raise_record_problem raises them)
    REC_BAD_VALUE = -2
    REC_WRONG_KG = -3
    REC_BAD_COMPOSITE = -4
    REC_BAD_TOMBSTONE = -5
    REC_BAD_LIST = -6
    REC_USER_KEY = -7


cdef inline bint valid_list_blob(const uint8_t *p, const uint8_t *end) noexcept nogil:
    """A ListState value is a sequence of well-formed records (checked on restore, before it is stored)."""
    cdef const uint8_t *el
    cdef size_t ell
    cdef int64_t ts
    cdef int rc
    while True:
        rc = read_record(&p, end, &ts, &el, &ell)
        if rc <= 0:
            return rc == 0


cdef inline int section_record(const uint8_t **pp, const uint8_t *end, const uint8_t **k, size_t *kl,
                               const uint8_t **v, size_t *vl, int64_t *ts, int kg) noexcept nogil:
    """Read the next record of key group kg's section: REC_OK (advanced past it), or a problem code (bounds,
    or a record of another key group).  Inline: it runs once per restored record."""
    cdef int rc = read_data_record(pp, end, k, kl, v, vl, ts)
    if rc == -1:
        return REC_BAD_KEY
    if rc == -2:
        return REC_BAD_VALUE
    if sc_be16_get(k[0]) != kg:
        return REC_WRONG_KG
    return REC_OK


cdef inline int record_kind(const uint8_t *key, size_t kl, const uint8_t *v, size_t vl, int64_t ts, bint is_list,
                            bint is_map, sc_kc_parts *parts) noexcept nogil:
    """What a record of a list / map / other state is: REC_OK (an entry), REC_TOMBSTONE (an incremental delta's:
    the (state, key, namespace) entry is rewritten from scratch by the records after it; ts = INT64_MIN), or a
    problem code."""
    if sc_kc_parse(key, kl, parts) != SC_OK:
        return REC_BAD_COMPOSITE
    if ts == INT64_MIN:
        return REC_BAD_TOMBSTONE if vl or parts.uklen else REC_TOMBSTONE
    if is_list and not valid_list_blob(v, v + vl):
        return REC_BAD_LIST
    if not is_map and parts.uklen:
        return REC_USER_KEY
    return REC_OK

