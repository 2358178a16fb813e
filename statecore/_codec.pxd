# cython: language_level=3
"""Serializer cdef classes: C-level encode/decode twins behind serialize/deserialize."""
from libc.stdint cimport uint8_t
from statecore._csrc cimport sc_buf

# Fast-path kinds the state layer switches on (0: call the serializer generically).
cdef enum:
    KIND_GENERIC = 0
    KIND_INT64 = 1
    KIND_FLOAT64 = 2
    KIND_AUTO = 3
    KIND_STR = 4
    KIND_BYTES = 5
    KIND_BOOL = 6

# Auto's tags (the first byte of every Auto encoding); see _codec.pyx.
cdef enum:
    TAG_NONE = 0x00
    TAG_FALSE = 0x01
    TAG_TRUE = 0x02
    TAG_INT64 = 0x03
    TAG_BIGINT = 0x04
    TAG_FLOAT = 0x05
    TAG_STR = 0x06
    TAG_BYTES = 0x07
    TAG_TUPLE = 0x08
    TAG_LIST = 0x09
    TAG_DICT = 0x0A


cdef class Serializer:
    cdef readonly int kind
    cdef int encode(self, object obj, sc_buf *out) except -1
    cdef int encode_key(self, object obj, sc_buf *out) except -1
    cdef object decode(self, const uint8_t *p, Py_ssize_t n)


cdef int write_bytes(sc_buf *out, const void *p, size_t n) except -1
