# cython: language_level=3
"""Declarations of the C core in csrc/ (every function is nogil and never raises).

This file only mirrors the headers; the one place where C status codes become
Python exceptions is statecore/_status.pxd.
"""
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t


cdef extern from "sc_common.h" nogil:
    ctypedef enum sc_status:
        SC_OK
        SC_NOTFOUND
        SC_ENOMEM
        SC_ECORRUPT
        SC_ETOOBIG
    void SC_PREFETCH(const void *p)


cdef extern from "sc_hash.h" nogil:
    uint32_t sc_murmur3_32(const void *data, size_t length, uint32_t seed)
    int32_t sc_flink_murmur(int32_t code)
    int32_t sc_key_group(const void *key, size_t length, int32_t max_parallelism)
    uint64_t sc_hash64(const void *data, size_t length)


cdef extern from "sc_buf.h" nogil:
    ctypedef struct sc_buf:
        uint8_t *data
        size_t len
        size_t cap
    sc_status sc_buf_grow(sc_buf *b, size_t extra)
    void sc_buf_free(sc_buf *b)
    sc_status sc_buf_reserve(sc_buf *b, size_t extra)
    sc_status sc_buf_write(sc_buf *b, const void *p, size_t n)
    sc_status sc_buf_put_byte(sc_buf *b, uint8_t c)


cdef extern from "sc_keycodec.h" nogil:
    enum: SC_VARINT_MAX
    enum: SC_KC_HEAD
    size_t sc_varint_put(uint8_t *p, uint64_t v)
    size_t sc_varint_get(const uint8_t *p, const uint8_t *end, uint64_t *out)
    void sc_be16_put(uint8_t *p, uint16_t v)
    uint16_t sc_be16_get(const uint8_t *p)
    void sc_be64_put(uint8_t *p, uint64_t v)
    uint64_t sc_be64_get(const uint8_t *p)
    sc_status sc_kc_build_prefix(sc_buf *b, uint16_t key_group, uint16_t state_id, const uint8_t *key,
                                 size_t klen, const uint8_t *ns, size_t nslen)
    ctypedef struct sc_kc_parts:
        uint16_t key_group
        uint16_t state_id
        const uint8_t *key
        size_t klen
        const uint8_t *ns
        size_t nslen
        const uint8_t *user_key
        size_t uklen
    sc_status sc_kc_parse(const uint8_t *p, size_t n, sc_kc_parts *out)


cdef extern from "sc_ttl.h" nogil:
    int sc_ttl_expired(int64_t ts, int64_t ttl, int64_t now)
    int64_t sc_now_ms()


cdef extern from "sc_table.h" nogil:
    enum: SC_INLINE_BYTES
    ctypedef struct sc_entry:
        int64_t ts
        uint32_t hash
        uint32_t klen
        uint32_t vlen
        uint32_t vcap
    ctypedef struct sc_table:
        sc_entry *slots
        size_t mask
        size_t count
        size_t bytes
        int nested
    uint32_t sc_table_hash(const uint8_t *key, size_t klen)
    sc_table *sc_table_new(size_t initial_capacity, int nested)
    void sc_table_free(sc_table *t)
    void sc_table_clear(sc_table *t)
    sc_status sc_table_reserve(sc_table *t, size_t n)
    void sc_table_prefault(sc_table *t) nogil
    sc_entry *sc_table_find(const sc_table *t, const uint8_t *key, size_t klen, uint32_t hash)
    sc_status sc_table_put(sc_table *t, const uint8_t *key, size_t klen, uint32_t hash,
                           const uint8_t *val, size_t vlen, int64_t ts, sc_entry **out)
    sc_status sc_table_append(sc_table *t, const uint8_t *key, size_t klen, uint32_t hash,
                              const uint8_t *val, size_t vlen, int64_t ts)
    int sc_table_delete(sc_table *t, const uint8_t *key, size_t klen, uint32_t hash)
    void sc_table_delete_entry(sc_table *t, sc_entry *e)
    sc_table *sc_table_get_inner(sc_table *t, const uint8_t *key, size_t klen, uint32_t hash,
                                 int create, sc_status *st)
    sc_entry *sc_table_slot(const sc_table *t, size_t i)
    sc_entry *sc_table_next(const sc_table *t, size_t *pos)
    void sc_table_prefetch(const sc_table *t, uint32_t hash)
    int sc_entry_is_inline(const sc_entry *e)
    uint8_t *sc_entry_key(sc_entry *e)
    uint8_t *sc_entry_value(sc_entry *e)
    sc_table *sc_entry_inner(sc_entry *e)
    size_t sc_table_bytes_deep(const sc_table *t)
    size_t sc_table_count_deep(const sc_table *t)
    size_t sc_table_expire_scan(sc_table *t, size_t *cursor, size_t n, int64_t ttl, int64_t now)
    sc_table *sc_table_clone(const sc_table *t)
