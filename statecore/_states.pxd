# cython: language_level=3
"""Re-exports for sibling modules (the storage interface lives in _tables.pxd, the snapshot sink in _sink.pxd),
and what a restore's loaders share (load_section here, the LMDB tier's bulk load) besides _records.pxd's record
checks: their errors, and the state lookup."""
from libc.stdint cimport uint8_t

from statecore._sink cimport SnapshotSink
from statecore._tables cimport StateTable


cdef int raise_record_problem(int code, int kg, str where, const uint8_t *k) except -1
cdef tuple section_state(dict sidmap, const uint8_t *k, str where)
