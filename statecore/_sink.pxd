# cython: language_level=3
"""Snapshot records partitioned by key group (see _sink.pyx)."""
from libc.stdint cimport int64_t, uint8_t, uint64_t

from statecore._csrc cimport sc_buf

# Storage layouts of a state's entries (what snapshots, incremental cleanup and restore must parse).
cdef enum:
    LAYOUT_VALUE = 0   # one value per (key, namespace)
    LAYOUT_LIST = 1    # one blob of timestamped records per (key, namespace)
    LAYOUT_MAP = 2     # one entry per (key, namespace, user key)

# SnapshotSink.add return codes besides 0.
cdef enum:
    SINK_ENOMEM = -1
    SINK_MALFORMED = -2
    SINK_EIO = -3      # writing a spill run failed (errno in spill_errno)
    SINK_SEALED = -4   # add after the sink's chunks were exported


cdef class SnapshotSink:
    """Collects snapshot records in one buffer per key group, spilling runs to a temp file past a limit."""
    cdef sc_buf *bufs
    cdef long long *counts
    cdef int kg_start
    cdef int kg_end
    cdef int64_t ttl
    cdef int64_t now
    cdef int layout
    cdef long long dropped
    cdef sc_buf scratch
    cdef size_t held          # bytes in bufs
    cdef size_t spill_at      # spill a run when held reaches this (0: never)
    cdef int spill_fd         # unlinked temp file of spilled runs (-1: none)
    cdef uint64_t spilled     # bytes written to spill_fd
    cdef int nruns
    cdef sc_buf runs          # per run, per key group: uint64 offset, uint64 length
    cdef int spill_errno
    cdef bint sealed
    cdef int add(self, const uint8_t *k, size_t kl, const uint8_t *uk, size_t ukl, const uint8_t *v, size_t vl,
                 int64_t ts) noexcept nogil
    cdef int presize(self, size_t total) noexcept nogil
    cdef int spill(self) noexcept nogil
    cdef int check(self, int rc) except -1
