# cython: language_level=3, boundscheck=False, wraparound=False
"""Thin bindings of the C core used by the Python layer and tests.

* :func:`murmur3_32` / :func:`key_group_for_bytes`: stable key hashing (csrc/sc_hash.c).
* :class:`KeyTable`: the C open-addressing table (csrc/sc_table.c) as a
  bytes -> (bytes, ts) mapping, for tests and tools; the states use the C table
  directly.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport int32_t, int64_t, uint32_t, uint8_t

from statecore._csrc cimport (SC_OK, sc_buf, sc_buf_free, sc_kc_build_prefix, sc_kc_parse, sc_kc_parts, sc_entry, sc_entry_key, sc_entry_value, sc_flink_murmur, sc_key_group, sc_murmur3_32, sc_table,
                              sc_table_bytes_deep, sc_table_clear, sc_table_delete, sc_table_find, sc_table_free,
                              sc_table_hash, sc_table_new, sc_table_next, sc_table_put, sc_table_append,
                              sc_table_clone)
from statecore._status cimport check


def murmur3_32(const uint8_t[::1] data not None, uint32_t seed=0):
    """MurmurHash3_x86_32 of ``data`` (unsigned), identical in every process."""
    cdef const uint8_t *p = &data[0] if data.shape[0] else <const uint8_t *>b""
    return sc_murmur3_32(p, data.shape[0], seed)


def flink_murmur_hash(int code):
    """Flink's ``MathUtils.murmurHash(int)``: a non-negative int."""
    return sc_flink_murmur(<int32_t>(code & 0xFFFFFFFF) if code >= 0 else <int32_t>code)


def key_group_for_bytes(const uint8_t[::1] data not None, int max_parallelism):
    """Key group of serialized key bytes: ``murmurHash(murmur3_32(data)) % max_parallelism``."""
    if max_parallelism < 1 or max_parallelism > 32768:
        raise ValueError(f"max_parallelism must be in 1..32768, got {max_parallelism}")
    cdef const uint8_t *p = &data[0] if data.shape[0] else <const uint8_t *>b""
    return sc_key_group(p, data.shape[0], max_parallelism)


cdef class KeyTable:
    """The C hash table: bytes keys -> (bytes value, int64 ts), all in C memory."""
    cdef sc_table *t

    def __cinit__(self, size_t capacity=8):
        self.t = sc_table_new(capacity, 0)
        if self.t is NULL:
            raise MemoryError()

    def __dealloc__(self):
        sc_table_free(self.t)
        self.t = NULL

    def put(self, const uint8_t[::1] key not None, const uint8_t[::1] value not None, int64_t ts=0):
        cdef const uint8_t *k = &key[0] if key.shape[0] else <const uint8_t *>b""
        cdef const uint8_t *v = &value[0] if value.shape[0] else <const uint8_t *>b""
        check(sc_table_put(self.t, k, key.shape[0], sc_table_hash(k, key.shape[0]), v, value.shape[0], ts, NULL))

    def append(self, const uint8_t[::1] key not None, const uint8_t[::1] value not None, int64_t ts=0):
        cdef const uint8_t *k = &key[0] if key.shape[0] else <const uint8_t *>b""
        cdef const uint8_t *v = &value[0] if value.shape[0] else <const uint8_t *>b""
        check(sc_table_append(self.t, k, key.shape[0], sc_table_hash(k, key.shape[0]), v, value.shape[0], ts))

    def get(self, const uint8_t[::1] key not None):
        """(value, ts) or None."""
        cdef const uint8_t *k = &key[0] if key.shape[0] else <const uint8_t *>b""
        cdef sc_entry *e = sc_table_find(self.t, k, key.shape[0], sc_table_hash(k, key.shape[0]))
        if e is NULL:
            return None
        return PyBytes_FromStringAndSize(<const char *>sc_entry_value(e), e.vlen), e.ts

    def delete(self, const uint8_t[::1] key not None):
        """Remove key; True when it was present."""
        cdef const uint8_t *k = &key[0] if key.shape[0] else <const uint8_t *>b""
        return sc_table_delete(self.t, k, key.shape[0], sc_table_hash(k, key.shape[0])) == 1

    def clear(self):
        sc_table_clear(self.t)

    def items(self):
        """List of (key, value, ts) in slot order."""
        cdef size_t pos = 0
        cdef sc_entry *e
        out = []
        while True:
            e = sc_table_next(self.t, &pos)
            if e is NULL:
                return out
            out.append((PyBytes_FromStringAndSize(<const char *>sc_entry_key(e), e.klen),
                        PyBytes_FromStringAndSize(<const char *>sc_entry_value(e), e.vlen), e.ts))

    def clone(self):
        cdef KeyTable c = KeyTable.__new__(KeyTable)
        sc_table_free(c.t)
        c.t = sc_table_clone(self.t)
        if c.t is NULL:
            raise MemoryError()
        return c

    @property
    def capacity(self):
        return self.t.mask + 1

    @property
    def bytes_in_use(self):
        return sc_table_bytes_deep(self.t)

    def __len__(self):
        return self.t.count


def composite_key(int key_group, int state_id, bytes key not None, bytes namespace not None, bytes user_key=b""):
    """The composite key ``BE16 kg | BE16 state id | varint len | key | varint len | ns | user key``."""
    cdef sc_buf b
    if not 0 <= key_group <= 0xFFFF or not 0 <= state_id <= 0xFFFF:
        raise ValueError("key_group and state_id must be in 0..65535")
    b.data = NULL
    b.len = b.cap = 0
    try:
        check(sc_kc_build_prefix(&b, key_group, state_id, <const uint8_t *>PyBytes_AS_STRING(key), len(key),
                                 <const uint8_t *>PyBytes_AS_STRING(namespace), len(namespace)))
        return PyBytes_FromStringAndSize(<const char *>b.data, b.len) + user_key
    finally:
        sc_buf_free(&b)


def parse_composite_key(bytes data not None):
    """(key_group, state_id, key, namespace, user_key) of a composite key; ValueError when malformed."""
    cdef sc_kc_parts p
    if sc_kc_parse(<const uint8_t *>PyBytes_AS_STRING(data), len(data), &p) != SC_OK:
        raise ValueError("malformed composite key")
    return (p.key_group, p.state_id, PyBytes_FromStringAndSize(<const char *>p.key, p.klen),
            PyBytes_FromStringAndSize(<const char *>p.ns, p.nslen),
            PyBytes_FromStringAndSize(<const char *>p.user_key, p.uklen))
