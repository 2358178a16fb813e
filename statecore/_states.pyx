# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Keyed state, compiled: the keyed-backend core, the five state types and TTL.

Layering (Flink's, in Python spelling):

* :class:`KeyedStateBackend` holds the current key (serialized once per
  ``set_current_key``, with its key group), the clock, and the registered states.
* Each state talks to a :class:`StateTable`, the storage of one state.  The heap
  backend's table is a C hash table (csrc/sc_table.c); the LMDB tier supplies
  another implementation of the same cdef interface.
* Every state builds the composite key prefix ``kg | state id | key | namespace``
  (csrc/sc_keycodec.h) once per current key / namespace and caches it with its
  hash, so a read-modify-write touches the table twice and builds nothing.
* TTL is applied in the state methods with the C check ``sc_ttl_expired``; with
  TTL off no clock is read and timestamps are 0.

ListState stores one blob per (key, namespace): records of
``BE64 timestamp | varint length | element bytes``; ``add`` appends a record in C
(amortised O(1), never rewriting the list).  MapState stores one entry per user key.
The semantics are written down in docs/semantics.md.
"""
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.math cimport NAN
from libc.stdint cimport INT64_MIN, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy

from statecore._codec cimport (KIND_AUTO, KIND_FLOAT64, KIND_INT64, TAG_INT64, Serializer, write_bytes)
from statecore._csrc cimport (SC_ENOMEM, SC_KC_HEAD, SC_OK, SC_VARINT_MAX, sc_be16_get, sc_be16_put, sc_be64_get,
                              sc_be64_put, sc_buf, sc_buf_free, sc_buf_reserve, sc_buf_write, sc_entry, sc_entry_inner,
                              sc_entry_key, sc_entry_value, sc_kc_build_prefix, sc_kc_parse, sc_kc_parts, sc_key_group, sc_now_ms,
                              sc_status, sc_table, sc_table_append, sc_table_bytes_deep, sc_table_count_deep,
                              sc_table_delete, sc_table_delete_entry, sc_table_expire_scan, sc_table_find, sc_table_free,
                              sc_table_clear, sc_table_reserve, sc_table_get_inner, sc_table_hash, sc_table_new, sc_table_next, sc_table_prefetch,
                              sc_table_put, sc_table_slot, sc_table_clone, sc_ttl_expired, sc_varint_get, sc_varint_put)
from statecore._records cimport (REC_BAD_COMPOSITE, REC_BAD_KEY, REC_BAD_LIST, REC_BAD_TOMBSTONE, REC_BAD_VALUE,
                                REC_TOMBSTONE, REC_USER_KEY, REC_WRONG_KG, append_record, as_bytes, buf_init,
                                filter_list_blob, read_record, record_kind, reserve, restamp_blob, section_record,
                                valid_list_blob)
from statecore._sink cimport LAYOUT_LIST, LAYOUT_MAP, LAYOUT_VALUE, SnapshotSink
from statecore._status cimport check
from statecore._tables cimport HeapStateTable, StateTable, next_record

import threading

import numpy as np

from statecore.errors import (BackendClosedError, CorruptCheckpointError, KeyGroupOutOfRangeError,
                              SerializationError, StateError, StateMigrationError)
from statecore.keygroups import KeyGroupRange, check_max_parallelism
from statecore.serializers import Auto, resolve_serializer
from statecore.ttl import ManualClock

cdef object _MISSING = object()
cdef uint64_t SIGN = 0x8000000000000000ULL

cdef enum:
    BATCH_BLOCK = 256  # keys per block (and StateTable.put_batch/get_batch call) of the ValueState batch paths
    PREFETCH_AHEAD = 16  # batch loops prefetch the slot of the key this many ahead: about the misses a core
                         # keeps in flight (prefetching a whole block at once overflows them)



# ------------------------------------------------------------------ snapshots

cdef int64_t TOMBSTONE = INT64_MIN
#: Timestamp of a delta record that deletes a whole (state, key, namespace) entry before it is rewritten.
TOMBSTONE_TS = TOMBSTONE


def snapshot_delta(list prefixes, dict tables, SnapshotSink sink):
    """Incremental checkpoint: per touched prefix, a tombstone record then its current entries.

    ``tables`` maps state id -> (StateTable, layout).  Restoring applies the
    base and then every delta in order; a tombstone clears the prefix, so
    removed map entries and cleared lists do not come back.  Returns the
    number of records.
    """
    cdef bytes p
    cdef const uint8_t *pp
    cdef const uint8_t *v
    cdef size_t vl
    cdef int64_t ts
    cdef uint32_t h
    cdef StateTable table
    cdef bytes ukb, vb
    cdef long long n = 0
    for p in prefixes:
        entry = tables.get(sc_be16_get(<const uint8_t *>PyBytes_AS_STRING(p) + 2))
        if entry is None:
            continue
        table, layout = entry
        pp = <const uint8_t *>PyBytes_AS_STRING(p)
        h = sc_table_hash(pp, PyBytes_GET_SIZE(p))
        sink.check(sink.add(pp, PyBytes_GET_SIZE(p), NULL, 0, NULL, 0, TOMBSTONE))
        n += 1
        if layout == LAYOUT_MAP:
            for ukb, vb, ts in table.mitems(pp, PyBytes_GET_SIZE(p), h):
                sink.check(sink.add(pp, PyBytes_GET_SIZE(p), <const uint8_t *>PyBytes_AS_STRING(ukb),
                                    PyBytes_GET_SIZE(ukb), <const uint8_t *>PyBytes_AS_STRING(vb),
                                    PyBytes_GET_SIZE(vb), ts))
                n += 1
        elif table.get(pp, PyBytes_GET_SIZE(p), h, &v, &vl, &ts):
            sink.check(sink.add(pp, PyBytes_GET_SIZE(p), NULL, 0, v, vl, ts))
            n += 1
    return n


cdef enum:
    LOAD_BLOCK = 256  # records parsed and hashed before any of them is inserted (restore); the inserts
                      # prefetch PREFETCH_AHEAD records ahead


_RECORD_PROBLEMS = {
    REC_BAD_KEY: "malformed record key in key group {kg}",
    REC_BAD_VALUE: "malformed record value in key group {kg}",
    REC_WRONG_KG: "a record of key group {other} is filed under {kg}",
    REC_BAD_COMPOSITE: "malformed composite key in key group {kg}",
    REC_BAD_TOMBSTONE: "malformed tombstone record in key group {kg}",
    REC_BAD_LIST: "malformed list state record in key group {kg}",
    REC_USER_KEY: "a non-map record carries a map user key",
}


cdef int raise_record_problem(int code, int kg, str where, const uint8_t *k) except -1:
    """Raise the CorruptCheckpointError (naming ``where``) of a section_record / record_kind problem code
    (statecore/_records.pxd); k: the record's key (read for REC_WRONG_KG only)."""
    text = _RECORD_PROBLEMS.get(code)
    if text is None:
        raise SystemError(f"statecore: unknown record problem {code}")
    other = sc_be16_get(k) if code == REC_WRONG_KG else None
    raise CorruptCheckpointError(f"{where}: " + text.format(kg=kg, other=other))


cdef tuple section_state(dict sidmap, const uint8_t *k, str where):
    """The ``(new state id, StateTable, layout)`` of the state a record names; CorruptCheckpointError when the
    metadata does not declare it."""
    entry = sidmap.get(sc_be16_get(k + 2))
    if entry is None:
        raise CorruptCheckpointError(f"{where}: a record names state id {sc_be16_get(k + 2)}, "
                                     "which the metadata does not declare")
    return entry


def load_section(KeyedStateBackend kb, const uint8_t[::1] data, Py_ssize_t off, Py_ssize_t length, int kg,
                 dict sidmap, str where):
    """Insert the records of one key-group section into the restored tables.

    ``sidmap`` maps the snapshot's state id to ``(new state id, StateTable, layout)``.
    Every record is checked (bounds, key group, state id) and a malformed one
    raises ``CorruptCheckpointError`` naming ``where``.  Returns the record count.
    Records are taken in blocks of one state: the block's keys are re-labelled
    with the new state id and hashed before any is inserted, and each insert
    prefetches the slot of the record PREFETCH_AHEAD places later, so the cache
    misses of a large restore overlap.
    """
    cdef const uint8_t *p
    cdef const uint8_t *rec
    cdef const uint8_t *end
    cdef const uint8_t *k = NULL
    cdef const uint8_t *v = NULL
    cdef const uint8_t *key
    cdef const uint8_t *vs[LOAD_BLOCK]
    cdef size_t kls[LOAD_BLOCK]
    cdef size_t vls[LOAD_BLOCK]
    cdef size_t koffs[LOAD_BLOCK]
    cdef int64_t tss[LOAD_BLOCK]
    cdef uint32_t hs[LOAD_BLOCK]
    cdef size_t kl = 0, vl = 0, plen
    cdef int64_t ts = 0
    cdef long long n = 0
    cdef int m, j, rc
    cdef sc_kc_parts parts
    cdef sc_buf *kbuf = &kb.rbuf
    cdef StateTable table
    cdef int layout = 0
    cdef uint16_t sid = 0
    cdef int last_sid = -1
    if off < 0 or length < 0 or off + length > data.shape[0]:
        raise CorruptCheckpointError(f"{where}: key group {kg} section [{off}, +{length}) is outside the file")
    if length == 0:
        return 0
    p = &data[off]
    end = p + length
    while p < end:
        # Pass 1: parse up to LOAD_BLOCK records of one state; their keys go to kbuf (by offset:
        # kbuf may move while it grows) with the state id of the restoring backend.
        kbuf.len = 0
        m = 0
        while p < end and m < LOAD_BLOCK:
            rec = p
            rc = section_record(&p, end, &k, &kl, &v, &vl, &ts, kg)
            if rc:
                raise_record_problem(rc, kg, where, k)
            if sc_be16_get(k + 2) != last_sid:  # records of one state come in runs: look up once per run
                if m:
                    p = rec  # the next block starts with this record
                    break
                sid, table, layout = section_state(sidmap, k, where)
                last_sid = sc_be16_get(k + 2)
            reserve(kbuf, kl)
            memcpy(kbuf.data + kbuf.len, k, kl)
            sc_be16_put(kbuf.data + kbuf.len + 2, sid)
            koffs[m] = kbuf.len
            kbuf.len += kl
            kls[m] = kl
            vs[m] = v
            vls[m] = vl
            tss[m] = ts
            m += 1
        if layout != LAYOUT_MAP:
            for j in range(m):
                hs[j] = sc_table_hash(kbuf.data + koffs[j], kls[j])
            for j in range(min(m, PREFETCH_AHEAD)):
                table.prefetch(hs[j])
        # Pass 2: check and insert.
        for j in range(m):
            if layout != LAYOUT_MAP and j + PREFETCH_AHEAD < m:
                table.prefetch(hs[j + PREFETCH_AHEAD])
            key = kbuf.data + koffs[j]
            kl = kls[j]
            v = vs[j]
            vl = vls[j]
            ts = tss[j]
            rc = record_kind(key, kl, v, vl, ts, layout == LAYOUT_LIST, layout == LAYOUT_MAP, &parts)
            if rc < 0:
                raise_record_problem(rc, kg, where, key)
            if rc == REC_TOMBSTONE:
                if layout == LAYOUT_MAP:
                    table.mclear(key, kl, sc_table_hash(key, kl))
                else:
                    table.remove(key, kl, hs[j])
            elif layout == LAYOUT_MAP:
                plen = kl - parts.uklen
                table.mput(key, plen, sc_table_hash(key, plen), parts.user_key, parts.uklen, v, vl, ts)
            else:
                table.put(key, kl, hs[j], v, vl, ts)
            n += 1
    return n


# ------------------------------------------------------------------ keyed backend

cdef class KeyedStateBackend:
    """The keyed state backend (Flink's ``KeyedStateBackend``): current key + states.

    Subclasses choose the storage by overriding ``_new_table(nested)``.
    Not thread-safe: use one keyed backend from one thread, as Flink's task
    thread does.
    """
    cdef readonly int max_parallelism
    cdef readonly object key_group_range
    cdef int kg_start
    cdef int kg_end
    cdef readonly Serializer key_serializer
    cdef Serializer ns_serializer
    cdef readonly object clock
    cdef bint manual_clock
    cdef sc_buf kbuf       # serialized current key
    cdef sc_buf tmpbuf     # scratch for the next key (swapped in on success)
    cdef sc_buf vbuf       # scratch: serialized values
    cdef sc_buf rbuf       # scratch: list records, batch keys
    cdef sc_buf ubuf       # scratch: map user keys
    cdef object cur_key
    cdef int cur_kg
    cdef uint64_t key_version
    cdef bint has_key
    cdef readonly bint closed
    cdef dict states
    cdef list every_record
    cdef public long long ttl_expired
    cdef int next_sid
    cdef readonly str job_id
    cdef readonly str operator_id
    cdef dict restored          # name -> [meta dict, sid, table]: restored, not yet claimed by get_state
    cdef public int64_t restore_clock_ms   # clock reading at restore (TTL switched on at restore stamps it)
    cdef public object state_backend       # the StateBackend that made this (its checkpoint storage, options)
    cdef public object checkpoint_lock     # taken while a snapshot copies state (see checkpoint/snapshot.py)
    cdef sc_table *dirty        # incremental checkpoints: prefixes touched since the last checkpoint (else NULL)
    cdef uint64_t dirty_epoch   # bumped when the dirty set is taken, so states mark their prefix again
    cdef public object chain    # incremental checkpoints: files of the current chain (see checkpoint/snapshot.py)

    def __cinit__(self, *args, **kwargs):
        buf_init(&self.kbuf)
        buf_init(&self.tmpbuf)
        buf_init(&self.vbuf)
        buf_init(&self.rbuf)
        buf_init(&self.ubuf)
        self.key_version = 1
        self.states = {}
        self.every_record = []
        self.restored = {}

    def __init__(self, max_parallelism=128, key_group_range=None, key_serializer=None, clock=None,
                 job_id="job", operator_id="operator"):
        check_max_parallelism(max_parallelism)
        self.max_parallelism = max_parallelism
        if key_group_range is None:
            key_group_range = KeyGroupRange(0, max_parallelism - 1)
        elif not isinstance(key_group_range, KeyGroupRange):
            raise TypeError(f"key_group_range must be a KeyGroupRange, got {type(key_group_range).__name__}")
        if len(key_group_range) == 0 or key_group_range.start < 0 or key_group_range.end >= max_parallelism:
            raise ValueError(f"key_group_range {key_group_range} must be a non-empty part of "
                             f"[0, {max_parallelism - 1}] for max_parallelism={max_parallelism}")
        self.key_group_range = key_group_range
        self.kg_start = key_group_range.start
        self.kg_end = key_group_range.end
        self.key_serializer = resolve_serializer(key_serializer)
        self.ns_serializer = Auto()
        if clock is not None and not callable(clock):
            raise TypeError(f"clock must be a callable returning milliseconds, got {type(clock).__name__}")
        self.clock = clock
        self.manual_clock = type(clock) is ManualClock
        self.job_id = str(job_id)
        self.operator_id = str(operator_id)

    def __dealloc__(self):
        sc_table_free(self.dirty)
        self.dirty = NULL
        sc_buf_free(&self.kbuf)
        sc_buf_free(&self.tmpbuf)
        sc_buf_free(&self.vbuf)
        sc_buf_free(&self.rbuf)
        sc_buf_free(&self.ubuf)

    # -- current key ------------------------------------------------------

    cdef inline int check_open(self) except -1:
        if self.closed:
            raise BackendClosedError("this keyed state backend is closed; create or restore a new one")
        return 0

    def set_current_key(self, key):
        """Make ``key`` the current key of every state of this backend.

        Raises ``KeyGroupOutOfRangeError`` (and keeps the previous key) when the
        key's group is not in this backend's ``key_group_range``, and
        ``SerializationError`` when the key serializer refuses the key.
        """
        cdef sc_buf t
        cdef int32_t kg
        self.check_open()
        self.tmpbuf.len = 0
        self.key_serializer.encode_key(key, &self.tmpbuf)
        kg = sc_key_group(self.tmpbuf.data, self.tmpbuf.len, self.max_parallelism)
        if kg < self.kg_start or kg > self.kg_end:
            raise KeyGroupOutOfRangeError(
                f"key {key!r:.80} belongs to key group {kg}, outside this backend's {self.key_group_range} "
                f"(max_parallelism={self.max_parallelism}); route it to the instance that owns key group {kg}")
        t = self.kbuf
        self.kbuf = self.tmpbuf
        self.tmpbuf = t
        self.cur_key = key
        self.cur_kg = kg
        self.key_version += 1
        self.has_key = True
        if self.every_record:
            for st in self.every_record:
                (<State>st).run_cleanup()

    def get_current_key(self):
        """The current key (as passed to ``set_current_key``), or None."""
        return self.cur_key

    @property
    def current_key_group(self):
        """Key group of the current key (StateError when no key is set)."""
        if not self.has_key:
            raise StateError("no current key: call set_current_key(key) first")
        return self.cur_kg

    cdef int64_t now(self) except? -1:
        if self.clock is None:
            return sc_now_ms()
        if self.manual_clock:
            return (<object>self.clock).now_ms
        return self.clock()

    # -- states -----------------------------------------------------------

    def _new_table(self, bint nested):
        return HeapStateTable(nested)

    def get_state(self, descriptor):
        """The state for ``descriptor`` (the same object for the same name).

        Raises ``StateMigrationError`` when the name is registered with another
        state type or serializers, or with a different TTL configuration.
        """
        self.check_open()
        from statecore.descriptors import StateDescriptor
        if not isinstance(descriptor, StateDescriptor):
            raise TypeError(f"get_state needs a state descriptor, got {type(descriptor).__name__}")
        name = descriptor.name
        existing = self.states.get(name)
        if existing is not None:
            old = (<State>existing).descriptor
            if old.compatibility_key() != descriptor.compatibility_key():
                raise StateMigrationError(
                    f"state {name!r} is registered as {old.state_type} state with serializers "
                    f"{old.compatibility_key()[1:]}; it was requested as {descriptor.state_type} state with "
                    f"{descriptor.compatibility_key()[1:]}. Use another name, or restore with a migration.")
            if old.ttl_config != descriptor.ttl_config:
                raise StateMigrationError(
                    f"state {name!r} is registered with TTL {old.ttl_config}, requested with "
                    f"{descriptor.ttl_config}; TTL changes take effect on restore")
            return existing
        if name in self.restored:
            meta, sid, table = self.restored[name]
            self._check_restored(meta, descriptor)
            old_ttl, new_ttl = meta.get("ttl") is not None, descriptor.ttl_config is not None
            if old_ttl != new_ttl:
                # Flink 2.2: enabling TTL stamps every restored entry with the restore time
                # as its last access; disabling drops the timestamps.
                (<StateTable>table).restamp(self.restore_clock_ms if new_ttl else 0,
                                            _LAYOUTS[descriptor.state_type])
            del self.restored[name]
        else:
            sid, table = self.new_sid(), self._new_table(descriptor.state_type == "map")
        cls = _STATE_CLASSES[descriptor.state_type]
        st = cls(self, descriptor, sid, table)
        self.states[name] = st
        if (<State>st).cleanup_every_record:
            self.every_record.append(st)
        return st

    cdef int new_sid(self) except -1:
        if self.next_sid >= 0xFFFF:
            raise StateError("a keyed backend holds at most 65535 states")
        self.next_sid += 1
        return self.next_sid - 1

    def _check_restored(self, dict meta, descriptor):
        """StateMigrationError unless descriptor is compatible with restored state meta."""
        name = descriptor.name
        if meta["type"] != descriptor.state_type:
            raise StateMigrationError(f"state {name!r} was checkpointed as {meta['type']} state and is now requested "
                                      f"as {descriptor.state_type} state; state types cannot be migrated")
        want = _serializer_ids(descriptor)
        for part in ("value_serializer", "user_key_serializer"):
            if meta.get(part) != want[part]:
                raise StateMigrationError(
                    f"state {name!r}: the {part.replace('_', ' ')} changed from {meta.get(part)} (in the checkpoint) "
                    f"to {want[part]}; restore with the serializer the state was written with (or bump a "
                    "serializer version only together with a migration)")

    def _restore_state(self, dict meta):
        """Register a state found in a checkpoint; returns (sid, table, layout) to load its records into."""
        name = meta["name"]
        if name in self.restored:
            old = self.restored[name][0]
            if {k: old.get(k) for k in ("type", "value_serializer", "user_key_serializer")} != \
                    {k: meta.get(k) for k in ("type", "value_serializer", "user_key_serializer")}:
                raise StateMigrationError(f"state {name!r} differs between the checkpoints being restored: "
                                          f"{old} vs {meta}")
            _, sid, table = self.restored[name]
        else:
            if meta.get("type") not in _LAYOUTS:
                raise CorruptCheckpointError(f"state {name!r} has unknown type {meta.get('type')!r}")
            sid, table = self.new_sid(), self._new_table(meta["type"] == "map")
            self.restored[name] = [meta, sid, table]
        return sid, table, _LAYOUTS[meta["type"]]

    def _snapshot_tables(self):
        """[(meta dict, layout, StateTable)] of every state, restored-but-unclaimed ones included."""
        self.check_open()
        out = []
        for name, st in self.states.items():
            d = (<State>st).descriptor
            meta = {"name": name, "sid": (<State>st).sid, "type": d.state_type,
                    "ttl": d.ttl_config.to_dict() if d.ttl_config is not None else None}
            meta.update(_serializer_ids(d))
            out.append((meta, (<State>st).layout, (<State>st).table))
        for name, (meta, sid, table) in self.restored.items():
            m = dict(meta)
            m["sid"] = sid
            out.append((m, _LAYOUTS[meta["type"]], table))
        return out

    def _now_ms(self):
        return self.now()

    # -- incremental checkpoints: the set of (state, key, namespace) prefixes touched since the last one

    def _enable_incremental(self):
        """Track touched prefixes so that checkpoints can upload only what changed (LMDB tier option)."""
        if self.dirty is NULL:
            self.dirty = sc_table_new(1024, 0)
            if self.dirty is NULL:
                raise MemoryError()
            self.dirty_epoch = 1

    @property
    def incremental(self):
        return self.dirty is not NULL

    cdef int mark_dirty(self, const uint8_t *p, size_t pl, uint32_t h) except -1:
        return check(sc_table_put(self.dirty, p, pl, h, NULL, 0, 0, NULL))

    def _take_dirty(self):
        """The touched prefixes (list of bytes), resetting the set: the start of the next delta."""
        cdef size_t pos = 0
        cdef sc_entry *e
        out = []
        if self.dirty is NULL:
            return out
        while True:
            e = sc_table_next(self.dirty, &pos)
            if e is NULL:
                break
            out.append(as_bytes(sc_entry_key(e), e.klen))
        sc_table_clear(self.dirty)
        self.dirty_epoch += 1
        return out

    def checkpoint(self, checkpoint_id):
        """Take a checkpoint into the backend's checkpoint storage; durable when it returns.

        Returns a ``CompletedCheckpoint``.  See statecore/checkpoint/snapshot.py.
        """
        from statecore.checkpoint.snapshot import checkpoint
        return checkpoint(self, checkpoint_id)

    def checkpoint_async(self, checkpoint_id):
        """Take the consistent cut now; write it in the background.  Returns a Future."""
        from statecore.checkpoint.snapshot import checkpoint_async
        return checkpoint_async(self, checkpoint_id)

    def savepoint(self, uri):
        """Write a canonical, self-contained savepoint to ``uri`` (restorable into any backend)."""
        from statecore.checkpoint.snapshot import savepoint
        return savepoint(self, uri)

    def get_keys(self, state_name, namespace=None):
        """Iterator over the keys with an entry in ``state_name`` under ``namespace``.

        As in Flink, keys whose entries have expired but are not yet cleaned up
        may appear.  The keys are a snapshot taken when this is called.
        """
        cdef sc_buf ns
        self.check_open()
        st = self.states.get(state_name)
        if st is not None:
            table = (<State>st).table
        elif state_name in self.restored:
            table = self.restored[state_name][2]
        else:
            raise StateError(f"no state named {state_name!r} is registered; call get_state(descriptor) first")
        buf_init(&ns)
        try:
            self.ns_serializer.encode_key(namespace, &ns)
            raw = (<StateTable>table).key_bytes(ns.data, ns.len)
        finally:
            sc_buf_free(&ns)
        ks = self.key_serializer
        return iter([ks.deserialize(k) for k in raw])

    def num_state_entries(self):
        """Entries stored (expired-but-not-cleaned included): one per (state, key,
        namespace) for value/list/reducing/aggregating states, one per map entry.
        Restored states not yet requested with ``get_state`` count too."""
        self.check_open()
        return sum((<State>s).table.count() for s in self.states.values()) + \
            sum((<StateTable>r[2]).count() for r in self.restored.values())

    def _bytes_in_memory(self):
        return sum((<State>s).table.nbytes() for s in self.states.values()) + \
            self.kbuf.cap + self.tmpbuf.cap + self.vbuf.cap + self.rbuf.cap + self.ubuf.cap

    def metrics(self):
        """Counters: entries, bytes_in_memory, bytes_on_disk, flushes, ttl_expired, states."""
        self.check_open()
        return {
            "entries": self.num_state_entries(),
            "bytes_in_memory": self._bytes_in_memory(),
            "bytes_on_disk": 0,
            "flushes": 0,
            "stalls": 0,
            "cache_hits": 0,
            "cache_misses": 0,
            "ttl_expired": self.ttl_expired,
            "states": len(self.states),
        }

    @property
    def state_names(self):
        return list(self.states)

    def close(self):
        """Release all state memory.  Idempotent; any later use raises BackendClosedError."""
        if self.closed:
            return
        self.closed = True
        for st in self.states.values():
            (<State>st).table.release()
        for r in self.restored.values():
            (<StateTable>r[2]).release()
        self.every_record = []
        executor = getattr(self.chain, "executor", None)
        if executor is not None:
            # Pending asynchronous checkpoints work on copies and finish; no new ones start.
            executor.shutdown(wait=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


# ------------------------------------------------------------------ states

cdef class State:
    """Base of the five state types: current namespace, prefix cache, TTL settings."""
    cdef KeyedStateBackend backend
    cdef StateTable table
    cdef readonly object descriptor
    cdef readonly str name
    cdef uint16_t sid
    cdef Serializer vser
    cdef object ns
    cdef sc_buf nsbuf
    cdef sc_buf pbuf
    cdef uint32_t phash
    cdef uint64_t pver
    cdef int64_t ttl
    cdef bint update_on_read
    cdef bint return_expired
    cdef size_t cleanup_size
    cdef bint cleanup_every_record
    cdef int layout
    cdef int64_t now   # clock reading of the current access (read once per access when TTL is on)
    cdef uint64_t dirty_epoch  # backend dirty epoch in which the current prefix was marked (0: not marked)

    def __cinit__(self, *args, **kwargs):
        buf_init(&self.nsbuf)
        buf_init(&self.pbuf)

    def __init__(self, KeyedStateBackend backend, descriptor, int sid, StateTable table):
        self.backend = backend
        self.table = table
        self.descriptor = descriptor
        self.name = descriptor.name
        self.sid = sid
        self.vser = descriptor.value_serializer
        backend.ns_serializer.encode_key(None, &self.nsbuf)
        cfg = descriptor.ttl_config
        if cfg is not None:
            self.ttl = cfg.ttl_ms
            self.update_on_read = cfg.update_on_read
            self.return_expired = cfg.return_expired
            size, every = cfg.effective_incremental_cleanup()
            self.cleanup_size = size
            self.cleanup_every_record = every and size > 0

    def __dealloc__(self):
        sc_buf_free(&self.nsbuf)
        sc_buf_free(&self.pbuf)

    cdef inline int prepare(self) except -1:
        """Check the backend and current key; refresh the cached prefix; run incremental cleanup."""
        cdef KeyedStateBackend b = self.backend
        if b.closed:
            raise BackendClosedError("this keyed state backend is closed; create or restore a new one")
        if not b.has_key:
            raise StateError(f"state {self.name!r} used with no current key: call set_current_key(key) first")
        if self.pver != b.key_version:
            check(sc_kc_build_prefix(&self.pbuf, <uint16_t>b.cur_kg, self.sid, b.kbuf.data, b.kbuf.len,
                                     self.nsbuf.data, self.nsbuf.len))
            self.phash = sc_table_hash(self.pbuf.data, self.pbuf.len)
            self.pver = b.key_version
            self.dirty_epoch = 0
        if b.dirty is not NULL and self.dirty_epoch != b.dirty_epoch:
            # Incremental checkpoints: every accessed (key, namespace) goes into the next delta
            # (reads included: they may refresh or drop TTL entries; over-approximation is safe).
            b.mark_dirty(self.pbuf.data, self.pbuf.len, self.phash)
            self.dirty_epoch = b.dirty_epoch
        if self.ttl:
            self.now = b.now()
            if self.cleanup_size:
                b.ttl_expired += self.table.cleanup(self.cleanup_size, self.ttl, self.now, self.layout, &b.rbuf)
        return 0

    cdef int run_cleanup(self) except -1:
        """Per-record incremental cleanup (cleanup_incrementally(..., every_record=True))."""
        self.backend.ttl_expired += self.table.cleanup(self.cleanup_size, self.ttl, self.backend.now(),
                                                       self.layout, &self.backend.rbuf)
        return 0

    def set_current_namespace(self, namespace):
        """Select the namespace (default None) of this state for later calls."""
        cdef sc_buf nb
        if self.backend.closed:
            raise BackendClosedError("this keyed state backend is closed; create or restore a new one")
        buf_init(&nb)
        try:
            self.backend.ns_serializer.encode_key(namespace, &nb)
        except BaseException:
            sc_buf_free(&nb)
            raise
        sc_buf_free(&self.nsbuf)
        self.nsbuf = nb
        self.ns = namespace
        self.pver = 0

    def get_current_namespace(self):
        return self.ns

    cdef int encode_value(self, object value) except -1:
        self.backend.vbuf.len = 0
        return self.vser.encode(value, &self.backend.vbuf)

    cdef inline int64_t write_ts(self) noexcept:
        return self.now if self.ttl else 0

    cdef object read_single(self, bint *found):
        """Read the value-like entry of the current key/namespace with Flink's TTL rules."""
        cdef const uint8_t *v
        cdef size_t vl
        cdef int64_t ts, now
        if not self.table.get(self.pbuf.data, self.pbuf.len, self.phash, &v, &vl, &ts):
            found[0] = False
            return None
        if self.ttl:
            now = self.now
            if sc_ttl_expired(ts, self.ttl, now):
                result = self.vser.decode(v, vl) if self.return_expired else None
                self.table.remove(self.pbuf.data, self.pbuf.len, self.phash)
                self.backend.ttl_expired += 1
                found[0] = self.return_expired
                return result
            if self.update_on_read:
                result = self.vser.decode(v, vl)
                self.table.touch(self.pbuf.data, self.pbuf.len, self.phash, now)
                found[0] = True
                return result
        found[0] = True
        return self.vser.decode(v, vl)

    cdef int write_single(self, object value) except -1:
        self.encode_value(value)
        return self.table.put(self.pbuf.data, self.pbuf.len, self.phash, self.backend.vbuf.data,
                              self.backend.vbuf.len, self.write_ts())

    def clear(self):
        """Remove the state of the current key and namespace."""
        self.prepare()
        if self.layout == LAYOUT_MAP:
            self.table.mclear(self.pbuf.data, self.pbuf.len, self.phash)
        else:
            self.table.remove(self.pbuf.data, self.pbuf.len, self.phash)

    def __repr__(self):
        return f"<{type(self).__name__} {self.name!r}>"


cdef class ValueState(State):
    """One value per key and namespace (Flink's ValueState)."""
    cdef object default

    def __init__(self, KeyedStateBackend backend, descriptor, int sid, StateTable table):
        State.__init__(self, backend, descriptor, sid, table)
        self.default = descriptor.default
        self.layout = LAYOUT_VALUE

    def value(self):
        """The stored value, else the descriptor's default (None unless given)."""
        cdef bint found
        self.prepare()
        result = self.read_single(&found)
        return result if found else self.default

    def update(self, value):
        """Store ``value``; ``update(None)`` is ``clear()``."""
        self.prepare()
        if value is None:
            self.table.remove(self.pbuf.data, self.pbuf.len, self.phash)
            return
        self.write_single(value)

    # -- batch access -------------------------------------------------------

    cdef int batch_keys(self, keys, sc_buf *out, list prefixes) except -1:
        """Serialize and range-check every key first (so bad input changes nothing)."""
        cdef KeyedStateBackend b = self.backend
        cdef sc_buf kb
        cdef int32_t kg
        buf_init(&kb)
        try:
            for key in keys:
                kb.len = 0
                b.key_serializer.encode_key(key, &kb)
                kg = sc_key_group(kb.data, kb.len, b.max_parallelism)
                if kg < b.kg_start or kg > b.kg_end:
                    raise KeyGroupOutOfRangeError(
                        f"key {key!r:.80} belongs to key group {kg}, outside this backend's {b.key_group_range}; "
                        "nothing was changed")
                check(sc_kc_build_prefix(out, <uint16_t>kg, self.sid, kb.data, kb.len, self.nsbuf.data,
                                         self.nsbuf.len))
                prefixes.append(as_bytes(out.data, out.len))
        finally:
            sc_buf_free(&kb)
        return 0

    cdef int mark_batch_dirty(self, keys) except -1:
        """Incremental checkpoints: put the prefixes of every key of a batch into the dirty set."""
        cdef list prefixes = []
        cdef bytes p
        self.batch_keys(keys.tolist() if isinstance(keys, np.ndarray) else keys, &self.backend.rbuf, prefixes)
        for p in prefixes:
            self.backend.mark_dirty(<const uint8_t *>PyBytes_AS_STRING(p), PyBytes_GET_SIZE(p),
                                    sc_table_hash(<const uint8_t *>PyBytes_AS_STRING(p), PyBytes_GET_SIZE(p)))
        return 0

    cdef int fast_kind(self, keys):
        """Value kind when the int64 fast path applies (keys an integer ndarray), else 0."""
        if self.vser.kind != KIND_FLOAT64 and self.vser.kind != KIND_INT64:
            return 0
        if self.backend.key_serializer.kind != KIND_AUTO and self.backend.key_serializer.kind != KIND_INT64:
            return 0
        if not isinstance(keys, np.ndarray) or keys.ndim != 1 or keys.dtype.kind not in "iu":
            return 0
        if keys.dtype.kind == "u" and keys.size and keys.max() > np.iinfo(np.int64).max:
            return 0
        return self.vser.kind

    def update_batch(self, keys, values):
        """``update`` for many keys (current namespace), without changing the current key.

        Keys and values may be sequences or NumPy arrays of equal length.  With
        an Int64/Float64 value serializer and an integer key array the loop runs
        in C.  All keys are checked before anything is written: a key outside
        the key-group range raises ``KeyGroupOutOfRangeError`` and changes
        nothing.  A ``None`` value clears that key.  Duplicate keys: the last wins.
        """
        self.backend.check_open()
        if self.ttl:
            self.now = self.backend.now()
        if self.backend.dirty is not NULL:
            self.mark_batch_dirty(keys)
        if len(keys) != len(values):
            raise ValueError(f"update_batch needs as many values as keys ({len(values)} != {len(keys)})")
        kind = self.fast_kind(keys)
        if kind and isinstance(values, np.ndarray) and values.ndim == 1 and \
                (values.dtype.kind == "f" if kind == KIND_FLOAT64 else values.dtype.kind in "iu"):
            self.update_batch_fast(np.ascontiguousarray(keys, dtype=np.int64),
                                   np.ascontiguousarray(values, dtype=np.float64 if kind == KIND_FLOAT64
                                                        else np.int64), kind)
            return
        self.update_batch_generic(keys, values)

    cdef int update_batch_generic(self, keys, values) except -1:
        cdef list prefixes = []
        cdef bytes p, v
        cdef int64_t ts
        cdef list encoded = []
        self.batch_keys(keys, &self.backend.rbuf, prefixes)
        for value in values:
            encoded.append(None if value is None else self.vser.serialize(value))
        ts = self.write_ts()
        for i in range(len(prefixes)):
            p = prefixes[i]
            if encoded[i] is None:
                self.table.remove(<const uint8_t *>PyBytes_AS_STRING(p), PyBytes_GET_SIZE(p),
                                  sc_table_hash(<const uint8_t *>PyBytes_AS_STRING(p), PyBytes_GET_SIZE(p)))
            else:
                v = encoded[i]
                self.table.put(<const uint8_t *>PyBytes_AS_STRING(p), PyBytes_GET_SIZE(p),
                               sc_table_hash(<const uint8_t *>PyBytes_AS_STRING(p), PyBytes_GET_SIZE(p)),
                               <const uint8_t *>PyBytes_AS_STRING(v), PyBytes_GET_SIZE(v), ts)
        return 0

    def value_batch(self, keys, fill=_MISSING):
        """``value()`` for many keys (current namespace), without changing the current key.

        Missing (or expired, under NeverReturnExpired) keys take ``fill``, which
        defaults to the descriptor's default.  With an Int64/Float64 value
        serializer and an integer key array the result is an ndarray of that
        dtype: when the default fill is None, a float64 result uses NaN and an
        int64 result raises ``StateError`` if a key is missing (pass ``fill=``).
        Otherwise the result is a list with ``fill`` (None) for missing keys.
        Reads obey TTL exactly as ``value()`` does.
        """
        self.backend.check_open()
        if self.backend.dirty is not NULL and self.ttl:
            self.mark_batch_dirty(keys)  # TTL reads may refresh or drop entries
        if fill is _MISSING:
            fill = self.default
        kind = self.fast_kind(keys)
        if kind:
            return self.value_batch_fast(np.ascontiguousarray(keys, dtype=np.int64), kind, fill)
        out = self.value_batch_generic(keys, fill)
        if isinstance(keys, np.ndarray) and self.vser.kind in (KIND_FLOAT64, KIND_INT64):
            return typed_result(out, self.vser.kind, fill, "value_batch")
        return out

    cdef list value_batch_generic(self, keys, fill):
        cdef list prefixes = []
        cdef bytes p
        cdef const uint8_t *v
        cdef size_t vl
        cdef int64_t ts, now = 0
        cdef uint32_t h
        self.batch_keys(keys, &self.backend.rbuf, prefixes)
        if self.ttl:
            now = self.backend.now()
        out = []
        for p in prefixes:
            h = sc_table_hash(<const uint8_t *>PyBytes_AS_STRING(p), PyBytes_GET_SIZE(p))
            if not self.table.get(<const uint8_t *>PyBytes_AS_STRING(p), PyBytes_GET_SIZE(p), h, &v, &vl, &ts):
                out.append(fill)
                continue
            if self.ttl and sc_ttl_expired(ts, self.ttl, now):
                out.append(self.vser.decode(v, vl) if self.return_expired else fill)
                self.table.remove(<const uint8_t *>PyBytes_AS_STRING(p), PyBytes_GET_SIZE(p), h)
                self.backend.ttl_expired += 1
                continue
            out.append(self.vser.decode(v, vl))
            if self.ttl and self.update_on_read:
                self.table.touch(<const uint8_t *>PyBytes_AS_STRING(p), PyBytes_GET_SIZE(p), h, now)
        return out

    cdef size_t fast_key_width(self):
        # kg + sid | varint(key len) | key (Auto: tag + 8, Int64: 8) | varint(ns len) | ns
        return SC_KC_HEAD + 1 + 9 + SC_VARINT_MAX + self.nsbuf.len

    cdef int check_fast_keys(self, const int64_t[::1] keys, uint16_t *kgs) except -1:
        """Key groups of every key; raises before anything changes if one is not owned."""
        cdef KeyedStateBackend b = self.backend
        cdef Py_ssize_t i, n = keys.shape[0], bad = -1
        cdef bint auto = b.key_serializer.kind == KIND_AUTO
        cdef uint8_t kb[9]
        cdef int32_t kg = 0
        with nogil:
            for i in range(n):
                if auto:
                    kb[0] = TAG_INT64
                    sc_be64_put(kb + 1, (<uint64_t>keys[i]) ^ SIGN)
                    kg = sc_key_group(kb, 9, b.max_parallelism)
                else:
                    sc_be64_put(kb, <uint64_t>keys[i])
                    kg = sc_key_group(kb, 8, b.max_parallelism)
                if kg < b.kg_start or kg > b.kg_end:
                    bad = i
                    break
                kgs[i] = <uint16_t>kg
        if bad >= 0:
            raise KeyGroupOutOfRangeError(
                f"key {keys[bad]} (index {bad}) belongs to key group {kg}, outside this backend's "
                f"{b.key_group_range}; nothing was changed")
        return 0

    cdef int batch_scratch(self, const int64_t[::1] keys, size_t kw, size_t block, uint16_t **kgs,
                           uint8_t **blk) except -1:
        """The fast paths' scratch: key groups of every key (checked: nothing changes if one is not
        owned) and room for one block of composite keys.  The caller frees both."""
        kgs[0] = <uint16_t *>malloc(keys.shape[0] * sizeof(uint16_t))
        blk[0] = <uint8_t *>malloc(block * kw)
        if kgs[0] is NULL or blk[0] is NULL:
            free(kgs[0])
            free(blk[0])
            raise MemoryError()
        try:
            self.check_fast_keys(keys, kgs[0])
        except BaseException:
            free(kgs[0])
            free(blk[0])
            raise
        return 0

    cdef inline size_t build_fast_key(self, uint8_t *out, int64_t key, uint16_t kg, bint auto) noexcept nogil:
        cdef size_t n = SC_KC_HEAD
        sc_be16_put(out, kg)
        sc_be16_put(out + 2, self.sid)
        if auto:
            out[n] = 9
            out[n + 1] = TAG_INT64
            sc_be64_put(out + n + 2, (<uint64_t>key) ^ SIGN)
            n += 10
        else:
            out[n] = 8
            sc_be64_put(out + n + 1, <uint64_t>key)
            n += 9
        n += sc_varint_put(out + n, self.nsbuf.len)
        if self.nsbuf.len:
            memcpy(out + n, self.nsbuf.data, self.nsbuf.len)
        return n + self.nsbuf.len

    cdef int update_batch_fast(self, const int64_t[::1] keys, values, int kind) except -1:
        if type(self.table) is not HeapStateTable:
            return self.update_batch_table(keys, values, kind)
        cdef Py_ssize_t i, j, m, base, n = keys.shape[0]
        cdef sc_table *t = (<HeapStateTable>self.table).t
        cdef const double[::1] fv
        cdef const int64_t[::1] iv
        cdef uint16_t *kgs = NULL
        cdef uint8_t *blk = NULL
        cdef uint32_t hs[BATCH_BLOCK]
        cdef size_t kw = self.fast_key_width(), kl = 0
        cdef bint auto = self.backend.key_serializer.kind == KIND_AUTO
        cdef uint8_t vb[8]
        cdef uint64_t bits
        cdef int64_t ts = self.write_ts()
        cdef sc_status st = SC_OK
        if n == 0:
            return 0
        if kind == KIND_FLOAT64:
            fv = values
        else:
            iv = values
        self.batch_scratch(keys, kw, BATCH_BLOCK, &kgs, &blk)
        try:
            with nogil:
                base = 0
                while base < n and st == SC_OK:
                    m = min(BATCH_BLOCK, n - base)
                    # Pass 1: build and hash a block of keys...
                    for j in range(m):
                        kl = self.build_fast_key(blk + j * kw, keys[base + j], kgs[base + j], auto)
                        hs[j] = sc_table_hash(blk + j * kw, kl)
                    # ...pass 2: probe, prefetching PREFETCH_AHEAD keys ahead so the cache misses overlap.
                    for j in range(min(m, PREFETCH_AHEAD)):
                        sc_table_prefetch(t, hs[j])
                    for j in range(m):
                        if j + PREFETCH_AHEAD < m:
                            sc_table_prefetch(t, hs[j + PREFETCH_AHEAD])
                        i = base + j
                        if kind == KIND_FLOAT64:
                            memcpy(&bits, &fv[i], 8)
                        else:
                            bits = <uint64_t>iv[i]
                        sc_be64_put(vb, bits)
                        st = sc_table_put(t, blk + j * kw, kl, hs[j], vb, 8, ts, NULL)
                        if st != SC_OK:
                            break
                    base += m
            check(st)
        finally:
            free(kgs)
            free(blk)
        return 0

    cdef object value_batch_fast(self, const int64_t[::1] keys, int kind, fill):
        if type(self.table) is not HeapStateTable:
            return self.value_batch_table(keys, kind, fill)
        cdef Py_ssize_t i, j, m, base, n = keys.shape[0], missing = 0
        cdef sc_table *t = (<HeapStateTable>self.table).t
        cdef uint16_t *kgs = NULL
        cdef uint8_t *blk = NULL
        cdef uint32_t hs[BATCH_BLOCK]
        cdef size_t kw = self.fast_key_width(), kl = 0
        cdef bint auto = self.backend.key_serializer.kind == KIND_AUTO
        cdef bint has_fill = fill is not None
        cdef double ffill = NAN
        cdef int64_t ifill = 0, ttl = self.ttl, now = 0
        cdef bint ret_exp = self.return_expired, upd = self.update_on_read
        cdef long expired = 0
        cdef uint64_t bits
        cdef sc_entry *e
        cdef bint corrupt = False
        if kind == KIND_FLOAT64:
            out = np.empty(n, dtype=np.float64)
            if has_fill:
                ffill = float(fill)
        else:
            out = np.empty(n, dtype=np.int64)
            if has_fill:
                ifill = int(fill)
        cdef double[::1] fo
        cdef int64_t[::1] io
        if kind == KIND_FLOAT64:
            fo = out
        else:
            io = out
        if n == 0:
            return out
        if ttl:
            now = self.backend.now()
        self.batch_scratch(keys, kw, BATCH_BLOCK, &kgs, &blk)
        try:
            with nogil:
                base = 0
                while base < n and not corrupt:
                    m = min(BATCH_BLOCK, n - base)
                    for j in range(m):
                        kl = self.build_fast_key(blk + j * kw, keys[base + j], kgs[base + j], auto)
                        hs[j] = sc_table_hash(blk + j * kw, kl)
                    for j in range(min(m, PREFETCH_AHEAD)):
                        sc_table_prefetch(t, hs[j])
                    for j in range(m):
                        if j + PREFETCH_AHEAD < m:
                            sc_table_prefetch(t, hs[j + PREFETCH_AHEAD])
                        i = base + j
                        e = sc_table_find(t, blk + j * kw, kl, hs[j])
                        if e is not NULL and e.vlen != 8:
                            corrupt = True
                            break
                        if e is not NULL and ttl and sc_ttl_expired(e.ts, ttl, now):
                            expired += 1
                            if not ret_exp:
                                sc_table_delete_entry(t, e)
                                e = NULL
                            else:
                                bits = sc_be64_get(sc_entry_value(e))
                                sc_table_delete_entry(t, e)
                                if kind == KIND_FLOAT64:
                                    memcpy(&fo[i], &bits, 8)
                                else:
                                    io[i] = <int64_t>bits
                                continue
                        if e is NULL:
                            missing += 1
                            if kind == KIND_FLOAT64:
                                fo[i] = ffill
                            else:
                                io[i] = ifill
                            continue
                        if ttl and upd:
                            e.ts = now
                        bits = sc_be64_get(sc_entry_value(e))
                        if kind == KIND_FLOAT64:
                            memcpy(&fo[i], &bits, 8)
                        else:
                            io[i] = <int64_t>bits
                    base += m
        finally:
            free(kgs)
            free(blk)
        self.backend.ttl_expired += expired
        if corrupt:
            raise StateError(f"state {self.name!r}: stored value is not 8 bytes; it was not written by "
                             f"{type(self.vser).__name__}")
        if missing and kind == KIND_INT64 and not has_fill:
            raise StateError(f"value_batch: {missing} key(s) have no value and an int64 array cannot hold None; "
                             "pass fill=<int> (or give the descriptor a default)")
        return out

    # Other tables (the LMDB tier): the same key encoding, in blocks through StateTable.put_batch/get_batch.

    cdef int update_batch_table(self, const int64_t[::1] keys, values, int kind) except -1:
        cdef Py_ssize_t j, m, base, n = keys.shape[0]
        cdef const double[::1] fv
        cdef const int64_t[::1] iv
        cdef uint16_t *kgs = NULL
        cdef uint8_t *blk = NULL
        cdef uint8_t vb[8 * BATCH_BLOCK]
        cdef uint32_t hs[BATCH_BLOCK]
        cdef size_t kw = self.fast_key_width(), kl = 0
        cdef bint auto = self.backend.key_serializer.kind == KIND_AUTO
        cdef uint64_t bits
        cdef int64_t ts = self.write_ts()
        if n == 0:
            return 0
        if kind == KIND_FLOAT64:
            fv = values
        else:
            iv = values
        self.batch_scratch(keys, kw, BATCH_BLOCK, &kgs, &blk)
        try:
            base = 0
            while base < n:
                m = min(BATCH_BLOCK, n - base)
                for j in range(m):
                    kl = self.build_fast_key(blk + j * kw, keys[base + j], kgs[base + j], auto)
                    hs[j] = sc_table_hash(blk + j * kw, kl)
                    if kind == KIND_FLOAT64:
                        memcpy(&bits, &fv[base + j], 8)
                    else:
                        bits = <uint64_t>iv[base + j]
                    sc_be64_put(vb + 8 * j, bits)
                self.table.put_batch(blk, kw, kl, hs, m, vb, 8, ts)
                base += m
        finally:
            free(kgs)
            free(blk)
        return 0

    cdef object value_batch_table(self, const int64_t[::1] keys, int kind, fill):
        cdef Py_ssize_t i, j, m, base, n = keys.shape[0], missing = 0
        cdef uint16_t *kgs = NULL
        cdef uint8_t *blk = NULL
        cdef uint8_t vb[8 * BATCH_BLOCK]
        cdef uint8_t found[BATCH_BLOCK]
        cdef int64_t tss[BATCH_BLOCK]
        cdef uint32_t hs[BATCH_BLOCK]
        cdef size_t kw = self.fast_key_width(), kl = 0
        cdef bint auto = self.backend.key_serializer.kind == KIND_AUTO
        cdef bint has_fill = fill is not None
        cdef double ffill = NAN
        cdef int64_t ifill = 0, ttl = self.ttl, now = 0
        cdef Py_ssize_t block = 1 if ttl else BATCH_BLOCK  # TTL: key by key (an expired read removes it)
        cdef uint64_t bits
        cdef double[::1] fo
        cdef int64_t[::1] io
        if kind == KIND_FLOAT64:
            out = np.empty(n, dtype=np.float64)
            fo = out
            if has_fill:
                ffill = float(fill)
        else:
            out = np.empty(n, dtype=np.int64)
            io = out
            if has_fill:
                ifill = int(fill)
        if n == 0:
            return out
        if ttl:
            now = self.backend.now()
        self.batch_scratch(keys, kw, BATCH_BLOCK, &kgs, &blk)
        try:
            base = 0
            while base < n:
                m = min(block, n - base)
                for j in range(m):
                    kl = self.build_fast_key(blk + j * kw, keys[base + j], kgs[base + j], auto)
                    hs[j] = sc_table_hash(blk + j * kw, kl)
                self.table.get_batch(blk, kw, kl, hs, m, vb, 8, tss, found)
                for j in range(m):
                    i = base + j
                    if found[j] == 2:
                        raise StateError(f"state {self.name!r}: stored value is not 8 bytes; it was not written "
                                         f"by {type(self.vser).__name__}")
                    if found[j] and ttl:
                        if sc_ttl_expired(tss[j], ttl, now):
                            self.table.remove(blk + j * kw, kl, hs[j])
                            self.backend.ttl_expired += 1
                            if not self.return_expired:
                                found[j] = 0
                        elif self.update_on_read:
                            self.table.touch(blk + j * kw, kl, hs[j], now)
                    if not found[j]:
                        missing += 1
                        if kind == KIND_FLOAT64:
                            fo[i] = ffill
                        else:
                            io[i] = ifill
                        continue
                    bits = sc_be64_get(vb + 8 * j)
                    if kind == KIND_FLOAT64:
                        memcpy(&fo[i], &bits, 8)
                    else:
                        io[i] = <int64_t>bits
                base += m
        finally:
            free(kgs)
            free(blk)
        if missing and kind == KIND_INT64 and not has_fill:
            raise StateError(f"value_batch: {missing} key(s) have no value and an int64 array cannot hold None; "
                             "pass fill=<int> (or give the descriptor a default)")
        return out


cdef class ListState(State):
    """A list of elements per key and namespace (Flink's ListState).

    ``add`` appends a record in C without rewriting the stored list.  ``None``
    elements are refused with ``ValueError`` (nothing changes).  With TTL,
    every element expires on its own.
    """

    def __init__(self, KeyedStateBackend backend, descriptor, int sid, StateTable table):
        State.__init__(self, backend, descriptor, sid, table)
        self.layout = LAYOUT_LIST

    cdef int encode_records(self, values) except -1:
        """Encode values into backend.rbuf as records (nothing is stored yet)."""
        cdef KeyedStateBackend b = self.backend
        cdef int64_t ts = self.write_ts()
        b.rbuf.len = 0
        for v in values:
            if v is None:
                raise ValueError(f"ListState {self.name!r}: None is not a valid list element; nothing was changed")
            b.vbuf.len = 0
            self.vser.encode(v, &b.vbuf)
            append_record(&b.rbuf, ts, b.vbuf.data, b.vbuf.len)
        return 0

    def get(self):
        """The elements as a new list (empty when nothing is stored)."""
        cdef const uint8_t *v
        cdef const uint8_t *p
        cdef const uint8_t *el = NULL
        cdef size_t vl = 0, ell = 0
        cdef int64_t ts = 0, ets = 0, now = 0
        cdef long expired = 0
        cdef KeyedStateBackend b = self.backend
        self.prepare()
        if not self.table.get(self.pbuf.data, self.pbuf.len, self.phash, &v, &vl, &ts):
            return []
        out = []
        if not self.ttl:
            p = v
            while next_record(&p, v + vl, &ets, &el, &ell):
                out.append(self.vser.decode(el, ell))
            return out
        now = self.now
        b.rbuf.len = 0
        p = v
        while next_record(&p, v + vl, &ets, &el, &ell):
            if sc_ttl_expired(ets, self.ttl, now):
                expired += 1
                if self.return_expired:
                    out.append(self.vser.decode(el, ell))
            else:
                out.append(self.vser.decode(el, ell))
                append_record(&b.rbuf, now if self.update_on_read else ets, el, ell)
        if expired or self.update_on_read:
            b.ttl_expired += expired
            if b.rbuf.len == 0:
                self.table.remove(self.pbuf.data, self.pbuf.len, self.phash)
            else:
                self.table.put(self.pbuf.data, self.pbuf.len, self.phash, b.rbuf.data, b.rbuf.len, ts)
        return out

    def add(self, value):
        """Append one element (amortised O(1): the stored list is not rewritten)."""
        self.prepare()
        if value is None:
            raise ValueError(f"ListState {self.name!r}: None is not a valid list element; nothing was changed")
        self.encode_records((value,))
        self.table.append(self.pbuf.data, self.pbuf.len, self.phash, self.backend.rbuf.data,
                          self.backend.rbuf.len, 0)

    def add_all(self, values):
        """Append every element of ``values`` (all are checked before anything is stored)."""
        self.prepare()
        self.encode_records(list(values))
        if self.backend.rbuf.len:
            self.table.append(self.pbuf.data, self.pbuf.len, self.phash, self.backend.rbuf.data,
                              self.backend.rbuf.len, 0)

    def update(self, values):
        """Replace the list with ``values``; an empty iterable clears it."""
        self.prepare()
        self.encode_records(list(values))
        if self.backend.rbuf.len:
            self.table.put(self.pbuf.data, self.pbuf.len, self.phash, self.backend.rbuf.data,
                           self.backend.rbuf.len, 0)
        else:
            self.table.remove(self.pbuf.data, self.pbuf.len, self.phash)


cdef class MapState(State):
    """A map of user keys to values per key and namespace (Flink's MapState).

    User keys are serialized with the descriptor's key serializer and must be
    valid keys (no dict, no NaN).  Values may be None (as in Flink).
    ``items()``/``keys()``/``values()`` return lists: a snapshot, safe to use
    while the state changes.  Heap order is unspecified; the LMDB tier returns
    serialized-key order.  With TTL, every entry expires on its own.
    """
    cdef Serializer kser

    def __init__(self, KeyedStateBackend backend, descriptor, int sid, StateTable table):
        State.__init__(self, backend, descriptor, sid, table)
        self.kser = descriptor.key_serializer
        self.layout = LAYOUT_MAP

    cdef inline int encode_ukey(self, object k) except -1:
        self.backend.ubuf.len = 0
        return self.kser.encode_key(k, &self.backend.ubuf)

    cdef object read_entry(self, object k, bint *found):
        cdef const uint8_t *v
        cdef size_t vl
        cdef int64_t ts, now
        cdef sc_buf *u = &self.backend.ubuf
        self.encode_ukey(k)
        if not self.table.mget(self.pbuf.data, self.pbuf.len, self.phash, u.data, u.len, &v, &vl, &ts):
            found[0] = False
            return None
        if self.ttl:
            now = self.now
            if sc_ttl_expired(ts, self.ttl, now):
                result = self.vser.decode(v, vl) if self.return_expired else None
                self.table.mremove(self.pbuf.data, self.pbuf.len, self.phash, u.data, u.len)
                self.backend.ttl_expired += 1
                found[0] = self.return_expired
                return result
            if self.update_on_read:
                result = self.vser.decode(v, vl)
                self.table.mtouch(self.pbuf.data, self.pbuf.len, self.phash, u.data, u.len, now)
                found[0] = True
                return result
        found[0] = True
        return self.vser.decode(v, vl)

    def get(self, key):
        """The value for ``key``, or None when absent (or expired and hidden)."""
        cdef bint found
        self.prepare()
        return self.read_entry(key, &found)

    def contains(self, key):
        """True when ``key`` has a visible entry (a read: TTL rules apply)."""
        cdef bint found
        self.prepare()
        self.read_entry(key, &found)
        return found

    def __contains__(self, key):
        return self.contains(key)

    def put(self, key, value):
        """Store ``value`` under ``key``."""
        self.prepare()
        self.encode_ukey(key)
        self.encode_value(value)
        self.table.mput(self.pbuf.data, self.pbuf.len, self.phash, self.backend.ubuf.data, self.backend.ubuf.len,
                        self.backend.vbuf.data, self.backend.vbuf.len, self.write_ts())

    def put_all(self, mapping):
        """Store every item of ``mapping`` (all are serialized before anything is stored)."""
        self.prepare()
        items = mapping.items() if hasattr(mapping, "items") else mapping
        encoded = [(self.kser.serialize_key(k), self.vser.serialize(v)) for k, v in items]
        self.put_encoded(encoded)

    cdef int put_encoded(self, list encoded) except -1:
        cdef bytes k, v
        cdef int64_t ts = self.write_ts()
        for k, v in encoded:
            self.table.mput(self.pbuf.data, self.pbuf.len, self.phash,
                            <const uint8_t *>PyBytes_AS_STRING(k), PyBytes_GET_SIZE(k),
                            <const uint8_t *>PyBytes_AS_STRING(v), PyBytes_GET_SIZE(v), ts)
        return 0

    def remove(self, key):
        """Remove ``key`` (no error when absent)."""
        self.prepare()
        self.encode_ukey(key)
        self.table.mremove(self.pbuf.data, self.pbuf.len, self.phash, self.backend.ubuf.data,
                           self.backend.ubuf.len)

    cdef list visible(self):
        """[(user key bytes, value bytes)] of the current map, applying TTL per entry."""
        cdef list raw
        cdef bytes kb, vb
        cdef int64_t ts, now
        self.prepare()
        raw = self.table.mitems(self.pbuf.data, self.pbuf.len, self.phash)
        if not self.ttl:
            return [(kb, vb) for kb, vb, ts in raw]
        now = self.now
        out = []
        for kb, vb, ts in raw:
            if sc_ttl_expired(ts, self.ttl, now):
                self.table.mremove(self.pbuf.data, self.pbuf.len, self.phash,
                                   <const uint8_t *>PyBytes_AS_STRING(kb), PyBytes_GET_SIZE(kb))
                self.backend.ttl_expired += 1
                if not self.return_expired:
                    continue
            elif self.update_on_read:
                self.table.mtouch(self.pbuf.data, self.pbuf.len, self.phash,
                                  <const uint8_t *>PyBytes_AS_STRING(kb), PyBytes_GET_SIZE(kb), now)
            out.append((kb, vb))
        return out

    cdef inline object dk(self, bytes kb):
        return self.kser.decode(<const uint8_t *>PyBytes_AS_STRING(kb), PyBytes_GET_SIZE(kb))

    cdef inline object dv(self, bytes vb):
        return self.vser.decode(<const uint8_t *>PyBytes_AS_STRING(vb), PyBytes_GET_SIZE(vb))

    def items(self):
        """List of (key, value) pairs."""
        return [(self.dk(kb), self.dv(vb)) for kb, vb in self.visible()]

    def keys(self):
        """List of keys."""
        return [self.dk(kb) for kb, vb in self.visible()]

    def values(self):
        """List of values."""
        return [self.dv(vb) for kb, vb in self.visible()]

    def __iter__(self):
        return iter(self.keys())

    def is_empty(self):
        """True when the map has no visible entry."""
        return len(self.visible()) == 0

    def put_batch(self, user_keys, values):
        """``put`` for many user keys of the current key (all serialized before anything is stored)."""
        self.prepare()
        if len(user_keys) != len(values):
            raise ValueError(f"put_batch needs as many values as keys ({len(values)} != {len(user_keys)})")
        self.put_encoded([(self.kser.serialize_key(k), self.vser.serialize(v))
                          for k, v in zip(_py_items(user_keys), _py_items(values))])

    def get_batch(self, user_keys, fill=None):
        """``get`` for many user keys of the current key.

        Missing keys take ``fill`` (None).  With an Int64/Float64 value
        serializer and an ndarray of keys the result is an ndarray of that dtype
        (a float64 result uses NaN for missing keys when fill is None; an int64
        one raises ``StateError`` unless ``fill`` is given); otherwise a list.
        """
        cdef bint found
        cdef Py_ssize_t missing = 0
        self.prepare()
        out = []
        for k in _py_items(user_keys):
            v = self.read_entry(k, &found)
            if not found:
                missing += 1
                v = fill
            out.append(v)
        if isinstance(user_keys, np.ndarray) and self.vser.kind in (KIND_FLOAT64, KIND_INT64):
            return typed_result(out, self.vser.kind, fill, "get_batch")
        return out


cdef object typed_result(list out, int kind, fill, str what):
    """A batch read's list as the serializer's ndarray (float64: NaN for missing; int64: needs fill)."""
    if kind == KIND_FLOAT64:
        return np.array([np.nan if v is None else v for v in out], dtype=np.float64)
    missing = sum(v is None for v in out)
    if missing:
        raise StateError(f"{what}: {missing} key(s) have no value and an int64 array cannot hold None; "
                         "pass fill=<int> (or give the descriptor a default)")
    return np.array(out, dtype=np.int64)


cdef object _py_items(seq):
    """NumPy arrays yield NumPy scalars; turn them into Python objects once."""
    if isinstance(seq, np.ndarray):
        return seq.tolist()
    return seq


cdef class ReducingState(State):
    """One value per key and namespace, folded with ``reduce_function(acc, value)``.

    As in Flink's heap backend, ``add(None)`` clears the state.  ``get()`` is
    None when empty.
    """
    cdef object reduce_function

    def __init__(self, KeyedStateBackend backend, descriptor, int sid, StateTable table):
        State.__init__(self, backend, descriptor, sid, table)
        self.reduce_function = descriptor.reduce_function
        self.layout = LAYOUT_VALUE

    def get(self):
        """The folded value, or None when empty."""
        cdef bint found
        self.prepare()
        return self.read_single(&found)

    def add(self, value):
        """Fold ``value`` into the stored value (an expired one counts as absent
        under NeverReturnExpired, as Flink's TtlReduceFunction does)."""
        cdef bint found
        self.prepare()
        if value is None:
            self.table.remove(self.pbuf.data, self.pbuf.len, self.phash)
            return
        acc = self.read_single(&found)
        self.write_single(self.reduce_function(acc, value) if found else value)


cdef class AggregatingState(State):
    """An accumulator per key and namespace (Flink's AggregatingState).

    ``add(v)`` does ``acc = add(v, acc)`` starting from ``create_accumulator()``;
    ``get()`` is ``get_result(acc)``, or None when empty.  The descriptor's
    serializer serializes the accumulator.  ``add(None)`` clears, as in Flink's
    heap backend.
    """
    cdef object agg

    def __init__(self, KeyedStateBackend backend, descriptor, int sid, StateTable table):
        State.__init__(self, backend, descriptor, sid, table)
        self.agg = descriptor.aggregate_function
        self.layout = LAYOUT_VALUE

    def get(self):
        """``get_result`` of the accumulator, or None when empty."""
        cdef bint found
        self.prepare()
        acc = self.read_single(&found)
        return self.agg.get_result(acc) if found else None

    def add(self, value):
        """Add ``value`` into the accumulator."""
        cdef bint found
        self.prepare()
        if value is None:
            self.table.remove(self.pbuf.data, self.pbuf.len, self.phash)
            return
        acc = self.read_single(&found)
        if not found:
            acc = self.agg.create_accumulator()
        self.write_single(self.agg.add(value, acc))


_LAYOUTS = {"value": LAYOUT_VALUE, "reducing": LAYOUT_VALUE, "aggregating": LAYOUT_VALUE,
            "list": LAYOUT_LIST, "map": LAYOUT_MAP}


def _serializer_ids(descriptor):
    """The serializer identities a checkpoint records for a state (JSON-able lists)."""
    if descriptor.state_type == "map":
        return {"value_serializer": list(descriptor.value_serializer.identity()),
                "user_key_serializer": list(descriptor.key_serializer.identity())}
    return {"value_serializer": list(descriptor.value_serializer.identity()), "user_key_serializer": None}


_STATE_CLASSES = {
    "value": ValueState,
    "list": ListState,
    "map": MapState,
    "reducing": ReducingState,
    "aggregating": AggregatingState,
}
