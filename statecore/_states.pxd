# cython: language_level=3
"""Re-exports for sibling modules (the storage interface lives in _tables.pxd, the snapshot sink in _sink.pxd),
and the data-file record checks a restore's loaders share (load_section here, the LMDB tier's bulk load)."""
from libc.stdint cimport int64_t, uint8_t

from statecore._csrc cimport sc_kc_parts
from statecore._sink cimport SnapshotSink
from statecore._tables cimport StateTable


cdef enum:
    REC_OK = 0
    REC_TOMBSTONE = 1       # record_kind: a delta's tombstone
    REC_BAD_KEY = -1        # problem codes (raise_record_problem)
    REC_BAD_VALUE = -2
    REC_WRONG_KG = -3
    REC_BAD_COMPOSITE = -4
    REC_BAD_TOMBSTONE = -5
    REC_BAD_LIST = -6
    REC_USER_KEY = -7

cdef int section_record(const uint8_t **pp, const uint8_t *end, const uint8_t **k, size_t *kl, const uint8_t **v,
                        size_t *vl, int64_t *ts, int kg) noexcept nogil
cdef int record_kind(const uint8_t *key, size_t kl, const uint8_t *v, size_t vl, int64_t ts, int layout,
                     sc_kc_parts *parts) noexcept nogil
cdef int raise_record_problem(int code, int kg, str where, const uint8_t *k) except -1
cdef tuple section_state(dict sidmap, const uint8_t *k, str where)
