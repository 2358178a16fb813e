# cython: language_level=3
"""Re-exports for sibling modules (the storage interface lives in _tables.pxd, the snapshot sink in _sink.pxd),
and the data-file record checks a restore's loaders share (load_section here, the LMDB tier's bulk load)."""
from libc.stdint cimport int64_t, uint8_t

from statecore._csrc cimport sc_kc_parts
from statecore._sink cimport SnapshotSink
from statecore._tables cimport StateTable


cdef int read_section_record(const uint8_t **pp, const uint8_t *end, const uint8_t **k, size_t *kl,
                             const uint8_t **v, size_t *vl, int64_t *ts, int kg, str where) except -1
cdef tuple section_state(dict sidmap, const uint8_t *k, str where)
cdef int check_record(const uint8_t *key, size_t kl, const uint8_t *v, size_t vl, int64_t ts, int layout, int kg,
                      str where, sc_kc_parts *parts) except -1
