# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Snapshot records partitioned by key group: the body of a checkpoint data file.

A data file is ``DATA_MAGIC`` followed by one section per key group, each a run
of records ``varint len(key) | key | varint len(value) | value | BE64 ts`` where
key is the full composite key (``kg | state id | key | ns | user key``).
Sections are what rescaling reads: a restoring backend reads exactly the key
groups it owns (Flink's KeyGroupPartitioner writes the same shape).

A :class:`SnapshotSink` receives the entries of a consistent cut in any order
(``add`` needs no GIL, so heap tables are serialized with it released) and
appends each to its key group's buffer.  Bounded memory: with ``spill_bytes``,
whenever the buffers hold that many bytes they are written to an unlinked temp
file as one *run* and freed (an external partition, as a sort spills); the file
then reads back each key group as its runs in order followed by what is still
buffered, so the order of records within a key group is kept (incremental
deltas rely on a tombstone preceding the entries that follow it).

:func:`file_chunks` turns one or more sinks into the data file as a list of
buffers in file order (views of the sinks' memory and of the spill files, not
copies) plus the per-key-group section table for the metadata; the storage
layer writes and hashes them as they are.  Several sinks over one key-group
range (parallel serialization of halves of a table) merge section by section.
"""
cimport cython
from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_FillInfo
from libc.errno cimport EINTR, errno
from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy
from posix.unistd cimport close as c_close, write as c_write

from statecore._csrc cimport (SC_KC_HEAD, SC_OK, SC_VARINT_MAX, sc_be16_get, sc_be64_put, sc_buf, sc_buf_free,
                              sc_buf_reserve, sc_ttl_expired, sc_varint_put)
from statecore._records cimport buf_init, filter_list_blob

import mmap
import os
import tempfile

from statecore.errors import StateError

#: First bytes of every snapshot data file (format version 1).
DATA_MAGIC = b"SCKDATA1"


cdef class SnapshotSink:
    """Snapshot records of one keyed backend, one buffer per owned key group.

    ``SnapshotSink(kg_start, kg_end, spill_dir=None, spill_bytes=0)``: with
    ``spill_bytes > 0`` at most about that many record bytes stay in memory;
    runs go to an unlinked temp file in ``spill_dir`` (the system temp dir when
    None).  ``set_state(ttl, now, layout)`` selects the state being added; with
    ttl > 0 (``cleanup_full_snapshot``) expired entries and list records are
    left out.  Once :func:`file_chunks` has exported a sink it is sealed: its
    memory is what the exported views show, so ``add`` then fails.
    """

    def __cinit__(self, int kg_start, int kg_end, spill_dir=None, size_t spill_bytes=0):
        self.spill_fd = -1
        buf_init(&self.scratch)
        buf_init(&self.runs)
        if kg_end < kg_start:
            raise ValueError("empty key-group range")
        self.kg_start = kg_start
        self.kg_end = kg_end
        self.bufs = <sc_buf *>calloc(kg_end - kg_start + 1, sizeof(sc_buf))
        self.counts = <long long *>calloc(kg_end - kg_start + 1, sizeof(long long))
        if self.bufs is NULL or self.counts is NULL:
            raise MemoryError()
        if spill_bytes:
            fd, path = tempfile.mkstemp(prefix=".statecore-snapshot-", suffix=".run", dir=spill_dir)
            os.unlink(path)  # nothing to clean up after a crash: the file lives as long as the fd
            self.spill_fd = fd
            self.spill_at = spill_bytes

    def __dealloc__(self):
        cdef int i
        if self.bufs is not NULL:
            for i in range(self.kg_end - self.kg_start + 1):
                sc_buf_free(&self.bufs[i])
        free(self.bufs)
        free(self.counts)
        sc_buf_free(&self.scratch)
        sc_buf_free(&self.runs)
        if self.spill_fd >= 0:
            c_close(self.spill_fd)

    def set_state(self, int64_t ttl, int64_t now, int layout):
        self.ttl = ttl
        self.now = now
        self.layout = layout

    @property
    def dropped(self):
        """Entries and list records left out as expired (cleanup_full_snapshot)."""
        return self.dropped

    @property
    def records(self):
        """Records added so far (all key groups)."""
        cdef long long n = 0
        cdef int i
        for i in range(self.kg_end - self.kg_start + 1):
            n += self.counts[i]
        return n

    @property
    def runs_spilled(self):
        """How many runs went to the spill file (0 when everything stayed in memory)."""
        return self.nruns

    cdef int add(self, const uint8_t *k, size_t kl, const uint8_t *uk, size_t ukl, const uint8_t *v, size_t vl,
                 int64_t ts) noexcept nogil:
        cdef int kg, rc
        cdef size_t start
        cdef sc_buf *b
        if self.sealed:
            return SINK_SEALED
        if kl < SC_KC_HEAD:
            return SINK_MALFORMED
        kg = sc_be16_get(k)
        if kg < self.kg_start or kg > self.kg_end:
            return SINK_MALFORMED
        if self.ttl:
            if self.layout == LAYOUT_LIST:
                rc = filter_list_blob(v, v + vl, self.ttl, self.now, &self.scratch, &self.dropped)
                if rc:
                    return rc
                if self.scratch.len == 0:
                    return 0
                v = self.scratch.data
                vl = self.scratch.len
            elif sc_ttl_expired(ts, self.ttl, self.now):
                self.dropped += 1
                return 0
        b = &self.bufs[kg - self.kg_start]
        if sc_buf_reserve(b, 2 * SC_VARINT_MAX + kl + ukl + vl + 8) != SC_OK:
            return SINK_ENOMEM
        start = b.len
        b.len += sc_varint_put(b.data + b.len, kl + ukl)
        memcpy(b.data + b.len, k, kl)
        b.len += kl
        if ukl:
            memcpy(b.data + b.len, uk, ukl)
            b.len += ukl
        b.len += sc_varint_put(b.data + b.len, vl)
        if vl:
            memcpy(b.data + b.len, v, vl)
            b.len += vl
        sc_be64_put(b.data + b.len, <uint64_t>ts)
        b.len += 8
        self.counts[kg - self.kg_start] += 1
        self.held += b.len - start
        if self.spill_at and self.held >= self.spill_at:
            return self.spill()
        return 0

    cdef int presize(self, size_t total) noexcept nogil:
        """Hint: about ``total`` more record bytes are coming, spread over the key groups.

        Growing 128 buffers by doubling copies the data about once more and faults
        in fresh pages at every step; reserving a generous share up front costs
        nothing for the part never written (untouched pages are never faulted in).
        A spilling sink reserves at most its spill limit (what its buffers may hold).
        """
        cdef int i, n = self.kg_end - self.kg_start + 1
        cdef size_t share
        if self.spill_at and total > self.spill_at:
            total = self.spill_at
        if total == 0:
            return 0
        share = total // <size_t>n
        share += share // 4 + 256
        for i in range(n):
            if sc_buf_reserve(&self.bufs[i], share) != SC_OK:
                return SINK_ENOMEM
        return 0

    cdef int spill(self) noexcept nogil:
        """Write every buffer to the spill file as one run, then free them."""
        cdef int i, n = self.kg_end - self.kg_start + 1
        cdef uint64_t *entry
        cdef const uint8_t *p
        cdef size_t left
        cdef Py_ssize_t w
        if sc_buf_reserve(&self.runs, <size_t>n * 2 * sizeof(uint64_t)) != SC_OK:
            return SINK_ENOMEM
        entry = <uint64_t *>(self.runs.data + self.runs.len)
        for i in range(n):
            p = self.bufs[i].data
            left = self.bufs[i].len
            entry[2 * i] = self.spilled
            entry[2 * i + 1] = left
            while left:
                w = c_write(self.spill_fd, p, left)
                if w < 0:
                    if errno == EINTR:
                        continue
                    self.spill_errno = errno
                    return SINK_EIO
                p += w
                left -= <size_t>w
                self.spilled += <uint64_t>w
            sc_buf_free(&self.bufs[i])  # freed, not kept: the next run may fill other key groups
        self.runs.len += <size_t>n * 2 * sizeof(uint64_t)
        self.nruns += 1
        self.held = 0
        return 0

    cdef int check(self, int rc) except -1:
        """Turn an ``add`` return code into the matching exception."""
        if rc == 0:
            return 0
        if rc == SINK_ENOMEM:
            raise MemoryError("statecore: out of memory while taking a snapshot")
        if rc == SINK_EIO:
            raise OSError(self.spill_errno, f"statecore: writing a snapshot spill run failed: "
                                            f"{os.strerror(self.spill_errno)}")
        if rc == SINK_SEALED:
            raise StateError("statecore: snapshot sink used after its data was exported")
        raise StateError("statecore: malformed entry found while taking a snapshot")


@cython.final
cdef class _Chunk:
    """A read-only buffer over part of a sink's memory; keeps the sink alive while it is used."""
    cdef object owner
    cdef const uint8_t *p
    cdef Py_ssize_t n

    def __getbuffer__(self, Py_buffer *view, int flags):
        if flags & PyBUF_WRITABLE:
            raise BufferError("snapshot chunks are read-only")
        PyBuffer_FillInfo(view, self, <void *>self.p, self.n, 1, flags)

    def __len__(self):
        return self.n


cdef _Chunk chunk_of(SnapshotSink owner, const uint8_t *p, Py_ssize_t n):
    cdef _Chunk c = _Chunk.__new__(_Chunk)
    c.owner = owner
    c.p = p
    c.n = n
    return c


def file_chunks(list sinks):
    """The data file of ``sinks`` (same key-group range): ``(chunks, sections, length)``.

    ``chunks`` are buffers in file order, the magic first; ``sections`` is
    ``[[key_group, offset, length, records], ...]`` for the non-empty key groups.
    Every sink is sealed.  Spilled runs are read through a read-only mmap of
    the spill file (page cache, not process memory).
    """
    cdef SnapshotSink s
    cdef SnapshotSink first = sinks[0]
    cdef int i, r, n = first.kg_end - first.kg_start + 1
    cdef const uint64_t *entry
    cdef Py_ssize_t off = len(DATA_MAGIC), total
    cdef long long count
    maps = []
    for s in sinks:
        if s.kg_start != first.kg_start or s.kg_end != first.kg_end:
            raise ValueError("file_chunks needs sinks over one key-group range")
        s.sealed = True
        maps.append(memoryview(mmap.mmap(s.spill_fd, s.spilled, access=mmap.ACCESS_READ)) if s.spilled else None)
    chunks = [DATA_MAGIC]
    sections = []
    for i in range(n):
        total = 0
        count = 0
        for j, s in enumerate(sinks):
            for r in range(s.nruns):
                entry = <const uint64_t *>s.runs.data + (<size_t>r * n + i) * 2
                if entry[1]:
                    chunks.append(maps[j][entry[0]:entry[0] + entry[1]])
                    total += <Py_ssize_t>entry[1]
            if s.bufs[i].len:
                chunks.append(chunk_of(s, s.bufs[i].data, s.bufs[i].len))
                total += <Py_ssize_t>s.bufs[i].len
            count += s.counts[i]
        if total:
            sections.append([first.kg_start + i, off, total, count])
            off += total
    return chunks, sections, off
